package image_test

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/blobseal/blobseal/fs/ext4"
	"github.com/blobseal/blobseal/image"
	"github.com/blobseal/blobseal/internal/testenv"
)

// patchedImage is a read-only image with some bytes overwritten, so each
// fuzz input is a small list of patches on one real ext4 image.
type patchedImage struct {
	base    []byte
	patches map[int64]byte
}

func (p *patchedImage) ReadAt(b []byte, off int64) (int, error) {
	if off < 0 || off >= int64(len(p.base)) {
		return 0, fmt.Errorf("read at %d outside the %d-byte image", off, len(p.base))
	}
	n := copy(b, p.base[off:])
	for at, v := range p.patches {
		if at >= off && at < off+int64(n) {
			b[at-off] = v
		}
	}
	if n < len(b) {
		return n, fmt.Errorf("short read at %d", off)
	}
	return n, nil
}

// fuzzBase builds a small reproducible image with every kind of entry.
func fuzzBase(f *testing.F) []byte {
	testenv.RequireTools(f, "mkfs.ext4", "debugfs")
	f.Setenv("E2FSPROGS_FAKE_TIME", "1700000000")
	src := f.TempDir()
	write := func(name, content string) {
		p := filepath.Join(src, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			f.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			f.Fatal(err)
		}
	}
	write("small", "hello")
	write("dir/nested", strings.Repeat("block of text ", 700))
	write("dir/sub/deeper", "x")
	for i := 0; i < 80; i++ { // a multi-block directory
		write(fmt.Sprintf("many/entry-with-a-long-name-%03d", i), "")
	}
	if err := os.Symlink("dir/nested", filepath.Join(src, "fastlink")); err != nil {
		f.Fatal(err)
	}
	if err := os.Symlink(strings.Repeat("long/", 30), filepath.Join(src, "slowlink")); err != nil {
		f.Fatal(err)
	}
	if err := os.Link(filepath.Join(src, "small"), filepath.Join(src, "dir", "hardlink")); err != nil {
		f.Fatal(err)
	}
	img := filepath.Join(f.TempDir(), "base.ext4")
	if _, err := image.MakeExt4(context.Background(), src, img, image.MakeOptions{
		BlockSize: 1024, UUID: "6b3d1f0e-8a1c-4c55-9d0b-2f6a7e5c4d31"}); err != nil {
		f.Fatal(err)
	}
	b, err := os.ReadFile(img)
	if err != nil {
		f.Fatal(err)
	}
	return b
}

// FuzzCheck damages a real image with byte patches (5 bytes each: a
// little-endian offset and a value) and requires that opening it and
// checking every entry ends with an answer — no panic, no hang.
func FuzzCheck(f *testing.F) {
	base := fuzzBase(f)
	f.Add([]byte{})
	f.Add([]byte{0x38, 0x04, 0, 0, 0xff})                         // superblock magic
	f.Add([]byte{0x00, 0x14, 0, 0, 0x00, 0x01, 0x14, 0, 0, 0x7f}) // group descriptors
	f.Fuzz(func(t *testing.T, patch []byte) {
		img := &patchedImage{base: base, patches: map[int64]byte{}}
		for ; len(patch) >= 5; patch = patch[5:] {
			off := int64(binary.LittleEndian.Uint32(patch)) % int64(len(base))
			img.patches[off] = patch[4]
		}
		tree, err := ext4.Open(img, int64(len(base)))
		if err != nil {
			return
		}
		// A patched size can claim terabytes of sparse zeros, which Check
		// would honestly hash; the bound proves it stops when asked.
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		entries := 0
		image.Check(ctx, tree, func(image.ManifestEntry) { entries++ })
		if entries > 100000 {
			t.Fatalf("%d entries from a 100-entry image", entries)
		}
	})
}
