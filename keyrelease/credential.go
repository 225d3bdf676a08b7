package keyrelease

import (
	"fmt"
	"os"
	"strings"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"

	"github.com/blobseal/blobseal/internal/azcred"
	"github.com/blobseal/blobseal/internal/secret"
	"github.com/blobseal/blobseal/keyrelease/hsm"
)

// CredentialOptions choose how blobseal authenticates to the vault.
type CredentialOptions struct {
	// Bearer, when set, is used as is (akv.bearer_token of the existing
	// sidecar's configuration).
	Bearer secret.Token
	// ManagedIdentityClientID selects a user-assigned managed identity.
	ManagedIdentityClientID string
	// AllowCLI adds the Azure CLI login (tooling on a workstation; never
	// in the sidecar).
	AllowCLI bool
}

// NewCredential returns the vault credential: the given bearer token, else
// blobseal's one identity chain (internal/azcred: workload identity, managed
// identity, and for tooling the Azure CLI).
func NewCredential(o CredentialOptions) (azcore.TokenCredential, error) {
	if o.Bearer != "" {
		return hsm.BearerToken(o.Bearer), nil
	}
	cred, err := azcred.New(azcred.Options{ManagedIdentityClientID: o.ManagedIdentityClientID, AllowCLI: o.AllowCLI})
	if err != nil {
		return nil, fmt.Errorf("vault credential: %w", err)
	}
	return cred, nil
}

// ReadBearerFile reads a vault bearer token from path (a test or tooling
// credential), wiping the file's bytes once the token is taken.
func ReadBearerFile(path string) (secret.Token, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("vault bearer token file: %w", err)
	}
	tok := secret.Token(strings.TrimSpace(string(b)))
	secret.Wipe(b)
	if tok == "" {
		return "", fmt.Errorf("vault bearer token file %s is empty", path)
	}
	return tok, nil
}
