package image

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/blobseal/blobseal/blob"
	"github.com/blobseal/blobseal/blockcache"
	"github.com/blobseal/blobseal/fs/ext4"
	"github.com/blobseal/blobseal/internal/testenv"
	"github.com/blobseal/blobseal/verity"
)

// readAll reads every regular file of img and compares it with src; it
// returns the paths whose read failed.
func readAll(t *testing.T, img *Image, files map[string][]byte) []string {
	t.Helper()
	var failed []string
	err := img.FS.Walk(func(p string, in *ext4.Inode) error {
		want, ok := files[p]
		if !ok || !in.IsRegular() {
			return nil
		}
		got := make([]byte, in.Size)
		if _, err := img.FS.ReadAt(in, got, 0); err != nil && len(got) > 0 {
			if !errors.Is(err, blockcache.ErrIntegrity) {
				t.Errorf("%s: %v, want an integrity error or success", p, err)
			}
			failed = append(failed, p)
			return nil
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s: wrong content accepted", p)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return failed
}

// With a root hash every path to the bytes is verified: the cached path,
// and DirectLocal (which a tree overrides: there is no unverified way in).
func TestVerifiedOpenHasNoBypass(t *testing.T) {
	testenv.RequireTools(t, "mkfs.ext4")
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	files := makeTree(t, src)
	key := make([]byte, 32)
	rand.Read(key)
	ctx := context.Background()
	img := filepath.Join(dir, "img")
	res, err := Create(ctx, CreateOptions{From: src, Out: img, Key: key})
	if err != nil {
		t.Fatal(err)
	}
	root, err := ParseRootHash(res.Verity.RootHash)
	if err != nil {
		t.Fatal(err)
	}
	// Flip one byte in every 64 KiB of the data area: every file larger
	// than that, and only those, must fail.
	raw, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	for off := int64(16<<20) + 1000; off < res.Verity.HashOffset; off += 64 << 10 {
		raw[off] ^= 1
	}
	bad := filepath.Join(dir, "bad")
	if err := os.WriteFile(bad, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, direct := range []bool{false, true} {
		for _, path := range []string{img, bad} {
			im, err := Open(ctx, Spec{Location: path, Key: key, DirectLocal: direct, Integrity: Integrity{RootHash: root, Require: true}})
			if path == bad && err != nil {
				// The tampered bytes may hit the filesystem's metadata too:
				// then the open itself is refused, naming the tree.
				if !errors.Is(err, blockcache.ErrIntegrity) {
					t.Fatalf("tampered image: %v", err)
				}
				continue
			}
			if err != nil {
				t.Fatal(err)
			}
			if im.Tree == nil || im.Cache == nil {
				t.Fatalf("DirectLocal=%v: tree %v cache %v: the verified path was bypassed", direct, im.Tree, im.Cache)
			}
			failed := readAll(t, im, files)
			if path == img && len(failed) > 0 {
				t.Errorf("intact image: %v failed", failed)
			}
			if path == bad && len(failed) == 0 {
				t.Errorf("tampered image: every file read")
			}
			if st := im.Tree.Stats(); st.BlocksVerified == 0 {
				t.Errorf("nothing was verified: %+v", st)
			}
			im.Close()
		}
	}
	// Integrity required, no root: refused before the image is touched.
	if _, err := Open(ctx, Spec{Location: filepath.Join(dir, "does-not-exist"), Key: key, Integrity: Integrity{Require: true}}); !errors.Is(err, ErrIntegrityRequired) {
		t.Fatalf("require without a root: %v", err)
	}
}

// A sparse image in Azurite, as a page blob (unwritten pages) and as a
// block blob (every byte stored): verified reads are correct and fetch
// little more than the files, tree included.
func TestVerifiedSparseBlobs(t *testing.T) {
	testenv.RequireTools(t, "mkfs.ext4")
	az := testenv.StartAzurite(t)
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	files := map[string][]byte{}
	for i := range 16 {
		b := make([]byte, 64<<10)
		rand.Read(b)
		p := fmt.Sprintf("/f%02d", i)
		files[p] = b
		if err := os.MkdirAll(src, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(src, p), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	key := make([]byte, 32)
	rand.Read(key)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	img := filepath.Join(dir, "sparse.img")
	res, err := Create(ctx, CreateOptions{From: src, Out: img, Key: key, Size: 48 << 20})
	if err != nil {
		t.Fatal(err)
	}
	root, _ := ParseRootHash(res.Verity.RootHash)
	for _, typ := range []string{"page", "block"} {
		u := az.Endpoint() + "/sparse/img-" + typ
		if _, err := blob.Upload(ctx, img, u, blob.UploadOptions{Options: blob.Options{ConnectionString: az.ConnectionString()},
			Type: typ, CreateContainer: true}); err != nil {
			t.Fatal(err)
		}
		im, err := Open(ctx, Spec{Location: u, Key: key, Blob: blob.Options{ConnectionString: az.ConnectionString()},
			Integrity: Integrity{RootHash: root, HashOffset: res.Verity.HashOffset, Require: true}})
		if err != nil {
			t.Fatalf("%s: %v", typ, err)
		}
		if failed := readAll(t, im, files); len(failed) > 0 {
			t.Errorf("%s: %v failed", typ, failed)
		}
		cs, ts := im.Cache.Stats(), im.Tree.Stats()
		fetched := cs.BytesFetched + ts.NodeBytes
		t.Logf("%s blob: %d data + %d tree bytes fetched in %d + %d requests; %d zero blocks verified without hashing",
			typ, cs.BytesFetched, ts.NodeBytes, cs.Requests, ts.NodeRequests, ts.ZeroBlocks)
		if fetched > 4<<20 || ts.ZeroBlocks == 0 {
			t.Errorf("%s: fetched %d bytes for 1 MiB of files in a 64 MiB image, zero blocks %d", typ, fetched, ts.ZeroBlocks)
		}
		im.Close()
	}
	// The hash offset from the wrong image: refused.
	if _, err := Open(ctx, Spec{Location: img, Key: key, Integrity: Integrity{RootHash: root, HashOffset: res.Verity.HashOffset - 4096}}); !errors.Is(err, verity.ErrNoSuperblock) && !errors.Is(err, verity.ErrBadSuperblock) {
		t.Fatalf("wrong hash offset: %v", err)
	}
}
