package main

import (
	"crypto/rsa"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"os"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/blobseal/blobseal/internal/secret"
	"github.com/blobseal/blobseal/keyrelease"
	"github.com/blobseal/blobseal/keyrelease/hsm"
	"github.com/blobseal/blobseal/keyrelease/policy"
)

// vaultFlags are shared by key import and key release.
type vaultFlags struct {
	vault, name, bearerFile, caFile, devDir string
	verbose                                 bool
}

func (v *vaultFlags) register(fs *pflag.FlagSet) {
	fs.StringVar(&v.vault, "vault", "", "vault URL: https://NAME.managedhsm.azure.net, https://NAME.vault.azure.net or the local key service")
	fs.StringVar(&v.name, "key-name", "", "key name")
	deprecatedAlias(fs, "name", "key-name")
	fs.StringVar(&v.bearerFile, "bearer-token-file", "", "file holding a bearer token for the vault (default: workload identity, managed identity, then the Azure CLI login)")
	fs.StringVar(&v.caFile, "ca-file", "", "PEM file of extra CA roots for TLS and for the vault's signed responses (local stack)")
	fs.StringVar(&v.devDir, "dev-dir", "", "the `DIR` of a running \"blobseal dev serve\": fills --vault, --ca-file, --bearer-token-file (and --maa-endpoint) from its stack.json")
	fs.BoolVarP(&v.verbose, "verbose", "v", false, "debug logging (never prints keys or tokens)")
}

// applyDev fills unset flags from a dev serve stack file.
func (v *vaultFlags) applyDev() (*devStack, error) {
	if v.devDir == "" {
		return nil, nil
	}
	st, err := readDevStack(v.devDir)
	if err != nil {
		return nil, err
	}
	if v.vault == "" {
		v.vault = st.VaultURL
	}
	if v.caFile == "" {
		v.caFile = st.CAPEMFile
	}
	if v.bearerFile == "" {
		v.bearerFile = st.BearerTokenFile
	}
	return st, nil
}

func (v *vaultFlags) check() error {
	if v.vault == "" {
		return usageErrorf("--vault is required (or --dev-dir)")
	}
	if v.name == "" {
		return usageErrorf("--key-name is required")
	}
	return nil
}

func (v *vaultFlags) logger(w io.Writer) *slog.Logger {
	level := slog.LevelInfo
	if v.verbose {
		level = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level}))
}

// credential is the vault credential: --bearer-token-file, else blobseal's
// identity chain with the Azure CLI login (this is workstation tooling).
func (v *vaultFlags) credential() (azcore.TokenCredential, error) {
	var bearer secret.Token
	if v.bearerFile != "" {
		var err error
		if bearer, err = keyrelease.ReadBearerFile(v.bearerFile); err != nil {
			return nil, fmt.Errorf("--bearer-token-file: %w", err)
		}
	}
	return keyrelease.NewCredential(keyrelease.CredentialOptions{Bearer: bearer, AllowCLI: true})
}

func newKeyCmd() *cobra.Command {
	return newGroup("key", "Create keys with a release policy, and release them",
		newKeyImportCmd(), newKeyReleaseCmd())
}

type keyImportFlags struct {
	vault                                                    vaultFlags
	kty, keyFile, authority, hostData, ccePolicy, compliance string
	allowDebug, immutable, printPolicy, json                 bool
	claims                                                   []string
}

func newKeyImportCmd() *cobra.Command {
	var o keyImportFlags
	cmd := &cobra.Command{
		Use:   "import --vault URL --key-name NAME (--host-data HEX | --cce-policy FILE) [flags]",
		Short: "Create or import a key with a release policy",
		Long: "Creates (or imports, with --key-file) a vault key whose release policy requires an SEV-SNP\n" +
			"attestation from --authority with the container group's HOST_DATA and no debugging.\n" +
			"Prints the key id (kid).",
		Example: "  blobseal key import --vault https://HSM.managedhsm.azure.net --key-name data-key --key-file key.bin \\\n" +
			"      --authority https://sharedeus.eus.attest.azure.net --cce-policy policy.rego",
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runKeyImport(cmd, &o)
		},
	}
	f := cmd.Flags()
	o.vault.register(f)
	f.StringVar(&o.kty, "kty", "oct-HSM", "key type: oct-HSM (Managed HSM) or RSA-HSM (Managed HSM, Key Vault Premium)")
	f.StringVar(&o.keyFile, "key-file", "", "key to import: 32 raw bytes for oct-HSM (the image's key file), PEM RSA private key for RSA-HSM; omit to have the vault generate it")
	f.StringVar(&o.authority, "authority", "", "attestation service URL the policy trusts, e.g. https://sharedeus.eus.attest.azure.net (default with --dev-dir: the local one)")
	f.StringVar(&o.hostData, "host-data", "", "expected x-ms-sevsnpvm-hostdata: hex SHA-256 of the CCE policy")
	f.StringVar(&o.ccePolicy, "cce-policy", "", "CCE policy file (Rego text or az confcom's base64) to compute --host-data from")
	f.BoolVar(&o.allowDebug, "allow-debug", false, "do not require x-ms-sevsnpvm-is-debuggable=false (NEVER for production keys)")
	f.StringVar(&o.compliance, "compliance-status", "", "required x-ms-compliance-status, e.g. azure-compliant-uvm")
	f.BoolVar(&o.immutable, "immutable", false, "make the release policy immutable")
	f.BoolVar(&o.printPolicy, "print-policy", false, "print the release policy JSON exactly as it would be sent, and import nothing")
	f.StringArrayVar(&o.claims, "claim", nil, "extra required claim NAME=VALUE or NAME:TYPE=VALUE (TYPE string, bool or number; default: the claim's type in MAA tokens, so hex values stay strings) (repeatable)")
	f.BoolVar(&o.json, "json", false, "print the key id and the release policy as one JSON object")
	markRequired(cmd, "key-name")
	cmd.MarkFlagsMutuallyExclusive("host-data", "cce-policy")
	cmd.MarkFlagsOneRequired("host-data", "cce-policy")
	completeValues(cmd, "kty", "oct-HSM", "RSA-HSM")
	return cmd
}

func runKeyImport(cmd *cobra.Command, o *keyImportFlags) error {
	ctx := cmd.Context()
	vf := &o.vault
	st, err := vf.applyDev()
	if err != nil {
		return err
	}
	if o.authority == "" && st != nil {
		o.authority = st.MAAEndpoint
	}
	if !o.printPolicy { // printing needs no vault
		if err := vf.check(); err != nil {
			return err
		}
	}
	if o.authority == "" {
		return usageErrorf("--authority is required (the attestation service URL the release policy trusts)")
	}
	if o.kty != "oct-HSM" && o.kty != "RSA-HSM" {
		return usageErrorf("--kty must be oct-HSM or RSA-HSM, not %q", o.kty)
	}
	hd := o.hostData
	if o.ccePolicy != "" {
		sum, err := keyrelease.HostDataFile(o.ccePolicy)
		if err != nil {
			return err
		}
		hd = hex.EncodeToString(sum[:])
	} else if _, err := keyrelease.ParseHostData(hd); err != nil {
		return usageErrorf("--host-data: %v", err)
	}
	var extra []policy.Claim
	for _, c := range o.claims {
		claim, err := policy.ParseClaim(c)
		if err != nil {
			return usageErrorf("--claim: %v", err)
		}
		extra = append(extra, claim)
	}
	list, err := policy.SevSnpVmClaims(policy.SevSnpVmOptions{HostData: hd, AllowDebug: o.allowDebug, ComplianceStatus: o.compliance, Extra: extra})
	if err != nil {
		return usageErrorf("%v", err)
	}
	pol, err := policy.Build(o.authority, list)
	if err != nil {
		return usageErrorf("%v", err)
	}
	polJSON, err := json.Marshal(pol)
	if err != nil {
		return err
	}
	out := cmd.OutOrStdout()
	if o.printPolicy {
		// Exactly the bytes the vault would get; nothing is imported.
		_, err := fmt.Fprintln(out, string(polJSON))
		return err
	}
	spec := hsm.KeySpec{Kty: o.kty, Policy: polJSON, Immutable: o.immutable}
	if o.keyFile != "" {
		if err := loadKeyFile(o.keyFile, &spec); err != nil {
			return err
		}
		defer secret.Wipe(spec.Oct)
	}
	roots, err := keyrelease.TLSRoots(vf.caFile)
	if err != nil {
		return fmt.Errorf("--ca-file: %w", err)
	}
	cred, err := vf.credential()
	if err != nil {
		return err
	}
	client, err := hsm.New(vf.vault, cred, hsm.Options{HTTPClient: keyrelease.HTTPClient(roots), TrustedRoots: roots, Logger: vf.logger(cmd.ErrOrStderr())})
	if err != nil {
		return err
	}
	kid, err := client.PutKey(ctx, vf.name, spec)
	if err != nil {
		return err
	}
	if o.json {
		return printJSON(out, struct {
			Kid    string          `json:"kid"`
			Kty    string          `json:"kty"`
			Policy json.RawMessage `json:"release_policy"`
		}{kid, o.kty, polJSON})
	}
	_, err = fmt.Fprintln(out, kid)
	return err
}

func loadKeyFile(path string, spec *hsm.KeySpec) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("--key-file: %w", err)
	}
	switch spec.Kty {
	case "oct-HSM":
		if len(data) != 32 {
			secret.Wipe(data)
			return fmt.Errorf("--key-file %s is %d bytes; an oct-HSM filesystem key must be exactly 32 raw bytes", path, len(data))
		}
		spec.Oct = data
	case "RSA-HSM":
		defer secret.Wipe(data)
		block, _ := pem.Decode(data)
		if block == nil {
			return fmt.Errorf("--key-file %s is not PEM (want an RSA private key)", path)
		}
		var key any
		if key, err = x509.ParsePKCS8PrivateKey(block.Bytes); err != nil {
			key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
		}
		rk, ok := key.(*rsa.PrivateKey)
		if err != nil || !ok {
			return fmt.Errorf("--key-file %s holds no RSA private key (PKCS#1 or PKCS#8 PEM)", path)
		}
		spec.RSA = rk
	}
	return nil
}

func newKeyReleaseCmd() *cobra.Command {
	var rf releaseFlags
	var out string
	var jsonOut bool
	cmd := &cobra.Command{
		Use:   "release --key-name NAME --vault URL --maa-endpoint URL --out FILE [flags]",
		Short: "Run attestation and key release; write the secret to a file",
		Long: "Attests, gets an attestation token and has the vault release the key, then writes the\n" +
			"secret to --out (mode 0600). The secret is never printed, not even with --json.",
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runKeyRelease(cmd, &rf, out, jsonOut)
		},
	}
	f := cmd.Flags()
	rf.register(f)
	f.BoolVarP(&rf.vault.verbose, "verbose", "v", false, "debug logging (never prints keys or tokens)")
	f.StringVar(&out, "out", "", "file to write the secret to (created with mode 0600; must not exist)")
	f.BoolVar(&jsonOut, "json", false, "print the key id, type and secret length as JSON (never the secret)")
	// The names this command had before it shared mount's release flags.
	deprecatedAlias(f, "name", "key-name")
	deprecatedAlias(f, "version", "key-version")
	deprecatedAlias(f, "sim-host-data", "simulated-host-data")
	deprecatedAlias(f, "sim-cce-policy", "simulated-cce-policy")
	deprecatedAlias(f, "sim-debuggable", "simulated-debuggable")
	markRequired(cmd, "key-name", "out")
	rf.declare(cmd)
	return cmd
}

func runKeyRelease(cmd *cobra.Command, rf *releaseFlags, out string, jsonOut bool) error {
	if err := rf.prepare(); err != nil {
		return err
	}
	// Create the output first so a bad path fails before any release.
	f, err := os.OpenFile(out, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("--out: %w (the file must not exist yet)", err)
	}
	rel, err := rf.release(cmd.Context(), rf.vault.logger(cmd.ErrOrStderr()))
	if err != nil {
		f.Close()
		os.Remove(out)
		return err
	}
	sec := rel.Secret
	defer sec.Wipe()
	_, werr := f.Write(sec)
	if cerr := f.Close(); werr == nil {
		werr = cerr
	}
	if werr != nil {
		os.Remove(out)
		return fmt.Errorf("write %s: %w", out, werr)
	}
	if jsonOut {
		return printJSON(cmd.OutOrStdout(), struct {
			Kid         string `json:"kid"`
			Kty         string `json:"kty"`
			SecretBytes int    `json:"secret_bytes"`
			Out         string `json:"out"`
		}{rel.KID, rel.Kty, len(sec), out})
	}
	fmt.Fprintf(cmd.ErrOrStderr(), "released %d-byte secret of key %q to %s\n", len(sec), rf.vault.name, out)
	return nil
}
