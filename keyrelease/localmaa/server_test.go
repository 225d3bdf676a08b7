package localmaa_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"

	"github.com/blobseal/blobseal/internal/secret"
	"github.com/blobseal/blobseal/keyrelease/evidence"
	"github.com/blobseal/blobseal/keyrelease/localca"
	"github.com/blobseal/blobseal/keyrelease/localmaa"
	"github.com/blobseal/blobseal/keyrelease/maa"
)

type stack struct {
	sim    *evidence.Simulated
	srv    *localmaa.Server
	base   string
	hc     *http.Client
	client *maa.Client
	logs   *bytes.Buffer
	log    *slog.Logger // one handler, so writes to logs are serialized
}

// testMeasurement is the launch measurement the test service lists as compliant.
func testMeasurement() (m [48]byte) {
	copy(m[:], bytes.Repeat([]byte{0x4d}, 48))
	return m
}

// newStack starts the local MAA over TLS (localca) trusting sim's roots.
func newStack(t *testing.T, sim *evidence.Simulated, mutate func(*localmaa.Options)) *stack {
	t.Helper()
	ca, err := localca.New("test CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := ca.ServerCert()
	if err != nil {
		t.Fatal(err)
	}
	m := testMeasurement()
	logs := &bytes.Buffer{}
	log := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	opts := localmaa.Options{
		Roots:                 sim.Roots(),
		TLSCert:               &cert,
		Logger:                log,
		CompliantMeasurements: [][]byte{m[:]},
	}
	if mutate != nil {
		mutate(&opts)
	}
	srv, err := localmaa.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	base, err := srv.Start("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Close() })
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: ca.ClientTLS()}}
	return &stack{sim: sim, srv: srv, base: base, hc: hc, logs: logs, log: log,
		client: maa.New(base, maa.Options{HTTPClient: hc, RetryDelay: time.Millisecond, Logger: log})}
}

func newSim(t *testing.T, cfg evidence.SimulatedConfig) *evidence.Simulated {
	t.Helper()
	s, err := evidence.NewSimulated(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func wrappingKey(t *testing.T) (*rsa.PrivateKey, []byte) {
	t.Helper()
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	rt, err := maa.RuntimeData(&k.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	return k, rt
}

func (s *stack) verifier(t *testing.T, clock func() time.Time) *maa.Verifier {
	t.Helper()
	v, err := maa.NewVerifier(maa.VerifierOptions{AllowedIssuers: []string{s.base}, HTTPClient: s.hc, Clock: clock, Logger: s.log})
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func TestAttestEndToEnd(t *testing.T) {
	var hd [32]byte
	copy(hd[:], bytes.Repeat([]byte{0xcc}, 32))
	measurement := testMeasurement()
	sim := newSim(t, evidence.SimulatedConfig{HostData: hd, Measurement: measurement, VMPL: 0})
	s := newStack(t, sim, nil)
	key, rt := wrappingKey(t)
	ev, err := sim.Get(context.Background(), evidence.ReportData(rt))
	if err != nil {
		t.Fatal(err)
	}
	tok, err := s.client.AttestSevSnpVm(context.Background(), ev, rt, "nonce-e2e")
	if err != nil {
		t.Fatal(err)
	}
	// Header as MAA writes it.
	jws, err := jose.ParseSigned(tok.Reveal(), []jose.SignatureAlgorithm{jose.RS256})
	if err != nil {
		t.Fatal(err)
	}
	h := jws.Signatures[0].Header
	keys := s.srv.SigningKeys()
	if h.Algorithm != "RS256" || h.KeyID != keys.Keys[0].KeyID || h.ExtraHeaders["jku"] != s.base+"/certs" || h.ExtraHeaders["typ"] != "JWT" {
		t.Fatalf("JWT header: %+v", h)
	}
	c, err := s.verifier(t, nil).Verify(context.Background(), tok)
	if err != nil {
		t.Fatal(err)
	}
	rd := evidence.ReportData(rt)
	checks := map[string][2]any{
		"iss":                             {c.Issuer, s.base},
		"x-ms-attestation-type":           {c.AttestationType, "sevsnpvm"},
		"x-ms-compliance-status":          {c.ComplianceStatus, "azure-compliant-uvm"},
		"x-ms-sevsnpvm-hostdata":          {c.HostData, hex.EncodeToString(hd[:])},
		"x-ms-sevsnpvm-is-debuggable":     {c.Debuggable, false},
		"x-ms-sevsnpvm-vmpl":              {c.VMPL, 0},
		"x-ms-sevsnpvm-launchmeasurement": {c.LaunchMeasurement, hex.EncodeToString(measurement[:])},
		"x-ms-sevsnpvm-reportdata":        {c.ReportData, hex.EncodeToString(rd[:])},
		"nonce":                           {c.Nonce, "nonce-e2e"},
		"x-ms-ver":                        {c.Raw["x-ms-ver"], "1.0"},
		"lifetime":                        {c.Expiry.Sub(c.IssuedAt), 8 * time.Hour},
	}
	for name, pair := range checks {
		if pair[0] != pair[1] {
			t.Errorf("%s = %v, want %v", name, pair[0], pair[1])
		}
	}
	for _, name := range []string{"jti", "nbf", "x-ms-sevsnpvm-guestsvn", "x-ms-sevsnpvm-idkeydigest", "x-ms-sevsnpvm-familyId", "x-ms-sevsnpvm-imageId", "x-ms-sevsnpvm-bootloader-svn", "x-ms-sevsnpvm-snpfw-svn", "x-ms-sevsnpvm-microcode-svn"} {
		if _, ok := c.Raw[name]; !ok {
			t.Errorf("claim %s missing", name)
		}
	}
	if len(c.RuntimeKeys) != 1 {
		t.Fatalf("x-ms-runtime.keys has %d keys", len(c.RuntimeKeys))
	}
	pub, ok := c.RuntimeKeys[0].Key.(*rsa.PublicKey)
	if !ok || !pub.Equal(&key.PublicKey) {
		t.Fatal("x-ms-runtime.keys[0] is not the wrapping key")
	}
	ks := c.Runtime["keys"].([]any)[0].(map[string]any)
	if ops := ks["key_ops"].([]any); len(ops) != 1 || ops[0] != "encrypt" {
		t.Fatalf("key_ops in token = %v", ks["key_ops"])
	}
}

func TestDebuggableGuestGetsTokenSayingSo(t *testing.T) {
	sim := newSim(t, evidence.SimulatedConfig{Debuggable: true, VMPL: 2})
	s := newStack(t, sim, nil)
	_, rt := wrappingKey(t)
	ev, err := sim.Get(context.Background(), evidence.ReportData(rt))
	if err != nil {
		t.Fatal(err)
	}
	tok, err := s.client.AttestSevSnpVm(context.Background(), ev, rt, "")
	if err != nil {
		t.Fatal(err)
	}
	c, err := s.verifier(t, nil).Verify(context.Background(), tok)
	if err != nil {
		t.Fatal(err)
	}
	if !c.Debuggable || c.Raw["x-ms-sevsnpvm-is-debuggable"] != true || c.VMPL != 2 {
		t.Fatalf("debuggable = %v (raw %v), vmpl %d", c.Debuggable, c.Raw["x-ms-sevsnpvm-is-debuggable"], c.VMPL)
	}
	if _, ok := c.Raw["x-ms-compliance-status"]; ok {
		t.Fatal("unlisted measurement reported as compliant")
	}
}

// post sends a raw body and returns status and MAA error body.
func (s *stack) post(t *testing.T, body []byte, query string) (int, maa.ErrorResponse) {
	t.Helper()
	resp, err := s.hc.Post(s.base+"/attest/SevSnpVm"+query, "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var er maa.ErrorResponse
	data, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		if err := json.Unmarshal(data, &er); err != nil || er.Error.Code == "" || er.Error.Message == "" {
			t.Fatalf("error body %s is not MAA's {error:{code,message}}", data)
		}
	}
	return resp.StatusCode, er
}

func TestRejections(t *testing.T) {
	sim := newSim(t, evidence.SimulatedConfig{Measurement: testMeasurement()})
	s := newStack(t, sim, nil)
	_, rt := wrappingKey(t)
	good, err := sim.Get(context.Background(), evidence.ReportData(rt))
	if err != nil {
		t.Fatal(err)
	}
	untrusted := newSim(t, evidence.SimulatedConfig{FreshKeys: true})
	evUntrusted, err := untrusted.Get(context.Background(), evidence.ReportData(rt))
	if err != nil {
		t.Fatal(err)
	}
	tampered := *good
	tampered.Report = append([]byte(nil), good.Report...)
	tampered.Report[0x90] ^= 0xff // launch measurement
	stale := *good
	if stale.CertChain, err = sim.VCEKChainPEM(sim.TCB() - 1); err != nil {
		t.Fatal(err)
	}
	_, otherRT := wrappingKey(t)

	for _, tc := range []struct {
		name    string
		ev      *evidence.Evidence
		runtime []byte
		want    string
	}{
		{"untrusted root", evUntrusted, rt, "SEV-SNP report verification failed"},
		{"bad signature", &tampered, rt, "SEV-SNP report verification failed"},
		{"stale VCEK", &stale, rt, "VCEK certificate is for TCB"},
		{"report data mismatch", good, otherRT, "report data mismatch"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			body, err := maa.EncodeSevSnpVmRequest(tc.ev, tc.runtime, "")
			if err != nil {
				t.Fatal(err)
			}
			status, er := s.post(t, body, "?api-version=2022-08-01")
			if status != 400 || !strings.Contains(er.Error.Message, tc.want) {
				t.Fatalf("status %d, error %+v, want 400 with %q", status, er, tc.want)
			}
		})
	}
	// Through the client: the rejection becomes an actionable *maa.Error.
	_, err = s.client.AttestSevSnpVm(context.Background(), evUntrusted, rt, "")
	var me *maa.Error
	if !errors.As(err, &me) || me.StatusCode != 400 || !strings.Contains(err.Error(), "did not verify to AMD's roots") {
		t.Fatalf("client error for untrusted root: %v", err)
	}
	status, er := s.post(t, []byte(`{"report":"!"}`), "?api-version=2022-08-01")
	if status != 400 || er.Error.Code != "InvalidParameter" || !strings.Contains(er.Error.Message, `"report" is not base64url`) {
		t.Fatalf("malformed: %d %+v", status, er)
	}
	status, er = s.post(t, []byte(`{}`), "")
	if status != 400 || er.Error.Code != "MissingApiVersionParameter" {
		t.Fatalf("no api-version: %d %+v", status, er)
	}
}

func TestPublishedKeysAndMetadata(t *testing.T) {
	s := newStack(t, newSim(t, evidence.SimulatedConfig{}), nil)
	get := func(path string) map[string]any {
		resp, err := s.hc.Get(s.base + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var m map[string]any
		if err := json.NewDecoder(resp.Body).Decode(&m); err != nil || resp.StatusCode != 200 {
			t.Fatalf("%s: %d %v", path, resp.StatusCode, err)
		}
		return m
	}
	meta := get("/.well-known/openid-configuration")
	if meta["issuer"] != s.base || meta["jwks_uri"] != s.base+"/certs" {
		t.Fatalf("openid configuration: %v", meta)
	}
	certs := get("/certs")
	keys := certs["keys"].([]any)
	k := keys[0].(map[string]any)
	// Real MAA's shape (keyrelease/maa/testdata): exactly x5c, kid, kty.
	if len(k) != 3 {
		t.Errorf("JWK fields %v, want exactly x5c, kid, kty", keysOf(k))
	}
	for _, f := range []string{"kid", "kty", "x5c"} {
		if _, ok := k[f]; !ok {
			t.Errorf("JWK lacks %s: %v", f, k)
		}
	}
	if k["kty"] != "RSA" {
		t.Fatalf("kty = %v", k["kty"])
	}
	x5c := k["x5c"].([]any)
	if _, err := base64.StdEncoding.DecodeString(x5c[0].(string)); err != nil {
		t.Fatalf("x5c[0]: %v", err)
	}
	if _, err := localmaa.New(localmaa.Options{Roots: []byte("junk")}); err == nil || !strings.Contains(err.Error(), "no self-signed AMD root") {
		t.Fatalf("bad roots: %v", err)
	}
}

func TestVerifierRejects(t *testing.T) {
	sim := newSim(t, evidence.SimulatedConfig{})
	now := time.Now()
	s := newStack(t, sim, func(o *localmaa.Options) {
		o.TokenLifetime = time.Hour
		o.Clock = func() time.Time { return now }
	})
	_, rt := wrappingKey(t)
	ev, err := sim.Get(context.Background(), evidence.ReportData(rt))
	if err != nil {
		t.Fatal(err)
	}
	tok, err := s.client.AttestSevSnpVm(context.Background(), ev, rt, "")
	if err != nil {
		t.Fatal(err)
	}
	// Expiry, with an injected clock.
	late := func() time.Time { return now.Add(2 * time.Hour) }
	if _, err := s.verifier(t, late).Verify(context.Background(), tok); err == nil || !strings.Contains(err.Error(), "expired") {
		t.Fatalf("expired: %v", err)
	}
	early := func() time.Time { return now.Add(-time.Hour) }
	if _, err := s.verifier(t, early).Verify(context.Background(), tok); err == nil || !strings.Contains(err.Error(), "not valid before") {
		t.Fatalf("not yet valid: %v", err)
	}
	// Issuer not on the allowed list.
	v, _ := maa.NewVerifier(maa.VerifierOptions{AllowedIssuers: []string{"https://sharedeus.eus.attest.azure.net"}, HTTPClient: s.hc})
	if _, err := v.Verify(context.Background(), tok); err == nil || !strings.Contains(err.Error(), "is not allowed") {
		t.Fatalf("issuer: %v", err)
	}
	// A tampered payload fails the signature.
	parts := strings.Split(tok.Reveal(), ".")
	payload, _ := base64.RawURLEncoding.DecodeString(parts[1])
	payload = bytes.Replace(payload, []byte(`"x-ms-sevsnpvm-is-debuggable":false`), []byte(`"x-ms-sevsnpvm-is-debuggable":true `), 1)
	forged := parts[0] + "." + base64.RawURLEncoding.EncodeToString(payload) + "." + parts[2]
	if _, err := s.verifier(t, nil).Verify(context.Background(), secret.Token(forged)); err == nil || !strings.Contains(err.Error(), "signature does not verify") {
		t.Fatalf("forged: %v", err)
	}
	// Another service claiming the same issuer, with its own key.
	srv2 := newStack(t, sim, func(o *localmaa.Options) { o.BaseURL = s.base })
	tok2, err := srv2.client.AttestSevSnpVm(context.Background(), ev, rt, "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.verifier(t, nil).Verify(context.Background(), tok2); err == nil || !strings.Contains(err.Error(), "no signing key with kid") {
		t.Fatalf("impostor token: %v", err)
	}
	if _, err := s.verifier(t, nil).Verify(context.Background(), "not-a-jwt"); err == nil || strings.Contains(err.Error(), "not-a-jwt") {
		t.Fatalf("garbage token: %v", err)
	}
}

// TestNoTokenInDebugLogs runs the whole flow at debug level and looks for
// any part of the token in client, verifier and server logs.
func TestNoTokenInDebugLogs(t *testing.T) {
	sim := newSim(t, evidence.SimulatedConfig{})
	s := newStack(t, sim, nil)
	_, rt := wrappingKey(t)
	ev, err := sim.Get(context.Background(), evidence.ReportData(rt))
	if err != nil {
		t.Fatal(err)
	}
	tok, err := s.client.AttestSevSnpVm(context.Background(), ev, rt, "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.verifier(t, nil).Verify(context.Background(), tok); err != nil {
		t.Fatal(err)
	}
	s.log.Debug("token value", "token", tok)
	out := s.logs.String()
	if !strings.Contains(out, "level=DEBUG") || !strings.Contains(out, "attestation token issued") {
		t.Fatalf("debug logging did not run: %q", out)
	}
	for i, part := range strings.Split(tok.Reveal(), ".") {
		if strings.Contains(out, part) {
			t.Fatalf("token part %d appears in the debug log", i)
		}
	}
}

// TestSeparateProcessSigner is dev serve + mount: the signer written to
// DIR by one side is read back by the other, and the service trusts it.
func TestSeparateProcessSigner(t *testing.T) {
	dir := t.TempDir()
	serveSide := newSim(t, evidence.SimulatedConfig{FreshKeys: true})
	if _, err := evidence.WriteSimulatedSigner(dir, serveSide); err != nil {
		t.Fatal(err)
	}
	s := newStack(t, serveSide, nil)
	data, err := evidence.ReadSimulatedSigner(dir)
	if err != nil {
		t.Fatal(err)
	}
	mountSide := newSim(t, evidence.SimulatedConfig{Signer: data})
	_, rt := wrappingKey(t)
	ev, err := mountSide.Get(context.Background(), evidence.ReportData(rt))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.client.AttestSevSnpVm(context.Background(), ev, rt, ""); err != nil {
		t.Fatal(err)
	}
}

func TestStartGeneratesTLS(t *testing.T) {
	sim := newSim(t, evidence.SimulatedConfig{})
	srv, err := localmaa.New(localmaa.Options{Roots: sim.Roots()})
	if err != nil {
		t.Fatal(err)
	}
	base, err := srv.Start("")
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	if !strings.HasPrefix(base, "https://127.0.0.1:") || len(srv.CAPEM()) == 0 {
		t.Fatalf("base %s, CA %d bytes", base, len(srv.CAPEM()))
	}
	// Untrusted by default; trusted with the CA.
	if _, err := http.Get(base + "/certs"); err == nil {
		t.Fatal("TLS accepted without the local CA")
	}
	pool := tlsPool(t, srv.CAPEM())
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	resp, err := hc.Get(base + "/certs")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
}

func tlsPool(t *testing.T, caPEM []byte) *x509.CertPool {
	t.Helper()
	p := x509.NewCertPool()
	if !p.AppendCertsFromPEM(caPEM) {
		t.Fatal("CA PEM does not parse")
	}
	return p
}

func TestConcurrentAttestations(t *testing.T) {
	sim := newSim(t, evidence.SimulatedConfig{})
	s := newStack(t, sim, nil)
	v := s.verifier(t, nil)
	_, rt := wrappingKey(t)
	errs := make(chan error, 8)
	for i := 0; i < 8; i++ {
		go func() {
			ev, err := sim.Get(context.Background(), evidence.ReportData(rt))
			if err == nil {
				var tok secret.Token
				if tok, err = s.client.AttestSevSnpVm(context.Background(), ev, rt, ""); err == nil {
					_, err = v.Verify(context.Background(), tok)
				}
			}
			errs <- err
		}()
	}
	for i := 0; i < 8; i++ {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
}

// BenchmarkAttestAndVerify measures one simulated report, one attestation
// over TLS and one token verification (keys cached).
func BenchmarkAttestAndVerify(b *testing.B) {
	sim, err := evidence.NewSimulated(evidence.SimulatedConfig{})
	if err != nil {
		b.Fatal(err)
	}
	ca, err := localca.New("bench CA", time.Hour)
	if err != nil {
		b.Fatal(err)
	}
	cert, err := ca.ServerCert()
	if err != nil {
		b.Fatal(err)
	}
	srv, err := localmaa.New(localmaa.Options{Roots: sim.Roots(), TLSCert: &cert})
	if err != nil {
		b.Fatal(err)
	}
	base, err := srv.Start("")
	if err != nil {
		b.Fatal(err)
	}
	defer srv.Close()
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: ca.ClientTLS()}}
	client := maa.New(base, maa.Options{HTTPClient: hc})
	v, err := maa.NewVerifier(maa.VerifierOptions{AllowedIssuers: []string{base}, HTTPClient: hc})
	if err != nil {
		b.Fatal(err)
	}
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		b.Fatal(err)
	}
	rt, err := maa.RuntimeData(&k.PublicKey)
	if err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		ev, err := sim.Get(context.Background(), evidence.ReportData(rt))
		if err != nil {
			b.Fatal(err)
		}
		tok, err := client.AttestSevSnpVm(context.Background(), ev, rt, "")
		if err != nil {
			b.Fatal(err)
		}
		if _, err := v.Verify(context.Background(), tok); err != nil {
			b.Fatal(err)
		}
	}
}

func keysOf(m map[string]any) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}
