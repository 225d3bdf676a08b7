package policy

import (
	"encoding/json"
	"strings"
	"testing"
)

const maaURL = "https://sharedeus.eus.attest.azure.net"

// A policy in the shape the Azure documentation and az confcom produce.
const acipolicy = `{
  "version": "1.0.0",
  "anyOf": [
    {
      "authority": "https://sharedeus.eus.attest.azure.net/",
      "allOf": [
        {"claim": "x-ms-attestation-type", "equals": "sevsnpvm"},
        {"claim": "x-ms-compliance-status", "equals": "azure-compliant-uvm"},
        {"claim": "x-ms-sevsnpvm-hostdata", "equals": "73973b78d70cc68353426de188db5dfc57e5b766e399935fb73a61127ea26d20"},
        {"claim": "x-ms-sevsnpvm-is-debuggable", "equals": false}
      ]
    }
  ]
}`

func goodClaims() map[string]any {
	return map[string]any{
		"iss":                         maaURL,
		"x-ms-attestation-type":       "sevsnpvm",
		"x-ms-compliance-status":      "azure-compliant-uvm",
		"x-ms-sevsnpvm-hostdata":      "73973B78D70CC68353426DE188DB5DFC57E5B766E399935FB73A61127EA26D20",
		"x-ms-sevsnpvm-is-debuggable": false,
		"x-ms-sevsnpvm-vmpl":          float64(0),
		"x-ms-isolation-tee":          map[string]any{"x-ms-attestation-type": "sevsnpvm"},
	}
}

func TestParseAndEvaluateAzurePolicy(t *testing.T) {
	p, err := Parse([]byte(acipolicy))
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Authorities) != 1 || len(p.Authorities[0].Rule.AllOf) != 4 {
		t.Fatalf("parsed shape wrong: %+v", p)
	}
	ok, mm := p.Evaluate(maaURL, goodClaims())
	if !ok {
		t.Fatalf("good claims rejected: %s", Describe(mm))
	}

	bad := goodClaims()
	bad["x-ms-sevsnpvm-hostdata"] = "00"
	bad["x-ms-sevsnpvm-is-debuggable"] = true
	ok, mm = p.Evaluate(maaURL, bad)
	if ok {
		t.Fatal("mismatching claims accepted")
	}
	desc := Describe(mm)
	for _, want := range []string{`"x-ms-sevsnpvm-hostdata" is "00"`, `"x-ms-sevsnpvm-is-debuggable" is true`} {
		if !strings.Contains(desc, want) {
			t.Errorf("explanation %q lacks %q", desc, want)
		}
	}
	if len(mm) != 2 {
		t.Errorf("want 2 mismatches, got %d: %s", len(mm), desc)
	}

	missing := goodClaims()
	delete(missing, "x-ms-compliance-status")
	if ok, mm := p.Evaluate(maaURL, missing); ok || len(mm) != 1 || !mm[0].Missing {
		t.Errorf("missing claim: ok=%v mm=%v", ok, mm)
	}

	ok, mm = p.Evaluate("https://evil.example", goodClaims())
	if ok || len(mm) != 1 || !strings.Contains(mm[0].String(), "not an authority") {
		t.Errorf("foreign issuer: ok=%v mm=%v", ok, mm)
	}
}

func TestNestedAnyOfAllOf(t *testing.T) {
	doc := `{"version":"1.0.0","anyOf":[{"authority":"https://a.example","anyOf":[
	  {"allOf":[{"claim":"x","equals":"1"},{"claim":"y","equals":2}]},
	  {"allOf":[{"claim":"z","exists":true},{"anyOf":[{"claim":"n","greaterOrEquals":5},{"claim":"tee.kind","equals":"snp"}]}]}
	]}]}`
	p, err := Parse([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		claims map[string]any
		ok     bool
	}{
		{map[string]any{"x": "1", "y": float64(2)}, true},
		{map[string]any{"x": "1", "y": float64(3)}, false},
		{map[string]any{"z": "anything", "n": float64(7)}, true},
		{map[string]any{"z": "anything", "n": float64(4)}, false},
		{map[string]any{"z": "anything", "tee": map[string]any{"kind": "SNP"}}, true},
		{map[string]any{"n": float64(9)}, false},
	}
	for i, c := range cases {
		ok, mm := p.Evaluate("https://A.example/", c.claims)
		if ok != c.ok {
			t.Errorf("case %d: ok=%v want %v (%s)", i, ok, c.ok, Describe(mm))
		}
		if !ok && len(mm) == 0 {
			t.Errorf("case %d: rejected without an explanation", i)
		}
	}
}

func TestBuildRoundTrip(t *testing.T) {
	p, err := Build(maaURL, []Claim{
		{"x-ms-sevsnpvm-hostdata", "abcd"},
		{"x-ms-sevsnpvm-is-debuggable", false},
		{"x-ms-sevsnpvm-vmpl", 0},
	})
	if err != nil {
		t.Fatal(err)
	}
	js, err := json.Marshal(p)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"version":"1.0.0","anyOf":[{"authority":"https://sharedeus.eus.attest.azure.net","allOf":[{"claim":"x-ms-sevsnpvm-hostdata","equals":"abcd"},{"claim":"x-ms-sevsnpvm-is-debuggable","equals":false},{"claim":"x-ms-sevsnpvm-vmpl","equals":0}]}]}`
	if string(js) != want {
		t.Fatalf("encoding\n got %s\nwant %s", js, want)
	}
	back, err := Parse(js)
	if err != nil {
		t.Fatal(err)
	}
	again, _ := json.Marshal(back)
	if string(again) != want {
		t.Fatalf("round trip changed the policy: %s", again)
	}
	if ok, mm := back.Evaluate(maaURL, map[string]any{"x-ms-sevsnpvm-hostdata": "ABCD", "x-ms-sevsnpvm-is-debuggable": false, "x-ms-sevsnpvm-vmpl": float64(0)}); !ok {
		t.Fatalf("built policy rejects matching claims: %s", Describe(mm))
	}
	if _, err := Build("http://insecure", []Claim{{"a", "b"}}); err == nil {
		t.Error("http authority accepted")
	}
	if _, err := Build(maaURL, nil); err == nil {
		t.Error("empty claim list accepted")
	}
}

func TestParseErrorsNameTheProblem(t *testing.T) {
	cases := map[string]string{
		`[]`:                               "not a JSON object",
		`{"version":"2.0","anyOf":[]}`:     "version",
		`{"version":"1.0.0","anyOf":[]}`:   "at least one authority",
		`{"version":"1.0.0","anyOf":[{}]}`: "authority URL is missing",
		`{"version":"1.0.0","bogus":1}`:    `unknown field "bogus"`,
		`{"version":"1.0.0","anyOf":[{"authority":"https://a","allOf":[]}]}`:                                                            "at least one condition",
		`{"version":"1.0.0","anyOf":[{"authority":"https://a","allOf":[{"claim":"x"}]}]}`:                                               "no operator",
		`{"version":"1.0.0","anyOf":[{"authority":"https://a","allOf":[{"claim":"x","like":"y"}]}]}`:                                    `unknown field "like"`,
		`{"version":"1.0.0","anyOf":[{"authority":"https://a","allOf":[{"claim":"x","equals":[1]}]}]}`:                                  "string, number or boolean",
		`{"version":"1.0.0","anyOf":[{"authority":"https://a","allOf":[{"claim":"x","less":"y"}]}]}`:                                    "takes a number",
		`{"version":"1.0.0","anyOf":[{"authority":"https://a","allOf":[{"claim":"x","equals":1}],"anyOf":[{"claim":"x","equals":1}]}]}`: "exactly one of allOf or anyOf",
		`{"version":"1.0.0","anyOf":[{"authority":"not a url","allOf":[{"claim":"x","equals":1}]}]}`:                                    "not an attestation service URL",
	}
	for in, want := range cases {
		_, err := Parse([]byte(in))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Parse(%s) = %v, want error containing %q", in, err, want)
		}
	}
	deep := `{"version":"1.0.0","anyOf":[{"authority":"https://a","allOf":[` + strings.Repeat(`{"allOf":[`, 40) + `{"claim":"x","equals":1}` + strings.Repeat(`]}`, 40) + `]}]}`
	if _, err := Parse([]byte(deep)); err == nil || !strings.Contains(err.Error(), "nested deeper") {
		t.Errorf("deep nesting: %v", err)
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(acipolicy))
	f.Add([]byte(`{"version":"1.0.0","anyOf":[{"authority":"https://a","anyOf":[{"allOf":[{"claim":"z","exists":true}]}]}]}`))
	f.Add([]byte(`{"version":"1.0.0","anyOf":[{"authority":"https://a","allOf":[{"claim":"n","less":3}]}]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := Parse(data)
		if err != nil {
			return
		}
		enc, err := json.Marshal(p)
		if err != nil {
			t.Fatalf("marshal of parsed policy: %v", err)
		}
		p2, err := Parse(enc)
		if err != nil {
			t.Fatalf("re-parse of %s: %v", enc, err)
		}
		enc2, _ := json.Marshal(p2)
		if string(enc) != string(enc2) {
			t.Fatalf("unstable encoding: %s vs %s", enc, enc2)
		}
		for _, a := range p.Authorities {
			_, _ = p.Evaluate(a.Authority, map[string]any{"x": "1", "n": float64(2), "z": true})
		}
	})
}
