package localhsm

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/blobseal/blobseal/internal/secret"
	"github.com/blobseal/blobseal/keyrelease/localca"
)

// FuzzRequests feeds arbitrary import, create and release bodies to the
// handler: every answer must be a Key Vault JSON body, never a 500 or panic.
func FuzzRequests(f *testing.F) {
	ca, err := localca.New("fuzz", time.Hour)
	if err != nil {
		f.Fatal(err)
	}
	cert, _ := ca.ServerCert("127.0.0.1")
	s, err := New(Options{TLSCert: cert, TrustedIssuers: []string{"https://127.0.0.1:1"}, BearerTokens: []secret.Token{"tok"},
		IssuerHTTPClient: &http.Client{Timeout: 100 * time.Millisecond}})
	if err != nil {
		f.Fatal(err)
	}
	h := s.Handler()
	// A released-able key so release bodies reach token verification.
	seed := `{"key":{"kty":"oct-HSM","k":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"},"Hsm":true,"attributes":{"exportable":true},"release_policy":{"data":"eyJ2ZXJzaW9uIjoiMS4wLjAiLCJhbnlPZiI6W3siYXV0aG9yaXR5IjoiaHR0cHM6Ly8xMjcuMC4wLjE6MSIsImFsbE9mIjpbeyJjbGFpbSI6IngiLCJlcXVhbHMiOjF9XX1dfQ"}}`
	req := httptest.NewRequest(http.MethodPut, "https://127.0.0.1/keys/k?api-version=7.4", bytes.NewReader([]byte(seed)))
	req.Header.Set("Authorization", "Bearer tok")
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	if rec.Code != http.StatusOK {
		f.Fatalf("seed import: %d %s", rec.Code, rec.Body)
	}
	f.Add(uint8(0), []byte(`{"key":{"kty":"oct-HSM","k":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"},"Hsm":true,"attributes":{"exportable":true},"release_policy":{"data":"eyJ2ZXJzaW9uIjoiMS4wLjAiLCJhbnlPZiI6W3siYXV0aG9yaXR5IjoiaHR0cHM6Ly8xMjcuMC4wLjE6MSIsImFsbE9mIjpbeyJjbGFpbSI6IngiLCJlcXVhbHMiOjF9XX1dfQ"}}`))
	f.Add(uint8(1), []byte(`{"kty":"RSA-HSM","key_size":2048}`))
	f.Add(uint8(2), []byte(`{"target":"eyJhbGciOiJSUzI1NiIsImtpZCI6IngifQ.eyJpc3MiOiJodHRwczovL2V2aWwifQ.AAAA","enc":"CKM_RSA_AES_KEY_WRAP"}`))
	f.Fuzz(func(t *testing.T, route uint8, body []byte) {
		method, path := http.MethodPut, "/keys/k"
		switch route % 3 {
		case 1:
			method, path = http.MethodPost, "/keys/k/create"
		case 2:
			method, path = http.MethodPost, "/keys/k/release"
		}
		req := httptest.NewRequest(method, "https://127.0.0.1"+path+"?api-version=7.4", bytes.NewReader(body))
		req.Header.Set("Authorization", "Bearer tok")
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code >= 500 {
			t.Fatalf("HTTP %d for %q", rec.Code, body)
		}
		var v map[string]any
		if err := json.Unmarshal(rec.Body.Bytes(), &v); err != nil {
			t.Fatalf("non-JSON answer %q", rec.Body.Bytes())
		}
	})
}
