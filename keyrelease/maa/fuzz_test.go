package maa

import (
	"encoding/base64"
	"testing"

	"github.com/blobseal/blobseal/keyrelease/evidence"
)

func FuzzDecodeSevSnpVmRequest(f *testing.F) {
	fx := newFixture(f, evidence.SimulatedConfig{})
	good, err := EncodeSevSnpVmRequest(fx.ev, fx.runtime, "nonce")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add([]byte(`{"report":"e30","runtimeData":{"data":"e30","dataType":"JSON"}}`))
	f.Add([]byte(`{"report":"` + base64.RawURLEncoding.EncodeToString([]byte(`{"SnpReport":"","VcekCertChain":"","Endorsements":"e30"}`)) + `"}`))
	f.Add([]byte(`{"report":null}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		d, err := DecodeSevSnpVmRequest(body)
		if err != nil {
			return
		}
		if len(d.Report) != evidence.ReportSize {
			t.Fatalf("accepted a %d-byte report", len(d.Report))
		}
		if d.RuntimeData != nil && d.RuntimeDataType != DataTypeJSON && d.RuntimeDataType != DataTypeBinary {
			t.Fatalf("accepted dataType %q", d.RuntimeDataType)
		}
	})
}

func FuzzParseClaims(f *testing.F) {
	f.Add([]byte(`{"iss":"https://x","exp":1700000000,"x-ms-sevsnpvm-is-debuggable":false,"x-ms-runtime":{"keys":[{"kty":"RSA","n":"AQAB","e":"AQAB"}]}}`))
	f.Add([]byte(`{"exp":1e300,"x-ms-sevsnpvm-vmpl":"0"}`))
	f.Add([]byte(`null`))
	f.Add([]byte(`{"x-ms-runtime":{"keys":{}}}`))
	f.Fuzz(func(t *testing.T, payload []byte) {
		c, err := ParseClaims(payload)
		if err == nil && c.Raw == nil {
			t.Fatal("claims without raw map")
		}
	})
}

func FuzzParseToken(f *testing.F) {
	f.Add("eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJodHRwczovL3gifQ.c2ln")
	f.Add("a.b.c")
	f.Add("..")
	f.Add(`{"payload":"e30","signatures":[]}`)
	f.Fuzz(func(t *testing.T, token string) {
		jws, c, err := parseUnverified(token)
		if err != nil {
			return
		}
		if len(jws.Signatures) != 1 || c == nil {
			t.Fatal("accepted a token without exactly one signature")
		}
	})
}
