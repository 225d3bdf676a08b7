package localhsm

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"

	"github.com/blobseal/blobseal/internal/secret"
	"github.com/blobseal/blobseal/keyrelease/hsm"
	"github.com/blobseal/blobseal/keyrelease/localca"
)

// issuer is a minimal attestation-token issuer: OpenID configuration and
// JWKS over TLS, RS256 tokens with a kid.
type issuer struct {
	url string
	key *rsa.PrivateKey
	kid string
}

func newIssuer(t *testing.T, ca *localca.CA) *issuer {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	is := &issuer{key: key, kid: "test-kid"}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /.well-known/openid-configuration", func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(map[string]string{"issuer": is.url, "jwks_uri": is.url + "/certs"})
	})
	mux.HandleFunc("GET /certs", func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: &key.PublicKey, KeyID: is.kid, Algorithm: "RS256", Use: "sig"}}})
	})
	srv := httptest.NewUnstartedServer(mux)
	cert, err := ca.ServerCert("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	is.url = srv.URL
	return is
}

func (is *issuer) mint(t *testing.T, signer *rsa.PrivateKey, claims map[string]any) string {
	t.Helper()
	payload, _ := json.Marshal(claims)
	s, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.RS256, Key: jose.JSONWebKey{Key: signer, KeyID: is.kid}}, (&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		t.Fatal(err)
	}
	obj, err := s.Sign(payload)
	if err != nil {
		t.Fatal(err)
	}
	out, _ := obj.CompactSerialize()
	return out
}

func (is *issuer) claims(wrapping *rsa.PublicKey, hostdata string) map[string]any {
	jwk, _ := json.Marshal(jose.JSONWebKey{Key: wrapping, KeyID: "w"})
	var j map[string]any
	json.Unmarshal(jwk, &j)
	return map[string]any{
		"iss": is.url, "exp": time.Now().Add(time.Hour).Unix(), "nbf": time.Now().Add(-time.Minute).Unix(),
		"x-ms-attestation-type": "sevsnpvm", "x-ms-sevsnpvm-hostdata": hostdata, "x-ms-sevsnpvm-is-debuggable": false,
		"x-ms-runtime": map[string]any{"keys": []any{j}},
	}
}

type env struct {
	t      *testing.T
	url    string
	hc     *http.Client
	bearer secret.Token
	is     *issuer
	ca     *localca.CA
}

func newEnv(t *testing.T) *env {
	ca, err := localca.New("test", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	is := newIssuer(t, ca)
	cert, _ := ca.ServerCert("127.0.0.1")
	bearer := secret.Token("local-bearer-0123456789")
	s, err := New(Options{TLSCert: cert, TrustedIssuers: []string{is.url}, IssuerHTTPClient: &http.Client{Transport: &http.Transport{TLSClientConfig: ca.ClientTLS()}}, BearerTokens: []secret.Token{bearer}})
	if err != nil {
		t.Fatal(err)
	}
	u, err := s.Start("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return &env{t: t, url: u, hc: &http.Client{Transport: &http.Transport{TLSClientConfig: ca.ClientTLS()}}, bearer: bearer, is: is, ca: ca}
}

func (e *env) do(method, path, auth string, body any) (int, http.Header, map[string]any) {
	e.t.Helper()
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, _ := http.NewRequest(method, e.url+path, rd)
	if auth != "" {
		req.Header.Set("Authorization", "Bearer "+auth)
	}
	resp, err := e.hc.Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	var out map[string]any
	json.NewDecoder(resp.Body).Decode(&out)
	return resp.StatusCode, resp.Header, out
}

func errMsg(m map[string]any) string {
	if e, ok := m["error"].(map[string]any); ok {
		return fmt.Sprint(e["code"], ": ", e["message"])
	}
	return ""
}

const policyJSON = `{"version":"1.0.0","anyOf":[{"authority":"%s","allOf":[{"claim":"x-ms-sevsnpvm-hostdata","equals":"aa"}]}]}`

func (e *env) importOct(name string, key []byte) {
	e.t.Helper()
	pol := fmt.Sprintf(policyJSON, e.is.url)
	st, _, body := e.do("PUT", "/keys/"+name+"?api-version=7.4", e.bearer.Reveal(), map[string]any{
		"key": map[string]any{"kty": "oct-HSM", "k": base64.RawURLEncoding.EncodeToString(key)}, "Hsm": true,
		"attributes":     map[string]any{"exportable": true},
		"release_policy": map[string]any{"contentType": "application/json; charset=utf-8", "data": base64.RawURLEncoding.EncodeToString([]byte(pol))},
	})
	if st != 200 {
		e.t.Fatalf("import: %d %s", st, errMsg(body))
	}
}

func TestChallengeAndAuth(t *testing.T) {
	e := newEnv(t)
	st, hdr, body := e.do("GET", "/keys/k?api-version=7.4", "", nil)
	if st != 401 {
		t.Fatalf("no auth: %d", st)
	}
	want := `Bearer authorization="https://login.microsoftonline.com/00000000-0000-0000-0000-000000000000", resource="https://managedhsm.azure.net"`
	if got := hdr.Get("WWW-Authenticate"); got != want {
		t.Fatalf("challenge %q", got)
	}
	if errMsg(body) == "" {
		t.Error("401 without Key Vault error body")
	}
	if st, _, _ := e.do("GET", "/keys/k?api-version=7.4", "wrong", nil); st != 401 {
		t.Errorf("wrong bearer: %d", st)
	}
	if st, _, b := e.do("GET", "/keys/k", e.bearer.Reveal(), nil); st != 400 || !strings.Contains(errMsg(b), "api-version") {
		t.Errorf("missing api-version: %d %s", st, errMsg(b))
	}
	if st, _, b := e.do("GET", "/keys/k?api-version=2025-07-01", e.bearer.Reveal(), nil); st != 404 || !strings.Contains(errMsg(b), "KeyNotFound") {
		t.Errorf("unknown key: %d %s", st, errMsg(b))
	}
}

func TestImportValidationAndGet(t *testing.T) {
	e := newEnv(t)
	key := make([]byte, 32)
	rand.Read(key)
	pol := base64.RawURLEncoding.EncodeToString([]byte(fmt.Sprintf(policyJSON, e.is.url)))
	cases := []struct {
		body map[string]any
		want string
	}{
		{map[string]any{"key": map[string]any{"kty": "oct-HSM", "k": base64.RawURLEncoding.EncodeToString(key)}, "attributes": map[string]any{"exportable": true}}, "must have a release policy"},
		{map[string]any{"key": map[string]any{"kty": "oct-HSM", "k": "AAAA"}, "attributes": map[string]any{"exportable": true}, "release_policy": map[string]any{"data": pol}}, "16, 24 or 32 bytes"},
		{map[string]any{"key": map[string]any{"kty": "oct-HSM", "k": base64.RawURLEncoding.EncodeToString(key)}, "attributes": map[string]any{"exportable": true}, "release_policy": map[string]any{"data": base64.RawURLEncoding.EncodeToString([]byte(`{"version":"1.0.0","anyOf":[]}`))}}, "at least one authority"},
		{map[string]any{"key": map[string]any{"kty": "EC", "d": "AA"}}, "cannot be imported"},
	}
	for _, c := range cases {
		st, _, b := e.do("PUT", "/keys/k?api-version=7.4", e.bearer.Reveal(), c.body)
		if st != 400 || !strings.Contains(errMsg(b), c.want) {
			t.Errorf("want 400 %q, got %d %s", c.want, st, errMsg(b))
		}
	}
	e.importOct("k", key)
	st, _, b := e.do("GET", "/keys/k/?api-version=7.4", e.bearer.Reveal(), nil)
	if st != 200 {
		t.Fatalf("get: %d", st)
	}
	k := b["key"].(map[string]any)
	if k["kty"] != "oct-HSM" || k["k"] != nil || !strings.HasPrefix(k["kid"].(string), e.url+"/keys/k/") {
		t.Errorf("get key = %v", k)
	}
	rp := b["release_policy"].(map[string]any)
	if d, _ := base64.RawURLEncoding.DecodeString(rp["data"].(string)); !strings.Contains(string(d), "x-ms-sevsnpvm-hostdata") {
		t.Errorf("release_policy.data = %v", rp["data"])
	}
	version := k["kid"].(string)[len(e.url+"/keys/k/"):]
	if st, _, _ := e.do("GET", "/keys/k/"+version+"?api-version=7.4", e.bearer.Reveal(), nil); st != 200 {
		t.Errorf("get by version: %d", st)
	}
}

func TestReleaseChecks(t *testing.T) {
	e := newEnv(t)
	key := make([]byte, 32)
	rand.Read(key)
	e.importOct("k", key)
	wrapping, _ := rsa.GenerateKey(rand.Reader, 2048)
	good := e.is.mint(t, e.is.key, e.is.claims(&wrapping.PublicKey, "aa"))

	st, _, b := e.do("POST", "/keys/k/release?api-version=7.4", e.bearer.Reveal(), map[string]any{"target": good, "enc": hsm.AlgRSAAESKeyWrap256})
	if st != 200 {
		t.Fatalf("release: %d %s", st, errMsg(b))
	}
	payload, err := hsm.VerifyReleaseJWS(b["value"].(string), hsm.JWSOptions{Host: "127.0.0.1", Roots: e.ca.Pool()})
	if err != nil {
		t.Fatal(err)
	}
	var p releasePayload
	json.Unmarshal(payload, &p)
	khRaw, _ := base64.RawURLEncoding.DecodeString(p.Response.Key.Key.KeyHSM)
	var kh keyHSM
	json.Unmarshal(khRaw, &kh)
	ct, _ := base64.RawURLEncoding.DecodeString(kh.Ciphertext)
	got, err := hsm.UnwrapKeyHSM(ct, wrapping, kh.Header.Enc)
	if err != nil || !bytes.Equal(got, key) {
		t.Fatalf("unwrap: %v", err)
	}

	forger, _ := rsa.GenerateKey(rand.Reader, 2048)
	expired := e.is.claims(&wrapping.PublicKey, "aa")
	expired["exp"] = time.Now().Add(-time.Hour).Unix()
	noRuntime := e.is.claims(&wrapping.PublicKey, "aa")
	delete(noRuntime, "x-ms-runtime")
	cases := []struct {
		name   string
		body   map[string]any
		status int
		want   string
	}{
		{"unknown enc", map[string]any{"target": good, "enc": "A256KW"}, 400, `Invalid enc "A256KW"`},
		{"no target", map[string]any{"enc": hsm.AlgCKMRSAAESKeyWrap}, 400, "target"},
		{"forged signature", map[string]any{"target": e.is.mint(t, forger, e.is.claims(&wrapping.PublicKey, "aa"))}, 400, "signature does not verify"},
		{"expired", map[string]any{"target": e.is.mint(t, e.is.key, expired)}, 400, "expired"},
		{"policy", map[string]any{"target": e.is.mint(t, e.is.key, e.is.claims(&wrapping.PublicKey, "bb"))}, 403, "release policy"},
		{"no runtime key", map[string]any{"target": e.is.mint(t, e.is.key, noRuntime)}, 400, "x-ms-runtime"},
		{"not a JWT", map[string]any{"target": "garbage"}, 400, "not an RS256 JWT"},
	}
	for _, c := range cases {
		st, _, b := e.do("POST", "/keys/k/release?api-version=7.4", e.bearer.Reveal(), c.body)
		if st != c.status || !strings.Contains(errMsg(b), c.want) {
			t.Errorf("%s: want %d %q, got %d %s", c.name, c.status, c.want, st, errMsg(b))
		}
	}
}

func TestImmutablePolicy(t *testing.T) {
	e := newEnv(t)
	pol := func(h string) string {
		return base64.RawURLEncoding.EncodeToString([]byte(strings.Replace(fmt.Sprintf(policyJSON, e.is.url), `"aa"`, `"`+h+`"`, 1)))
	}
	body := func(h string) map[string]any {
		return map[string]any{"kty": "oct-HSM", "attributes": map[string]any{"exportable": true}, "release_policy": map[string]any{"data": pol(h), "immutable": true}}
	}
	if st, _, b := e.do("POST", "/keys/k/create?api-version=7.4", e.bearer.Reveal(), body("aa")); st != 200 {
		t.Fatalf("create: %d %s", st, errMsg(b))
	}
	if st, _, b := e.do("POST", "/keys/k/create?api-version=7.4", e.bearer.Reveal(), body("bb")); st != 400 || !strings.Contains(errMsg(b), "immutable") {
		t.Errorf("changing an immutable policy: %d %s", st, errMsg(b))
	}
}
