package keyrelease_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	azpolicy "github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	xhkdf "golang.org/x/crypto/hkdf"

	"github.com/blobseal/blobseal/internal/secret"
	"github.com/blobseal/blobseal/keyrelease"
	"github.com/blobseal/blobseal/keyrelease/evidence"
	"github.com/blobseal/blobseal/keyrelease/hsm"
	"github.com/blobseal/blobseal/keyrelease/localca"
	"github.com/blobseal/blobseal/keyrelease/localhsm"
	"github.com/blobseal/blobseal/keyrelease/localmaa"
	"github.com/blobseal/blobseal/keyrelease/policy"
)

// The CCE policy whose SHA-256 is the simulated VM's HOST_DATA.
const ccePolicy = "package policy\napi_version := \"0.10.0\"\nallow_all := true\n"

var measurement = [48]byte{1, 2, 3, 4, 5, 6, 7, 8}

// stack is the whole local chain: simulated SNP, local MAA, local key service.
type stack struct {
	t        testing.TB
	ca       *localca.CA
	maaURL   string
	vaultURL string
	http     *http.Client
	rec      *recorder
	bearer   secret.Token
	readOnly secret.Token
	sim      *evidence.Simulated
	logBuf   *lockedBuffer
	log      *slog.Logger
	admin    *hsm.Client
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// recorder keeps request and response bodies so tests can check the wire
// format field by field.
type recorder struct {
	base http.RoundTripper
	mu   sync.Mutex
	ex   []exchange
}

type exchange struct {
	method, path string
	auth         string
	status       int
	reqBody      []byte
	respBody     []byte
}

func (r *recorder) RoundTrip(req *http.Request) (*http.Response, error) {
	var body []byte
	if req.Body != nil {
		var err error
		if body, err = io.ReadAll(req.Body); err != nil {
			return nil, err
		}
		req.Body.Close()
		req.Body = io.NopCloser(bytes.NewReader(body))
	}
	resp, err := r.base.RoundTrip(req)
	if err != nil {
		return nil, err
	}
	rb, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		return nil, err
	}
	resp.Body = io.NopCloser(bytes.NewReader(rb))
	r.mu.Lock()
	r.ex = append(r.ex, exchange{req.Method, req.URL.Path, req.Header.Get("Authorization"), resp.StatusCode, body, rb})
	r.mu.Unlock()
	return resp, nil
}

func (r *recorder) find(method, suffix string, status int) []exchange {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []exchange
	for _, e := range r.ex {
		if e.method == method && strings.HasSuffix(e.path, suffix) && e.status == status {
			out = append(out, e)
		}
	}
	return out
}

func hostData() [32]byte { return sha256.Sum256([]byte(ccePolicy)) }

func newStack(t testing.TB, vaultClock func() time.Time) *stack {
	t.Helper()
	s := &stack{t: t, logBuf: &lockedBuffer{}}
	s.log = slog.New(slog.NewJSONHandler(s.logBuf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	ca, err := localca.New("test CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	s.ca = ca
	cert, err := ca.ServerCert("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	sim, err := evidence.NewSimulated(evidence.SimulatedConfig{HostData: hostData(), Measurement: measurement})
	if err != nil {
		t.Fatal(err)
	}
	s.sim = sim
	m, err := localmaa.New(localmaa.Options{Roots: sim.Roots(), TLSCert: &cert, CompliantMeasurements: [][]byte{measurement[:]}, Logger: s.log})
	if err != nil {
		t.Fatal(err)
	}
	if s.maaURL, err = m.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })

	s.rec = &recorder{base: &http.Transport{TLSClientConfig: ca.ClientTLS()}}
	s.http = &http.Client{Transport: s.rec, Timeout: 30 * time.Second}
	s.bearer = randomToken(t)
	s.readOnly = randomToken(t)
	h, err := localhsm.New(localhsm.Options{
		TLSCert:          cert,
		TrustedIssuers:   []string{s.maaURL},
		IssuerHTTPClient: &http.Client{Transport: &http.Transport{TLSClientConfig: ca.ClientTLS()}},
		BearerTokens:     []secret.Token{s.bearer},
		ReadOnlyTokens:   []secret.Token{s.readOnly},
		Clock:            vaultClock,
		Logger:           s.log,
	})
	if err != nil {
		t.Fatal(err)
	}
	if s.vaultURL, err = h.Start("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	s.admin = s.client(s.bearer)
	return s
}

func (s *stack) client(tok secret.Token) *hsm.Client {
	c, err := hsm.New(s.vaultURL, hsm.BearerToken(tok), hsm.Options{HTTPClient: s.http, TrustedRoots: s.ca.Pool(), Logger: s.log})
	if err != nil {
		s.t.Fatal(err)
	}
	return c
}

func randomToken(t testing.TB) secret.Token {
	b := make([]byte, 24)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return secret.Token("bearer-" + hex.EncodeToString(b))
}

// sealPolicy is the policy key import builds for the test deployment.
func (s *stack) sealPolicy() []byte {
	hd := hostData()
	p, err := policy.Build(s.maaURL, []policy.Claim{
		{Name: "x-ms-attestation-type", Value: "sevsnpvm"},
		{Name: "x-ms-compliance-status", Value: "azure-compliant-uvm"},
		{Name: "x-ms-sevsnpvm-hostdata", Value: hex.EncodeToString(hd[:])},
		{Name: "x-ms-sevsnpvm-is-debuggable", Value: false},
	})
	if err != nil {
		s.t.Fatal(err)
	}
	js, err := json.Marshal(p)
	if err != nil {
		s.t.Fatal(err)
	}
	return js
}

func (s *stack) config(ev evidence.Provider, name, alg string, cred azcore.TokenCredential) keyrelease.Config {
	return keyrelease.Config{
		Evidence: ev, MAAEndpoint: s.maaURL, VaultURL: s.vaultURL, KeyName: name,
		Credential: cred, WrapAlg: alg, HTTPClient: s.http, TrustedRoots: s.ca.Pool(), Logger: s.log,
	}
}

func (s *stack) importOct(name string) secret.Bytes {
	key := make(secret.Bytes, 32)
	if _, err := rand.Read(key); err != nil {
		s.t.Fatal(err)
	}
	if _, err := s.admin.PutKey(context.Background(), name, hsm.KeySpec{Kty: "oct-HSM", Oct: key, Policy: s.sealPolicy()}); err != nil {
		s.t.Fatal(err)
	}
	return key
}

func TestChainOctHSM(t *testing.T) {
	s := newStack(t, nil)
	key := s.importOct("fs-key")
	for _, alg := range hsm.Algorithms() {
		t.Run(alg, func(t *testing.T) {
			got, err := keyrelease.ReleaseKey(context.Background(), s.config(s.sim, "fs-key", alg, hsm.BearerToken(s.bearer)))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got.Secret, key) {
				t.Fatal("released secret differs from the imported key")
			}
			// The caller (key release --json) learns which key it got.
			if !strings.Contains(got.KID, "/keys/fs-key/") || got.Kty != "oct-HSM" {
				t.Fatalf("released key is %q (%s), want fs-key, oct-HSM", got.KID, got.Kty)
			}
		})
	}
	s.checkWire(key)
	s.checkLogsClean(key)
}

func TestChainRSAHSMWithHKDF(t *testing.T) {
	s := newStack(t, nil)
	rk, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.admin.PutKey(context.Background(), "rsa-key", hsm.KeySpec{Kty: "RSA-HSM", RSA: rk, Policy: s.sealPolicy()}); err != nil {
		t.Fatal(err)
	}
	const salt = "00112233445566778899aabbccddeeff"
	cfg := s.config(s.sim, "rsa-key", hsm.AlgRSAAESKeyWrap256, hsm.BearerToken(s.bearer))
	cfg.Salt = salt
	got, err := keyrelease.Release(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	// Independent derivation with x/crypto's HKDF.
	saltBytes, _ := hex.DecodeString(salt)
	want := make([]byte, 32)
	if _, err := io.ReadFull(xhkdf.New(sha256.New, rk.D.Bytes(), saltBytes, []byte("Symmetric Encryption Key")), want); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("released RSA-HSM secret differs from HKDF-SHA256(D, salt, default label)")
	}
	cfg.Label = "other label"
	other, err := keyrelease.Release(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(other, got) {
		t.Fatal("label does not change the derived secret")
	}
	s.checkLogsClean(secret.Bytes(rk.D.Bytes()))
	s.checkLogsClean(got)
}

func TestChainGeneratedKeys(t *testing.T) {
	s := newStack(t, nil)
	for _, kty := range []string{"oct-HSM", "RSA-HSM"} {
		kid, err := s.admin.PutKey(context.Background(), "gen-"+strings.ToLower(kty), hsm.KeySpec{Kty: kty, Policy: s.sealPolicy()})
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(kid, s.vaultURL+"/keys/gen-") {
			t.Fatalf("kid %q not under the vault", kid)
		}
		cfg := s.config(s.sim, "gen-"+strings.ToLower(kty), "", hsm.BearerToken(s.bearer))
		a, err := keyrelease.Release(context.Background(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		b, err := keyrelease.Release(context.Background(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		if len(a) != 32 || !bytes.Equal(a, b) {
			t.Fatalf("%s: two releases differ or are not 32 bytes", kty)
		}
	}
	// Create Key request, as azkeys sends it.
	creates := s.rec.find(http.MethodPost, "/keys/gen-oct-hsm/create", http.StatusOK)
	if len(creates) != 1 {
		t.Fatalf("want one create request, got %d", len(creates))
	}
	var cr map[string]any
	mustJSON(t, creates[0].reqBody, &cr)
	if cr["kty"] != "oct-HSM" || cr["attributes"].(map[string]any)["exportable"] != true {
		t.Errorf("create request = %v", cr)
	}
	if d := b64(t, cr["release_policy"].(map[string]any)["data"].(string)); string(d) != string(s.sealPolicy()) {
		t.Errorf("create release_policy.data = %s", d)
	}
	var created map[string]any
	mustJSON(t, creates[0].respBody, &created)
	if k := created["key"].(map[string]any); k["k"] != nil || k["kty"] != "oct-HSM" {
		t.Errorf("create response leaks or mislabels the key: %v", k)
	}
	// EC keys are released and unwrapped (PKCS#8) but define no filesystem secret.
	body := `{"kty":"EC-HSM","crv":"P-256","attributes":{"exportable":true},"release_policy":{"data":"` + base64.RawURLEncoding.EncodeToString(s.sealPolicy()) + `"}}`
	if st := s.rawCreate(t, "ec-key", body); st != http.StatusOK {
		t.Fatalf("create EC key: HTTP %d", st)
	}
	_, err := keyrelease.Release(context.Background(), s.config(s.sim, "ec-key", "", hsm.BearerToken(s.bearer)))
	if err == nil || !strings.Contains(err.Error(), "EC-HSM keys do not define a filesystem secret") {
		t.Fatalf("EC key: %v", err)
	}
}

func TestChainDenials(t *testing.T) {
	s := newStack(t, nil)
	s.importOct("fs-key")
	ctx := context.Background()

	wrongHost, err := evidence.NewSimulated(evidence.SimulatedConfig{HostData: sha256.Sum256([]byte("another policy")), Measurement: measurement, Signer: mustSigner(t, s.sim)})
	if err != nil {
		t.Fatal(err)
	}
	debug, err := evidence.NewSimulated(evidence.SimulatedConfig{HostData: hostData(), Measurement: measurement, Debuggable: true, Signer: mustSigner(t, s.sim)})
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name  string
		cfg   keyrelease.Config
		is    error
		words []string
	}{
		{"wrong host data", s.config(wrongHost, "fs-key", "", hsm.BearerToken(s.bearer)), hsm.ErrPolicy, []string{`claim "x-ms-sevsnpvm-hostdata"`}},
		{"debuggable VM", s.config(debug, "fs-key", "", hsm.BearerToken(s.bearer)), hsm.ErrPolicy, []string{`claim "x-ms-sevsnpvm-is-debuggable" is true`}},
		{"no release permission", s.config(s.sim, "fs-key", "", hsm.BearerToken(s.readOnly)), hsm.ErrPermission, []string{"keys/release"}},
		{"unknown bearer", s.config(s.sim, "fs-key", "", hsm.BearerToken("nope-not-a-token")), hsm.ErrUnauthorized, []string{"credential"}},
		{"unknown key", s.config(s.sim, "missing", "", hsm.BearerToken(s.bearer)), hsm.ErrKeyNotFound, []string{"key name"}},
		{"unknown wrap algorithm", s.config(s.sim, "fs-key", "RSA_AES_KEY_WRAP_999", hsm.BearerToken(s.bearer)), hsm.ErrUnknownAlgorithm, []string{"RSA_AES_KEY_WRAP_999"}},
	}
	var errTexts []string
	defer func() {
		// No error text may carry a token or the bearer.
		for _, e := range s.rec.find(http.MethodPost, "/attest/SevSnpVm", http.StatusOK) {
			var tr struct {
				Token string `json:"token"`
			}
			mustJSON(t, e.respBody, &tr)
			sig := tr.Token[strings.LastIndex(tr.Token, ".")+1:]
			for _, txt := range errTexts {
				if strings.Contains(txt, sig) || strings.Contains(txt, s.bearer.Reveal()) || strings.Contains(txt, s.readOnly.Reveal()) {
					t.Errorf("error text carries a token: %s", txt)
				}
			}
		}
	}()
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := keyrelease.Release(ctx, c.cfg)
			if err != nil {
				errTexts = append(errTexts, err.Error())
			}
			if err == nil {
				t.Fatalf("released %d bytes", len(got))
			}
			if !errors.Is(err, c.is) {
				t.Fatalf("error %q is not %v", err, c.is)
			}
			// Callers (the SKR API) learn the failed step without parsing text.
			stage := keyrelease.StageRelease
			if c.name == "unknown wrap algorithm" {
				stage = keyrelease.StageConfig
			}
			var se *keyrelease.StageError
			if !errors.As(err, &se) || se.Stage != stage {
				t.Errorf("error %q is not a StageError of stage %q: %+v", err, stage, se)
			}
			for _, w := range c.words {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
			t.Logf("%s: %v", c.name, err)
		})
	}

	// The denial explanation read the policy with Get Key: check that response.
	gets := s.rec.find(http.MethodGet, "/keys/fs-key/", http.StatusOK)
	if len(gets) == 0 {
		t.Fatal("no Get Key request recorded for the policy explanation")
	}
	var got map[string]any
	mustJSON(t, gets[0].respBody, &got)
	k := got["key"].(map[string]any)
	if k["kty"] != "oct-HSM" || k["k"] != nil || !strings.Contains(k["kid"].(string), "/keys/fs-key/") {
		t.Errorf("get key = %v", k)
	}
	if a := got["attributes"].(map[string]any); a["exportable"] != true || a["created"] == nil || a["recoveryLevel"] == nil {
		t.Errorf("get attributes = %v", a)
	}
	if rp := got["release_policy"].(map[string]any); rp["contentType"] != "application/json; charset=utf-8" || string(b64(t, rp["data"].(string))) != string(s.sealPolicy()) {
		t.Errorf("get release_policy = %v", rp)
	}

	t.Run("not exportable", func(t *testing.T) {
		raw := s.rawCreate(t, "plain-key", `{"kty":"oct-HSM","key_size":256,"attributes":{"exportable":false}}`)
		if raw != http.StatusOK {
			t.Fatalf("create non-exportable key: HTTP %d", raw)
		}
		_, err := keyrelease.Release(ctx, s.config(s.sim, "plain-key", "", hsm.BearerToken(s.bearer)))
		if !errors.Is(err, hsm.ErrNotExportable) || !strings.Contains(err.Error(), "exportable=true") {
			t.Fatalf("got %v", err)
		}
	})
}

func mustSigner(t *testing.T, sim *evidence.Simulated) []byte {
	t.Helper()
	b, err := sim.SignerPEM()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// rawCreate posts a create request with the right bearer directly.
func (s *stack) rawCreate(t testing.TB, name, body string) int {
	req, err := http.NewRequest(http.MethodPost, s.vaultURL+"/keys/"+name+"/create?api-version=7.4", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+s.bearer.Reveal())
	req.Header.Set("Content-Type", "application/json")
	resp, err := s.http.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

func TestChainUntrustedIssuerAndExpiredToken(t *testing.T) {
	// An attestation service the key service does not trust.
	s := newStack(t, nil)
	s.importOct("fs-key")
	other := newStack(t, nil)
	cfg := s.config(s.sim, "fs-key", "", hsm.BearerToken(s.bearer))
	cfg.MAAEndpoint = other.maaURL
	cfg.Evidence = other.sim
	cfg.HTTPClient = &http.Client{Transport: &http.Transport{TLSClientConfig: multiCA(s.ca, other.ca)}}
	_, err := keyrelease.Release(context.Background(), cfg)
	if !errors.Is(err, hsm.ErrTokenRejected) || !strings.Contains(err.Error(), "not trusted") {
		t.Fatalf("untrusted issuer: %v", err)
	}

	// A key service whose clock is 9 hours ahead sees MAA's 8-hour token expired.
	past := newStack(t, func() time.Time { return time.Now().Add(9 * time.Hour) })
	past.importOct("fs-key")
	_, err = keyrelease.Release(context.Background(), past.config(past.sim, "fs-key", "", hsm.BearerToken(past.bearer)))
	if !errors.Is(err, hsm.ErrTokenExpired) || !strings.Contains(err.Error(), "fresh attestation token") {
		t.Fatalf("expired token: %v", err)
	}
}

func TestChainBadX5C(t *testing.T) {
	s := newStack(t, nil)
	s.importOct("fs-key")
	stranger, err := localca.New("someone else", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cfg := s.config(s.sim, "fs-key", "", hsm.BearerToken(s.bearer))
	cfg.TrustedRoots = stranger.Pool() // TLS still trusts the real CA; the JWS chain does not verify
	_, err = keyrelease.Release(context.Background(), cfg)
	if !errors.Is(err, hsm.ErrBadResponse) || !strings.Contains(err.Error(), "x5c") {
		t.Fatalf("bad x5c: %v", err)
	}
}

func multiCA(cas ...*localca.CA) *tls.Config {
	cfg := cas[0].ClientTLS()
	for _, ca := range cas[1:] {
		cfg.RootCAs.AddCert(ca.Cert)
	}
	return cfg
}

// checkWire verifies the recorded import, release request and release
// response against the Key Vault REST formats, field by field.
func (s *stack) checkWire(key secret.Bytes) {
	t := s.t
	imports := s.rec.find(http.MethodPut, "/keys/fs-key", http.StatusOK)
	if len(imports) != 1 {
		t.Fatalf("want one successful import, got %d", len(imports))
	}
	var imp map[string]any
	mustJSON(t, imports[0].reqBody, &imp)
	if imp["Hsm"] != true {
		t.Errorf("import: Hsm = %v", imp["Hsm"])
	}
	k := imp["key"].(map[string]any)
	if k["kty"] != "oct-HSM" || k["k"] != base64.RawURLEncoding.EncodeToString(key) {
		t.Errorf("import: key kty=%v, k mismatch", k["kty"])
	}
	if a := imp["attributes"].(map[string]any); a["exportable"] != true {
		t.Errorf("import: attributes %v", a)
	}
	rp := imp["release_policy"].(map[string]any)
	if rp["contentType"] != "application/json; charset=utf-8" {
		t.Errorf("import: contentType %v", rp["contentType"])
	}
	pol, err := base64.RawURLEncoding.DecodeString(rp["data"].(string))
	if err != nil || string(pol) != string(s.sealPolicy()) {
		t.Errorf("import: release_policy.data is not base64url of the policy: %v", err)
	}
	// The azkeys challenge: an unauthenticated first request gets 401.
	if ch := s.rec.find(http.MethodPut, "/keys/fs-key", http.StatusUnauthorized); len(ch) == 0 || ch[0].auth != "" {
		t.Error("no 401 challenge round before the import")
	}

	rels := s.rec.find(http.MethodPost, "/keys/fs-key/release", http.StatusOK)
	if len(rels) != len(hsm.Algorithms()) {
		t.Fatalf("want %d releases, got %d", len(hsm.Algorithms()), len(rels))
	}
	for i, r := range rels {
		var req map[string]any
		mustJSON(t, r.reqBody, &req)
		if req["enc"] != hsm.Algorithms()[i] || !strings.HasPrefix(req["target"].(string), "eyJ") {
			t.Errorf("release request %d: enc=%v target prefix wrong", i, req["enc"])
		}
		for f := range req {
			if f != "enc" && f != "target" && f != "nonce" {
				t.Errorf("release request has unexpected field %q", f)
			}
		}
		if !strings.HasPrefix(r.auth, "Bearer ") {
			t.Error("release request without bearer")
		}
		var resp struct {
			Value string `json:"value"`
		}
		mustJSON(t, r.respBody, &resp)
		parts := strings.Split(resp.Value, ".")
		if len(parts) != 3 {
			t.Fatalf("release response is not a compact JWS")
		}
		var hdr map[string]any
		mustJSON(t, b64(t, parts[0]), &hdr)
		if x5c, ok := hdr["x5c"].([]any); !ok || len(x5c) < 1 {
			t.Errorf("JWS header lacks x5c: %v", hdr)
		}
		var payload map[string]any
		mustJSON(t, b64(t, parts[1]), &payload)
		rq := payload["request"].(map[string]any)
		if rq["enc"] != hsm.Algorithms()[i] || rq["api-version"] == "" || !strings.HasSuffix(rq["kid"].(string), "/keys/fs-key") {
			t.Errorf("payload.request = %v", rq)
		}
		rk := payload["response"].(map[string]any)["key"].(map[string]any)
		kk := rk["key"].(map[string]any)
		if kk["kty"] != "oct-HSM" || !strings.Contains(kk["kid"].(string), "/keys/fs-key/") || kk["key_ops"] == nil {
			t.Errorf("payload.response.key.key = %v", kk)
		}
		var kh map[string]any
		mustJSON(t, b64(t, kk["key_hsm"].(string)), &kh)
		h := kh["header"].(map[string]any)
		if kh["schema_version"] != "1.0" || h["alg"] != "dir" || h["enc"] != hsm.Algorithms()[i] || h["kid"] == "" {
			t.Errorf("key_hsm = %v", kh)
		}
		ct := b64(t, kh["ciphertext"].(string))
		// 256-byte RSA-2048 block + RFC 5649 wrap of 32 bytes (40 bytes).
		if len(ct) != 256+40 {
			t.Errorf("ciphertext is %d bytes, want 296", len(ct))
		}
		if a := rk["attributes"].(map[string]any); a["exportable"] != true || a["enabled"] != true {
			t.Errorf("attributes = %v", a)
		}
		if p := rk["release_policy"].(map[string]any); p["data"] == "" {
			t.Errorf("release_policy = %v", p)
		}
	}
}

// checkLogsClean asserts that neither key material nor tokens nor bearers
// appear in the debug log of the whole chain.
func (s *stack) checkLogsClean(key secret.Bytes) {
	t := s.t
	logs := s.logBuf.String()
	if !strings.Contains(logs, `"step":"hsm release"`) {
		t.Fatalf("debug log lacks the chain steps:\n%s", logs)
	}
	needles := map[string]string{
		"key hex":       hex.EncodeToString(key),
		"key base64url": base64.RawURLEncoding.EncodeToString(key),
		"key base64":    base64.StdEncoding.EncodeToString(key),
		"bearer":        s.bearer.Reveal(),
	}
	for _, e := range s.rec.find(http.MethodPost, "/attest/SevSnpVm", http.StatusOK) {
		var tr struct {
			Token string `json:"token"`
		}
		mustJSON(t, e.respBody, &tr)
		parts := strings.Split(tr.Token, ".")
		needles["MAA token"] = tr.Token
		needles["MAA token signature"] = parts[2]
	}
	if _, ok := needles["MAA token"]; !ok {
		t.Fatal("no attestation exchange recorded")
	}
	for what, n := range needles {
		if strings.Contains(logs, n) {
			t.Errorf("%s appears in the log", what)
		}
	}
}

func mustJSON(t testing.TB, b []byte, v any) {
	t.Helper()
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatalf("bad JSON %q: %v", b, err)
	}
}

func b64(t testing.TB, s string) []byte {
	t.Helper()
	b, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(s, "="))
	if err != nil {
		t.Fatalf("not base64url: %v", err)
	}
	return b
}

func TestChainKeyVersions(t *testing.T) {
	s := newStack(t, nil)
	ctx := context.Background()
	first := make(secret.Bytes, 32)
	second := make(secret.Bytes, 32)
	rand.Read(first)
	rand.Read(second)
	kid1, err := s.admin.PutKey(ctx, "versioned", hsm.KeySpec{Kty: "oct-HSM", Oct: first, Policy: s.sealPolicy()})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.admin.PutKey(ctx, "versioned", hsm.KeySpec{Kty: "oct-HSM", Oct: second, Policy: s.sealPolicy()}); err != nil {
		t.Fatal(err)
	}
	cfg := s.config(s.sim, "versioned", "", hsm.BearerToken(s.bearer))
	latest, err := keyrelease.Release(ctx, cfg)
	if err != nil || !bytes.Equal(latest, second) {
		t.Fatalf("latest version: %v", err)
	}
	cfg.KeyVersion = (&hsm.ReleasedKey{KID: kid1}).Version()
	old, err := keyrelease.Release(ctx, cfg)
	if err != nil || !bytes.Equal(old, first) {
		t.Fatalf("version %s: %v", cfg.KeyVersion, err)
	}
}

func TestNewCredential(t *testing.T) {
	cred, err := keyrelease.NewCredential(keyrelease.CredentialOptions{Bearer: "fixed-bearer-value"})
	if err != nil {
		t.Fatal(err)
	}
	tok, err := cred.GetToken(context.Background(), policyOpts())
	if err != nil || tok.Token != "fixed-bearer-value" {
		t.Fatalf("bearer credential: %v", err)
	}
	if _, err := keyrelease.NewCredential(keyrelease.CredentialOptions{AllowCLI: true}); err != nil {
		t.Fatalf("identity chain: %v", err)
	}
}

func TestConfigErrors(t *testing.T) {
	_, err := keyrelease.Release(context.Background(), keyrelease.Config{})
	for _, w := range []string{"evidence provider", "attestation endpoint", "vault URL", "key name", "vault credential"} {
		if err == nil || !strings.Contains(err.Error(), w) {
			t.Errorf("empty config error %v does not name %q", err, w)
		}
	}
}

func policyOpts() azpolicy.TokenRequestOptions {
	return azpolicy.TokenRequestOptions{Scopes: []string{"https://managedhsm.azure.net/.default"}}
}

func TestUnreachableVaultDoesNotHang(t *testing.T) {
	s := newStack(t, nil)
	cfg := s.config(s.sim, "fs-key", "", hsm.BearerToken(s.bearer))
	cfg.VaultURL = "https://127.0.0.1:1" // nothing listens there
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	start := time.Now()
	_, err := keyrelease.Release(ctx, cfg)
	if err == nil {
		t.Fatal("release from a closed port succeeded")
	}
	if !strings.Contains(err.Error(), "cannot reach the vault") && !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("unexpected error: %v", err)
	}
	if el := time.Since(start); el > 6*time.Second {
		t.Fatalf("took %v despite a 3 s deadline", el)
	}
	t.Log(err)
}
