package localca

import (
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

func TestServerCertTrustedOnlyThroughCA(t *testing.T) {
	ca, err := New("test CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := ca.ServerCert()
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok") }))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	srv.StartTLS()
	defer srv.Close()

	good := &http.Client{Transport: &http.Transport{TLSClientConfig: ca.ClientTLS()}}
	resp, err := good.Get(srv.URL)
	if err != nil {
		t.Fatalf("client trusting the CA failed: %v", err)
	}
	resp.Body.Close()

	other, _ := New("other", time.Hour)
	bad := &http.Client{Transport: &http.Transport{TLSClientConfig: other.ClientTLS()}}
	if _, err := bad.Get(srv.URL); err == nil {
		t.Fatal("client trusting another CA connected")
	}
}

func TestServerCertRSA(t *testing.T) {
	ca, err := New("test", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := ca.ServerCertRSA()
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := cert.PrivateKey.(*rsa.PrivateKey); !ok {
		t.Fatalf("private key is %T, want *rsa.PrivateKey", cert.PrivateKey)
	}
	if _, err := cert.Leaf.Verify(x509.VerifyOptions{Roots: ca.Pool(), DNSName: "127.0.0.1"}); err != nil {
		t.Fatalf("RSA server certificate does not verify to the CA for 127.0.0.1: %v", err)
	}
}
