package policy

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"testing"
)

func loadClaims(t *testing.T) map[string]any {
	t.Helper()
	b, err := os.ReadFile("testdata/sevsnpvm_claims.json")
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	return m
}

// Every claim of a real SevSnpVm token, given on the command line as
// NAME=VALUE, gets the type MAA gives it, and a policy built from all of
// them is satisfied by the token. Before, digit-only hex (familyId, a zero
// host data) became 1e+30 and such a key could never be released.
func TestParseClaimTypesFromRealClaimSet(t *testing.T) {
	claims := loadClaims(t)
	var list []Claim
	for name, v := range claims {
		c, err := ParseClaim(fmt.Sprintf("%s=%v", name, v))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if fmt.Sprintf("%T", c.Value) != fmt.Sprintf("%T", v) {
			t.Errorf("%s=%v: parsed as %T, the token has %T", name, v, c.Value, v)
		}
		list = append(list, c)
	}
	p, err := Build("https://sharedeus.eus.attest.azure.net", list)
	if err != nil {
		t.Fatal(err)
	}
	ok, mm := p.Evaluate("https://sharedeus.eus.attest.azure.net", claims)
	if !ok {
		t.Fatalf("policy from the token's own claims does not match it: %v", mm)
	}
	out, err := json.Marshal(p)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"equals":"01000000000000000000000000000000"`, `"equals":"0000000000000000000000000000000000000000000000000000000000000000"`, `"equals":false`, `"equals":93`} {
		if !bytes.Contains(out, []byte(want)) {
			t.Errorf("printed policy lacks %s: %s", want, out)
		}
	}
}

func TestParseClaimExplicitTypesAndErrors(t *testing.T) {
	for in, want := range map[string]any{
		"custom=42":                                  "42",
		"custom:number=42":                           42.0,
		"custom:bool=true":                           true,
		"x-ms-sevsnpvm-vmpl:string=0":                "0",
		"x-ms-sevsnpvm-familyId=0100":                "0100",
		"x-ms-sevsnpvm-guestsvn=7":                   7.0,
		"x-ms-compliance-status=azure-compliant-uvm": "azure-compliant-uvm",
	} {
		c, err := ParseClaim(in)
		if err != nil || c.Value != want {
			t.Errorf("%s: %#v %v, want %#v", in, c.Value, err, want)
		}
	}
	for in, want := range map[string]string{
		"noequals":                       "NAME=VALUE",
		"=x":                             "NAME=VALUE",
		":number=1":                      "empty name",
		"x-ms-sevsnpvm-is-debuggable=no": "not true or false",
		"x-ms-sevsnpvm-vmpl=zero":        "not a number",
		"custom:date=1":                  "not string, bool or number",
	} {
		if _, err := ParseClaim(in); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want %q", in, err, want)
		}
	}
}

func TestSevSnpVmClaims(t *testing.T) {
	hd := strings.Repeat("ab", 32)
	list, err := SevSnpVmClaims(SevSnpVmOptions{HostData: strings.ToUpper(hd), ComplianceStatus: "azure-compliant-uvm", Extra: []Claim{{Name: "x", Value: "y"}}})
	if err != nil {
		t.Fatal(err)
	}
	got := fmt.Sprint(list)
	want := fmt.Sprint([]Claim{{"x-ms-attestation-type", "sevsnpvm"}, {"x-ms-sevsnpvm-hostdata", hd}, {"x-ms-sevsnpvm-is-debuggable", false}, {"x-ms-compliance-status", "azure-compliant-uvm"}, {"x", "y"}})
	if got != want {
		t.Fatalf("%s\nwant %s", got, want)
	}
	if list, _ := SevSnpVmClaims(SevSnpVmOptions{HostData: hd, AllowDebug: true}); len(list) != 2 {
		t.Fatalf("allow debug: %v", list)
	}
	if _, err := SevSnpVmClaims(SevSnpVmOptions{HostData: "12"}); err == nil || !strings.Contains(err.Error(), "64 hex digits") {
		t.Fatalf("short host data: %v", err)
	}
}

// Policies as Key Vault holds them: the recorded one parses and evaluates;
// version 0.2 with a bare-host authority parses with warnings and matches
// tokens of that authority's https issuer.
func TestPoliciesFromTheField(t *testing.T) {
	b, err := os.ReadFile("testdata/azkeys_release_policy.json")
	if err != nil {
		t.Fatal(err)
	}
	p, err := Parse(b)
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Warnings) != 0 {
		t.Errorf("warnings on a current policy: %v", p.Warnings)
	}
	if ok, mm := p.Evaluate("https://chloweazkeyssite.azurewebsites.net", map[string]any{"sdk-test": "true"}); !ok {
		t.Fatalf("recorded policy: %v", mm)
	}
	b, err = os.ReadFile("testdata/legacy_v02_policy.json")
	if err != nil {
		t.Fatal(err)
	}
	p, err = Parse(b)
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Warnings) != 2 || !strings.Contains(strings.Join(p.Warnings, " "), `version "0.2"`) || !strings.Contains(strings.Join(p.Warnings, " "), "no scheme") {
		t.Fatalf("warnings %q", p.Warnings)
	}
	claims := loadClaims(t)
	if ok, mm := p.Evaluate("https://sharedeus2.eus2.attest.azure.net", claims); !ok {
		t.Fatalf("legacy policy vs. matching claims: %v", mm)
	}
	claims["x-ms-sevsnpvm-is-debuggable"] = true
	if ok, mm := p.Evaluate("https://sharedeus2.eus2.attest.azure.net", claims); ok || len(mm) != 1 || mm[0].Claim != "x-ms-sevsnpvm-is-debuggable" {
		t.Fatalf("debuggable VM: %v %v", ok, mm)
	}
	if ok, _ := p.Evaluate("https://other.attest.azure.net", loadClaims(t)); ok {
		t.Fatal("other issuer matched a bare-host authority")
	}
	if _, err := Parse([]byte(`{"version":"0.1","anyOf":[{"authority":"a.b","allOf":[{"claim":"x","equals":"y"}]}]}`)); err == nil || !strings.Contains(err.Error(), `"0.2" is accepted as legacy`) {
		t.Fatalf("version 0.1: %v", err)
	}
}

func FuzzParseClaim(f *testing.F) {
	for _, s := range []string{"x-ms-sevsnpvm-familyId=01000000000000000000000000000000", "a:number=1e3", "x-ms-sevsnpvm-is-debuggable=false", "=", "a:bool=maybe"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		c, err := ParseClaim(s)
		if err != nil {
			return
		}
		if c.Name == "" || strings.Contains(c.Name, "=") {
			t.Fatalf("%q gave name %q", s, c.Name)
		}
		if _, err := Build("https://a.b", []Claim{c}); err != nil && !strings.Contains(err.Error(), "claim") {
			t.Fatalf("%q: %v", s, err)
		}
	})
}
