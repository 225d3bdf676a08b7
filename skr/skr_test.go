package skr

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"

	"github.com/blobseal/blobseal/internal/secret"
	"github.com/blobseal/blobseal/keyrelease/evidence"
	"github.com/blobseal/blobseal/keyrelease/hsm"
	"github.com/blobseal/blobseal/keyrelease/localstack"
	"github.com/blobseal/blobseal/keyrelease/maa"
)

type fixture struct {
	st   *localstack.Stack
	key  secret.Bytes
	url  string
	srv  *Server
	host string // the local MAA as a bare host, the way the Azure sidecar's clients name MAA
}

func newFixture(t *testing.T, mutate func(*Options)) *fixture {
	t.Helper()
	hostData := sha256.Sum256([]byte("package policy\n"))
	st, err := localstack.Start(localstack.Options{SignerDir: t.TempDir(), Simulated: evidence.SimulatedConfig{HostData: hostData}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(st.Close)
	key := make(secret.Bytes, 32)
	rand.Read(key)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := st.ImportOctKey(ctx, "fs-key", key, hostData); err != nil {
		t.Fatal(err)
	}
	if err := st.ImportOctKey(ctx, "other-key", key, hostData); err != nil {
		t.Fatal(err)
	}
	o := Options{Evidence: st.Simulated, HTTPClient: st.HTTPClient(), TrustedRoots: st.CAPool()}
	if mutate != nil {
		mutate(&o)
	}
	srv, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(srv.Handler())
	t.Cleanup(hs.Close)
	return &fixture{st: st, key: key, url: hs.URL, srv: srv, host: strings.TrimPrefix(st.MAAEndpoint, "https://")}
}

// post sends body as the Azure sidecar's test scripts do (curl -X POST -H
// 'Content-Type: application/json' -d BODY) and decodes exactly one JSON
// object from the response, failing on anything after it.
func (f *fixture) post(t *testing.T, path, body string) (int, map[string]any) {
	t.Helper()
	resp, err := http.Post(f.url+path, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	return decodeOne(t, resp)
}

func decodeOne(t *testing.T, resp *http.Response) (int, map[string]any) {
	t.Helper()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		t.Errorf("Content-Type %q", ct)
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	var m map[string]any
	if err := dec.Decode(&m); err != nil {
		t.Fatalf("response %q: %v", raw, err)
	}
	if dec.More() || dec.InputOffset() != int64(len(bytes.TrimRight(raw, "\n"))) {
		t.Fatalf("response has more than one JSON body: %q", raw)
	}
	return resp.StatusCode, m
}

// The requests below are the ones docker/skr/tests/attest_client.sh and
// skr_client.sh of microsoft/confidential-sidecar-containers send.
func TestAzureSidecarRequests(t *testing.T) {
	f := newFixture(t, func(o *Options) { o.Credential = nil })
	runtime := []byte(`{"app":"orders","nonce":"4711"}`)
	rd := base64.StdEncoding.EncodeToString(runtime)

	resp, err := http.Get(f.url + "/status")
	if err != nil {
		t.Fatal(err)
	}
	if code, m := decodeOne(t, resp); code != 200 || m["message"] != "Status OK" {
		t.Fatalf("status: %d %v", code, m)
	}

	code, m := f.post(t, "/attest/raw", `{"runtime_data": "`+rd+`"}`)
	if code != 200 {
		t.Fatalf("attest/raw: %d %v", code, m)
	}
	report, err := hex.DecodeString(m["report"].(string))
	if err != nil || len(report) != evidence.ReportSize {
		t.Fatalf("report: %d bytes, %v", len(report), err)
	}
	want := evidence.ReportData(runtime)
	if !bytes.Equal(report[0x50:0x90], want[:]) {
		t.Fatal("REPORT_DATA is not SHA-256 of runtime_data")
	}

	// The sidecar's python tests send URL-safe base64 to attest/combined.
	code, m = f.post(t, "/attest/combined", `{"runtime_data": "`+base64.URLEncoding.EncodeToString([]byte("EXAMPLE_COMBINED"))+`"}`)
	if code != 200 {
		t.Fatalf("attest/combined: %d %v", code, m)
	}
	ev, _ := base64.StdEncoding.DecodeString(m["evidence"].(string))
	chain, _ := base64.StdEncoding.DecodeString(m["endorsements"].(string))
	want = evidence.ReportData([]byte("EXAMPLE_COMBINED"))
	if len(ev) != evidence.ReportSize || !bytes.Equal(ev[0x50:0x90], want[:]) || !bytes.Contains(chain, []byte("-----BEGIN CERTIFICATE-----")) {
		t.Fatalf("combined: %d-byte evidence, chain %.40q", len(ev), chain)
	}
	if tcb := m["endorsed_tcb"].(string); len(tcb) != 16 || tcb != hex.EncodeToString(ev[0x180:0x188]) {
		t.Fatalf("endorsed_tcb %q", tcb)
	}
	if _, ok := m["uvm_endorsements"].(string); !ok {
		t.Fatalf("uvm_endorsements missing: %v", m)
	}

	code, m = f.post(t, "/attest/maa", `{"maa_endpoint": "`+f.host+`", "runtime_data": "`+rd+`"}`)
	if code != 200 {
		t.Fatalf("attest/maa: %d %v", code, m)
	}
	v, err := maa.NewVerifier(maa.VerifierOptions{AllowedIssuers: []string{f.st.MAAEndpoint}, HTTPClient: f.st.HTTPClient()})
	if err != nil {
		t.Fatal(err)
	}
	claims, err := v.Verify(context.Background(), secret.Token(m["token"].(string)))
	if err != nil {
		t.Fatal(err)
	}
	if claims.Runtime["app"] != "orders" || claims.Runtime["nonce"] != "4711" {
		t.Fatalf("token runtime claims: %v", claims.Runtime)
	}

	// skr_client.sh: no access_token; this server has no identity, so the
	// request must carry one.
	noToken := `{"maa_endpoint": "` + f.host + `", "akv_endpoint": "` + strings.TrimPrefix(f.st.VaultURL, "https://") + `", "kid": "fs-key"}`
	if code, m = f.post(t, "/key/release", noToken); code != http.StatusUnauthorized || !strings.Contains(m["error"].(string), "access_token") {
		t.Fatalf("key/release without credential: %d %v", code, m)
	}
	withToken := strings.TrimSuffix(noToken, "}") + `, "access_token": "` + f.st.Bearer.Reveal() + `"}`
	code, m = f.post(t, "/key/release", withToken)
	if code != 200 {
		t.Fatalf("key/release: %d %v", code, m)
	}
	var jwk map[string]any
	if err := json.Unmarshal([]byte(m["key"].(string)), &jwk); err != nil {
		t.Fatalf("key is not a JWK string: %v", err)
	}
	var jk jose.JSONWebKey
	if err := jk.UnmarshalJSON([]byte(m["key"].(string))); err != nil {
		t.Fatal(err)
	}
	if jwk["kty"] != "oct" || !bytes.Equal(jk.Key.([]byte), f.key) || !strings.Contains(jwk["kid"].(string), "/keys/fs-key/") {
		t.Fatalf("released JWK kty=%v kid=%v", jwk["kty"], jwk["kid"])
	}
	if _, ok := jwk["key_ops"].([]any); !ok {
		t.Fatalf("JWK lacks key_ops: %v", jwk["key_ops"])
	}

	stats := f.srv.Metrics().Snapshot()
	if s := stats["POST /key/release"]; s.Requests != 2 || s.Errors != 1 {
		t.Fatalf("key/release metrics %+v", s)
	}
	if s := stats["GET /status"]; s.Requests != 1 || s.Errors != 0 {
		t.Fatalf("status metrics %+v", s)
	}
}

func TestErrorsAreOneJSONBody(t *testing.T) {
	f := newFixture(t, func(o *Options) {
		o.Credential = nil
		o.AllowedKeys = []string{"fs-key"}
		o.MaxBodyBytes = 1024
	})
	vault := strings.TrimPrefix(f.st.VaultURL, "https://")
	for _, c := range []struct {
		path, body string
		status     int
		want       string
	}{
		{"/attest/raw", `{"runtime_data": "***"}`, 400, "runtime_data must be base64"},
		{"/attest/raw", `{}`, 400, "missing required field(s) runtime_data"},
		{"/attest/raw", `not json`, 400, "invalid request format"},
		{"/attest/raw", `{"runtime_data": "` + strings.Repeat("A", 2048) + `"}`, 413, "larger than 1024 bytes"},
		{"/attest/maa", `{"runtime_data": "AA=="}`, 400, "missing required field(s) maa_endpoint"},
		{"/attest/maa", `{"runtime_data": "AA==", "maa_endpoint": "http://plain.example"}`, 400, "must be a host name or an https URL"},
		{"/key/release", `{"kid": "fs-key"}`, 400, "missing required field(s) akv_endpoint, maa_endpoint"},
		{"/key/release", `{"maa_endpoint": "` + f.host + `", "akv_endpoint": "` + vault + `", "kid": "other-key", "access_token": "` + f.st.Bearer.Reveal() + `"}`, 403, "not in this sidecar's allowed keys"},
		{"/key/release", `{"maa_endpoint": "` + f.host + `", "akv_endpoint": "` + vault + `", "kid": "fs-key", "access_token": "wrong"}`, 401, "credential"},
		{"/key/release", `{"maa_endpoint": "` + f.host + `", "akv_endpoint": "` + vault + `", "kid": "a/b/c"}`, 400, "kid"},
		{"/nope", `{}`, 404, "no endpoint POST /nope"},
	} {
		code, m := f.post(t, c.path, c.body)
		msg, _ := m["error"].(string)
		if code != c.status || !strings.Contains(msg, c.want) {
			t.Errorf("%s %.60s: %d %q, want %d %q", c.path, c.body, code, msg, c.status, c.want)
		}
		if strings.Contains(msg, f.st.Bearer.Reveal()) {
			t.Errorf("%s: error leaks the access token", c.path)
		}
	}
	resp, err := http.Get(f.url + "/key/release")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("GET /key/release: %d", resp.StatusCode)
	}
}

// A VM whose host data the key's policy does not pin is refused with 403
// and the claim named; the refusal goes through the real release chain.
func TestPolicyDenialIs403(t *testing.T) {
	f := newFixture(t, nil)
	signer, err := f.st.Simulated.SignerPEM()
	if err != nil {
		t.Fatal(err)
	}
	other, err := evidence.NewSimulated(evidence.SimulatedConfig{HostData: sha256.Sum256([]byte("other")), Signer: signer})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := New(Options{Evidence: other, HTTPClient: f.st.HTTPClient(), TrustedRoots: f.st.CAPool()})
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(srv.Handler())
	t.Cleanup(hs.Close)
	f.url = hs.URL
	code, m := f.post(t, "/key/release", `{"maa_endpoint": "`+f.host+`", "akv_endpoint": "`+f.st.VaultURL+`", "kid": "fs-key", "access_token": "`+f.st.Bearer.Reveal()+`"}`)
	if code != http.StatusForbidden || !strings.Contains(m["error"].(string), "x-ms-sevsnpvm-hostdata") {
		t.Fatalf("%d %v", code, m)
	}
}

func TestOptionsAndAddresses(t *testing.T) {
	if _, err := New(Options{}); err == nil || !strings.Contains(err.Error(), "evidence provider") {
		t.Errorf("no evidence: %v", err)
	}
	sim, err := evidence.NewSimulated(evidence.SimulatedConfig{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := New(Options{Evidence: sim, AllowedKeys: []string{"a/b/c"}}); err == nil {
		t.Error("bad allowed key accepted")
	}
	for addr, want := range map[string]bool{DefaultAddress: true, "localhost:8080": true, "[::1]:8080": true, "0.0.0.0:8080": false, ":8080": false, "10.0.0.4:8080": false} {
		if IsLoopback(addr) != want {
			t.Errorf("IsLoopback(%q) = %v", addr, !want)
		}
	}
}

// skr_client.sh's exact command line, against Serve on a loopback port.
func TestServeWithTheAzureClientScriptsCurl(t *testing.T) {
	curl, err := exec.LookPath("curl")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("curl is required (scripts/install-deps.sh installs it)")
		}
		t.Skip("curl not installed")
	}
	f := newFixture(t, nil)
	f.srv.o.Credential = hsm.BearerToken(f.st.Bearer) // the sidecar's identity
	ctx, cancel := context.WithCancel(context.Background())
	addrc := make(chan string, 1)
	errc := make(chan error, 1)
	go func() { errc <- f.srv.Serve(ctx, "127.0.0.1:0", func(a string) { addrc <- a }) }()
	t.Cleanup(func() {
		cancel()
		if err := <-errc; err != nil {
			t.Error(err)
		}
	})
	var addr string
	select {
	case addr = <-addrc:
	case err := <-errc:
		t.Fatal(err)
	}
	body := "{\"maa_endpoint\": \"" + f.host + "\", \"akv_endpoint\": \"" + strings.TrimPrefix(f.st.VaultURL, "https://") + "\", \"kid\": \"fs-key\"}"
	out, err := exec.Command(curl, "-s", "-X", "POST", "-H", "Content-Type: application/json", "-d", body, "http://"+addr+"/key/release").Output()
	if err != nil {
		t.Fatal(err)
	}
	var resp struct{ Key string }
	if err := json.Unmarshal(out, &resp); err != nil {
		t.Fatalf("%q: %v", out, err)
	}
	var jk jose.JSONWebKey
	if err := jk.UnmarshalJSON([]byte(resp.Key)); err != nil || !bytes.Equal(jk.Key.([]byte), f.key) {
		t.Fatalf("released key differs: %v", err)
	}
}

// blockingEvidence holds Get until released, to fill the server's slots.
type blockingEvidence struct {
	evidence.Provider
	entered chan struct{}
	release chan struct{}
}

func (b *blockingEvidence) Get(ctx context.Context, rd [64]byte) (*evidence.Evidence, error) {
	b.entered <- struct{}{}
	<-b.release
	return b.Provider.Get(ctx, rd)
}

func TestInFlightLimit(t *testing.T) {
	sim, err := evidence.NewSimulated(evidence.SimulatedConfig{})
	if err != nil {
		t.Fatal(err)
	}
	be := &blockingEvidence{Provider: sim, entered: make(chan struct{}, 2), release: make(chan struct{})}
	srv, err := New(Options{Evidence: be, MaxInFlight: 2})
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(srv.Handler())
	t.Cleanup(hs.Close)
	f := &fixture{url: hs.URL}
	results := make(chan int, 2)
	for i := 0; i < 2; i++ {
		go func() {
			resp, err := http.Post(hs.URL+"/attest/raw", "application/json", strings.NewReader(`{"runtime_data":"aGk="}`))
			if err != nil {
				results <- 0
				return
			}
			resp.Body.Close()
			results <- resp.StatusCode
		}()
	}
	<-be.entered
	<-be.entered
	code, m := f.post(t, "/attest/raw", `{"runtime_data":"aGk="}`)
	if code != http.StatusTooManyRequests || !strings.Contains(m["error"].(string), "already running") {
		t.Fatalf("third request: %d %v", code, m)
	}
	// GET /status is never refused.
	resp, err := http.Get(hs.URL + "/status")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("status while busy: %v %v", err, resp)
	}
	resp.Body.Close()
	close(be.release)
	for i := 0; i < 2; i++ {
		if c := <-results; c != 200 {
			t.Fatalf("blocked request ended with %d", c)
		}
	}
}
