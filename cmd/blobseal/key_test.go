package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const testCCE = "package policy\n\napi_version := \"0.10.0\"\n\nmount_device := {\"allowed\": true}\n"

// startDevStack runs `blobseal dev serve` in the background and waits for
// its stack.json.
func startDevStack(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- runIn(ctx, "dev", "serve", "--dir", dir) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("dev serve: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("dev serve did not stop")
		}
		if _, err := os.Stat(filepath.Join(dir, StackFile)); !os.IsNotExist(err) {
			t.Error("stack.json left behind after shutdown")
		}
	})
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if _, err := readDevStack(dir); err == nil {
			return dir
		}
		select {
		case err := <-done:
			t.Fatalf("dev serve exited: %v", err)
		case <-time.After(50 * time.Millisecond):
		}
	}
	t.Fatal("stack.json did not appear")
	return ""
}

func TestKeyImportAndReleaseWithDevStack(t *testing.T) {
	dev := startDevStack(t)
	st, err := readDevStack(dev)
	if err != nil {
		t.Fatal(err)
	}
	if info, err := os.Stat(st.BearerTokenFile); err != nil || info.Mode().Perm() != 0o600 {
		t.Fatalf("bearer token file: %v %v", info, err)
	}
	work := t.TempDir()
	key := make([]byte, 32)
	rand.Read(key)
	keyFile := filepath.Join(work, "keyfile.bin")
	os.WriteFile(keyFile, key, 0o600)
	// The key is imported with the policy in az confcom's base64 form and
	// released by a VM whose HOST_DATA is computed from the Rego text: both
	// must give the same SHA-256.
	b64Policy := filepath.Join(work, "policy.b64")
	os.WriteFile(b64Policy, []byte(base64.StdEncoding.EncodeToString([]byte(testCCE))+"\n"), 0o600)
	regoPolicy := filepath.Join(work, "policy.rego")
	os.WriteFile(regoPolicy, []byte(testCCE), 0o600)

	ctx := context.Background()
	stdout, _, err := runOut(ctx, "key", "import", "--json", "--dev-dir", dev, "--key-name", "fs-key", "--key-file", keyFile, "--cce-policy", b64Policy, "--compliance-status", "azure-compliant-uvm")
	if err != nil {
		t.Fatal(err)
	}
	var imported struct {
		Kid    string `json:"kid"`
		Kty    string `json:"kty"`
		Policy struct {
			AnyOf []struct {
				Authority string `json:"authority"`
			} `json:"anyOf"`
		} `json:"release_policy"`
	}
	if err := json.Unmarshal([]byte(stdout), &imported); err != nil || !strings.Contains(imported.Kid, "/keys/fs-key/") ||
		imported.Kty != "oct-HSM" || len(imported.Policy.AnyOf) != 1 || imported.Policy.AnyOf[0].Authority != st.MAAEndpoint {
		t.Fatalf("key import --json: %v\n%s", err, stdout)
	}
	out := filepath.Join(work, "released.bin")
	stdout, stderr, err := runOut(ctx, "key", "release", "--json", "--dev-dir", dev, "--key-name", "fs-key", "--attestation", "simulated", "--simulated-cce-policy", regoPolicy, "--out", out)
	if err != nil {
		t.Fatal(err)
	}
	var released map[string]any
	if err := json.Unmarshal([]byte(stdout), &released); err != nil || released["kid"] != imported.Kid || released["kty"] != "oct-HSM" ||
		released["secret_bytes"] != 32.0 || released["out"] != out || len(released) != 4 {
		t.Fatalf("key release --json: %v\n%s", err, stdout)
	}
	for _, enc := range []string{hex.EncodeToString(key), base64.StdEncoding.EncodeToString(key), base64.RawURLEncoding.EncodeToString(key)} {
		if strings.Contains(stdout+stderr, enc) {
			t.Fatal("the released secret appears in the command's output")
		}
	}
	got, err := os.ReadFile(out)
	if err != nil || !bytes.Equal(got, key) {
		t.Fatalf("released secret differs from the key file (%v)", err)
	}
	if info, _ := os.Stat(out); info.Mode().Perm() != 0o600 {
		t.Fatalf("--out mode %v, want 0600", info.Mode().Perm())
	}

	// Another CCE policy: refused, naming the claim, and no file left.
	other := filepath.Join(work, "other.rego")
	os.WriteFile(other, []byte(testCCE+"\nextra := 1\n"), 0o600)
	out2 := filepath.Join(work, "denied.bin")
	err = runIn(ctx, "key", "release", "--dev-dir", dev, "--key-name", "fs-key", "--attestation", "simulated", "--simulated-cce-policy", other, "--out", out2)
	if err == nil || !strings.Contains(err.Error(), "x-ms-sevsnpvm-hostdata") {
		t.Fatalf("wrong CCE policy: %v", err)
	}
	if _, serr := os.Stat(out2); !os.IsNotExist(serr) {
		t.Fatal("a refused release left its --out file")
	}
	// A debuggable VM is refused by the default policy.
	err = runIn(ctx, "key", "release", "--dev-dir", dev, "--key-name", "fs-key", "--attestation", "simulated", "--simulated-cce-policy", regoPolicy, "--simulated-debuggable", "--out", out2)
	if err == nil || !strings.Contains(err.Error(), "x-ms-sevsnpvm-is-debuggable") {
		t.Fatalf("debuggable VM: %v", err)
	}
	// --out must not overwrite.
	if err := runIn(ctx, "key", "release", "--dev-dir", dev, "--key-name", "fs-key", "--attestation", "simulated", "--simulated-cce-policy", regoPolicy, "--out", out); err == nil || !strings.Contains(err.Error(), "must not exist") {
		t.Fatalf("existing --out: %v", err)
	}

	// A vault-generated RSA-HSM key releases the same HKDF secret twice.
	if err := runIn(ctx, "key", "import", "--dev-dir", dev, "--key-name", "rsa-key", "--kty", "RSA-HSM", "--host-data", strings.Repeat("ab", 32), "--allow-debug"); err != nil {
		t.Fatal(err)
	}
	var secrets [][]byte
	for i, alg := range []string{"RSA_AES_KEY_WRAP_256", "RSA_AES_KEY_WRAP_384"} {
		p := filepath.Join(work, "rsa"+string(rune('0'+i)))
		if err := runIn(ctx, "key", "release", "--dev-dir", dev, "--key-name", "rsa-key", "--attestation", "simulated", "--simulated-host-data", strings.Repeat("AB", 32), "--simulated-debuggable", "--wrap-alg", alg, "--salt", "0011", "--out", p); err != nil {
			t.Fatal(err)
		}
		b, _ := os.ReadFile(p)
		secrets = append(secrets, b)
	}
	if len(secrets[0]) != 32 || !bytes.Equal(secrets[0], secrets[1]) {
		t.Fatal("RSA-HSM releases differ or are not 32 bytes")
	}
}

func TestKeyCommandUsage(t *testing.T) {
	ctx := context.Background()
	vault := []string{"--vault", "https://x.managedhsm.azure.net", "--key-name", "k"}
	imp := func(extra ...string) []string {
		return append(append([]string{"key", "import"}, vault...), append([]string{"--authority", "https://a.example"}, extra...)...)
	}
	rel := func(extra ...string) []string {
		return append(append([]string{"key", "release"}, vault...), append([]string{"--maa-endpoint", "https://a.example"}, extra...)...)
	}
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"key", "import", "--key-name", "k", "--host-data", strings.Repeat("0", 64)}, "--vault"},
		{imp(), "one of --cce-policy or --host-data is required"},
		{imp("--host-data", strings.Repeat("0", 64), "--cce-policy", "p.rego"), "give either --cce-policy or --host-data, not both"},
		{imp("--host-data", "zz"), "64 hex digits"},
		{imp("--host-data", strings.Repeat("0", 64), "--kty", "EC-HSM"), "--kty"},
		{imp("--host-data", strings.Repeat("0", 64), "--claim", "novalue"), "NAME=VALUE"},
		{imp("--host-data", strings.Repeat("0", 64), "--name", "k2"), "--key-name and its old name --name"},
		{rel(), "--out is required"},
		{rel("--out", "f", "--wrap-alg", "X"), "unknown key wrap algorithm"},
		{rel("--out", "f", "--simulated-debuggable"), "--attestation simulated"},
		{rel("--out", "f", "--simulated-host-data", "x", "--simulated-cce-policy", "y"), "not both"},
		{rel("--out", "f", "--oout", "g"), "did you mean --out?"},
		{[]string{"dev", "serve"}, "--dir is required"},
		{[]string{"key", "relase"}, "did you mean release?"},
	}
	for _, c := range cases {
		err := runIn(ctx, c.args...)
		if !errors.Is(err, errUsage) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v: got %v, want usage error with %q", c.args, err, c.want)
		}
	}
}

// Hex claims made only of digits (familyId, imageId) must stay strings in
// the release policy: as numbers (familyId 0100…00 became 1e+30) the
// policy can never match the token. The round trip runs the real binary
// against the local stack, whose simulated reports carry a zero familyId.
func TestKeyImportDigitOnlyHexClaim(t *testing.T) {
	const zeroFamily = "00000000000000000000000000000000"
	const otherFamily = "01000000000000000000000000000000"
	hostData := strings.Repeat("0", 64)

	// --print-policy prints the policy and touches no vault (none is given).
	stdout, stderr, code := blobseal(t, "key", "import", "--print-policy", "--key-name", "k", "--authority", "https://maa.example",
		"--host-data", hostData, "--claim", "x-ms-sevsnpvm-familyId="+otherFamily, "--claim", "x-ms-sevsnpvm-guestsvn=2")
	if code != 0 {
		t.Fatalf("key import --print-policy: exit %d\n%s", code, stderr)
	}
	equals := map[string]any{}
	var printed struct {
		AnyOf []struct {
			Authority string `json:"authority"`
			AllOf     []struct {
				Claim  string `json:"claim"`
				Equals any    `json:"equals"`
			} `json:"allOf"`
		} `json:"anyOf"`
	}
	if err := json.Unmarshal([]byte(stdout), &printed); err != nil || len(printed.AnyOf) != 1 {
		t.Fatalf("--print-policy output is not one policy: %v\n%s", err, stdout)
	}
	for _, c := range printed.AnyOf[0].AllOf {
		equals[c.Claim] = c.Equals
	}
	if equals["x-ms-sevsnpvm-familyId"] != otherFamily || equals["x-ms-sevsnpvm-guestsvn"] != 2.0 ||
		equals["x-ms-sevsnpvm-hostdata"] != hostData || equals["x-ms-sevsnpvm-is-debuggable"] != false {
		t.Fatalf("claims in the printed policy: %v", equals)
	}

	dev := startDevStack(t)
	work := t.TempDir()
	imp := func(name, family string, extra ...string) string {
		t.Helper()
		args := append([]string{"key", "import", "--dev-dir", dev, "--key-name", name, "--host-data", hostData,
			"--claim", "x-ms-sevsnpvm-familyId=" + family}, extra...)
		stdout, stderr, code := blobseal(t, args...)
		if code != 0 {
			t.Fatalf("%v: exit %d\n%s", args, code, stderr)
		}
		return stdout
	}
	// What --print-policy prints is exactly what the import sends.
	preview := imp("fam-key", zeroFamily, "--print-policy")
	var sent struct {
		Policy json.RawMessage `json:"release_policy"`
	}
	if err := json.Unmarshal([]byte(imp("fam-key", zeroFamily, "--json")), &sent); err != nil {
		t.Fatal(err)
	}
	var a, b bytes.Buffer
	json.Compact(&a, []byte(preview))
	json.Compact(&b, sent.Policy)
	if a.String() != b.String() {
		t.Fatalf("--print-policy printed\n%s\nbut the import sent\n%s", a.String(), b.String())
	}
	release := func(name string) (string, int) {
		out := filepath.Join(work, name)
		_, stderr, code := blobseal(t, "key", "release", "--dev-dir", dev, "--key-name", name, "--attestation", "simulated",
			"--simulated-host-data", hostData, "--out", out)
		return stderr, code
	}
	if stderr, code := release("fam-key"); code != 0 {
		t.Fatalf("a zero familyId claim does not match the zero familyId token: exit %d\n%s", code, stderr)
	}
	imp("other-fam-key", otherFamily)
	if stderr, code := release("other-fam-key"); code != 1 || !strings.Contains(stderr, "x-ms-sevsnpvm-familyId") {
		t.Fatalf("another familyId: exit %d, want 1 naming the claim\n%s", code, stderr)
	}
}
