package secret

import (
	"bytes"
	"fmt"
	"log/slog"
	"strings"
	"testing"
)

func TestBytesNeverPrinted(t *testing.T) {
	k := Bytes("supersecretkeymaterial")
	for _, s := range []string{
		fmt.Sprint(k), fmt.Sprintf("%v %s %x %X %q %#v %+v", k, k, k, k, k, k, k),
		fmt.Sprintf("%v", struct{ K Bytes }{k}),
	} {
		if strings.Contains(s, "supersecret") || strings.Contains(s, fmt.Sprintf("%x", []byte(k))) {
			t.Fatalf("key leaked: %s", s)
		}
	}
	var buf bytes.Buffer
	slog.New(slog.NewJSONHandler(&buf, nil)).Info("x", "key", k, "tok", Token("eyJhbGciOi"))
	if strings.Contains(buf.String(), "supersecret") || strings.Contains(buf.String(), "eyJhbGciOi") {
		t.Fatalf("slog leaked: %s", buf.String())
	}
	k.Wipe()
	if !bytes.Equal(k, make([]byte, len(k))) {
		t.Fatal("wipe left bytes")
	}
}

func TestRedactURL(t *testing.T) {
	in := "https://acct.blob.core.windows.net/c/b.img?sv=2022-11-02&sig=SECRETSIG%3D&se=2030-01-01"
	out := RedactURL(in)
	if strings.Contains(out, "SECRETSIG") || !strings.Contains(out, "acct.blob.core.windows.net/c/b.img") {
		t.Fatalf("bad redaction: %s", out)
	}
	if got := RedactURL("/plain/path.img"); got != "/plain/path.img" {
		t.Fatalf("plain path changed: %s", got)
	}
}
