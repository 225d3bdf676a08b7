// Package logging builds the slog loggers of every command. Secrets are
// kept out by type (secret.Bytes and secret.Token redact themselves); this
// package adds a second net for values that arrive as plain strings: any
// attribute whose key names a secret, and SAS signatures inside URLs.
package logging

import (
	"fmt"
	"io"
	"log/slog"
	"regexp"
	"strings"

	"github.com/blobseal/blobseal/internal/secret"
)

// New returns a logger writing text or JSON at the given level
// ("debug", "info", "warn", "error").
func New(w io.Writer, level, format string) (*slog.Logger, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(strings.ToUpper(orDefault(level, "info")))); err != nil {
		return nil, fmt.Errorf("log level %q: use debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lvl, ReplaceAttr: redact}
	switch orDefault(format, "text") {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("log format %q: use text or json", format)
}

func orDefault(s, d string) string {
	if s == "" {
		return d
	}
	return s
}

// secretKeys are attribute names whose string values are always secrets.
var secretKeys = regexp.MustCompile(`(?i)(^|_|\.)(token|bearer|password|passphrase|secret|key_?material|sas|sig|authorization|raw_?key)$`)

// sasInText finds URLs carrying a SAS signature inside free text.
var sasInText = regexp.MustCompile(`https?://[^\s"'<>]*[?&]sig=[^\s"'<>]*`)

// jwtInText finds JSON Web Tokens inside free text.
var jwtInText = regexp.MustCompile(`eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*`)

// Scrub removes SAS signatures and JWTs from free text.
func Scrub(s string) string {
	if strings.Contains(s, "sig=") {
		s = sasInText.ReplaceAllStringFunc(s, secret.RedactURL)
	}
	if strings.Contains(s, "eyJ") {
		s = jwtInText.ReplaceAllString(s, "[REDACTED JWT]")
	}
	return s
}

func redact(_ []string, a slog.Attr) slog.Attr {
	if a.Value.Kind() != slog.KindString {
		if a.Value.Kind() == slog.KindAny {
			if err, ok := a.Value.Any().(error); ok {
				return slog.String(a.Key, Scrub(err.Error()))
			}
		}
		return a
	}
	if secretKeys.MatchString(a.Key) && a.Value.String() != "" {
		return slog.String(a.Key, "[REDACTED]")
	}
	return slog.String(a.Key, Scrub(a.Value.String()))
}
