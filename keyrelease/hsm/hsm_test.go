package hsm

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/go-jose/go-jose/v4"
	xhkdf "golang.org/x/crypto/hkdf"

	"github.com/blobseal/blobseal/internal/secret"
	"github.com/blobseal/blobseal/internal/testenv"
)

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// RFC 5649 section 6 test vectors.
func TestRFC5649Vectors(t *testing.T) {
	kek := unhex(t, "5840df6e29b02af1 ab493b705bf16ea1 ae8338f4dcc176a8")
	cases := []struct{ key, wrapped string }{
		{"c37b7e6492584340 bed1220780894115 5068f738", "138bdeaa9b8fa7fc 61f97742e72248ee 5ae6ae5360d1ae6a 5f54f373fa543b6a"},
		{"466f7250617369", "afbeb0f07dfbf541 9200f2ccb50bb24f"},
	}
	for _, c := range cases {
		key, want := unhex(t, c.key), unhex(t, c.wrapped)
		got, err := WrapPad(kek, key)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("WrapPad(%x) = %x, want %x", key, got, want)
		}
		back, err := UnwrapPad(kek, want)
		if err != nil || !bytes.Equal(back, key) {
			t.Errorf("UnwrapPad(%x) = %x, %v", want, back, err)
		}
	}
}

func TestWrapPadRoundTripAndTamper(t *testing.T) {
	kek := make([]byte, 32)
	rand.Read(kek)
	for n := 1; n <= 70; n++ {
		key := make([]byte, n)
		rand.Read(key)
		w, err := WrapPad(kek, key)
		if err != nil {
			t.Fatal(err)
		}
		if len(w) != ((n+7)/8)*8+8 {
			t.Fatalf("len %d: wrapped to %d bytes", n, len(w))
		}
		back, err := UnwrapPad(kek, w)
		if err != nil || !bytes.Equal(back, key) {
			t.Fatalf("len %d: round trip failed: %v", n, err)
		}
		w[len(w)/2] ^= 1
		if _, err := UnwrapPad(kek, w); err == nil {
			t.Fatalf("len %d: tampered wrap accepted", n)
		}
	}
	if _, err := UnwrapPad(kek, make([]byte, 12)); err == nil {
		t.Error("12-byte input accepted")
	}
	if _, err := WrapPad(kek[:5], []byte("x")); err == nil {
		t.Error("5-byte KEK accepted")
	}
}

// OpenSSL builds the ciphertext (RSA-OAEP of a transport key, then
// id-aes256-wrap-pad of the key), and UnwrapKeyHSM must recover the key.
func TestUnwrapKeyHSMAgainstOpenSSL(t *testing.T) {
	openssl := testenv.RequireTools(t, "openssl")[0]
	dir := t.TempDir()
	wrapping, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	pubDER, _ := x509.MarshalPKIXPublicKey(&wrapping.PublicKey)
	pubPath := filepath.Join(dir, "pub.pem")
	os.WriteFile(pubPath, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER}), 0o600)
	kek := make([]byte, 32)
	rand.Read(kek)
	kekPath := filepath.Join(dir, "kek.bin")
	os.WriteFile(kekPath, kek, 0o600)
	material := make([]byte, 45) // not a multiple of 8: exercises padding
	rand.Read(material)
	matPath := filepath.Join(dir, "key.bin")
	os.WriteFile(matPath, material, 0o600)

	run := func(args ...string) []byte {
		out, err := exec.Command(openssl, args...).Output()
		if err != nil {
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				t.Fatalf("openssl %v: %v: %s", args, err, ee.Stderr)
			}
			t.Fatal(err)
		}
		return out
	}
	wrapped := run("enc", "-id-aes256-wrap-pad", "-K", hex.EncodeToString(kek), "-iv", "A65959A6", "-in", matPath)
	for alg, md := range map[string]string{AlgCKMRSAAESKeyWrap: "sha1", AlgRSAAESKeyWrap256: "sha256", AlgRSAAESKeyWrap384: "sha384"} {
		head := run("pkeyutl", "-encrypt", "-pubin", "-inkey", pubPath, "-in", kekPath,
			"-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:"+md, "-pkeyopt", "rsa_mgf1_md:"+md)
		got, err := UnwrapKeyHSM(append(head, wrapped...), wrapping, alg)
		if err != nil {
			t.Fatalf("%s: %v", alg, err)
		}
		if !bytes.Equal(got, material) {
			t.Fatalf("%s: unwrapped material differs", alg)
		}
		// Our own wrap must unwrap in OpenSSL too (inverse direction).
		ours, err := WrapPad(kek, material)
		if err != nil {
			t.Fatal(err)
		}
		oursPath := filepath.Join(dir, "ours.bin")
		os.WriteFile(oursPath, ours, 0o600)
		if back := run("enc", "-d", "-id-aes256-wrap-pad", "-K", hex.EncodeToString(kek), "-iv", "A65959A6", "-in", oursPath); !bytes.Equal(back, material) {
			t.Fatalf("openssl could not unwrap our RFC 5649 output")
		}
	}
}

func TestUnwrapKeyHSMErrors(t *testing.T) {
	wrapping, _ := rsa.GenerateKey(rand.Reader, 2048)
	other, _ := rsa.GenerateKey(rand.Reader, 2048)
	material := []byte("0123456789abcdef0123456789abcdef")
	ct, err := WrapKeyHSM(nil, material, &wrapping.PublicKey, AlgRSAAESKeyWrap384)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := UnwrapKeyHSM(ct, other, AlgRSAAESKeyWrap384); err == nil || !strings.Contains(err.Error(), "runtime key") {
		t.Errorf("foreign wrapping key: %v", err)
	}
	if _, err := UnwrapKeyHSM(ct, wrapping, AlgRSAAESKeyWrap256); err == nil {
		t.Error("wrong OAEP hash accepted")
	}
	if _, err := UnwrapKeyHSM(ct, wrapping, "A256KW"); !errors.Is(err, ErrUnknownAlgorithm) {
		t.Errorf("unknown alg: %v", err)
	}
	if _, err := UnwrapKeyHSM(ct[:200], wrapping, AlgRSAAESKeyWrap384); err == nil || !strings.Contains(err.Error(), "at least") {
		t.Errorf("short ciphertext: %v", err)
	}
}

func TestDeriveSecret(t *testing.T) {
	oct := make(secret.Bytes, 32)
	rand.Read(oct)
	got, err := DeriveSecret(&ReleasedKey{Kty: "oct-HSM", Material: oct}, "", "")
	if err != nil || !bytes.Equal(got, oct) {
		t.Fatalf("oct-HSM: %v", err)
	}
	if _, err := DeriveSecret(&ReleasedKey{Kty: "oct-HSM", Material: oct[:16]}, "", ""); err == nil || !strings.Contains(err.Error(), "32") {
		t.Errorf("16-byte oct: %v", err)
	}
	rk, _ := rsa.GenerateKey(rand.Reader, 2048)
	der, _ := x509.MarshalPKCS8PrivateKey(rk)
	salt := "a1b2c3"
	want := make([]byte, 32)
	io.ReadFull(xhkdf.New(sha256.New, rk.D.Bytes(), []byte{0xa1, 0xb2, 0xc3}, []byte("custom")), want)
	got, err = DeriveSecret(&ReleasedKey{Kty: "RSA-HSM", Material: der}, salt, "custom")
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("RSA-HSM: %v", err)
	}
	if _, err := DeriveSecret(&ReleasedKey{Kty: "RSA-HSM", Material: der}, "xyz", ""); err == nil || !strings.Contains(err.Error(), "hex") {
		t.Errorf("bad salt: %v", err)
	}
	ek, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	eder, _ := x509.MarshalPKCS8PrivateKey(ek)
	if _, err := DeriveSecret(&ReleasedKey{Kty: "EC-HSM", Material: eder}, "", ""); err == nil || !strings.Contains(err.Error(), "oct-HSM or RSA-HSM") {
		t.Errorf("EC: %v", err)
	}
	if v := (&ReleasedKey{KID: "https://h.managedhsm.azure.net/keys/k/0123abcd"}).Version(); v != "0123abcd" {
		t.Errorf("Version() = %q", v)
	}
}

// testPKI is an RSA root and a leaf for a Managed HSM host name, like the
// real service's signing certificate.
type testPKI struct {
	root    *x509.Certificate
	leaf    *x509.Certificate
	leafKey *rsa.PrivateKey
}

func newPKI(t testing.TB, host string) *testPKI {
	t.Helper()
	rootKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	rootT := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test root"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	rootDER, err := x509.CreateCertificate(rand.Reader, rootT, rootT, &rootKey.PublicKey, rootKey)
	if err != nil {
		t.Fatal(err)
	}
	root, _ := x509.ParseCertificate(rootDER)
	leafKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	leafT := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: host}, DNSNames: []string{host}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature}
	leafDER, err := x509.CreateCertificate(rand.Reader, leafT, root, &leafKey.PublicKey, rootKey)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(leafDER)
	return &testPKI{root: root, leaf: leaf, leafKey: leafKey}
}

func (p *testPKI) pool() *x509.CertPool {
	pool := x509.NewCertPool()
	pool.AddCert(p.root)
	return pool
}

func (p *testPKI) sign(t testing.TB, payload []byte, withX5C bool) string {
	t.Helper()
	opts := &jose.SignerOptions{}
	if withX5C {
		opts = opts.WithHeader("x5c", []string{base64.StdEncoding.EncodeToString(p.leaf.Raw), base64.StdEncoding.EncodeToString(p.root.Raw)})
	}
	s, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.RS256, Key: p.leafKey}, opts)
	if err != nil {
		t.Fatal(err)
	}
	obj, err := s.Sign(payload)
	if err != nil {
		t.Fatal(err)
	}
	out, err := obj.CompactSerialize()
	if err != nil {
		t.Fatal(err)
	}
	return out
}

const hsmHost = "myhsm.managedhsm.azure.net"

func releaseJSON(t testing.TB, wrapping *rsa.PrivateKey, material []byte, alg, kty, kid string) []byte {
	ct, err := WrapKeyHSM(nil, material, &wrapping.PublicKey, alg)
	if err != nil {
		t.Fatal(err)
	}
	kh, _ := json.Marshal(map[string]any{"schema_version": "1.0", "header": map[string]string{"kid": "TargetKey", "alg": "dir", "enc": alg}, "ciphertext": base64.RawURLEncoding.EncodeToString(ct)})
	p, _ := json.Marshal(map[string]any{
		"request":  map[string]any{"api-version": "7.4", "enc": alg, "kid": "https://" + hsmHost + "/keys/k"},
		"response": map[string]any{"key": map[string]any{"key": map[string]any{"kid": kid, "kty": kty, "key_ops": []string{"encrypt"}, "key_hsm": base64.RawURLEncoding.EncodeToString(kh)}, "attributes": map[string]any{"exportable": true}}},
	})
	return p
}

func TestVerifyJWSAndOpen(t *testing.T) {
	pki := newPKI(t, hsmHost)
	wrapping, _ := rsa.GenerateKey(rand.Reader, 2048)
	material := make([]byte, 32)
	rand.Read(material)
	payload := releaseJSON(t, wrapping, material, AlgRSAAESKeyWrap256, "oct-HSM", "https://"+hsmHost+"/keys/k/v1")
	jws := pki.sign(t, payload, true)

	got, err := VerifyReleaseJWS(jws, JWSOptions{Host: hsmHost, Roots: pki.pool()})
	if err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("VerifyReleaseJWS: %v", err)
	}
	rk, err := parsePayload(got, "k", AlgRSAAESKeyWrap256, wrapping)
	if err != nil || !bytes.Equal(rk.Material, material) || rk.Kty != "oct-HSM" || rk.Version() != "v1" {
		t.Fatalf("parsePayload: %v", err)
	}

	bad := []struct {
		name, jws, host string
		roots           *x509.CertPool
		want            string
	}{
		{"other host", jws, "evil.managedhsm.azure.net", pki.pool(), "x5c"},
		{"other root", jws, hsmHost, newPKI(t, hsmHost).pool(), "x5c"},
		{"no x5c", pki.sign(t, payload, false), hsmHost, pki.pool(), "x5c"},
		{"tampered payload", tamper(jws), hsmHost, pki.pool(), "signature"},
		{"garbage", "a.b.c", hsmHost, pki.pool(), "compact JWS"},
	}
	for _, c := range bad {
		if _, err := VerifyReleaseJWS(c.jws, JWSOptions{Host: c.host, Roots: c.roots}); !errors.Is(err, ErrBadResponse) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v", c.name, err)
		}
	}
	if _, err := parsePayload(payload, "other-key", AlgRSAAESKeyWrap256, wrapping); err == nil || !strings.Contains(err.Error(), "not the requested key") {
		t.Errorf("kid of another key accepted: %v", err)
	}
	if _, err := parsePayload(payload, "k", AlgCKMRSAAESKeyWrap, wrapping); err == nil {
		t.Error("enc mismatch accepted")
	}
}

func tamper(jws string) string {
	parts := strings.Split(jws, ".")
	p, _ := base64.RawURLEncoding.DecodeString(parts[1])
	p = bytes.Replace(p, []byte(`"7.4"`), []byte(`"7.5"`), 1)
	parts[1] = base64.RawURLEncoding.EncodeToString(p)
	return strings.Join(parts, ".")
}

func TestBearerToken(t *testing.T) {
	c := BearerToken("super-secret-bearer")
	tok, err := c.GetToken(t.Context(), policy.TokenRequestOptions{Scopes: []string{"https://managedhsm.azure.net/.default"}})
	if err != nil || tok.Token != "super-secret-bearer" || !tok.ExpiresOn.After(time.Now()) {
		t.Fatalf("GetToken = %v, %v", tok.ExpiresOn, err)
	}
	if s := fmt.Sprintf("%v %+v %#v", c, c, c); strings.Contains(s, "super-secret") {
		t.Fatalf("credential prints its token: %s", s)
	}
	if _, err := BearerToken("").GetToken(t.Context(), policy.TokenRequestOptions{}); err == nil {
		t.Error("empty bearer accepted")
	}
}

func FuzzVerifyJWS(f *testing.F) {
	pki := newPKI(f, hsmHost)
	wrapping, _ := rsa.GenerateKey(rand.Reader, 2048)
	material := make([]byte, 32)
	f.Add(pki.sign(f, releaseJSON(f, wrapping, material, AlgCKMRSAAESKeyWrap, "oct-HSM", "https://"+hsmHost+"/keys/k/1"), true))
	f.Add("eyJhbGciOiJSUzI1NiJ9.e30.AAAA")
	f.Add("...")
	pool := pki.pool()
	f.Fuzz(func(t *testing.T, s string) {
		payload, err := VerifyReleaseJWS(s, JWSOptions{Host: hsmHost, Roots: pool})
		if err != nil {
			if !errors.Is(err, ErrBadResponse) {
				t.Fatalf("error not marked ErrBadResponse: %v", err)
			}
			return
		}
		_, _ = parsePayload(payload, "k", AlgCKMRSAAESKeyWrap, wrapping)
	})
}

func FuzzParsePayload(f *testing.F) {
	wrapping, _ := rsa.GenerateKey(rand.Reader, 2048)
	material := make([]byte, 32)
	f.Add(releaseJSON(f, wrapping, material, AlgCKMRSAAESKeyWrap, "oct-HSM", "https://"+hsmHost+"/keys/k/1"))
	f.Add([]byte(`{"response":{"key":{"key":{"kid":"https://h/keys/k/1","key_hsm":"e30"}}}}`))
	f.Add([]byte(`{}`))
	f.Fuzz(func(t *testing.T, payload []byte) {
		rk, err := parsePayload(payload, "k", AlgCKMRSAAESKeyWrap, wrapping)
		if err == nil && rk == nil {
			t.Fatal("nil key without error")
		}
	})
}

func FuzzUnwrapPad(f *testing.F) {
	kek := unhex(f, "5840df6e29b02af1 ab493b705bf16ea1 ae8338f4dcc176a8")
	f.Add(unhex(f, "138bdeaa9b8fa7fc 61f97742e72248ee 5ae6ae5360d1ae6a 5f54f373fa543b6a"))
	f.Add(unhex(f, "afbeb0f07dfbf541 9200f2ccb50bb24f"))
	f.Fuzz(func(t *testing.T, wrapped []byte) {
		key, err := UnwrapPad(kek, wrapped)
		if err != nil {
			return
		}
		again, err := WrapPad(kek, key)
		if err != nil || !bytes.Equal(again, wrapped) {
			t.Fatalf("unwrap accepted %x but re-wrap gives %x (%v)", wrapped, again, err)
		}
	})
}
