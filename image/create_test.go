package image

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/blobseal/blobseal/crypto"
	"github.com/blobseal/blobseal/fs/ext4"
	"github.com/blobseal/blobseal/internal/testenv"
)

// makeTree writes a small varied tree and returns its files' contents.
// makeWritableImage builds a 64 MiB read-write LUKS2 image of makeTree's
// files under a new temporary directory, with a random key.
func makeWritableImage(ctx context.Context, t *testing.T) (dir string, key []byte, out string) {
	t.Helper()
	dir = t.TempDir()
	src := filepath.Join(dir, "src")
	makeTree(t, src)
	key = make([]byte, 64)
	rand.Read(key)
	out = filepath.Join(dir, "rw.img")
	if _, err := Create(ctx, CreateOptions{From: src, Out: out, Key: key, ReadWrite: true, Size: 64 << 20}); err != nil {
		t.Fatal(err)
	}
	return dir, key, out
}

func makeTree(t *testing.T, root string) map[string][]byte {
	t.Helper()
	files := map[string][]byte{}
	add := func(rel string, data []byte) {
		p := filepath.Join(root, rel)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, data, 0o640); err != nil {
			t.Fatal(err)
		}
		files[rel] = data
	}
	for i := range 300 {
		b := make([]byte, i*37)
		rand.Read(b)
		add(fmt.Sprintf("d%d/file%03d", i%7, i), b)
	}
	big := make([]byte, 3<<20)
	rand.Read(big)
	add("big/model.bin", big)
	add("empty", nil)
	os.Symlink("big/model.bin", filepath.Join(root, "link"))
	return files
}

func TestCreateOpensAndMatchesSource(t *testing.T) {
	testenv.RequireTools(t, "mkfs.ext4")
	for _, format := range []string{"luks2", "plain"} {
		t.Run(format, func(t *testing.T) {
			dir := t.TempDir()
			src := filepath.Join(dir, "src")
			files := makeTree(t, src)
			key := make([]byte, 64)
			rand.Read(key)
			out := filepath.Join(dir, "out.img")
			res, err := Create(context.Background(), CreateOptions{From: src, Out: out, Key: key, Crypto: crypto.FormatOptions{Format: format}})
			if err != nil {
				t.Fatal(err)
			}
			if res.Entries < 300 || res.FilesystemBytes < 3<<20 {
				t.Fatalf("implausible result %+v", res)
			}
			if format == "luks2" && res.HoleBytes == 0 {
				t.Fatalf("no holes in a LUKS2 image with free space: %+v", res)
			}
			leftovers, _ := filepath.Glob(filepath.Join(dir, ".blobseal-*"))
			if len(leftovers) != 0 {
				t.Fatalf("temporary files left: %v", leftovers)
			}
			f, err := os.Open(out)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			st, _ := f.Stat()
			vol, err := crypto.Open(f, st.Size(), key, crypto.OpenOptions{Format: map[string]string{"plain": "plain"}[format]})
			if err != nil {
				t.Fatal(err)
			}
			defer vol.Close()
			fsys, err := ext4.Open(vol, vol.Size())
			if err != nil {
				t.Fatal(err)
			}
			seen := 0
			err = fsys.Walk(func(path string, ino *ext4.Inode) error {
				rel := strings.TrimPrefix(path, "/")
				want, ok := files[rel]
				if !ok || !ino.IsRegular() {
					return nil
				}
				got := make([]byte, ino.Size)
				if _, err := fsys.ReadAt(ino, got, 0); err != nil && len(got) > 0 {
					return fmt.Errorf("%s: %v", rel, err)
				}
				if !bytes.Equal(got, want) {
					return fmt.Errorf("%s differs", rel)
				}
				if ino.Mode&0o777 != 0o640 {
					return fmt.Errorf("%s mode %o", rel, ino.Mode&0o777)
				}
				seen++
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if seen != len(files) {
				t.Fatalf("found %d of %d files", seen, len(files))
			}
		})
	}
}

func TestCreateRefusesSectorLargerThanBlock(t *testing.T) {
	dir := t.TempDir()
	_, err := Create(context.Background(), CreateOptions{From: dir, Out: filepath.Join(dir, "x"), Key: make([]byte, 32), BlockSize: 1024})
	if err == nil || !strings.Contains(err.Error(), "sector size 4096 is larger than the ext4 block size 1024") {
		t.Fatalf("got %v", err)
	}
}

func TestManifestEntryString(t *testing.T) {
	cases := []struct {
		e    ManifestEntry
		want string
	}{
		{ManifestEntry{Path: "/a/b", Mode: syscall.S_IFREG | 0o4755, UID: 1, GID: 2, Size: 3, Digest: "abc"}, "f 4755 1:2 3 abc /a/b"},
		{ManifestEntry{Path: "/sp ace", Mode: syscall.S_IFLNK | 0o777, Size: 5, Digest: "t t"}, `l 0777 0:0 5 "t t" "/sp ace"`},
		{ManifestEntry{Path: "/bad\xff", Mode: syscall.S_IFDIR | 0o700, Size: 4096, Digest: "-"}, `d 0700 0:0 4096 - "/bad\xff"`},
		{ManifestEntry{Path: "/dev", Mode: syscall.S_IFCHR | 0o600, Digest: DeviceDigest(1, 3)}, "c 0600 0:0 0 1,3 /dev"},
		{ManifestEntry{Path: "/ünï", Mode: syscall.S_IFIFO | 0o644, Digest: "-"}, "p 0644 0:0 0 - /ünï"},
	}
	for _, c := range cases {
		if got := c.e.String(); got != c.want {
			t.Errorf("String() = %q, want %q", got, c.want)
		}
		if n := len(strings.Fields(c.e.String())); n != 6 && !strings.Contains(c.e.String(), `"`) {
			t.Errorf("%q has %d fields", c.e.String(), n)
		}
	}
}

// TestEstimateTree: sparse files count their allocation, hard links count
// once, and the estimate is enough for mke2fs on the first try.
func TestEstimateTree(t *testing.T) {
	dir := t.TempDir()
	f, err := os.Create(filepath.Join(dir, "sparse"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("end"), 10<<30); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if err := os.WriteFile(filepath.Join(dir, "data"), make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if err := os.Link(filepath.Join(dir, "data"), filepath.Join(dir, fmt.Sprint("link", i))); err != nil {
			t.Fatal(err)
		}
	}
	est, err := EstimateTree(dir, 4096)
	if err != nil {
		t.Fatal(err)
	}
	if est.Inodes != 3 { // root, sparse, data (+3 links)
		t.Errorf("inodes %d, want 3", est.Inodes)
	}
	if est.MaxDirEntries != 5 {
		t.Errorf("largest directory has %d entries, want 5", est.MaxDirEntries)
	}
	if est.Blocks < 256 || est.Blocks > 300 {
		t.Errorf("blocks %d: want the 1 MiB file (256) plus little for the 10 GiB sparse one", est.Blocks)
	}
	if sz := est.ImageSize(false); sz < minImageSize || sz%(1<<20) != 0 || sz > 8<<20 {
		t.Errorf("image size %d", sz)
	}
	if j, nj := est.ImageSize(true), est.ImageSize(false); j <= nj {
		t.Errorf("journal does not add space: %d vs %d", j, nj)
	}
	if _, err := EstimateTree(filepath.Join(dir, "missing"), 4096); err == nil {
		t.Error("estimate of a missing directory succeeded")
	}
}

func TestMakeExt4Errors(t *testing.T) {
	testenv.RequireTools(t, "mkfs.ext4", "debugfs")
	src := t.TempDir()
	big := make([]byte, 8<<20)
	if _, err := rand.Read(big); err != nil { // mke2fs stores zero blocks as holes
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(src, "big"), big, 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "img")
	ctx := context.Background()
	if _, err := MakeExt4(ctx, src, out, MakeOptions{Size: 4 << 20}); err == nil || !strings.Contains(err.Error(), "mkfs.ext4") {
		t.Errorf("explicit size too small: %v", err)
	}
	if _, err := MakeExt4(ctx, src, out, MakeOptions{BlockSize: 8192}); err == nil || !strings.Contains(err.Error(), "block size") {
		t.Errorf("bad block size: %v", err)
	}
	if _, err := MakeExt4(ctx, src, out, MakeOptions{Label: strings.Repeat("l", 17)}); err == nil || !strings.Contains(err.Error(), "label") {
		t.Errorf("long label: %v", err)
	}
	if _, err := MakeExt4(ctx, filepath.Join(src, "big"), out, MakeOptions{}); err == nil || !strings.Contains(err.Error(), "not a directory") {
		t.Errorf("file as source: %v", err)
	}
	size, err := MakeExt4(ctx, src, out, MakeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(out); err != nil || st.Size() != size {
		t.Errorf("image is %v bytes (err %v), MakeExt4 said %d", st.Size(), err, size)
	}
}
