package image

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blobseal/blobseal/crypto"
	"github.com/blobseal/blobseal/fs/ext4"
	"github.com/blobseal/blobseal/internal/testenv"
)

// makeTree writes a small varied tree and returns its files' contents.
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
