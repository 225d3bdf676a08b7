package azcred

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
)

// Outside Azure no identity yields a token: the chain must say so promptly
// instead of hanging, naming the identities it tried.
func TestChainFailsClearlyOutsideAzure(t *testing.T) {
	t.Setenv("AZURE_FEDERATED_TOKEN_FILE", "")
	t.Setenv("IDENTITY_ENDPOINT", "http://127.0.0.1:1/msi/token") // nothing listens there
	t.Setenv("IMDS_ENDPOINT", "http://127.0.0.1:1")
	t.Setenv("PATH", t.TempDir()) // no az CLI
	cred, err := New(Options{AllowCLI: true})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err = cred.GetToken(ctx, policy.TokenRequestOptions{Scopes: []string{"https://vault.azure.net/.default"}})
	if err == nil {
		t.Fatal("got a token outside Azure")
	}
	for _, want := range []string{"ManagedIdentityCredential"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not name %s: %v", want, err)
		}
	}
}

func TestWorkloadIdentityJoinsWhenConfigured(t *testing.T) {
	tokFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokFile, []byte("not-a-real-assertion"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("AZURE_FEDERATED_TOKEN_FILE", tokFile)
	t.Setenv("AZURE_TENANT_ID", "00000000-0000-0000-0000-000000000000")
	t.Setenv("AZURE_CLIENT_ID", "11111111-1111-1111-1111-111111111111")
	t.Setenv("AZURE_AUTHORITY_HOST", "https://127.0.0.1:1/") // unreachable: no request leaves the machine
	t.Setenv("IDENTITY_ENDPOINT", "http://127.0.0.1:1/msi/token")
	t.Setenv("IMDS_ENDPOINT", "http://127.0.0.1:1")
	cred, err := New(Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err = cred.GetToken(ctx, policy.TokenRequestOptions{Scopes: []string{"https://vault.azure.net/.default"}})
	if err == nil || !strings.Contains(err.Error(), "WorkloadIdentityCredential") {
		t.Fatalf("workload identity not tried: %v", err)
	}
}
