package keyrelease_test

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/base64"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/blobseal/blobseal/keyrelease"
	"github.com/blobseal/blobseal/keyrelease/evidence"
	"github.com/blobseal/blobseal/keyrelease/localca"
)

func TestTLSRootsAndHTTPClient(t *testing.T) {
	ca, err := localca.New("wiring test CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := ca.ServerCert("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("ok")) }))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	srv.StartTLS()
	t.Cleanup(srv.Close)

	dir := t.TempDir()
	caFile := filepath.Join(dir, "ca.pem")
	os.WriteFile(caFile, ca.PEM(), 0o600)
	roots, err := keyrelease.TLSRoots(caFile)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := keyrelease.HTTPClient(roots).Get(srv.URL)
	if err != nil {
		t.Fatalf("client with the CA file: %v", err)
	}
	resp.Body.Close()
	// Without the CA the server is not trusted.
	if _, err := keyrelease.HTTPClient(nil).Get(srv.URL); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("client with system roots only: %v", err)
	}
	if r, err := keyrelease.TLSRoots(""); r != nil || err != nil {
		t.Fatalf("no CA file: %v %v", r, err)
	}
	junk := filepath.Join(dir, "junk.pem")
	os.WriteFile(junk, []byte("not pem"), 0o600)
	if _, err := keyrelease.TLSRoots(junk); err == nil || !strings.Contains(err.Error(), "no PEM certificate") {
		t.Fatalf("junk CA file: %v", err)
	}
}

func TestHostData(t *testing.T) {
	rego := []byte("package policy\n\napi_version := \"0.10.0\"\n")
	want := sha256.Sum256(rego)
	for name, in := range map[string][]byte{"rego": rego, "base64": []byte(base64.StdEncoding.EncodeToString(rego) + "\n")} {
		got, err := keyrelease.HostData(in)
		if err != nil || got != want {
			t.Errorf("%s: %x %v", name, got, err)
		}
	}
	if _, err := keyrelease.HostData(nil); err == nil {
		t.Error("empty policy accepted")
	}
	if _, err := keyrelease.ParseHostData("abc"); err == nil || !strings.Contains(err.Error(), "64 hex digits") {
		t.Errorf("short host data: %v", err)
	}
}

func TestNewEvidenceSimulatedFromDir(t *testing.T) {
	dir := t.TempDir()
	hd := sha256.Sum256([]byte("p"))
	sim, err := evidence.LoadOrCreateSimulated(dir, evidence.SimulatedConfig{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := evidence.WriteSimulatedSigner(dir, sim); err != nil {
		t.Fatal(err)
	}
	prov, err := keyrelease.NewEvidence(keyrelease.EvidenceConfig{Provider: "simulated", SimulatedDir: dir, SimulatedHostData: hd})
	if err != nil {
		t.Fatal(err)
	}
	ev, err := prov.Get(context.Background(), [64]byte{1})
	if err != nil {
		t.Fatal(err)
	}
	if ev.HostData != hd {
		t.Fatalf("host data %x", ev.HostData)
	}
	if _, err := keyrelease.NewEvidence(keyrelease.EvidenceConfig{Provider: "simulated", SimulatedDir: t.TempDir()}); err == nil {
		t.Fatal("simulated provider without a signer in the directory accepted")
	}
}

func TestReadBearerFile(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "bearer")
	os.WriteFile(good, []byte("  eyJ.token.sig\n"), 0o600)
	if tok, err := keyrelease.ReadBearerFile(good); err != nil || tok.Reveal() != "eyJ.token.sig" {
		t.Fatalf("ReadBearerFile: %v", err)
	}
	empty := filepath.Join(dir, "empty")
	os.WriteFile(empty, []byte("\n"), 0o600)
	for path, want := range map[string]string{empty: "is empty", filepath.Join(dir, "missing"): "no such file"} {
		if _, err := keyrelease.ReadBearerFile(path); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want %q", path, err, want)
		}
	}
}
