package sidecar

import (
	"context"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"net/http"
	"os"
	"sync"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"

	"github.com/blobseal/blobseal/internal/secret"
	"github.com/blobseal/blobseal/keyrelease"
	"github.com/blobseal/blobseal/keyrelease/evidence"
)

// keyEnv is built once it succeeds and shared by every filesystem's key
// release and the SKR API. A failed setup (a CA file not yet written, no
// SEV-SNP device yet) is not remembered: the next attempt tries again, so
// on_failure: retry covers it like any other failure.
type keyEnv struct {
	mu       sync.Mutex
	ready    bool
	provider evidence.Provider
	client   *http.Client
	roots    *x509.CertPool
}

// obtainKey returns the filesystem's key: the key file's bytes, the raw
// testing key, or the secret released by the HSM to this attested VM.
func (s *Sidecar) obtainKey(ctx context.Context, f *Filesystem) (secret.Bytes, error) {
	switch {
	case f.Key.File != "":
		data, err := os.ReadFile(f.Key.File)
		if err != nil {
			return nil, fmt.Errorf("read key file: %w", err)
		}
		return secret.Bytes(data), nil
	case len(f.Key.raw) > 0:
		s.log.Warn("using a raw key from the configuration: for testing only", "fs", f.Name)
		return secret.Bytes(append([]byte(nil), f.Key.raw...)), nil
	}
	r := f.Key.Release
	env, err := s.keyEnvironment()
	if err != nil {
		return nil, err
	}
	var bearer secret.Token
	switch {
	case r.BearerTokenFile != "":
		if bearer, err = keyrelease.ReadBearerFile(r.BearerTokenFile); err != nil {
			return nil, err
		}
	case r.BearerToken != "":
		bearer = r.BearerToken
	}
	cred, err := keyrelease.NewCredential(keyrelease.CredentialOptions{Bearer: bearer, ManagedIdentityClientID: f.IdentityClientID})
	if err != nil {
		return nil, err
	}
	return keyrelease.Release(ctx, keyrelease.Config{
		Evidence:     env.provider,
		MAAEndpoint:  r.MAAEndpoint,
		VaultURL:     r.Vault,
		KeyName:      r.KeyName,
		KeyVersion:   r.KeyVersion,
		Credential:   cred,
		WrapAlg:      r.WrapAlg,
		Salt:         r.Salt,
		Label:        r.Label,
		HTTPClient:   env.client,
		TrustedRoots: env.roots,
		Logger:       s.log.With("fs", f.Name),
	})
}

// keyEnvironment builds the evidence provider and the HTTP client through
// keyrelease, the one place that knows how.
func (s *Sidecar) keyEnvironment() (*keyEnv, error) {
	e := &s.keyEnv
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.ready {
		return e, nil
	}
	a := s.cfg.Attestation
	ec := keyrelease.EvidenceConfig{Provider: a.Provider, CertCache: a.CertCache(), SimulatedDir: a.SimulatedDir, Logger: s.log}
	if a.SimulatedHostData != "" {
		b, _ := hex.DecodeString(a.SimulatedHostData) // validated
		copy(ec.SimulatedHostData[:], b)
	}
	provider, err := keyrelease.NewEvidence(ec)
	if err != nil {
		return nil, err
	}
	roots, err := keyrelease.TLSRoots(a.CAFile)
	if err != nil {
		return nil, fmt.Errorf("attestation.ca_file: %w", err)
	}
	e.provider, e.roots, e.client, e.ready = provider, roots, keyrelease.HTTPClient(roots), true
	return e, nil
}

// vaultCredential is the sidecar's own identity for SKR API requests that
// carry no access_token.
func (s *Sidecar) vaultCredential() (azcore.TokenCredential, error) {
	return keyrelease.NewCredential(keyrelease.CredentialOptions{ManagedIdentityClientID: s.cfg.SKR.IdentityClientID})
}
