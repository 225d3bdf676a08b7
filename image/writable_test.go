package image

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blobseal/blobseal/crypto"
	"github.com/blobseal/blobseal/fs/ext4"
	"github.com/blobseal/blobseal/internal/testenv"
)

// TestReadWriteImageOpensWritable: Create with ReadWrite gives a journaled
// image without a tree and with room to grow; OpenWritable changes it, and
// after Close a fresh read-only Open sees the change, with every sector
// still decrypting under the same key.
func TestReadWriteImageOpensWritable(t *testing.T) {
	testenv.RequireTools(t, "mkfs.ext4", "debugfs")
	for _, format := range []string{"luks2", "plain"} {
		t.Run(format, func(t *testing.T) {
			dir := t.TempDir()
			src := filepath.Join(dir, "src")
			files := makeTree(t, src)
			key := make([]byte, 64)
			rand.Read(key)
			out := filepath.Join(dir, "rw.img")
			res, err := Create(context.Background(), CreateOptions{From: src, Out: out, Key: key, ReadWrite: true,
				Crypto: crypto.FormatOptions{Format: format}})
			if err != nil {
				t.Fatal(err)
			}
			if res.Verity != nil {
				t.Fatalf("a read-write image got a verity tree: %+v", res.Verity)
			}
			openFmt := map[string]string{"plain": "plain"}[format]
			spec := Spec{Location: out, Key: key, Crypto: crypto.OpenOptions{Format: openFmt}}
			w, err := OpenWritable(context.Background(), spec)
			if err != nil {
				t.Fatalf("OpenWritable: %v", err)
			}
			st := w.Writer.FS().StatFS()
			if free := st.FreeBlocks * uint64(st.BlockSize); free < 64<<20 {
				t.Errorf("%d bytes free, want at least 64 MiB", free)
			}
			if st.FreeInodes < uint64(len(files))*4 {
				t.Errorf("%d free inodes for a tree of %d files", st.FreeInodes, len(files))
			}
			f, err := w.Writer.Create(ext4.RootIno, "written", 0o600, 0, 0)
			if err != nil {
				t.Fatal(err)
			}
			payload := bytes.Repeat([]byte("rw!"), 100000)
			if _, err := w.Writer.WriteAt(f.Ino, payload, 12345); err != nil {
				t.Fatal(err)
			}
			if err := w.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			if err := w.Close(); err != nil { // idempotent
				t.Fatalf("second Close: %v", err)
			}

			img, err := Open(context.Background(), spec)
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			ino, err := img.FS.Lookup(inodeOf(t, img.FS, ext4.RootIno), "written")
			if err != nil {
				t.Fatal(err)
			}
			in := inodeOf(t, img.FS, ino)
			got := make([]byte, in.Size)
			if _, err := img.FS.ReadAt(in, got, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got[12345:], payload) || !bytes.Equal(got[:12345], make([]byte, 12345)) {
				t.Errorf("written file reads back wrong (%d bytes)", len(got))
			}
			if problems := Check(context.Background(), img.FS, func(ManifestEntry) {}); len(problems) != 0 {
				t.Errorf("check after writing: %v", problems)
			}
		})
	}
}

func inodeOf(t *testing.T, f *ext4.FS, ino uint32) *ext4.Inode {
	t.Helper()
	in, err := f.Inode(ino)
	if err != nil {
		t.Fatal(err)
	}
	return in
}

// TestOpenWritableRefuses: pinned root hashes, images with a
// verity tree and filesystems the writer cannot keep consistent are
// refused, each saying why.
func TestOpenWritableRefuses(t *testing.T) {
	tools := testenv.RequireTools(t, "mkfs.ext4", "debugfs")
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	makeTree(t, src)
	key := make([]byte, 64)
	rand.Read(key)
	ctx := context.Background()
	verityImg := filepath.Join(dir, "verity.img")
	if _, err := Create(ctx, CreateOptions{From: src, Out: verityImg, Key: key}); err != nil {
		t.Fatal(err)
	}
	// inline_data is a feature the writer does not maintain.
	plain := filepath.Join(dir, "inline.ext4")
	if out, err := exec.Command(tools[0], "-q", "-F", "-t", "ext4", "-O", "inline_data", plain, "8M").CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v: %s", err, out)
	}
	inline := filepath.Join(dir, "inline.img")
	pf, err := os.Open(plain)
	if err != nil {
		t.Fatal(err)
	}
	defer pf.Close()
	of, err := os.Create(inline)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := crypto.CreateImage(ctx, of, pf, 8<<20, key, crypto.FormatOptions{}); err != nil {
		t.Fatal(err)
	}
	of.Close()

	for _, c := range []struct {
		name string
		spec Spec
		is   error
		want string
	}{
		{"root hash", Spec{Location: verityImg, Key: key, Integrity: Integrity{RootHash: make([]byte, 32)}}, ErrVerityReadOnly, "root hash"},
		{"verity tree", Spec{Location: verityImg, Key: key}, ErrVerityReadOnly, "ends with a verity tree"},
		{"missing", Spec{Location: filepath.Join(dir, "none"), Key: key}, os.ErrNotExist, "open image"},
		{"inline_data", Spec{Location: inline, Key: key}, ext4.ErrUnsupported, "inline_data"},
	} {
		w, err := OpenWritable(ctx, c.spec)
		if err == nil {
			w.Close()
			t.Errorf("%s: opened", c.name)
			continue
		}
		if (c.is != nil && !errors.Is(err, c.is)) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v; want %v mentioning %q", c.name, err, c.is, c.want)
		}
		if strings.Contains(err.Error(), "SECRET") {
			t.Errorf("%s: error leaks the SAS token: %v", c.name, err)
		}
	}
}
