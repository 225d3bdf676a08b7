package maa

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"

	"github.com/blobseal/blobseal/internal/secret"
)

func TestOnlyRS256Accepted(t *testing.T) {
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.HS256, Key: []byte("0123456789abcdef0123456789abcdef")}, nil)
	if err != nil {
		t.Fatal(err)
	}
	jws, err := signer.Sign([]byte(`{"iss":"https://maa.test","exp":4102444800}`))
	if err != nil {
		t.Fatal(err)
	}
	hs, err := jws.CompactSerialize()
	if err != nil {
		t.Fatal(err)
	}
	none := "eyJhbGciOiJub25lIn0.eyJpc3MiOiJodHRwczovL21hYS50ZXN0In0."
	v, err := NewVerifier(VerifierOptions{AllowedIssuers: []string{"https://maa.test"}})
	if err != nil {
		t.Fatal(err)
	}
	for name, tok := range map[string]string{"HS256": hs, "none": none} {
		_, err := v.Verify(context.Background(), secret.Token(tok))
		if err == nil || !strings.Contains(err.Error(), "not an RS256 JWS") {
			t.Errorf("%s token: %v", name, err)
		}
	}
	if _, err := NewVerifier(VerifierOptions{}); err == nil || !strings.Contains(err.Error(), "allowed issuer") {
		t.Fatalf("no issuers: %v", err)
	}
}

func TestParseClaimsTypes(t *testing.T) {
	c, err := ParseClaims([]byte(`{"iss":"https://a","exp":1700000000,"iat":1699990000,"x-ms-sevsnpvm-is-debuggable":true,"x-ms-sevsnpvm-vmpl":2,
		"x-ms-runtime":{"keys":[{"kty":"RSA","kid":"k1","e":"AQAB","n":"sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw","key_ops":["encrypt"]}]}}`))
	if err != nil {
		t.Fatal(err)
	}
	if c.Issuer != "https://a" || !c.Debuggable || c.VMPL != 2 || c.Expiry != time.Unix(1700000000, 0) || len(c.RuntimeKeys) != 1 || c.RuntimeKeys[0].KeyID != "k1" {
		t.Fatalf("claims: %+v", c)
	}
	for _, bad := range []string{`{"x-ms-sevsnpvm-is-debuggable":"false"}`, `{"exp":"soon"}`, `{"x-ms-runtime":[]}`, `{"iss":3}`, `[]`} {
		if _, err := ParseClaims([]byte(bad)); err == nil {
			t.Errorf("ParseClaims(%s) accepted", bad)
		}
	}
}
