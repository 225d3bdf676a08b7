package sidecar

import (
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/blobseal/blobseal/keyrelease/localca"
)

// A setup failure (the CA file not written yet) is not remembered: the
// next attempt, as on_failure: retry makes, succeeds once the file exists.
func TestKeyEnvironmentSetupIsRetried(t *testing.T) {
	dir := t.TempDir()
	caFile := filepath.Join(dir, "ca.pem")
	cfg, err := Parse([]byte("on_failure: retry\nattestation: {provider: simulated, ca_file: " + caFile + "}\nskr: {address: 127.0.0.1:0}\n"))
	if err != nil {
		t.Fatal(err)
	}
	s := New(cfg, slog.New(slog.DiscardHandler), nil)
	if _, err := s.keyEnvironment(); err == nil || !strings.Contains(err.Error(), "ca_file") {
		t.Fatalf("missing CA file: %v", err)
	}
	ca, err := localca.New("retry test", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(caFile, ca.PEM(), 0o600); err != nil {
		t.Fatal(err)
	}
	env, err := s.keyEnvironment()
	if err != nil {
		t.Fatalf("after the CA file appeared: %v", err)
	}
	if env.provider == nil || env.client == nil || env.roots == nil {
		t.Fatal("environment incomplete")
	}
}

func TestRawKeyIsDecodedAndWiped(t *testing.T) {
	cfg, err := Parse([]byte("filesystems:\n  - mount_point: /mnt/a\n    source: /x\n    require_integrity: false\n    key: {raw_hex: 00112233}\n"))
	if err != nil {
		t.Fatal(err)
	}
	raw := cfg.Filesystems[0].Key.raw
	if len(raw) != 4 || raw[1] != 0x11 {
		t.Fatalf("raw key %x", []byte(raw))
	}
	cfg.Wipe()
	if raw[1] != 0 || cfg.Filesystems[0].Key.raw != nil {
		t.Fatal("raw key not wiped")
	}
}
