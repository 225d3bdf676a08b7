// Package policy models the secure key release policy of Azure Key Vault and
// Managed HSM: parse it, build it from a few claims, evaluate it against the
// claims of an attestation token and explain which claims differ.
//
// The grammar (version "1.0.0"): a top-level anyOf of authorities; each
// authority holds one allOf or anyOf of conditions; a condition is a claim
// test ({"claim": name, "equals": value}, also notEquals, less, lessOrEquals,
// greater, greaterOrEquals, exists) or a nested allOf/anyOf. As in Azure
// Policy, string comparison ignores case, and a condition on a missing claim
// fails.
package policy

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/url"
	"sort"
	"strconv"
	"strings"
)

// maxDepth bounds nesting so hostile input cannot exhaust the stack.
const maxDepth = 16

// operators lists what a claim condition may use.
func operators() []string {
	return []string{"equals", "notEquals", "less", "lessOrEquals", "greater", "greaterOrEquals", "exists"}
}

// Policy is a parsed release policy.
type Policy struct {
	Version     string
	Authorities []Authority
	// Warnings are forms Key Vault accepts but that are legacy or
	// ambiguous (version 0.2, an authority without https://); Parse
	// accepts them so denials of policies in the field can be explained.
	Warnings []string
}

// Authority is one top-level branch: tokens issued by Authority whose claims
// satisfy Rule.
type Authority struct {
	Authority string
	Rule      Condition
}

// Condition is either a claim test (Claim set) or a group (AllOf or AnyOf set).
type Condition struct {
	Claim    string
	Operator string // one of operators()
	Value    any    // string, bool, float64 (JSON numbers), or nil

	AllOf []Condition
	AnyOf []Condition
}

// Claim is one name/value pair for Build.
type Claim struct {
	Name  string
	Value any
}

// Mismatch is one condition the claims did not satisfy.
type Mismatch struct {
	Authority string
	Claim     string
	Operator  string
	Want      any
	Got       any  // nil when Missing
	Missing   bool // the token has no such claim
}

func (m Mismatch) String() string {
	if m.Claim == "" {
		return fmt.Sprintf("token issuer %q is not an authority of the policy (policy allows %v)", m.Got, m.Want)
	}
	if m.Missing {
		return fmt.Sprintf("claim %q is missing (policy wants %s %s)", m.Claim, m.Operator, show(m.Want))
	}
	return fmt.Sprintf("claim %q is %s (policy wants %s %s)", m.Claim, show(m.Got), m.Operator, show(m.Want))
}

func show(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Sprint(v)
	}
	return string(b)
}

// Parse decodes and validates a policy, naming the first problem found.
func Parse(data []byte) (*Policy, error) {
	var top map[string]json.RawMessage
	if err := decode(data, &top); err != nil {
		return nil, fmt.Errorf("release policy: not a JSON object: %w", err)
	}
	p := &Policy{}
	for k, v := range top {
		switch strings.ToLower(k) {
		case "version":
			if err := decode(v, &p.Version); err != nil {
				return nil, fmt.Errorf("release policy: version must be a string: %w", err)
			}
		case "anyof":
			var list []json.RawMessage
			if err := decode(v, &list); err != nil {
				return nil, fmt.Errorf("release policy: anyOf must be an array of authorities: %w", err)
			}
			for i, raw := range list {
				a, err := parseAuthority(raw)
				if err != nil {
					return nil, fmt.Errorf("release policy: anyOf[%d]: %w", i, err)
				}
				p.Authorities = append(p.Authorities, a)
				if !strings.Contains(a.Authority, "://") {
					p.Warnings = append(p.Warnings, fmt.Sprintf("authority %q has no scheme; it is compared as https://%s", a.Authority, a.Authority))
				}
			}
		default:
			return nil, fmt.Errorf("release policy: unknown field %q (allowed: version, anyOf)", k)
		}
	}
	switch {
	case strings.HasPrefix(p.Version, "1.0."):
	case p.Version == "0.2":
		p.Warnings = append(p.Warnings, `release policy version "0.2" is the legacy format; Key Vault still accepts it, new policies should use "1.0.0"`)
	default:
		return nil, fmt.Errorf("release policy: version %q is not supported (use \"1.0.0\"; \"0.2\" is accepted as legacy)", p.Version)
	}
	if len(p.Authorities) == 0 {
		return nil, errors.New("release policy: anyOf must list at least one authority")
	}
	return p, nil
}

func decode(data []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if dec.More() {
		return errors.New("trailing data after JSON value")
	}
	return nil
}

func parseAuthority(raw json.RawMessage) (Authority, error) {
	var obj map[string]json.RawMessage
	if err := decode(raw, &obj); err != nil {
		return Authority{}, fmt.Errorf("authority entry must be an object: %w", err)
	}
	var a Authority
	groups := 0
	for k, v := range obj {
		switch strings.ToLower(k) {
		case "authority":
			if err := decode(v, &a.Authority); err != nil {
				return Authority{}, fmt.Errorf("authority must be a string: %w", err)
			}
		case "allof", "anyof":
			groups++
			list, err := parseList(v, 1)
			if err != nil {
				return Authority{}, fmt.Errorf("%s: %w", k, err)
			}
			if strings.ToLower(k) == "allof" {
				a.Rule.AllOf = list
			} else {
				a.Rule.AnyOf = list
			}
		default:
			return Authority{}, fmt.Errorf("unknown field %q (allowed: authority, allOf, anyOf)", k)
		}
	}
	if a.Authority == "" {
		return Authority{}, errors.New("authority URL is missing")
	}
	// Policies in the field name the authority with or without https://.
	if u, err := url.Parse(withScheme(a.Authority)); err != nil || u.Host == "" || (u.Scheme != "https" && u.Scheme != "http") {
		return Authority{}, fmt.Errorf("authority %q is not an attestation service URL (https://HOST or HOST)", a.Authority)
	}
	if groups != 1 {
		return Authority{}, fmt.Errorf("authority %q needs exactly one of allOf or anyOf", a.Authority)
	}
	return a, nil
}

func parseList(raw json.RawMessage, depth int) ([]Condition, error) {
	if depth > maxDepth {
		return nil, fmt.Errorf("conditions nested deeper than %d levels", maxDepth)
	}
	var list []json.RawMessage
	if err := decode(raw, &list); err != nil {
		return nil, fmt.Errorf("must be an array of conditions: %w", err)
	}
	if len(list) == 0 {
		return nil, errors.New("must hold at least one condition")
	}
	out := make([]Condition, 0, len(list))
	for i, r := range list {
		c, err := parseCondition(r, depth)
		if err != nil {
			return nil, fmt.Errorf("[%d]: %w", i, err)
		}
		out = append(out, c)
	}
	return out, nil
}

func parseCondition(raw json.RawMessage, depth int) (Condition, error) {
	var obj map[string]json.RawMessage
	if err := decode(raw, &obj); err != nil {
		return Condition{}, fmt.Errorf("condition must be an object: %w", err)
	}
	var c Condition
	kinds := 0
	for k, v := range obj {
		lk := strings.ToLower(k)
		switch {
		case lk == "claim":
			kinds++
			if err := decode(v, &c.Claim); err != nil || c.Claim == "" {
				return Condition{}, errors.New("claim must be a non-empty string")
			}
		case lk == "allof" || lk == "anyof":
			kinds++
			list, err := parseList(v, depth+1)
			if err != nil {
				return Condition{}, fmt.Errorf("%s%w", k, err)
			}
			if lk == "allof" {
				c.AllOf = list
			} else {
				c.AnyOf = list
			}
		default:
			op := canonicalOperator(k)
			if op == "" {
				return Condition{}, fmt.Errorf("unknown field %q (allowed: claim with one of %s, allOf, anyOf)", k, strings.Join(operators(), ", "))
			}
			if c.Operator != "" {
				return Condition{}, fmt.Errorf("condition has two operators (%s and %s)", c.Operator, op)
			}
			var val any
			if err := decode(v, &val); err != nil {
				return Condition{}, fmt.Errorf("%s: bad value: %w", k, err)
			}
			val, err := normalizeValue(val)
			if err != nil {
				return Condition{}, fmt.Errorf("%s: %w", k, err)
			}
			c.Operator, c.Value = op, val
		}
	}
	if kinds != 1 {
		return Condition{}, errors.New("condition needs exactly one of claim, allOf or anyOf")
	}
	if c.Claim != "" {
		if c.Operator == "" {
			return Condition{}, fmt.Errorf("claim %q has no operator (use one of %s)", c.Claim, strings.Join(operators(), ", "))
		}
		if err := checkOperand(c); err != nil {
			return Condition{}, err
		}
	} else if c.Operator != "" {
		return Condition{}, fmt.Errorf("operator %s needs a claim", c.Operator)
	}
	return c, nil
}

func canonicalOperator(k string) string {
	for _, op := range operators() {
		if strings.EqualFold(op, k) {
			return op
		}
	}
	return ""
}

// normalizeValue turns json.Number into float64 and rejects composite values.
func normalizeValue(v any) (any, error) {
	switch x := v.(type) {
	case json.Number:
		f, err := x.Float64()
		if err != nil || math.IsInf(f, 0) || math.IsNaN(f) {
			return nil, fmt.Errorf("number %s out of range", x)
		}
		return f, nil
	case string, bool:
		return x, nil
	default:
		return nil, fmt.Errorf("value must be a string, number or boolean, not %T", v)
	}
}

func checkOperand(c Condition) error {
	switch c.Operator {
	case "exists":
		if _, ok := c.Value.(bool); !ok {
			return fmt.Errorf("claim %q: exists takes true or false", c.Claim)
		}
	case "less", "lessOrEquals", "greater", "greaterOrEquals":
		if _, ok := number(c.Value); !ok {
			return fmt.Errorf("claim %q: %s takes a number", c.Claim, c.Operator)
		}
	}
	return nil
}

// Build makes a policy with one authority whose allOf lists the claims with
// "equals", in the given order.
func Build(authority string, claims []Claim) (*Policy, error) {
	if u, err := url.Parse(authority); err != nil || u.Scheme != "https" || u.Host == "" {
		return nil, fmt.Errorf("release policy: authority %q must be an https URL of the attestation service", authority)
	}
	if len(claims) == 0 {
		return nil, errors.New("release policy: at least one claim is needed (an empty policy would release to any attested VM)")
	}
	rule := Condition{}
	for _, c := range claims {
		if c.Name == "" {
			return nil, errors.New("release policy: claim with an empty name")
		}
		v, err := normalizeValue(toJSONValue(c.Value))
		if err != nil {
			return nil, fmt.Errorf("release policy: claim %q: %w", c.Name, err)
		}
		rule.AllOf = append(rule.AllOf, Condition{Claim: c.Name, Operator: "equals", Value: v})
	}
	return &Policy{Version: "1.0.0", Authorities: []Authority{{Authority: authority, Rule: rule}}}, nil
}

func toJSONValue(v any) any {
	switch x := v.(type) {
	case int:
		return json.Number(strconv.Itoa(x))
	case int64:
		return json.Number(strconv.FormatInt(x, 10))
	case float64:
		return json.Number(strconv.FormatFloat(x, 'g', -1, 64))
	}
	return v
}

// MarshalJSON writes the policy in the service's encoding, keys in a fixed
// order.
func (p *Policy) MarshalJSON() ([]byte, error) {
	var b bytes.Buffer
	b.WriteString(`{"version":`)
	writeJSON(&b, p.Version)
	b.WriteString(`,"anyOf":[`)
	for i, a := range p.Authorities {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(`{"authority":`)
		writeJSON(&b, a.Authority)
		b.WriteByte(',')
		writeGroup(&b, a.Rule)
		b.WriteByte('}')
	}
	b.WriteString(`]}`)
	return b.Bytes(), nil
}

func writeGroup(b *bytes.Buffer, c Condition) {
	name, list := "allOf", c.AllOf
	if c.AnyOf != nil {
		name, list = "anyOf", c.AnyOf
	}
	writeJSON(b, name)
	b.WriteString(":[")
	for i, sub := range list {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteByte('{')
		if sub.Claim != "" {
			b.WriteString(`"claim":`)
			writeJSON(b, sub.Claim)
			b.WriteByte(',')
			writeJSON(b, sub.Operator)
			b.WriteByte(':')
			writeJSON(b, sub.Value)
		} else {
			writeGroup(b, sub)
		}
		b.WriteByte('}')
	}
	b.WriteByte(']')
}

func writeJSON(b *bytes.Buffer, v any) {
	enc, err := json.Marshal(v)
	if err != nil { // only strings, bools and finite floats reach here
		enc = []byte("null")
	}
	b.Write(enc)
}

// AuthorityURLs lists the authority URLs of the policy.
func (p *Policy) AuthorityURLs() []string {
	out := make([]string, 0, len(p.Authorities))
	for _, a := range p.Authorities {
		out = append(out, a.Authority)
	}
	return out
}

// SameAuthority compares attestation service URLs the way issuers are
// compared: scheme and host case-insensitively, ignoring a trailing slash.
func SameAuthority(a, b string) bool {
	return normalizeAuthority(a) == normalizeAuthority(b)
}

func withScheme(s string) string {
	if s != "" && !strings.Contains(s, "://") {
		return "https://" + s
	}
	return s
}

func normalizeAuthority(s string) string {
	u, err := url.Parse(withScheme(strings.TrimSpace(s)))
	if err != nil {
		return s
	}
	return strings.ToLower(u.Scheme) + "://" + strings.ToLower(u.Host) + strings.TrimRight(u.Path, "/")
}

// Evaluate reports whether a token issued by authority with the given claims
// satisfies the policy; if not, mismatches explains why (for an anyOf, the
// branch that came closest).
func (p *Policy) Evaluate(authority string, claims map[string]any) (bool, []Mismatch) {
	var best []Mismatch
	matched := false
	for _, a := range p.Authorities {
		if !SameAuthority(a.Authority, authority) {
			continue
		}
		matched = true
		ok, mm := eval(a.Rule, claims, 0)
		if ok {
			return true, nil
		}
		for i := range mm {
			mm[i].Authority = a.Authority
		}
		if best == nil || len(mm) < len(best) {
			best = mm
		}
	}
	if !matched {
		return false, []Mismatch{{Want: p.AuthorityURLs(), Got: authority}}
	}
	return false, best
}

func eval(c Condition, claims map[string]any, depth int) (bool, []Mismatch) {
	if depth > maxDepth {
		return false, []Mismatch{{Claim: "(policy)", Operator: "nesting", Want: maxDepth}}
	}
	switch {
	case c.Claim != "":
		got, present := lookup(claims, c.Claim)
		if test(c, got, present) {
			return true, nil
		}
		return false, []Mismatch{{Claim: c.Claim, Operator: c.Operator, Want: c.Value, Got: got, Missing: !present}}
	case c.AllOf != nil:
		var all []Mismatch
		for _, sub := range c.AllOf {
			if ok, mm := eval(sub, claims, depth+1); !ok {
				all = append(all, mm...)
			}
		}
		return len(all) == 0, all
	default:
		var best []Mismatch
		for _, sub := range c.AnyOf {
			ok, mm := eval(sub, claims, depth+1)
			if ok {
				return true, nil
			}
			if best == nil || len(mm) < len(best) {
				best = mm
			}
		}
		return false, best
	}
}

// lookup finds a claim by its exact name, else by a dotted path into nested
// objects ("x-ms-isolation-tee.x-ms-attestation-type").
func lookup(claims map[string]any, name string) (any, bool) {
	if v, ok := claims[name]; ok {
		return v, true
	}
	parts := strings.Split(name, ".")
	var cur any = claims
	for _, part := range parts {
		m, ok := cur.(map[string]any)
		if !ok {
			return nil, false
		}
		if cur, ok = m[part]; !ok {
			return nil, false
		}
	}
	return cur, true
}

func test(c Condition, got any, present bool) bool {
	if c.Operator == "exists" {
		want, _ := c.Value.(bool)
		return present == want
	}
	if !present {
		return false
	}
	switch c.Operator {
	case "equals":
		return equal(got, c.Value)
	case "notEquals":
		return !equal(got, c.Value)
	}
	g, ok1 := number(got)
	w, ok2 := number(c.Value)
	if !ok1 || !ok2 {
		return false
	}
	switch c.Operator {
	case "less":
		return g < w
	case "lessOrEquals":
		return g <= w
	case "greater":
		return g > w
	case "greaterOrEquals":
		return g >= w
	}
	return false
}

func equal(got, want any) bool {
	if gn, ok := number(got); ok {
		if wn, ok := number(want); ok {
			return gn == wn
		}
	}
	gs, ok1 := scalarString(got)
	ws, ok2 := scalarString(want)
	return ok1 && ok2 && strings.EqualFold(gs, ws)
}

func scalarString(v any) (string, bool) {
	switch x := v.(type) {
	case string:
		return x, true
	case bool:
		return strconv.FormatBool(x), true
	case float64:
		return strconv.FormatFloat(x, 'g', -1, 64), true
	case json.Number:
		return x.String(), true
	}
	return "", false
}

func number(v any) (float64, bool) {
	switch x := v.(type) {
	case float64:
		return x, true
	case int:
		return float64(x), true
	case int64:
		return float64(x), true
	case json.Number:
		f, err := x.Float64()
		return f, err == nil
	}
	return 0, false
}

// Describe joins mismatches into one readable sentence, sorted for
// stable output.
func Describe(mm []Mismatch) string {
	parts := make([]string, 0, len(mm))
	for _, m := range mm {
		parts = append(parts, m.String())
	}
	sort.Strings(parts)
	return strings.Join(parts, "; ")
}
