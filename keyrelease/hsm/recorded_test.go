package hsm

import (
	"crypto/x509"
	"encoding/json"
	"errors"
	"os"
	"strings"
	"testing"
	"time"
)

// recordedRelease is the 200 body of a real Managed HSM release (see
// testdata/README.md). Its certificates expired in 2023: it verifies only at
// its recording time, which is what the injectable clock is for.
func recordedRelease(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("testdata/mhsm_release_response.json")
	if err != nil {
		t.Fatal(err)
	}
	var body struct {
		Value string `json:"value"`
	}
	if err := json.Unmarshal(b, &body); err != nil {
		t.Fatal(err)
	}
	return body.Value
}

// digicertG2 is the root the recorded chain ends at, read from the system
// store rather than from the response itself.
func digicertG2(t *testing.T) *x509.CertPool {
	t.Helper()
	pem, err := os.ReadFile("/etc/ssl/certs/DigiCert_Global_Root_G2.pem")
	if err != nil {
		t.Fatalf("system CA store (ca-certificates) lacks DigiCert Global Root G2: %v", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		t.Fatal("DigiCert Global Root G2: not PEM")
	}
	return pool
}

func TestVerifyRecordedManagedHSMRelease(t *testing.T) {
	compact := recordedRelease(t)
	roots := digicertG2(t)
	const host = "chloweazkeyshsm.managedhsm.azure.net"
	recorded := time.Date(2022, 6, 27, 19, 1, 25, 0, time.UTC) // the recording's Date header
	payload, err := VerifyReleaseJWS(compact, JWSOptions{Host: host, Roots: roots, Now: recorded})
	if err != nil {
		t.Fatal(err)
	}
	var p releasePayload
	if err := json.Unmarshal(payload, &p); err != nil {
		t.Fatal(err)
	}
	k := p.Response.Key.Key
	if p.Request.Enc != "CKM_RSA_AES_KEY_WRAP" || p.Request.APIVersion != "7.3" || !kidNames(k.KID, "testreleasekey2633194999") || k.KeyHSM == "" || strings.Join(k.KeyOps, ",") != "verify,sign" {
		t.Fatalf("payload: %+v", p)
	}
	// The key_hsm transfer blob has the shape the unwrapper expects.
	blob, err := decodeB64(k.KeyHSM)
	if err != nil {
		t.Fatal(err)
	}
	var kh keyHSM
	if err := json.Unmarshal(blob, &kh); err != nil || kh.SchemaVersion != "1.0" || kh.Header.Enc != "CKM_RSA_AES_KEY_WRAP" || kh.Ciphertext == "" {
		t.Fatalf("key_hsm %+v: %v", kh, err)
	}

	for name, o := range map[string]JWSOptions{
		"now (certificates expired)": {Host: host, Roots: roots},
		"another vault host":         {Host: "other.managedhsm.azure.net", Roots: roots, Now: recorded},
		"other roots":                {Host: host, Roots: x509.NewCertPool(), Now: recorded},
	} {
		if _, err := VerifyReleaseJWS(compact, o); !errors.Is(err, ErrBadResponse) {
			t.Errorf("%s: %v", name, err)
		}
	}
	// One flipped signature byte fails.
	sig := strings.LastIndexByte(compact, '.') + 10
	repl := "A"
	if compact[sig] == 'A' {
		repl = "B"
	}
	flipped := compact[:sig] + repl + compact[sig+1:]
	if _, err := VerifyReleaseJWS(flipped, JWSOptions{Host: host, Roots: roots, Now: recorded}); !errors.Is(err, ErrBadResponse) {
		t.Errorf("flipped signature: %v", err)
	}
}
