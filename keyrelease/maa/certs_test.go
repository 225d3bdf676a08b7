package maa

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"

	"github.com/blobseal/blobseal/internal/secret"
)

// The recorded /certs document of a real MAA instance (see testdata/README.md)
// has no n/e: the key must come from the x5c certificate.
func TestParseSigningKeysRealMAACerts(t *testing.T) {
	body, err := os.ReadFile("testdata/maa_certs_shareduks.json")
	if err != nil {
		t.Fatal(err)
	}
	// A strict JWK parser refuses it: this is the bug the fixture shows.
	var strict jose.JSONWebKeySet
	if err := json.Unmarshal(body, &strict); err == nil {
		t.Fatal("go-jose accepted an x5c-only RSA JWK; the fixture no longer shows the problem")
	}
	set, err := ParseSigningKeys(body)
	if err != nil {
		t.Fatal(err)
	}
	if len(set.Keys) != 1 {
		t.Fatalf("%d keys, want 1", len(set.Keys))
	}
	k := set.Keys[0]
	pub, ok := k.Key.(*rsa.PublicKey)
	if !ok || k.KeyID != "81dsh2B8UUKHZ2JXSOQn-VwfQMU" || pub.N.BitLen() != 2048 || pub.E != 65537 {
		t.Fatalf("key %q: %T", k.KeyID, k.Key)
	}
	if cn := k.Certificates[0].Subject.CommonName; cn != "AttestationService-LocalTest-ReportSigning" {
		t.Fatalf("certificate subject %q", cn)
	}
	if !k.Valid() || !k.IsPublic() {
		t.Fatal("parsed key is not a valid public JWK")
	}
}

func TestParseSigningKeysErrors(t *testing.T) {
	for body, want := range map[string]string{
		`{"keys":[]}`:                                       "no keys",
		`{"keys":[{"kid":"a","kty":"RSA"}]}`:                "neither n/e nor an x5c",
		`{"keys":[{"kid":"a","kty":"RSA","x5c":["%"]}]}`:    "not base64",
		`{"keys":[{"kid":"a","kty":"RSA","x5c":["AAAA"]}]}`: "x5c[0]",
		`{"keys":[{"kid":"a","kty":"EC","crv":"P-256"}]}`:   "no RSA signing keys",
		`[]`: "not a JWK set",
	} {
		if _, err := ParseSigningKeys([]byte(body)); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want %q", body, err, want)
		}
	}
	many := `{"keys":[` + strings.Repeat(`{"kty":"EC"},`, maxSigningKeys) + `{"kty":"EC"}]}`
	if _, err := ParseSigningKeys([]byte(many)); err == nil || !strings.Contains(err.Error(), "more than") {
		t.Errorf("oversized set: %v", err)
	}
}

// A token from an issuer that publishes x5c-only keys verifies, at a clock
// set to its issue time (long after expiry in real time).
func TestVerifyWithX5COnlyKeysAndInjectedClock(t *testing.T) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "maa signing"},
		NotBefore: time.Unix(1600000000, 0), NotAfter: time.Unix(1700000000, 0)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewTLSServer(nil)
	t.Cleanup(srv.Close)
	srv.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/certs" {
			http.NotFound(w, r)
			return
		}
		json.NewEncoder(w).Encode(map[string]any{"keys": []any{map[string]any{
			"x5c": []string{base64.StdEncoding.EncodeToString(der)}, "kid": "k+1=", "kty": "RSA"}}})
	})
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.RS256, Key: key},
		(&jose.SignerOptions{}).WithType("JWT").WithHeader("kid", "k+1="))
	if err != nil {
		t.Fatal(err)
	}
	iat := int64(1650000000)
	payload, _ := json.Marshal(map[string]any{"iss": srv.URL, "iat": iat, "nbf": iat, "exp": iat + 8*3600})
	jws, err := signer.Sign(payload)
	if err != nil {
		t.Fatal(err)
	}
	tok, _ := jws.CompactSerialize()
	recorded := time.Unix(iat+60, 0)
	v, err := NewVerifier(VerifierOptions{AllowedIssuers: []string{srv.URL}, HTTPClient: srv.Client(), Clock: func() time.Time { return recorded }})
	if err != nil {
		t.Fatal(err)
	}
	c, err := v.Verify(context.Background(), secret.Token(tok))
	if err != nil {
		t.Fatal(err)
	}
	if c.IssuedAt.Unix() != iat {
		t.Fatalf("iat %v", c.IssuedAt)
	}
	// The same token at the real time has expired.
	now, _ := NewVerifier(VerifierOptions{AllowedIssuers: []string{srv.URL}, HTTPClient: srv.Client()})
	if _, err := now.Verify(context.Background(), secret.Token(tok)); err == nil || !strings.Contains(err.Error(), "expired") {
		t.Fatalf("at the real time: %v", err)
	}
}

func FuzzParseSigningKeys(f *testing.F) {
	if b, err := os.ReadFile("testdata/maa_certs_shareduks.json"); err == nil {
		f.Add(b)
	}
	f.Add([]byte(`{"keys":[{"kty":"RSA","kid":"a","x5c":["AAAA"]}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		set, err := ParseSigningKeys(b)
		if err == nil && len(set.Keys) == 0 {
			t.Fatal("no error and no keys")
		}
	})
}
