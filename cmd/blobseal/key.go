package main

import (
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azidentity"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/blobseal/blobseal/internal/secret"
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
	fs.StringVar(&v.bearerFile, "bearer-token-file", "", "file holding a bearer token for the vault (default: azidentity — managed identity, workload identity or Azure CLI)")
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

// roots returns the system pool plus --ca-file (nil pool: system only).
func (v *vaultFlags) roots() (*x509.CertPool, error) {
	if v.caFile == "" {
		return nil, nil
	}
	pemData, err := os.ReadFile(v.caFile)
	if err != nil {
		return nil, fmt.Errorf("--ca-file: %w", err)
	}
	pool, err := x509.SystemCertPool()
	if err != nil {
		pool = x509.NewCertPool()
	}
	if !pool.AppendCertsFromPEM(pemData) {
		return nil, fmt.Errorf("--ca-file %s holds no PEM certificate", v.caFile)
	}
	return pool, nil
}

func httpClientFor(roots *x509.CertPool) *http.Client {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	if roots != nil {
		tr.TLSClientConfig = &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}
	}
	return &http.Client{Transport: tr, Timeout: 60 * time.Second}
}

func (v *vaultFlags) credential() (azcore.TokenCredential, error) {
	if v.bearerFile != "" {
		b, err := os.ReadFile(v.bearerFile)
		if err != nil {
			return nil, fmt.Errorf("--bearer-token-file: %w", err)
		}
		tok := strings.TrimSpace(string(b))
		secret.Wipe(b)
		if tok == "" {
			return nil, fmt.Errorf("--bearer-token-file %s is empty", v.bearerFile)
		}
		return hsm.BearerToken(secret.Token(tok)), nil
	}
	cred, err := azidentity.NewDefaultAzureCredential(nil)
	if err != nil {
		return nil, fmt.Errorf("no Azure credential (managed identity, workload identity, Azure CLI) and no --bearer-token-file: %w", err)
	}
	return cred, nil
}

// hostDataFromCCE computes HOST_DATA from a CCE policy file the way ACI
// does: SHA-256 of the policy text. The file may hold the Rego text or the
// base64 form `az confcom acipolicygen` prints (and ARM templates carry).
func hostDataFromCCE(path string) ([32]byte, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return [32]byte{}, fmt.Errorf("CCE policy: %w", err)
	}
	text := raw
	trimmed := strings.TrimSpace(string(raw))
	if dec, err := base64.StdEncoding.DecodeString(trimmed); err == nil && len(dec) > 0 && utf8.Valid(dec) && !strings.ContainsAny(trimmed, " \n\t") {
		text = dec
	}
	if len(text) == 0 {
		return [32]byte{}, fmt.Errorf("CCE policy file %s is empty", path)
	}
	return sha256.Sum256(text), nil
}

func parseHostData(s string) (string, error) {
	s = strings.ToLower(strings.TrimSpace(s))
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != 32 {
		return "", fmt.Errorf("--host-data must be 64 hex digits (the SHA-256 of the CCE policy), got %q", s)
	}
	return s, nil
}

// claimValue reads a --claim value: true/false and JSON numbers keep their
// type (MAA emits them so); anything else is a string.
func claimValue(s string) any {
	switch s {
	case "true":
		return true
	case "false":
		return false
	}
	if f, err := strconv.ParseFloat(s, 64); err == nil && strings.Trim(s, "0123456789.-+eE") == "" {
		return f
	}
	return s
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
	f.BoolVar(&o.printPolicy, "print-policy", false, "print the release policy JSON")
	f.StringArrayVar(&o.claims, "claim", nil, "extra required claim NAME=VALUE (repeatable)")
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
	if err := vf.check(); err != nil {
		return err
	}
	if o.authority == "" {
		return usageErrorf("--authority is required (the attestation service URL the release policy trusts)")
	}
	if o.kty != "oct-HSM" && o.kty != "RSA-HSM" {
		return usageErrorf("--kty must be oct-HSM or RSA-HSM, not %q", o.kty)
	}
	hd := o.hostData
	if o.ccePolicy != "" {
		sum, err := hostDataFromCCE(o.ccePolicy)
		if err != nil {
			return err
		}
		hd = hex.EncodeToString(sum[:])
	} else if hd, err = parseHostData(hd); err != nil {
		return usageErrorf("%v", err)
	}
	list := []policy.Claim{
		{Name: "x-ms-attestation-type", Value: "sevsnpvm"},
		{Name: "x-ms-sevsnpvm-hostdata", Value: hd},
	}
	if !o.allowDebug {
		list = append(list, policy.Claim{Name: "x-ms-sevsnpvm-is-debuggable", Value: false})
	}
	if o.compliance != "" {
		list = append(list, policy.Claim{Name: "x-ms-compliance-status", Value: o.compliance})
	}
	for _, c := range o.claims {
		name, value, ok := strings.Cut(c, "=")
		if !ok || name == "" {
			return usageErrorf("--claim %q must be NAME=VALUE", c)
		}
		list = append(list, policy.Claim{Name: name, Value: claimValue(value)})
	}
	pol, err := policy.Build(o.authority, list)
	if err != nil {
		return usageErrorf("%v", err)
	}
	polJSON, err := json.Marshal(pol)
	if err != nil {
		return err
	}
	spec := hsm.KeySpec{Kty: o.kty, Policy: polJSON, Immutable: o.immutable}
	if o.keyFile != "" {
		if err := loadKeyFile(o.keyFile, &spec); err != nil {
			return err
		}
		defer secret.Wipe(spec.Oct)
	}
	roots, err := vf.roots()
	if err != nil {
		return err
	}
	cred, err := vf.credential()
	if err != nil {
		return err
	}
	client, err := hsm.New(vf.vault, cred, hsm.Options{HTTPClient: httpClientFor(roots), TrustedRoots: roots, Logger: vf.logger(cmd.ErrOrStderr())})
	if err != nil {
		return err
	}
	kid, err := client.PutKey(ctx, vf.name, spec)
	if err != nil {
		return err
	}
	out := cmd.OutOrStdout()
	if o.json {
		return printJSON(out, struct {
			Kid    string          `json:"kid"`
			Kty    string          `json:"kty"`
			Policy json.RawMessage `json:"release_policy"`
		}{kid, o.kty, polJSON})
	}
	fmt.Fprintln(out, kid)
	if o.printPolicy {
		fmt.Fprintln(out, string(polJSON))
	}
	return nil
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
	rel, err := rf.releaseKey(cmd.Context(), rf.vault.logger(cmd.ErrOrStderr()))
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
		}{rel.Kid, rel.Kty, len(sec), out})
	}
	fmt.Fprintf(cmd.ErrOrStderr(), "released %d-byte secret of key %q to %s\n", len(sec), rf.vault.name, out)
	return nil
}
