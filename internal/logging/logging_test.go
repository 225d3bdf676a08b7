package logging

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/blobseal/blobseal/internal/secret"
)

func TestSecretsNeverLogged(t *testing.T) {
	for _, format := range []string{"text", "json"} {
		var buf bytes.Buffer
		log, err := New(&buf, "debug", format)
		if err != nil {
			t.Fatal(err)
		}
		jwt := "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJodHRwczovL3gifQ.c2lnbmF0dXJlMTIz"
		log.Debug("opening",
			"url", "https://acct.blob.core.windows.net/c/b.img?sv=2022&sig=TOPSECRETSIG",
			"bearer_token", "plain-bearer-value",
			"key", secret.Bytes("volume-key-bytes"),
			"tok", secret.Token(jwt),
			"msg2", "token was "+jwt,
			"err", errors.New("GET https://a.blob.core.windows.net/c/x?sig=ERRSIG failed"))
		out := buf.String()
		for _, leak := range []string{"TOPSECRETSIG", "plain-bearer-value", "volume-key-bytes", "c2lnbmF0dXJlMTIz", "ERRSIG"} {
			if strings.Contains(out, leak) {
				t.Fatalf("%s output leaks %q: %s", format, leak, out)
			}
		}
		if !strings.Contains(out, "acct.blob.core.windows.net/c/b.img") {
			t.Fatalf("redaction removed too much: %s", out)
		}
	}
}

func TestBadLevelAndFormat(t *testing.T) {
	if _, err := New(&bytes.Buffer{}, "loud", "text"); err == nil {
		t.Fatal("bad level accepted")
	}
	if _, err := New(&bytes.Buffer{}, "info", "xml"); err == nil {
		t.Fatal("bad format accepted")
	}
}
