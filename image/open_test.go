package image

import (
	"context"
	"crypto/rand"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blobseal/blobseal/crypto"
	"github.com/blobseal/blobseal/internal/testenv"
)

// TestOpenReadPathAndErrors: local images go through the block cache
// unless DirectLocal; both paths give the same consistent tree; each
// misconfiguration fails at its stage with an error saying what to fix.
func TestOpenReadPathAndErrors(t *testing.T) {
	testenv.RequireTools(t, "mkfs.ext4", "debugfs")
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	files := makeTree(t, src)
	key := make([]byte, 64)
	rand.Read(key)
	ctx := context.Background()
	luks := filepath.Join(dir, "luks.img")
	if _, err := Create(ctx, CreateOptions{From: src, Out: luks, Key: key}); err != nil {
		t.Fatal(err)
	}
	plain := filepath.Join(dir, "plain.img")
	if _, err := Create(ctx, CreateOptions{From: src, Out: plain, Key: key, Crypto: crypto.FormatOptions{Format: "plain"}}); err != nil {
		t.Fatal(err)
	}

	for _, direct := range []bool{false, true} {
		img, err := Open(ctx, Spec{Location: luks, Key: key, DirectLocal: direct})
		if err != nil {
			t.Fatalf("DirectLocal=%v: %v", direct, err)
		}
		if (img.Cache == nil) != direct {
			t.Errorf("DirectLocal=%v: cache %v", direct, img.Cache)
		}
		if img.Name != luks {
			t.Errorf("Name %q, want %q", img.Name, luks)
		}
		regular := 0
		problems := Check(ctx, img.FS, func(e ManifestEntry) {
			if strings.HasPrefix(e.String(), "f ") {
				regular++
			}
		})
		if len(problems) != 0 || regular != len(files) {
			t.Errorf("DirectLocal=%v: %d regular files of %d, problems %v", direct, regular, len(files), problems)
		}
		if err := img.Close(); err != nil {
			t.Error(err)
		}
	}

	wrong := make([]byte, 64)
	rand.Read(wrong)
	cases := []struct {
		name string
		spec Spec
		want string
	}{
		{"missing", Spec{Location: filepath.Join(dir, "nope"), Key: key}, "open image source"},
		{"plain without format", Spec{Location: plain, Key: key}, "--format plain"},
		{"wrong key", Spec{Location: luks, Key: wrong}, "unlock " + luks},
		{"plain wrong sector size", Spec{Location: plain, Key: key, Crypto: crypto.OpenOptions{Format: "plain", Plain: crypto.PlainOptions{SectorSize: 512}}}, "not a readable ext4"},
	}
	for _, c := range cases {
		img, err := Open(ctx, c.spec)
		if err == nil || !strings.Contains(err.Error(), c.want) || img != nil {
			t.Errorf("%s: %v (image %v), want an error mentioning %q", c.name, err, img, c.want)
		}
	}
	img, err := Open(ctx, Spec{Location: plain, Key: key, Crypto: crypto.OpenOptions{Format: "plain"}})
	if err != nil {
		t.Fatalf("plain image with --format plain: %v", err)
	}
	img.Close()
}
