package maa

import (
	"bytes"
	"context"
	"encoding/base64"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/blobseal/blobseal/internal/secret"
)

// replay answers requests from a recording: the issuer's /certs body for
// its URL, 404 for anything else (the recording has no OpenID metadata, so
// the verifier falls back to {issuer}/certs). Nothing leaves the machine.
type replay map[string][]byte

func (r replay) RoundTrip(req *http.Request) (*http.Response, error) {
	body, ok := r[req.URL.String()]
	status := http.StatusOK
	if !ok {
		status, body = http.StatusNotFound, nil
	}
	return &http.Response{StatusCode: status, Body: io.NopCloser(bytes.NewReader(body)), Header: http.Header{}, Request: req}, nil
}

// A real MAA token, verified with the real x5c-only signing key its issuer
// published, at the time it was recorded (testdata/README.md).
func TestVerifyRecordedMAAToken(t *testing.T) {
	tok, err := os.ReadFile("testdata/maa_sharedwus_token.jwt")
	if err != nil {
		t.Fatal(err)
	}
	certs, err := os.ReadFile("testdata/maa_certs_sharedwus.json")
	if err != nil {
		t.Fatal(err)
	}
	const iss = "https://sharedwus.wus.attest.azure.net"
	hc := &http.Client{Transport: replay{iss + "/certs": certs}}
	recorded := time.Unix(1620244716, 0).Add(time.Minute) // iat + 1 minute; the response's Date header
	v, err := NewVerifier(VerifierOptions{AllowedIssuers: []string{iss}, HTTPClient: hc, Clock: func() time.Time { return recorded }})
	if err != nil {
		t.Fatal(err)
	}
	token := secret.Token(strings.TrimSpace(string(tok)))
	c, err := v.Verify(context.Background(), token)
	if err != nil {
		t.Fatal(err)
	}
	if c.Issuer != iss || c.Raw["x-ms-attestation-type"] != "sgx" || c.Expiry.Unix() != 1620273516 {
		t.Fatalf("claims: iss %s type %v exp %v", c.Issuer, c.Raw["x-ms-attestation-type"], c.Expiry)
	}

	// Now it has expired; a changed payload byte breaks the signature.
	now, _ := NewVerifier(VerifierOptions{AllowedIssuers: []string{iss}, HTTPClient: hc})
	if _, err := now.Verify(context.Background(), token); err == nil || !strings.Contains(err.Error(), "expired") {
		t.Fatalf("at the real time: %v", err)
	}
	parts := strings.Split(string(token), ".")
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		t.Fatal(err)
	}
	payload = bytes.Replace(payload, []byte(`"x-ms-sgx-is-debuggable":false`), []byte(`"x-ms-sgx-is-debuggable":true `), 1)
	tampered := secret.Token(parts[0] + "." + base64.RawURLEncoding.EncodeToString(payload) + "." + parts[2])
	v2, _ := NewVerifier(VerifierOptions{AllowedIssuers: []string{iss}, HTTPClient: hc, Clock: func() time.Time { return recorded }})
	if _, err := v2.Verify(context.Background(), tampered); err == nil || !strings.Contains(err.Error(), "signature") {
		t.Fatalf("tampered token: %v", err)
	}
}
