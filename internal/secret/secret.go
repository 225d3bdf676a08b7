// Package secret holds key material and credentials in types that cannot be
// printed: String, GoString, Format and slog's LogValue all redact.
package secret

import (
	"fmt"
	"log/slog"
	"net/url"
	"strings"
)

const redacted = "[REDACTED]"

// Bytes is key material (volume keys, passphrases, released secrets).
type Bytes []byte

// String implements fmt.Stringer without revealing the bytes.
func (b Bytes) String() string { return fmt.Sprintf("[REDACTED %d bytes]", len(b)) }

// GoString covers %#v.
func (b Bytes) GoString() string { return b.String() }

// Format covers every verb, including %x and %v.
func (b Bytes) Format(f fmt.State, _ rune) { _, _ = f.Write([]byte(b.String())) }

// LogValue keeps the bytes out of slog output.
func (b Bytes) LogValue() slog.Value { return slog.StringValue(b.String()) }

// Wipe overwrites the bytes with zeros.
func (b Bytes) Wipe() { Wipe(b) }

// Wipe overwrites p with zeros.
func Wipe(p []byte) {
	for i := range p {
		p[i] = 0
	}
}

// Token is a bearer token, JWT or SAS string.
type Token string

// String implements fmt.Stringer without revealing the token.
func (t Token) String() string {
	if t == "" {
		return ""
	}
	return redacted
}

// GoString covers %#v.
func (t Token) GoString() string { return t.String() }

// Format covers every verb.
func (t Token) Format(f fmt.State, _ rune) { _, _ = f.Write([]byte(t.String())) }

// LogValue keeps the token out of slog output.
func (t Token) LogValue() slog.Value { return slog.StringValue(t.String()) }

// Reveal returns the raw token for the one place that must send it.
func (t Token) Reveal() string { return string(t) }

// sasParams are the query parameters that carry SAS credentials.
var sasParams = []string{"sig", "se", "st", "sp", "sv", "sr", "skoid", "sktid", "skt", "ske", "sks", "skv", "spr", "sip", "ss", "srt", "sdd", "saoid", "suoid", "scid"}

// RedactURL returns the URL with its query string (SAS) and any user info
// removed, safe for logs and error messages.
func RedactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		if i := strings.IndexAny(raw, "?#"); i >= 0 {
			return raw[:i] + "?" + redacted
		}
		return raw
	}
	if u.User != nil {
		u.User = url.User(redacted)
	}
	if u.RawQuery != "" {
		q := u.Query()
		for _, p := range sasParams {
			if q.Has(p) {
				q.Set(p, redacted)
			}
		}
		u.RawQuery = q.Encode()
	}
	u.Fragment = ""
	return u.String()
}
