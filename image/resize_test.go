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
	"syscall"
	"testing"
	"time"

	"github.com/blobseal/blobseal/blob"
	"github.com/blobseal/blobseal/crypto"
	"github.com/blobseal/blobseal/fs/ext4"
	"github.com/blobseal/blobseal/internal/testenv"
)

// writeBig creates name in the root and writes n bytes into it through a
// read-write open of spec, returning the write's error.
func writeBig(t *testing.T, spec Spec, name string, n int) error {
	t.Helper()
	w, err := OpenWritable(context.Background(), spec)
	if err != nil {
		t.Fatalf("OpenWritable: %v", err)
	}
	defer func() {
		if err := w.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
	}()
	in, err := w.Writer.Create(ext4.RootIno, name, 0o644, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, err = w.Writer.WriteAt(in.Ino, bytes.Repeat([]byte{0xA5}, n), 0)
	if err != nil {
		// Give the space back so the image closes clean.
		if uerr := w.Writer.Unlink(ext4.RootIno, name); uerr != nil {
			t.Fatal(uerr)
		}
	}
	return err
}

// checkResized opens spec read-only: the filesystem is about fsBytes,
// every file of the tree is intact, and e2fsck accepts the decrypted
// volume.
func checkResized(t *testing.T, spec Spec, fsBytes int64, files map[string][]byte) {
	t.Helper()
	img, err := Open(context.Background(), spec)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	st := img.FS.StatFS()
	if total := int64(st.Blocks) * int64(st.BlockSize); total < fsBytes*9/10 || total > fsBytes {
		t.Errorf("statfs: %d bytes, want about %d", total, fsBytes)
	}
	for rel, want := range files {
		in, err := lookup(img.FS, rel)
		if err != nil {
			t.Fatalf("%s: %v", rel, err)
		}
		got := make([]byte, in.Size)
		if in.Size != uint64(len(want)) {
			t.Fatalf("%s is %d bytes after the resize, want %d", rel, in.Size, len(want))
		}
		if len(got) == 0 {
			continue
		}
		if _, err := img.FS.ReadAt(in, got, 0); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%s reads back wrong after the resize (%v)", rel, err)
		}
	}
	e2fsckDecrypted(t, img)
}

// e2fsckDecrypted writes img's plaintext (the decrypted download) to a
// file and fails the test unless e2fsck -fn finds it clean.
func e2fsckDecrypted(t *testing.T, img *Image) {
	t.Helper()
	plain := filepath.Join(t.TempDir(), "plain.ext4")
	out, err := os.Create(plain)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4<<20)
	for off := int64(0); off < img.Volume.Size(); off += int64(len(buf)) {
		n := min(int64(len(buf)), img.Volume.Size()-off)
		if _, err := img.Volume.ReadAt(buf[:n], off); err != nil {
			t.Fatal(err)
		}
		if _, err := out.WriteAt(buf[:n], off); err != nil {
			t.Fatal(err)
		}
	}
	out.Close()
	tools := testenv.RequireTools(t, "e2fsck")
	if o, err := exec.Command(tools[0], "-fn", plain).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -fn of the decrypted volume: %v\n%s", err, o)
	}
}

func lookup(f *ext4.FS, rel string) (*ext4.Inode, error) {
	ino := uint32(ext4.RootIno)
	for _, part := range strings.Split(rel, "/") {
		dir, err := f.Inode(ino)
		if err != nil {
			return nil, err
		}
		if ino, err = f.Lookup(dir, part); err != nil {
			return nil, err
		}
	}
	return f.Inode(ino)
}

// TestResizeGrowsImages: a read-write image too small for a write (ENOSPC)
// is grown with Resize, as a local file (LUKS2 and plain) and as a page
// blob on Azurite under its lease; afterwards the write fits, the old
// files are intact and e2fsck accepts the decrypted volume.
func TestResizeGrowsImages(t *testing.T) {
	testenv.RequireTools(t, "mkfs.ext4", "debugfs", "e2fsck")
	az := testenv.StartAzurite(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	files := makeTree(t, src)
	key := make([]byte, 64)
	rand.Read(key)
	bo := blob.Options{ConnectionString: az.ConnectionString(), RetryDelay: 20 * time.Millisecond}
	const fsSize, newSize = 32 << 20, 160 << 20
	const big = 40 << 20 // more than the small image has free

	for _, c := range []struct{ name, format, where string }{
		{"file-luks2", "luks2", "file"},
		{"file-plain", "plain", "file"},
		{"pageblob-luks2", "luks2", "blob"},
	} {
		t.Run(c.name, func(t *testing.T) {
			out := filepath.Join(t.TempDir(), "rw.img")
			if _, err := Create(ctx, CreateOptions{From: src, Out: out, Key: key, ReadWrite: true, Size: fsSize,
				Crypto: crypto.FormatOptions{Format: c.format}}); err != nil {
				t.Fatal(err)
			}
			spec := Spec{Location: out, Key: key, Crypto: crypto.OpenOptions{Format: map[string]string{"plain": "plain"}[c.format]}}
			if c.where == "blob" {
				spec.Location = az.Endpoint() + "/img/" + c.name + ".img"
				spec.Blob = bo
				spec.Write.Lease.Duration = 15 * time.Second
				if _, err := blob.Upload(ctx, out, spec.Location, blob.UploadOptions{Options: bo, Type: "page", CreateContainer: true}); err != nil {
					t.Fatal(err)
				}
			}
			if err := writeBig(t, spec, "too-big", big); !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("a %d-byte write into the %d-byte image: %v, want ENOSPC", big, fsSize, err)
			}
			res, err := Resize(ctx, spec, newSize)
			if err != nil {
				t.Fatalf("Resize: %v", err)
			}
			t.Logf("%+v", res)
			if res.NewBytes != newSize || res.NewFSBytes <= res.OldFSBytes || res.NewFSBytes > newSize {
				t.Fatalf("Resize result %+v", res)
			}
			if c.where == "blob" {
				s, err := blob.Open(ctx, spec.Location, bo)
				if err != nil {
					t.Fatal(err)
				}
				if s.Size() != newSize {
					t.Fatalf("blob is %d bytes after Resize, want %d", s.Size(), newSize)
				}
				// The lease was released: a writer gets in at once.
				w, err := OpenWritable(ctx, spec)
				if err != nil {
					t.Fatalf("OpenWritable after Resize (lease released?): %v", err)
				}
				w.Close()
			} else if st, err := os.Stat(out); err != nil || st.Size() != newSize {
				t.Fatalf("image file after Resize: %v %v", st, err)
			}
			if err := writeBig(t, spec, "fits-now", big); err != nil {
				t.Fatalf("the %d-byte write after Resize: %v", big, err)
			}
			checkResized(t, spec, res.NewFSBytes, files)
		})
	}
}

// TestResizeRefuses: what Resize must not change is refused, unchanged,
// each with a message naming what to do.
func TestResizeRefuses(t *testing.T) {
	testenv.RequireTools(t, "mkfs.ext4", "debugfs")
	az := testenv.StartAzurite(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	makeTree(t, src)
	key := make([]byte, 64)
	rand.Read(key)
	verityImg := filepath.Join(dir, "verity.img")
	if _, err := Create(ctx, CreateOptions{From: src, Out: verityImg, Key: key}); err != nil {
		t.Fatal(err)
	}
	rw := filepath.Join(dir, "rw.img")
	if _, err := Create(ctx, CreateOptions{From: src, Out: rw, Key: key, ReadWrite: true, Size: 32 << 20}); err != nil {
		t.Fatal(err)
	}
	bo := blob.Options{ConnectionString: az.ConnectionString(), RetryDelay: 20 * time.Millisecond}
	blockURL := az.Endpoint() + "/img/block.img"
	if _, err := blob.Upload(ctx, rw, blockURL, blob.UploadOptions{Options: bo, Type: "block", CreateContainer: true}); err != nil {
		t.Fatal(err)
	}
	rwSize := func() int64 {
		st, err := os.Stat(rw)
		if err != nil {
			t.Fatal(err)
		}
		return st.Size()
	}
	before := rwSize()
	for _, c := range []struct {
		name string
		spec Spec
		size int64
		is   error
		want string
	}{
		{"verity tree", Spec{Location: verityImg, Key: key}, 256 << 20, ErrVerityReadOnly, "ends with a verity tree"},
		{"root hash", Spec{Location: rw, Key: key, Integrity: Integrity{RootHash: make([]byte, 32)}}, 256 << 20, ErrVerityReadOnly, "root hash"},
		{"block blob", Spec{Location: blockURL, Key: key, Blob: bo}, 256 << 20, blob.ErrUnsupported, "image upload --type page"},
		{"shrink", Spec{Location: rw, Key: key}, 16 << 20, nil, "only grows"},
		{"unaligned", Spec{Location: rw, Key: key}, 100<<20 + 512, nil, "multiple of 4096"},
		{"too large", Spec{Location: rw, Key: key}, 64 << 30, ext4.ErrTooLarge, "the image can grow to at most 34376515584 bytes"},
		{"wrong key", Spec{Location: rw, Key: make([]byte, 64)}, 256 << 20, nil, "unlock"},
	} {
		_, err := Resize(ctx, c.spec, c.size)
		if err == nil || (c.is != nil && !errors.Is(err, c.is)) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v; want %v mentioning %q", c.name, err, c.is, c.want)
		}
		t.Logf("%s: %v", c.name, err)
	}
	if after := rwSize(); after != before {
		t.Fatalf("refused resizes changed the image's size from %d to %d", before, after)
	}
}

// TestResizeFinishesInterrupted: an image whose device grew but whose
// filesystem did not (a resize interrupted between the two) is finished
// by running Resize again with the same size; once the filesystem fills
// the image, the same Resize says there is nothing to do.
func TestResizeFinishesInterrupted(t *testing.T) {
	testenv.RequireTools(t, "mkfs.ext4", "debugfs", "e2fsck")
	ctx := context.Background()
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	files := makeTree(t, src)
	key := make([]byte, 64)
	rand.Read(key)
	out := filepath.Join(dir, "rw.img")
	if _, err := Create(ctx, CreateOptions{From: src, Out: out, Key: key, ReadWrite: true, Size: 32 << 20}); err != nil {
		t.Fatal(err)
	}
	const newSize = 96 << 20
	if err := os.Truncate(out, newSize); err != nil {
		t.Fatal(err)
	}
	spec := Spec{Location: out, Key: key}
	res, err := Resize(ctx, spec, newSize)
	if err != nil {
		t.Fatalf("Resize of an interrupted resize: %v", err)
	}
	if res.OldFSBytes != 32<<20 || res.NewFSBytes <= res.OldFSBytes || res.OldBytes != newSize {
		t.Fatalf("Resize result %+v, want the 32 MiB filesystem grown in the %d-byte image", res, newSize)
	}
	if _, err := Resize(ctx, spec, newSize); err == nil || !strings.Contains(err.Error(), "filesystem fills it") {
		t.Fatalf("Resize to the size it has: %v, want nothing-to-do refusal", err)
	}
	checkResized(t, spec, res.NewFSBytes, files)
}
