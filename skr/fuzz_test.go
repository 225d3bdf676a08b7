package skr

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/blobseal/blobseal/keyrelease/evidence"
)

// FuzzRequestFields feeds untrusted request fields to their parsers: no
// panic, and what is accepted is well formed.
func FuzzRequestFields(f *testing.F) {
	f.Add("fs-key", "sharedeus2.eus2.attest.azure.net", "aGVsbG8=")
	f.Add("https://v.managedhsm.azure.net/keys/k/0123", "https://127.0.0.1:8443/", "RVhBTVBMRV9DT01CSU5FRA")
	f.Add("a/b/c", "http://x", "***")
	f.Fuzz(func(t *testing.T, kid, endpoint, runtime string) {
		if name, version, e := keyName(kid); e == nil {
			if name == "" || strings.ContainsAny(name+version, "/?#") {
				t.Fatalf("kid %q accepted as %q/%q", kid, name, version)
			}
		}
		if u, e := endpointURL("maa_endpoint", endpoint); e == nil && !strings.HasPrefix(u, "https://") {
			t.Fatalf("endpoint %q accepted as %q", endpoint, u)
		}
		_, _ = runtimeData(runtime)
	})
}

// FuzzAttestRawBody posts arbitrary bodies to /attest/raw (simulated
// evidence): every answer is one JSON object with the right status class.
func FuzzAttestRawBody(f *testing.F) {
	sim, err := evidence.NewSimulated(evidence.SimulatedConfig{})
	if err != nil {
		f.Fatal(err)
	}
	srv, err := New(Options{Evidence: sim, MaxBodyBytes: 4096})
	if err != nil {
		f.Fatal(err)
	}
	f.Add([]byte(`{"runtime_data": "aGVsbG8="}`))
	f.Add([]byte(`{"runtime_data": 5}`))
	f.Add([]byte(`{}{}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		rec := httptest.NewRecorder()
		req := httptest.NewRequest(http.MethodPost, "/attest/raw", strings.NewReader(string(body)))
		srv.Handler().ServeHTTP(rec, req)
		if rec.Code != http.StatusOK && rec.Code != http.StatusBadRequest && rec.Code != http.StatusRequestEntityTooLarge {
			t.Fatalf("status %d for %q", rec.Code, body)
		}
		if !strings.HasPrefix(rec.Body.String(), "{") || strings.Count(rec.Body.String(), "\n") > 0 {
			t.Fatalf("response %q", rec.Body.String())
		}
	})
}

func FuzzParseSkrSideCarArgs(f *testing.F) {
	f.Add(kafkaSampleArgs)
	f.Add("e30=")
	f.Fuzz(func(t *testing.T, s string) {
		c, err := ParseSkrSideCarArgs(s)
		if err == nil && c.Evidence.CertCache.URL != "" && !strings.HasPrefix(c.Evidence.CertCache.URL, "http") {
			t.Fatalf("cert cache URL %q", c.Evidence.CertCache.URL)
		}
	})
}
