package sidecar

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// publish runs on the real filesystem: it must never destroy what blobseal
// did not create.
func TestPublishNeverReplacesForeignEntries(t *testing.T) {
	dir := t.TempDir()
	mp := filepath.Join(dir, "data")
	hidden := hiddenDir(mp)
	if err := os.Mkdir(hidden, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(hidden, "marker"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	check := func(want string) {
		t.Helper()
		if got, err := os.ReadFile(filepath.Join(mp, "marker")); err != nil || string(got) != want {
			t.Fatalf("through the mount point: %q %v", got, err)
		}
	}

	// A regular file stays, byte for byte.
	if err := os.WriteFile(mp, []byte("operator data"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := publish(mp, hidden); err == nil || !strings.Contains(err.Error(), "regular file") {
		t.Fatalf("publish over a file: %v", err)
	}
	if b, _ := os.ReadFile(mp); string(b) != "operator data" {
		t.Fatalf("file replaced: %q", b)
	}
	os.Remove(mp)

	// A symlink elsewhere stays.
	if err := os.Symlink("/etc", mp); err != nil {
		t.Fatal(err)
	}
	if err := publish(mp, hidden); err == nil || !strings.Contains(err.Error(), "did not create") {
		t.Fatalf("publish over a foreign symlink: %v", err)
	}
	if d, _ := os.Readlink(mp); d != "/etc" {
		t.Fatalf("foreign symlink replaced: %q", d)
	}
	os.Remove(mp)

	// A non-empty directory stays.
	os.Mkdir(mp, 0o755)
	os.WriteFile(filepath.Join(mp, "keep"), nil, 0o644)
	if err := publish(mp, hidden); err == nil || !strings.Contains(err.Error(), "not an empty directory") {
		t.Fatalf("publish over a non-empty directory: %v", err)
	}
	if _, err := os.Stat(filepath.Join(mp, "keep")); err != nil {
		t.Fatal(err)
	}
	os.RemoveAll(mp)

	// An empty directory is replaced; our own stale link is replaced.
	os.Mkdir(mp, 0o755)
	if err := publish(mp, hidden); err != nil {
		t.Fatal(err)
	}
	check("x")
	if err := publish(mp, hidden); err != nil {
		t.Fatalf("republish over our own link: %v", err)
	}
	check("x")
	if err := unpublish(mp, hidden); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(mp); !os.IsNotExist(err) {
		t.Fatalf("unpublish left %v", err)
	}
	// Nothing: published.
	if err := publish(mp, hidden); err != nil {
		t.Fatal(err)
	}
	check("x")
	if leftovers, _ := filepath.Glob(filepath.Join(dir, ".blobseal-link-*")); len(leftovers) != 0 {
		t.Fatalf("temporary links left: %v", leftovers)
	}
}
