package blob

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"

	"github.com/blobseal/blobseal/internal/testenv"
	"github.com/blobseal/blobseal/keyrelease/localca"
)

// entraToken stands in for an Entra ID credential: it mints a JWT with the
// claims Azurite's OAuth mode checks (issuer, audience, lifetime). Azurite
// does not verify token signatures.
type entraToken struct {
	lifetime time.Duration
	calls    atomic.Int64
}

func (e *entraToken) GetToken(_ context.Context, o policy.TokenRequestOptions) (azcore.AccessToken, error) {
	e.calls.Add(1)
	if len(o.Scopes) != 1 || !strings.HasPrefix(o.Scopes[0], "https://storage.azure.com") {
		return azcore.AccessToken{}, errors.New("unexpected scope " + strings.Join(o.Scopes, ","))
	}
	now := time.Now()
	exp := now.Add(e.lifetime)
	claims, _ := json.Marshal(map[string]any{
		"aud": "https://storage.azure.com", "iss": "https://sts.windows.net/ab1f708d-50f6-404c-a006-d71b2ac7a606/",
		"iat": now.Add(-2 * time.Hour).Unix(), "nbf": now.Add(-2 * time.Hour).Unix(), "exp": exp.Unix(),
		"oid": "00000000-0000-0000-0000-000000000001", "tid": "ab1f708d-50f6-404c-a006-d71b2ac7a606",
	})
	enc := base64.RawURLEncoding.EncodeToString
	tok := enc([]byte(`{"alg":"RS256","typ":"JWT"}`)) + "." + enc(claims) + "." + enc([]byte("unsigned"))
	// Report a long validity so azcore does not refresh the expired one.
	return azcore.AccessToken{Token: tok, ExpiresOn: now.Add(time.Hour)}, nil
}

// startAzuriteOAuth runs Azurite over TLS with OAuth enabled, which the
// shared testenv helper does not offer.
func startAzuriteOAuth(t *testing.T) (endpoint string, hc *http.Client) {
	bin := testenv.RequireTools(t, "azurite-blob")[0]
	ca, err := localca.New("blobseal test", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := ca.ServerCert("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	keyDER, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	certPath, keyPath := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Certificate[0]}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	port := testenv.FreePort(t)
	cmd := exec.Command(bin, "--blobHost", "127.0.0.1", "--blobPort", strconv.Itoa(port),
		"--location", filepath.Join(dir, "data"), "--cert", certPath, "--key", keyPath, "--oauth", "basic",
		"--disableTelemetry", "--skipApiVersionCheck", "--silent", "--loose")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		_ = cmd.Wait()
	})
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("azurite (TLS) did not listen on %s", addr)
		}
		time.Sleep(50 * time.Millisecond)
	}
	hc = NewHTTPClient()
	hc.Transport.(*http.Transport).TLSClientConfig = &tls.Config{RootCAs: ca.Pool()}
	return "https://" + addr + "/devstoreaccount1", hc
}

// TestTokenCredential reads and uploads with an Entra-style bearer token
// (the managed/workload identity path) against Azurite's OAuth mode.
func TestTokenCredential(t *testing.T) {
	endpoint, hc := startAzuriteOAuth(t)
	cred := &entraToken{lifetime: time.Hour}
	opts := Options{Credential: cred, HTTPClient: hc}
	img := sparseImage(31, 1<<20)
	path := filepath.Join(t.TempDir(), "tok.img")
	if err := os.WriteFile(path, img, 0o600); err != nil {
		t.Fatal(err)
	}
	loc := endpoint + "/tok/disk.img"
	res, err := Upload(testCtx(t), path, loc, UploadOptions{Options: opts, CreateContainer: true, Verify: true})
	if err != nil {
		t.Fatal(err)
	}
	if !res.Verified || cred.calls.Load() == 0 {
		t.Fatalf("upload %+v with %d token requests", res, cred.calls.Load())
	}
	src, err := Open(testCtx(t), loc, opts)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(img))
	if _, err := src.ReadAt(testCtx(t), got, 0); err != nil || !bytes.Equal(got, img) {
		t.Fatalf("read with a token: %v", err)
	}

	// An expired token is refused with a message about the identity.
	_, err = Open(testCtx(t), loc, Options{Credential: &entraToken{lifetime: -time.Hour}, HTTPClient: hc})
	if !errors.Is(err, ErrAccessDenied) || !strings.Contains(err.Error(), "identity") {
		t.Fatalf("expired token: %v", err)
	}
	t.Logf("expired token: %v", err)

	// A token credential over plain http is refused before any request.
	_, err = Open(testCtx(t), "http://127.0.0.1:1/devstoreaccount1/c/b", Options{Credential: cred})
	if err == nil || !strings.Contains(err.Error(), "needs an https endpoint") {
		t.Fatalf("token over http: %v", err)
	}
}

func TestDefaultCredential(t *testing.T) {
	t.Setenv("AZURE_FEDERATED_TOKEN_FILE", "")
	cred, err := DefaultCredential(CredentialOptions{ManagedIdentityClientID: "11111111-2222-3333-4444-555555555555"})
	if err != nil || cred == nil {
		t.Fatalf("DefaultCredential: %v", err)
	}
	// Workload identity configured without tenant/client: the chain still
	// builds from the managed identity.
	t.Setenv("AZURE_FEDERATED_TOKEN_FILE", filepath.Join(t.TempDir(), "token"))
	t.Setenv("AZURE_TENANT_ID", "")
	t.Setenv("AZURE_CLIENT_ID", "")
	if cred, err := DefaultCredential(CredentialOptions{AllowCLI: true}); err != nil || cred == nil {
		t.Fatalf("DefaultCredential with partial workload identity: %v", err)
	}
}
