package skr

import (
	"context"
	"encoding/base64"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blobseal/blobseal/keyrelease"
	"github.com/blobseal/blobseal/keyrelease/evidence"
)

// SkrSideCarArgs of Microsoft's confidential AKS Kafka sample (a Kata pod
// running mcr.microsoft.com/aci/skr:2.7), verbatim.
const kafkaSampleArgs = "ewogICAgImNlcnRjYWNoZSI6IHsKCQkiZW5kcG9pbnRfdHlwZSI6ICJMb2NhbFRISU0iLAoJCSJlbmRwb2ludCI6ICIxNjkuMjU0LjE2OS4yNTQvbWV0YWRhdGEvVEhJTS9hbWQvY2VydGlmaWNhdGlvbiIKCX0gIAp9"

func TestParseSkrSideCarArgs(t *testing.T) {
	c, err := ParseSkrSideCarArgs(kafkaSampleArgs)
	if err != nil {
		t.Fatal(err)
	}
	if cc := c.Evidence.CertCache; cc.Kind != evidence.CertCacheTHIM || cc.URL != "http://169.254.169.254/metadata/THIM/amd/certification" {
		t.Fatalf("cert cache %+v", cc)
	}
	js := `{"certcache":{"endpoint_type":"AzCache","endpoint":"americas.test.acccache.azure.net","tee_type":"SevSnpVM","api_version":"api-version=2020-10-15-preview"},"identity":{"client_id":"1234"}}`
	if c, err = ParseSkrSideCarArgs(base64.StdEncoding.EncodeToString([]byte(js))); err != nil || c.IdentityClientID != "1234" || c.Evidence.CertCache.URL != "https://americas.test.acccache.azure.net" {
		t.Fatalf("%+v %v", c, err)
	}
	if c, err := ParseSkrSideCarArgs(""); err != nil || c.Evidence.CertCache.URL != "" {
		t.Fatalf("empty: %+v %v", c, err)
	}
	for in, want := range map[string]string{
		"%%%": "not base64",
		base64.StdEncoding.EncodeToString([]byte(`{"certcache":{"endpoint":"x","endpoint_type":"Other"}}`)): "AzCache, LocalTHIM or AMD",
		base64.StdEncoding.EncodeToString([]byte(`{"cert_cache":{}}`)):                                      "expected JSON",
	} {
		if _, err := ParseSkrSideCarArgs(in); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%.30s: %v, want %q", in, err, want)
		}
	}
}

// Run wires evidence, roots and identity through keyrelease and serves.
func TestRunServes(t *testing.T) {
	dir := t.TempDir()
	sim, err := evidence.LoadOrCreateSimulated(dir, evidence.SimulatedConfig{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := evidence.WriteSimulatedSigner(dir, sim); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	addrc := make(chan string, 1)
	done := make(chan error, 1)
	go func() {
		done <- Run(ctx, Config{Address: "127.0.0.1:0", Evidence: keyrelease.EvidenceConfig{Provider: "simulated", SimulatedDir: dir},
			Ready: func(a string) { addrc <- a }}, nil)
	}()
	var addr string
	select {
	case addr = <-addrc:
	case err := <-done:
		t.Fatal(err)
	}
	resp, err := http.Post("http://"+addr+"/attest/raw", "application/json", strings.NewReader(`{"runtime_data":"aGk="}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("attest/raw: %d", resp.StatusCode)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	// Bad wiring fails before serving, naming the cause.
	junk := filepath.Join(dir, "junk.pem")
	os.WriteFile(junk, []byte("x"), 0o600)
	err = Run(context.Background(), Config{CAFile: junk, Evidence: keyrelease.EvidenceConfig{Provider: "simulated", SimulatedDir: dir}}, nil)
	if err == nil || !strings.Contains(err.Error(), "no PEM certificate") {
		t.Fatalf("junk CA file: %v", err)
	}
}
