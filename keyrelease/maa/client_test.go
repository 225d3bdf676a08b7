package maa

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"math/big"
	"net/http"
	"net/http/httptest"
	"sort"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"

	"github.com/blobseal/blobseal/keyrelease/evidence"
)

// fixture is simulated evidence bound to a fresh wrapping key.
type fixture struct {
	key     *rsa.PrivateKey
	runtime []byte
	ev      *evidence.Evidence
	sim     *evidence.Simulated
}

func newFixture(t testing.TB, cfg evidence.SimulatedConfig) *fixture {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	rt, err := RuntimeData(&key.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	sim, err := evidence.NewSimulated(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ev, err := sim.Get(context.Background(), evidence.ReportData(rt))
	if err != nil {
		t.Fatal(err)
	}
	ev.UVMReferenceInfo = []byte("reference-info-cose")
	return &fixture{key: key, runtime: rt, ev: ev, sim: sim}
}

func keysOf(m map[string]any) string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return strings.Join(ks, ",")
}

// unb64 decodes strict unpadded base64url, as MAA's examples use.
func unb64(t *testing.T, field string, v any) []byte {
	t.Helper()
	s, ok := v.(string)
	if !ok {
		t.Fatalf("%s is %T, want a string", field, v)
	}
	if strings.ContainsAny(s, "+/=") {
		t.Fatalf("%s is not unpadded base64url: %.40q", field, s)
	}
	b, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil {
		t.Fatalf("%s: %v", field, err)
	}
	return b
}

func obj(t *testing.T, field string, b []byte) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatalf("%s is not a JSON object: %v", field, err)
	}
	return m
}

// TestRequestBodyFieldByField checks what the client puts on the wire
// against the SevSnpVm format, layer by layer, without using the decoder.
func TestRequestBodyFieldByField(t *testing.T) {
	fx := newFixture(t, evidence.SimulatedConfig{})
	var got []byte
	var hdr http.Header
	var path, query string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got, _ = io.ReadAll(r.Body)
		hdr, path, query = r.Header.Clone(), r.URL.Path, r.URL.RawQuery
		_ = json.NewEncoder(w).Encode(TokenResponse{Token: "aGVhZGVy.cGF5bG9hZA.c2ln"})
	}))
	defer srv.Close()
	c := New(srv.URL+"/", Options{UserAgent: "blobseal-test/9"})
	tok, err := c.AttestSevSnpVm(context.Background(), fx.ev, fx.runtime, "nonce-42")
	if err != nil {
		t.Fatal(err)
	}
	if tok.Reveal() != "aGVhZGVy.cGF5bG9hZA.c2ln" {
		t.Fatal("token not returned")
	}
	if path != "/attest/SevSnpVm" || query != "api-version=2022-08-01" {
		t.Fatalf("request line: %s?%s", path, query)
	}
	if hdr.Get("Content-Type") != "application/json" || hdr.Get("User-Agent") != "blobseal-test/9" {
		t.Fatalf("headers: %v", hdr)
	}
	top := obj(t, "body", got)
	if keysOf(top) != "nonce,report,runtimeData" {
		t.Fatalf("top-level fields: %s", keysOf(top))
	}
	if top["nonce"] != "nonce-42" {
		t.Fatalf("nonce = %v", top["nonce"])
	}
	rd, ok := top["runtimeData"].(map[string]any)
	if !ok || keysOf(rd) != "data,dataType" || rd["dataType"] != "JSON" {
		t.Fatalf("runtimeData = %v", top["runtimeData"])
	}
	if !bytes.Equal(unb64(t, "runtimeData.data", rd["data"]), fx.runtime) {
		t.Fatal("runtimeData.data is not the runtime JSON")
	}
	inner := obj(t, "report", unb64(t, "report", top["report"]))
	if keysOf(inner) != "Endorsements,SnpReport,VcekCertChain" {
		t.Fatalf("report fields: %s", keysOf(inner))
	}
	if !bytes.Equal(unb64(t, "SnpReport", inner["SnpReport"]), fx.ev.Report) {
		t.Fatal("SnpReport differs from the raw report")
	}
	if !bytes.Equal(unb64(t, "VcekCertChain", inner["VcekCertChain"]), fx.ev.CertChain) {
		t.Fatal("VcekCertChain differs from the PEM chain")
	}
	end := obj(t, "Endorsements", unb64(t, "Endorsements", inner["Endorsements"]))
	uvm, ok := end["Uvm"].([]any)
	if keysOf(end) != "Uvm" || !ok || len(uvm) != 1 {
		t.Fatalf("Endorsements = %v", end)
	}
	if string(unb64(t, "Uvm[0]", uvm[0])) != "reference-info-cose" {
		t.Fatal("Uvm[0] is not the reference info")
	}
	// The runtime data is a JWK set with the wrapping key.
	var set struct {
		Keys []map[string]any `json:"keys"`
	}
	if err := json.Unmarshal(fx.runtime, &set); err != nil || len(set.Keys) != 1 {
		t.Fatalf("runtime JSON: %s", fx.runtime)
	}
	k := set.Keys[0]
	if keysOf(k) != "e,key_ops,kid,kty,n" || k["kty"] != "RSA" {
		t.Fatalf("JWK fields: %v", k)
	}
	if ops, _ := k["key_ops"].([]any); len(ops) != 1 || ops[0] != "encrypt" {
		t.Fatalf("key_ops = %v", k["key_ops"])
	}
	if new(big.Int).SetBytes(unb64(t, "n", k["n"])).Cmp(fx.key.N) != 0 {
		t.Fatal("n is not the wrapping key's modulus")
	}
	thumb, err := (&jose.JSONWebKey{Key: &fx.key.PublicKey}).Thumbprint(crypto.SHA256)
	if err != nil || k["kid"] != base64.RawURLEncoding.EncodeToString(thumb) {
		t.Fatalf("kid %v is not the RFC 7638 thumbprint", k["kid"])
	}
	// And REPORT_DATA binds exactly these bytes.
	sum := sha256.Sum256(fx.runtime)
	if !bytes.Equal(fx.ev.Report[0x50:0x70], sum[:]) {
		t.Fatal("REPORT_DATA does not hold SHA-256(runtime data)")
	}
}

func TestDecodeRoundTrip(t *testing.T) {
	fx := newFixture(t, evidence.SimulatedConfig{})
	body, err := EncodeSevSnpVmRequest(fx.ev, fx.runtime, "n1")
	if err != nil {
		t.Fatal(err)
	}
	d, err := DecodeSevSnpVmRequest(body)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(d.Report, fx.ev.Report) || !bytes.Equal(d.CertChain, fx.ev.CertChain) || !bytes.Equal(d.RuntimeData, fx.runtime) ||
		d.RuntimeDataType != "JSON" || d.Nonce != "n1" || len(d.UVMReferenceInfo) != 1 || string(d.UVMReferenceInfo[0]) != "reference-info-cose" {
		t.Fatalf("round trip: %+v", d)
	}
	for _, tc := range []struct{ body, want string }{
		{`nope`, "request body is not JSON"},
		{`{}`, `request has no "report"`},
		{`{"report":"!!"}`, `"report" is not base64url`},
		{`{"report":"` + base64.RawURLEncoding.EncodeToString([]byte(`{"SnpReport":"AAAA"}`)) + `"}`, `"SnpReport" is 3 bytes, want 1184`},
		{`{"report":"` + base64.RawURLEncoding.EncodeToString([]byte(`[1]`)) + `"}`, `decoded "report" is not JSON`},
	} {
		if _, err := DecodeSevSnpVmRequest([]byte(tc.body)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Decode(%s) = %v, want %q", tc.body, err, tc.want)
		}
	}
}

// counting answers with the given statuses in turn, then a token.
func counting(t *testing.T, statuses ...int) (*httptest.Server, *atomic.Int32) {
	var n atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		i := int(n.Add(1)) - 1
		if i < len(statuses) {
			if statuses[i] == http.StatusTooManyRequests {
				w.Header().Set("Retry-After", "0")
			}
			w.WriteHeader(statuses[i])
			_ = json.NewEncoder(w).Encode(ErrorResponse{Error: ErrorDetail{Code: "Busy", Message: "try later"}})
			return
		}
		_ = json.NewEncoder(w).Encode(TokenResponse{Token: "a.b.c"})
	}))
	t.Cleanup(srv.Close)
	return srv, &n
}

func TestRetriesOn429And5xx(t *testing.T) {
	fx := newFixture(t, evidence.SimulatedConfig{})
	srv, n := counting(t, 429, 503, 500)
	c := New(srv.URL, Options{RetryDelay: time.Millisecond})
	if _, err := c.AttestSevSnpVm(context.Background(), fx.ev, fx.runtime, ""); err != nil {
		t.Fatal(err)
	}
	if n.Load() != 4 {
		t.Fatalf("requests = %d, want 4", n.Load())
	}
	srv, n = counting(t, 503, 503, 503)
	c = New(srv.URL, Options{RetryDelay: time.Millisecond, MaxRetries: 2})
	_, err := c.AttestSevSnpVm(context.Background(), fx.ev, fx.runtime, "")
	if err == nil || !strings.Contains(err.Error(), "unavailable after 3 attempts") || n.Load() != 3 {
		t.Fatalf("exhausted: %v after %d requests", err, n.Load())
	}
}

func TestNoRetryOnRejection(t *testing.T) {
	fx := newFixture(t, evidence.SimulatedConfig{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusBadRequest)
		_ = json.NewEncoder(w).Encode(ErrorResponse{Error: ErrorDetail{Code: "InvalidParameter", Message: "VCEK certificate chain does not verify"}})
	}))
	defer srv.Close()
	c := New(srv.URL, Options{RetryDelay: time.Millisecond})
	_, err := c.AttestSevSnpVm(context.Background(), fx.ev, fx.runtime, "")
	var me *Error
	if !errors.As(err, &me) || me.StatusCode != 400 || me.Code != "InvalidParameter" {
		t.Fatalf("err = %v", err)
	}
	for _, want := range []string{"HTTP 400 InvalidParameter", "VCEK certificate chain does not verify", "--cert-cache-url"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
	srv404 := httptest.NewServer(http.NotFoundHandler())
	defer srv404.Close()
	_, err = New(srv404.URL, Options{}).AttestSevSnpVm(context.Background(), fx.ev, fx.runtime, "")
	if err == nil || !strings.Contains(err.Error(), "check --maa-endpoint") {
		t.Fatalf("404: %v", err)
	}
}

func TestClientChecksBindingBeforeSending(t *testing.T) {
	fx := newFixture(t, evidence.SimulatedConfig{})
	var n atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { n.Add(1) }))
	defer srv.Close()
	other := append([]byte(nil), fx.runtime...)
	other[len(other)-2] = ' '
	_, err := New(srv.URL, Options{}).AttestSevSnpVm(context.Background(), fx.ev, other, "")
	if err == nil || !strings.Contains(err.Error(), "REPORT_DATA is not SHA-256 of the runtime data") || n.Load() != 0 {
		t.Fatalf("err = %v, requests %d", err, n.Load())
	}
	if _, err := New("", Options{}).AttestSevSnpVm(context.Background(), fx.ev, fx.runtime, ""); err == nil || !strings.Contains(err.Error(), "--maa-endpoint") {
		t.Fatalf("no endpoint: %v", err)
	}
}

func TestContextCancellationAndTimeout(t *testing.T) {
	fx := newFixture(t, evidence.SimulatedConfig{})
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
		case <-release:
		}
	}))
	defer srv.Close()
	defer close(release)
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(50*time.Millisecond, cancel)
	start := time.Now()
	_, err := New(srv.URL, Options{}).AttestSevSnpVm(ctx, fx.ev, fx.runtime, "")
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
	if time.Since(start) > 10*time.Second {
		t.Fatal("cancellation was not prompt")
	}
	// A per-attempt timeout makes a hung service an error, after retries.
	_, err = New(srv.URL, Options{Timeout: 50 * time.Millisecond, MaxRetries: 1, RetryDelay: time.Millisecond}).AttestSevSnpVm(context.Background(), fx.ev, fx.runtime, "")
	if err == nil || !strings.Contains(err.Error(), "unavailable after 2 attempts") || !strings.Contains(err.Error(), "deadline exceeded") {
		t.Fatalf("timeout: %v", err)
	}
}

func TestRuntimeDataRejectsSmallKeys(t *testing.T) {
	k, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := RuntimeData(&k.PublicKey); err == nil || !strings.Contains(err.Error(), "1024 bits") {
		t.Fatalf("err = %v", err)
	}
	if _, err := RuntimeData(nil); err == nil {
		t.Fatal("nil key accepted")
	}
}
