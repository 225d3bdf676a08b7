// Package keyrelease runs secure key release end to end — the one place the
// chain is assembled: a fresh RSA wrapping key, its public half as MAA
// runtime data, SNP evidence whose REPORT_DATA is the SHA-256 of that runtime
// data, an MAA token, the HSM release against the token, the local unwrap and
// the derivation of the 32-byte filesystem secret. Every step is timed and
// logged; no key, token or bearer reaches a log or error.
package keyrelease

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"

	"github.com/blobseal/blobseal/internal/secret"
	"github.com/blobseal/blobseal/keyrelease/evidence"
	"github.com/blobseal/blobseal/keyrelease/hsm"
	"github.com/blobseal/blobseal/keyrelease/maa"
)

// Config is everything one release needs.
type Config struct {
	Evidence    evidence.Provider // hardware or, only when asked for by name, simulated
	MAAEndpoint string            // e.g. https://sharedeus.eus.attest.azure.net
	Nonce       string            // optional MAA nonce

	VaultURL   string // https://NAME.managedhsm.azure.net, https://NAME.vault.azure.net
	KeyName    string
	KeyVersion string                 // "" = latest
	Credential azcore.TokenCredential // azidentity credential or hsm.BearerToken
	WrapAlg    string                 // "" = CKM_RSA_AES_KEY_WRAP

	Salt  string // hex; RSA keys only (key_derivation.salt)
	Label string // RSA keys only; "" = hsm.DefaultLabel

	// HTTPClient carries MAA and vault requests (nil: defaults with system
	// roots); TrustedRoots verify the vault's signed response (nil: system).
	HTTPClient   *http.Client
	TrustedRoots *x509.CertPool
	Logger       *slog.Logger
}

// WrappingKeyBits is the size of the fresh wrapping key.
const WrappingKeyBits = 2048

func (c *Config) check() error {
	var missing []string
	if c.Evidence == nil {
		missing = append(missing, "evidence provider")
	}
	if c.MAAEndpoint == "" {
		missing = append(missing, "attestation endpoint (authority.endpoint / --maa-endpoint)")
	}
	if c.VaultURL == "" {
		missing = append(missing, "vault URL (akv.endpoint / --vault)")
	}
	if c.KeyName == "" {
		missing = append(missing, "key name (kid / --name)")
	}
	if c.Credential == nil {
		missing = append(missing, "vault credential")
	}
	if len(missing) > 0 {
		return fmt.Errorf("key release: missing %v", missing)
	}
	if err := hsm.CheckAlgorithm(c.WrapAlg); err != nil {
		return fmt.Errorf("key release: %w", err)
	}
	return nil
}

// Release runs the chain and returns the 32-byte secret. The caller wipes it.
func Release(ctx context.Context, cfg Config) (secret.Bytes, error) {
	if err := cfg.check(); err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	total := time.Now()
	step := func(name string, start time.Time, attrs ...any) {
		log.Debug("key release step", append([]any{"step", name, "elapsed", time.Since(start)}, attrs...)...)
	}

	start := time.Now()
	wrapping, err := rsa.GenerateKey(rand.Reader, WrappingKeyBits)
	if err != nil {
		return nil, fmt.Errorf("key release: generate wrapping key: %w", err)
	}
	runtimeData, err := maa.RuntimeData(&wrapping.PublicKey)
	if err != nil {
		return nil, fmt.Errorf("key release: runtime data: %w", err)
	}
	step("wrapping key", start, "bits", WrappingKeyBits)

	start = time.Now()
	ev, err := cfg.Evidence.Get(ctx, evidence.ReportData(runtimeData))
	if err != nil {
		return nil, fmt.Errorf("key release: attestation evidence (%s): %w", cfg.Evidence.Name(), err)
	}
	step("evidence", start, "provider", cfg.Evidence.Name(), "report_bytes", len(ev.Report))

	start = time.Now()
	mc := maa.New(cfg.MAAEndpoint, maa.Options{HTTPClient: cfg.HTTPClient, Logger: log})
	token, err := mc.AttestSevSnpVm(ctx, ev, runtimeData, cfg.Nonce)
	if err != nil {
		return nil, fmt.Errorf("key release: attestation at %s: %w", mc.Endpoint(), err)
	}
	step("attestation token", start, "endpoint", mc.Endpoint())

	start = time.Now()
	hc, err := hsm.New(cfg.VaultURL, cfg.Credential, hsm.Options{HTTPClient: cfg.HTTPClient, TrustedRoots: cfg.TrustedRoots, Logger: log})
	if err != nil {
		return nil, fmt.Errorf("key release: %w", err)
	}
	rk, err := hc.Release(ctx, cfg.KeyName, cfg.KeyVersion, token, wrapping, cfg.WrapAlg)
	if err != nil {
		return nil, fmt.Errorf("key release: %w", err)
	}
	defer rk.Material.Wipe()
	step("hsm release", start, "kid", rk.KID, "kty", rk.Kty)

	start = time.Now()
	out, err := hsm.DeriveSecret(rk, cfg.Salt, cfg.Label)
	if err != nil {
		return nil, fmt.Errorf("key release: %w", err)
	}
	step("derive", start, "kty", rk.Kty)
	log.Info("key released", "kid", rk.KID, "kty", rk.Kty, "total", time.Since(total))
	return out, nil
}
