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
	"errors"
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
		missing = append(missing, "key name (kid / --key-name)")
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

// Stages of the chain, as StageError names them.
const (
	StageConfig   = "config"
	StageEvidence = "evidence"
	StageAttest   = "attestation"
	StageRelease  = "release"
	StageDerive   = "derive"
)

// StageError says which step of the chain failed, so a caller (the SKR API)
// can answer with the right status without parsing messages.
type StageError struct {
	Stage string
	Err   error
}

func (e *StageError) Error() string { return e.Err.Error() }
func (e *StageError) Unwrap() error { return e.Err }

func stageErr(stage string, format string, args ...any) error {
	return &StageError{Stage: stage, Err: fmt.Errorf(format, args...)}
}

// AttestConfig is what one attestation needs.
type AttestConfig struct {
	Evidence    evidence.Provider
	MAAEndpoint string // https URL, or a bare host as the Azure sidecars take it
	Nonce       string
	HTTPClient  *http.Client
	Logger      *slog.Logger
}

// Attest gets fresh evidence whose REPORT_DATA is SHA-256(runtimeData) and
// exchanges it at MAA for a token carrying runtimeData. Failures are
// *StageError (StageEvidence or StageAttest).
func Attest(ctx context.Context, c AttestConfig, runtimeData []byte) (secret.Token, error) {
	if c.Evidence == nil || c.MAAEndpoint == "" {
		return "", &StageError{Stage: StageConfig, Err: errors.New("attestation: evidence provider and attestation endpoint are required")}
	}
	log := logger(c.Logger)
	start := time.Now()
	ev, err := c.Evidence.Get(ctx, evidence.ReportData(runtimeData))
	if err != nil {
		return "", stageErr(StageEvidence, "attestation evidence (%s): %w", c.Evidence.Name(), err)
	}
	log.Debug("key release step", "step", "evidence", "elapsed", time.Since(start), "provider", c.Evidence.Name(), "report_bytes", len(ev.Report))
	start = time.Now()
	mc := maa.New(c.MAAEndpoint, maa.Options{HTTPClient: c.HTTPClient, Logger: log})
	token, err := mc.AttestSevSnpVm(ctx, ev, runtimeData, c.Nonce)
	if err != nil {
		return "", stageErr(StageAttest, "attestation at %s: %w", mc.Endpoint(), err)
	}
	log.Debug("key release step", "step", "attestation token", "elapsed", time.Since(start), "endpoint", mc.Endpoint())
	return token, nil
}

func logger(l *slog.Logger) *slog.Logger {
	if l == nil {
		return slog.New(slog.DiscardHandler)
	}
	return l
}

// ReleaseRaw runs attestation and the HSM release and returns the released
// key itself (oct bytes or PKCS#8), without deriving the filesystem secret:
// the SKR API hands keys out as JWKs. The caller wipes Material. Failures
// are *StageError.
func ReleaseRaw(ctx context.Context, cfg Config) (*hsm.ReleasedKey, error) {
	if err := cfg.check(); err != nil {
		return nil, &StageError{Stage: StageConfig, Err: err}
	}
	log := logger(cfg.Logger)
	start := time.Now()
	wrapping, err := rsa.GenerateKey(rand.Reader, WrappingKeyBits)
	if err != nil {
		return nil, stageErr(StageConfig, "key release: generate wrapping key: %w", err)
	}
	runtimeData, err := maa.RuntimeData(&wrapping.PublicKey)
	if err != nil {
		return nil, stageErr(StageConfig, "key release: runtime data: %w", err)
	}
	log.Debug("key release step", "step", "wrapping key", "elapsed", time.Since(start), "bits", WrappingKeyBits)
	token, err := Attest(ctx, AttestConfig{Evidence: cfg.Evidence, MAAEndpoint: cfg.MAAEndpoint, Nonce: cfg.Nonce, HTTPClient: cfg.HTTPClient, Logger: log}, runtimeData)
	if err != nil {
		var se *StageError
		if errors.As(err, &se) {
			se.Err = fmt.Errorf("key release: %w", se.Err)
		}
		return nil, err
	}
	return ReleaseWithToken(ctx, cfg, token, wrapping)
}

// ReleaseWithToken is the release step alone: it presents token (an MAA
// token whose runtime keys hold wrapping's public key) to the vault and
// unwraps the released key with wrapping. Evidence and MAAEndpoint of cfg
// are not used. The caller wipes Material. Failures are *StageError.
func ReleaseWithToken(ctx context.Context, cfg Config, token secret.Token, wrapping *rsa.PrivateKey) (*hsm.ReleasedKey, error) {
	if token == "" || wrapping == nil {
		return nil, &StageError{Stage: StageConfig, Err: errors.New("key release: an attestation token and its wrapping key are required")}
	}
	if cfg.VaultURL == "" || cfg.KeyName == "" || cfg.Credential == nil {
		return nil, &StageError{Stage: StageConfig, Err: errors.New("key release: vault URL, key name and vault credential are required")}
	}
	if err := hsm.CheckAlgorithm(cfg.WrapAlg); err != nil {
		return nil, &StageError{Stage: StageConfig, Err: fmt.Errorf("key release: %w", err)}
	}
	log := logger(cfg.Logger)
	start := time.Now()
	hc, err := hsm.New(cfg.VaultURL, cfg.Credential, hsm.Options{HTTPClient: cfg.HTTPClient, TrustedRoots: cfg.TrustedRoots, Logger: log})
	if err != nil {
		return nil, stageErr(StageConfig, "key release: %w", err)
	}
	rk, err := hc.Release(ctx, cfg.KeyName, cfg.KeyVersion, token, wrapping, cfg.WrapAlg)
	if err != nil {
		return nil, stageErr(StageRelease, "key release: %w", err)
	}
	log.Debug("key release step", "step", "hsm release", "elapsed", time.Since(start), "kid", rk.KID, "kty", rk.Kty)
	return rk, nil
}

// Released is the outcome of a release: the 32-byte filesystem secret and
// the vault key it came from.
type Released struct {
	Secret secret.Bytes // the caller wipes it
	KID    string       // the key identifier the vault answered with
	Kty    string       // oct-HSM, RSA-HSM, ...
}

// ReleaseKey runs the chain and returns the secret with the key's id and
// type. Failures are *StageError.
func ReleaseKey(ctx context.Context, cfg Config) (Released, error) {
	total := time.Now()
	rk, err := ReleaseRaw(ctx, cfg)
	if err != nil {
		return Released{}, err
	}
	defer rk.Material.Wipe()
	out, err := hsm.DeriveSecret(rk, cfg.Salt, cfg.Label)
	if err != nil {
		return Released{}, stageErr(StageDerive, "key release: %w", err)
	}
	logger(cfg.Logger).Info("key released", "kid", rk.KID, "kty", rk.Kty, "total", time.Since(total))
	return Released{Secret: out, KID: rk.KID, Kty: rk.Kty}, nil
}

// Release runs the chain and returns the 32-byte secret. The caller wipes it.
// Failures are *StageError.
func Release(ctx context.Context, cfg Config) (secret.Bytes, error) {
	r, err := ReleaseKey(ctx, cfg)
	return r.Secret, err
}
