package sidecar

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"

	"github.com/blobseal/blobseal/blob"
	"github.com/blobseal/blobseal/internal/secret"
	"github.com/blobseal/blobseal/keyrelease"
	"github.com/blobseal/blobseal/keyrelease/evidence"
	"github.com/blobseal/blobseal/keyrelease/hsm"
)

// keyEnv is created once and shared by every filesystem's key release.
type keyEnv struct {
	once     sync.Once
	err      error
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
	case f.Key.RawHex != "":
		s.log.Warn("using a raw key from the configuration: for testing only", "fs", f.Name)
		b, err := hex.DecodeString(f.Key.RawHex)
		if err != nil {
			return nil, fmt.Errorf("raw_key is not hex")
		}
		return secret.Bytes(b), nil
	}
	r := f.Key.Release
	env, err := s.keyEnvironment()
	if err != nil {
		return nil, err
	}
	var cred azcore.TokenCredential
	switch {
	case r.BearerTokenFile != "":
		tok, err := os.ReadFile(r.BearerTokenFile)
		if err != nil {
			return nil, fmt.Errorf("read vault bearer token file: %w", err)
		}
		cred = hsm.BearerToken(secret.Token(strings.TrimSpace(string(tok))))
	case r.BearerToken != "":
		cred = hsm.BearerToken(r.BearerToken)
	default:
		if cred, err = blob.DefaultCredential(blob.CredentialOptions{ManagedIdentityClientID: f.IdentityClientID}); err != nil {
			return nil, fmt.Errorf("vault identity: %w", err)
		}
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

func (s *Sidecar) keyEnvironment() (*keyEnv, error) {
	e := &s.keyEnv
	e.once.Do(func() {
		a := s.cfg.Attestation
		opts := evidence.Options{CertCacheURL: a.CertCacheURL, Logger: s.log}
		if a.Provider == "simulated" {
			sim := &evidence.SimulatedConfig{}
			if a.SimulatedHostData != "" {
				b, _ := hex.DecodeString(a.SimulatedHostData) // validated
				copy(sim.HostData[:], b)
			}
			if a.SimulatedDir != "" {
				signer, err := evidence.ReadSimulatedSigner(a.SimulatedDir)
				if err != nil {
					e.err = fmt.Errorf("simulated attestation: %w", err)
					return
				}
				sim.Signer = signer
			}
			opts.Simulated = sim
		}
		if e.provider, e.err = evidence.NewProvider(a.Provider, opts); e.err != nil {
			return
		}
		if a.CAFile != "" {
			pem, err := os.ReadFile(a.CAFile)
			if err != nil {
				e.err = fmt.Errorf("read attestation.ca_file: %w", err)
				return
			}
			roots, err := x509.SystemCertPool()
			if err != nil {
				roots = x509.NewCertPool()
			}
			if !roots.AppendCertsFromPEM(pem) {
				e.err = fmt.Errorf("attestation.ca_file %s holds no PEM certificate", a.CAFile)
				return
			}
			e.roots = roots
			e.client = &http.Client{
				Timeout:   60 * time.Second,
				Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}},
			}
		}
	})
	return e, e.err
}
