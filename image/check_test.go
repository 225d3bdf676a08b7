package image

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/blobseal/blobseal/fs/ext4"
	"github.com/blobseal/blobseal/internal/testenv"
)

// TestCheckSparseFiles checks that a file's holes are never read: a hole
// below the limit is hashed as zeros (the digest is sha256sum's), a 1 TiB
// sparse file and an i_size that debugfs set to 2^50 bytes finish at once.
func TestCheckSparseFiles(t *testing.T) {
	testenv.RequireTools(t, "mkfs.ext4", "debugfs")
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	if err := os.Mkdir(src, 0o755); err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("blobseal"), 512)
	sparse := func(name string, size int64, at ...int64) {
		f, err := os.Create(filepath.Join(src, name))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		for _, off := range at {
			if _, err := f.WriteAt(data, off); err != nil {
				t.Fatal(err)
			}
		}
		if err := f.Truncate(size); err != nil {
			t.Fatal(err)
		}
	}
	sparse("holes", 64<<20, 0, 5<<20, 64<<20-int64(len(data)))
	sparse("tebibyte", 1<<40, 512<<30)
	sparse("absurd", 8192, 0)
	img := filepath.Join(dir, "fs.img")
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-d", src, img, "64M").CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	if out, err := exec.Command("debugfs", "-w", "-R", "sif /absurd size 0x4000000000000", img).CombinedOutput(); err != nil {
		t.Fatalf("debugfs: %v\n%s", err, out)
	}
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, _ := f.Stat()
	tree, err := ext4.Open(f, st.Size())
	if err != nil {
		t.Fatal(err)
	}
	entries := map[string]ManifestEntry{}
	start := time.Now()
	problems := Check(context.Background(), tree, func(e ManifestEntry) { entries[e.Path] = e })
	t.Logf("check took %v", time.Since(start))

	want, err := os.ReadFile(filepath.Join(src, "holes"))
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(want)
	if got := entries["/holes"]; got.Digest != hex.EncodeToString(sum[:]) || got.Note != "" {
		t.Errorf("/holes: digest %s note %q, want sha256sum's %x", got.Digest, got.Note, sum)
	}
	tb := entries["/tebibyte"]
	if !strings.HasPrefix(tb.Digest, SparseDigestPrefix) || !strings.Contains(tb.Note, "4096 bytes of data in a file of 1099511627776 bytes") {
		t.Errorf("/tebibyte: digest %q note %q, want a sparse digest and a note", tb.Digest, tb.Note)
	}
	if len(problems) != 1 || !strings.Contains(problems[0].Error(), "/absurd") || !strings.Contains(problems[0].Error(), "absurd size") {
		t.Errorf("problems %v, want one naming /absurd and its size", problems)
	}
	// The sparse digest depends on the data and where it lies.
	h := sha256.New()
	h.Write([]byte{0, 0, 0, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0}) // offset 512 GiB, length 4096
	h.Write(data)
	if want := SparseDigestPrefix + hex.EncodeToString(h.Sum(nil)); tb.Digest != want {
		t.Errorf("/tebibyte digest %s, want %s", tb.Digest, want)
	}
}
