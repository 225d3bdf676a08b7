package main

import (
	"context"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azidentity"

	"github.com/blobseal/blobseal/internal/secret"
	"github.com/blobseal/blobseal/keyrelease/hsm"
	"github.com/blobseal/blobseal/keyrelease/policy"
)

// multiFlag collects a repeatable string flag.
type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

// vaultFlags are shared by key import and key release.
type vaultFlags struct {
	vault, name, bearerFile, caFile, devDir string
	verbose                                 bool
}

func (v *vaultFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&v.vault, "vault", "", "vault URL: https://NAME.managedhsm.azure.net, https://NAME.vault.azure.net or the local key service")
	fs.StringVar(&v.name, "name", "", "key name")
	fs.StringVar(&v.bearerFile, "bearer-token-file", "", "file holding a bearer token for the vault (default: azidentity — managed identity, workload identity or Azure CLI)")
	fs.StringVar(&v.caFile, "ca-file", "", "PEM file of extra CA roots for TLS and for the vault's signed responses (local stack)")
	fs.StringVar(&v.devDir, "dev-dir", "", "directory of a running `blobseal dev serve`: fills --vault, --ca-file, --bearer-token-file (and --maa-endpoint) from its stack.json")
	fs.BoolVar(&v.verbose, "v", false, "debug logging (never prints keys or tokens)")
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
		return usageErrorf("--name is required")
	}
	return nil
}

func (v *vaultFlags) logger() *slog.Logger {
	level := slog.LevelInfo
	if v.verbose {
		level = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
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

func runKeyImport(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("key import", flag.ContinueOnError)
	var vf vaultFlags
	vf.register(fs)
	kty := fs.String("kty", "oct-HSM", "key type: oct-HSM (Managed HSM) or RSA-HSM (Managed HSM, Key Vault Premium)")
	keyFile := fs.String("key-file", "", "key to import: 32 raw bytes for oct-HSM (the image's key file), PEM RSA private key for RSA-HSM; omit to have the vault generate it")
	authority := fs.String("authority", "", "attestation service URL the policy trusts, e.g. https://sharedeus.eus.attest.azure.net (default with --dev-dir: the local one)")
	hostData := fs.String("host-data", "", "expected x-ms-sevsnpvm-hostdata: hex SHA-256 of the CCE policy")
	ccePolicy := fs.String("cce-policy", "", "CCE policy file (Rego text or az confcom's base64) to compute --host-data from")
	allowDebug := fs.Bool("allow-debug", false, "do not require x-ms-sevsnpvm-is-debuggable=false (NEVER for production keys)")
	compliance := fs.String("compliance-status", "", "required x-ms-compliance-status, e.g. azure-compliant-uvm")
	immutable := fs.Bool("immutable", false, "make the release policy immutable")
	printPolicy := fs.Bool("print-policy", false, "print the release policy JSON")
	var claims multiFlag
	fs.Var(&claims, "claim", "extra required claim NAME=VALUE (repeatable)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usageErrorf("unexpected arguments %v", fs.Args())
	}
	st, err := vf.applyDev()
	if err != nil {
		return err
	}
	if *authority == "" && st != nil {
		*authority = st.MAAEndpoint
	}
	if err := vf.check(); err != nil {
		return err
	}
	if *authority == "" {
		return usageErrorf("--authority is required (the attestation service URL the release policy trusts)")
	}
	if *kty != "oct-HSM" && *kty != "RSA-HSM" {
		return usageErrorf("--kty must be oct-HSM or RSA-HSM, not %q", *kty)
	}
	if (*hostData == "") == (*ccePolicy == "") {
		return usageErrorf("give exactly one of --host-data HEX or --cce-policy FILE (the policy must pin the container group)")
	}
	hd := *hostData
	if *ccePolicy != "" {
		sum, err := hostDataFromCCE(*ccePolicy)
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
	if !*allowDebug {
		list = append(list, policy.Claim{Name: "x-ms-sevsnpvm-is-debuggable", Value: false})
	}
	if *compliance != "" {
		list = append(list, policy.Claim{Name: "x-ms-compliance-status", Value: *compliance})
	}
	for _, c := range claims {
		name, value, ok := strings.Cut(c, "=")
		if !ok || name == "" {
			return usageErrorf("--claim %q must be NAME=VALUE", c)
		}
		list = append(list, policy.Claim{Name: name, Value: claimValue(value)})
	}
	pol, err := policy.Build(*authority, list)
	if err != nil {
		return usageErrorf("%v", err)
	}
	polJSON, err := json.Marshal(pol)
	if err != nil {
		return err
	}
	spec := hsm.KeySpec{Kty: *kty, Policy: polJSON, Immutable: *immutable}
	if *keyFile != "" {
		if err := loadKeyFile(*keyFile, &spec); err != nil {
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
	client, err := hsm.New(vf.vault, cred, hsm.Options{HTTPClient: httpClientFor(roots), TrustedRoots: roots, Logger: vf.logger()})
	if err != nil {
		return err
	}
	kid, err := client.PutKey(ctx, vf.name, spec)
	if err != nil {
		return err
	}
	fmt.Println(kid)
	if *printPolicy {
		fmt.Println(string(polJSON))
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

func runKeyRelease(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("key release", flag.ContinueOnError)
	var rf releaseFlags
	rf.register(fs)
	// The names this command had before it shared mount's release flags.
	fs.StringVar(&rf.vault.name, "name", "", "same as --key-name")
	fs.StringVar(&rf.keyVersion, "version", "", "same as --key-version")
	fs.StringVar(&rf.simHostData, "sim-host-data", "", "same as --simulated-host-data")
	fs.StringVar(&rf.simCCE, "sim-cce-policy", "", "same as --simulated-cce-policy")
	fs.BoolVar(&rf.simDebug, "sim-debuggable", false, "same as --simulated-debuggable")
	fs.BoolVar(&rf.vault.verbose, "v", false, "debug logging (never prints keys or tokens)")
	out := fs.String("out", "", "file to write the 32-byte secret to (created with mode 0600; must not exist)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usageErrorf("unexpected arguments %v", fs.Args())
	}
	if err := rf.prepare(); err != nil {
		return err
	}
	if *out == "" {
		return usageErrorf("--out FILE is required (the secret is never printed)")
	}
	// Create the output first so a bad path fails before any release.
	f, err := os.OpenFile(*out, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("--out: %w (the file must not exist yet)", err)
	}
	sec, err := rf.release(ctx, rf.vault.logger())
	if err != nil {
		f.Close()
		os.Remove(*out)
		return err
	}
	defer sec.Wipe()
	_, werr := f.Write(sec)
	if cerr := f.Close(); werr == nil {
		werr = cerr
	}
	if werr != nil {
		os.Remove(*out)
		return fmt.Errorf("write %s: %w", *out, werr)
	}
	fmt.Fprintf(os.Stderr, "released %d-byte secret of key %q to %s\n", len(sec), rf.vault.name, *out)
	return nil
}
