package main

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

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
	f.StringVar(&v.bearerFile, "bearer-token-file", "", "file holding a bearer token for the vault (default: workload identity, managed identity, then the Azure CLI login)")
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
		if _, err := keyrelease.ParseHostData(r.simHostData); err != nil {
			return usageErrorf("--simulated-host-data: %v", err)
		}
	}
	return nil
}

// release attests, fetches the MAA token and has the vault release the
// key. The secret stays in memory; the caller wipes it.
func (r *releaseFlags) release(ctx context.Context, log *slog.Logger) (keyrelease.Released, error) {
	roots, err := keyrelease.TLSRoots(r.vault.caFile)
	if err != nil {
		return keyrelease.Released{}, fmt.Errorf("--ca-file: %w", err)
	}
	client := keyrelease.HTTPClient(roots)
	ev := keyrelease.EvidenceConfig{Provider: r.attestation, CertCacheURL: r.certCache, HTTPClient: client, Logger: log,
		SimulatedDir: r.simDir, SimulatedDebuggable: r.simDebug}
	switch {
	case r.simHostData != "":
		ev.SimulatedHostData, _ = keyrelease.ParseHostData(r.simHostData) // checked in prepare
	case r.simCCE != "":
		if ev.SimulatedHostData, err = keyrelease.HostDataFile(r.simCCE); err != nil {
			return keyrelease.Released{}, fmt.Errorf("--simulated-cce-policy: %w", err)
		}
	}
	provider, err := keyrelease.NewEvidence(ev)
	if err != nil {
		return keyrelease.Released{}, err
	}
	cred, err := r.vault.credential()
	if err != nil {
		return keyrelease.Released{}, err
	}
	return keyrelease.ReleaseKey(ctx, keyrelease.Config{
		Evidence: provider, MAAEndpoint: r.maaEndpoint,
		VaultURL: r.vault.vault, KeyName: r.vault.name, KeyVersion: r.keyVersion,
		Credential: cred, WrapAlg: r.wrapAlg, Salt: r.salt, Label: r.label,
		HTTPClient: client, TrustedRoots: roots, Logger: log,
	})
}
