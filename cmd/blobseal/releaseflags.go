package main

import (
	"context"
	"encoding/hex"
	"fmt"
	"log/slog"
	"path/filepath"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/blobseal/blobseal/internal/secret"
	"github.com/blobseal/blobseal/keyrelease"
	"github.com/blobseal/blobseal/keyrelease/evidence"
	"github.com/blobseal/blobseal/keyrelease/hsm"
)

// releaseFlags are the flags of a secure key release (attest, MAA token,
// vault release), shared by `blobseal mount` (as the alternative to
// --key-file) and `blobseal key release`.
type releaseFlags struct {
	vault       vaultFlags // vault, key name, bearer token, CA, dev dir
	maaEndpoint string
	keyVersion  string
	attestation string
	salt, label string
	wrapAlg     string
	simDir      string // directory holding the simulated signer
	simHostData string
	simCCE      string // CCE policy file whose SHA-256 is the simulated HOST_DATA
	simDebug    bool
	certCache   string
}

func (r *releaseFlags) register(f *pflag.FlagSet) {
	v := &r.vault
	f.StringVar(&r.maaEndpoint, "maa-endpoint", "", "attestation service URL, e.g. https://sharedeus.eus.attest.azure.net (secure key release)")
	f.StringVar(&v.vault, "vault", "", "vault URL: https://NAME.managedhsm.azure.net, https://NAME.vault.azure.net or the local key service")
	f.StringVar(&v.name, "key-name", "", "name of the vault key to release (instead of --key-file)")
	f.StringVar(&r.keyVersion, "key-version", "", "key version (default: latest)")
	f.StringVar(&r.attestation, "attestation", evidence.ProviderAuto, "evidence provider: auto, sev-guest, configfs-tsm, or simulated (local testing only; named explicitly, logged)")
	f.StringVar(&r.salt, "salt", "", "RSA-HSM keys: HKDF salt (hex)")
	f.StringVar(&r.label, "label", "", "RSA-HSM keys: HKDF label (default \"Symmetric Encryption Key\")")
	f.StringVar(&r.wrapAlg, "wrap-alg", hsm.AlgCKMRSAAESKeyWrap, "key wrap: CKM_RSA_AES_KEY_WRAP, RSA_AES_KEY_WRAP_256 or RSA_AES_KEY_WRAP_384")
	f.StringVar(&v.bearerFile, "bearer-token-file", "", "file holding a bearer token for the vault (default: azidentity)")
	f.StringVar(&v.caFile, "ca-file", "", "PEM file of extra CA roots for TLS and the vault's signed responses (local stack)")
	f.StringVar(&r.simDir, "simulated-dir", "", "simulated only: directory holding the simulated signer (default with --dev-dir: the stack's)")
	f.StringVar(&r.simHostData, "simulated-host-data", "", "simulated only: HOST_DATA to report, 64 hex digits")
	f.StringVar(&r.simCCE, "simulated-cce-policy", "", "simulated only: CCE policy file whose SHA-256 is the HOST_DATA to report")
	f.BoolVar(&r.simDebug, "simulated-debuggable", false, "simulated only: report a debuggable guest")
	f.StringVar(&r.certCache, "cert-cache-url", "", "AMD certificate cache for a missing or stale host certificate (default: the provider's)")
	f.StringVar(&v.devDir, "dev-dir", "", "the `DIR` of a running \"blobseal dev serve\": fills --maa-endpoint, --vault, --ca-file, --bearer-token-file and the simulated signer from its stack.json")
}

// releaseFlagNames are the flags register adds: a command with another key
// source declares them exclusive with it.
func releaseFlagNames() []string {
	return []string{"maa-endpoint", "vault", "key-name", "key-version", "attestation", "salt", "label",
		"wrap-alg", "bearer-token-file", "ca-file", "simulated-dir", "simulated-host-data", "simulated-cce-policy",
		"simulated-debuggable", "cert-cache-url", "dev-dir"}
}

// declare marks the flag combinations a release cannot use.
func (r *releaseFlags) declare(cmd *cobra.Command) {
	cmd.MarkFlagsMutuallyExclusive("simulated-host-data", "simulated-cce-policy")
	completeValues(cmd, "attestation", evidence.ProviderAuto, evidence.ProviderSevGuest, evidence.ProviderConfigfsTSM, evidence.ProviderSimulated)
	completeValues(cmd, "wrap-alg", hsm.AlgCKMRSAAESKeyWrap, hsm.AlgRSAAESKeyWrap256, hsm.AlgRSAAESKeyWrap384)
}

// prepare fills unset flags from --dev-dir and checks the set is complete,
// before anything slow happens.
func (r *releaseFlags) prepare() error {
	st, err := r.vault.applyDev()
	if err != nil {
		return err
	}
	if st != nil {
		if r.maaEndpoint == "" {
			r.maaEndpoint = st.MAAEndpoint
		}
		if r.simDir == "" && st.SimulatedSignerFile != "" {
			r.simDir = filepath.Dir(st.SimulatedSignerFile)
		}
	}
	switch {
	case r.vault.vault == "":
		return usageErrorf("--vault is required for key release (or --dev-dir)")
	case r.vault.name == "":
		return usageErrorf("--key-name is required for key release")
	case r.maaEndpoint == "":
		return usageErrorf("--maa-endpoint is required for key release (or --dev-dir)")
	}
	if err := hsm.CheckAlgorithm(r.wrapAlg); err != nil {
		return usageErrorf("--wrap-alg: %v", err)
	}
	if r.attestation != evidence.ProviderSimulated && (r.simHostData != "" || r.simCCE != "" || r.simDebug || r.simDir != "" && r.vault.devDir == "") {
		return usageErrorf("--simulated-* flags need --attestation simulated")
	}
	if r.simHostData != "" {
		if _, err := parseHostData(r.simHostData); err != nil {
			return usageErrorf("--simulated-host-data: %v", err)
		}
	}
	return nil
}

// releasedKey is a released secret and the vault key it came from.
type releasedKey struct {
	Secret   secret.Bytes
	Kid, Kty string
}

// release attests, fetches the MAA token and has the vault release the
// key. The secret stays in memory; the caller wipes it.
func (r *releaseFlags) release(ctx context.Context, log *slog.Logger) (secret.Bytes, error) {
	k, err := r.releaseKey(ctx, log)
	return k.Secret, err
}

// releaseKey is release that also reports the key's id and type.
// keyrelease.Release returns only the secret and logs which key it was;
// the log record is where the id and type are read from.
func (r *releaseFlags) releaseKey(ctx context.Context, log *slog.Logger) (releasedKey, error) {
	var k releasedKey
	log = slog.New(&releasedKeyHandler{Handler: log.Handler(), key: &k})
	sec, err := r.doRelease(ctx, log)
	k.Secret = sec
	return k, err
}

// releasedKeyHandler passes records on and notes kid and kty from the
// "key released" record, whatever the log level.
type releasedKeyHandler struct {
	slog.Handler
	key *releasedKey
}

var _ slog.Handler = (*releasedKeyHandler)(nil)

func (h *releasedKeyHandler) Enabled(context.Context, slog.Level) bool { return true }

func (h *releasedKeyHandler) Handle(ctx context.Context, rec slog.Record) error {
	if rec.Message == "key released" {
		rec.Attrs(func(a slog.Attr) bool {
			switch a.Key {
			case "kid":
				h.key.Kid = a.Value.String()
			case "kty":
				h.key.Kty = a.Value.String()
			}
			return true
		})
	}
	if !h.Handler.Enabled(ctx, rec.Level) {
		return nil
	}
	return h.Handler.Handle(ctx, rec)
}

func (h *releasedKeyHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return &releasedKeyHandler{Handler: h.Handler.WithAttrs(attrs), key: h.key}
}

func (h *releasedKeyHandler) WithGroup(name string) slog.Handler {
	return &releasedKeyHandler{Handler: h.Handler.WithGroup(name), key: h.key}
}

func (r *releaseFlags) doRelease(ctx context.Context, log *slog.Logger) (secret.Bytes, error) {
	roots, err := r.vault.roots()
	if err != nil {
		return nil, err
	}
	client := httpClientFor(roots)
	evOpts := evidence.Options{Logger: log, CertCacheURL: r.certCache, HTTPClient: client}
	if r.attestation == evidence.ProviderSimulated {
		sc := &evidence.SimulatedConfig{Debuggable: r.simDebug}
		if r.simHostData != "" {
			h, _ := parseHostData(r.simHostData) // checked in prepare
			b, _ := hex.DecodeString(h)
			copy(sc.HostData[:], b)
		}
		if r.simCCE != "" {
			if sc.HostData, err = hostDataFromCCE(r.simCCE); err != nil {
				return nil, err
			}
		}
		if r.simDir != "" {
			if sc.Signer, err = evidence.ReadSimulatedSigner(r.simDir); err != nil {
				return nil, fmt.Errorf("--simulated-dir: %w", err)
			}
		}
		evOpts.Simulated = sc
	}
	provider, err := evidence.NewProvider(r.attestation, evOpts)
	if err != nil {
		return nil, err
	}
	cred, err := r.vault.credential()
	if err != nil {
		return nil, err
	}
	return keyrelease.Release(ctx, keyrelease.Config{
		Evidence: provider, MAAEndpoint: r.maaEndpoint,
		VaultURL: r.vault.vault, KeyName: r.vault.name, KeyVersion: r.keyVersion,
		Credential: cred, WrapAlg: r.wrapAlg, Salt: r.salt, Label: r.label,
		HTTPClient: client, TrustedRoots: roots, Logger: log,
	})
}
