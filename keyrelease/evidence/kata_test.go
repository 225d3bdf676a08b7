package evidence

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

func copyFixture(t *testing.T, dir string) []byte {
	t.Helper()
	b, err := os.ReadFile("testdata/sidecar-security-policy-base64")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, FileSecurityPolicy), b, 0o644); err != nil {
		t.Fatal(err)
	}
	return b
}

// On confidential AKS the collateral is where Kata mounts it; the Azure
// sidecar's own security context file reads from there.
func TestCollateralFromKataDirectory(t *testing.T) {
	root := t.TempDir()
	kata := filepath.Join(root, KataSecurityContextDir)
	copyFixture(t, kata)
	if err := os.WriteFile(filepath.Join(kata, FileReferenceInfo), []byte("Y29zZS1zaWduMQ=="), 0o644); err != nil {
		t.Fatal(err)
	}
	col, err := LoadCollateral(envMap(nil), root)
	if err != nil {
		t.Fatal(err)
	}
	if col.Source != kata || !bytes.HasPrefix(col.SecurityPolicy, []byte("package policy\n")) || string(col.ReferenceInfo) != "cose-sign1" {
		t.Fatalf("collateral from %q: policy %.20q, reference %q", col.Source, col.SecurityPolicy, col.ReferenceInfo)
	}
	if col.HostAMDCert != nil {
		t.Fatal("host certificate from nowhere")
	}
}

// The Azure sidecars read a security context directory before the UVM_*
// environment; blobseal does the same, and the ACI directory comes before
// the Kata one.
func TestCollateralOrderDirectoryFirst(t *testing.T) {
	root := t.TempDir()
	aci := filepath.Join(root, "security-context-123")
	copyFixture(t, aci)
	copyFixture(t, filepath.Join(root, KataSecurityContextDir))
	env := envMap(map[string]string{EnvSecurityPolicy: "b3RoZXI="}) // "other"
	col, err := LoadCollateral(env, root)
	if err != nil {
		t.Fatal(err)
	}
	if col.Source != aci || !bytes.HasPrefix(col.SecurityPolicy, []byte("package policy")) {
		t.Fatalf("source %q, policy %.20q", col.Source, col.SecurityPolicy)
	}
	explicit := filepath.Join(root, "explicit")
	copyFixture(t, explicit)
	env = envMap(map[string]string{EnvSecurityContextDir: explicit, EnvSecurityPolicy: "b3RoZXI="})
	if col, err = LoadCollateral(env, root); err != nil || col.Source != explicit {
		t.Fatalf("UVM_SECURITY_CONTEXT_DIR: %v %q", err, col.Source)
	}
	// No directory at all: the environment.
	if col, err = LoadCollateral(envMap(map[string]string{EnvSecurityPolicy: "b3RoZXI="}), t.TempDir()); err != nil || col.Source != "environment" || string(col.SecurityPolicy) != "other" {
		t.Fatalf("environment: %v %+v", err, col)
	}
}
