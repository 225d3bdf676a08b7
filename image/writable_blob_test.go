package image

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/blobseal/blobseal/blob"
	"github.com/blobseal/blobseal/fs/ext4"
	"github.com/blobseal/blobseal/internal/testenv"
)

// TestOpenWritablePageBlob: an image made with ReadWrite and uploaded as a
// page blob is opened for writing under a lease (a second writer is
// refused, naming the lease), written, closed (flushed, lease released),
// and a cold read-only open of the blob reads the write and checks clean.
// The same image as a block blob is refused, saying to upload a page blob;
// a page blob with a verity tree is refused as read-only.
func TestOpenWritablePageBlob(t *testing.T) {
	testenv.RequireTools(t, "mkfs.ext4", "debugfs")
	az := testenv.StartAzurite(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	makeTree(t, src)
	key := make([]byte, 64)
	rand.Read(key)
	out := filepath.Join(dir, "rw.img")
	if _, err := Create(ctx, CreateOptions{From: src, Out: out, Key: key, ReadWrite: true}); err != nil {
		t.Fatal(err)
	}
	bo := blob.Options{ConnectionString: az.ConnectionString(), RetryDelay: 20 * time.Millisecond}
	pageURL := az.Endpoint() + "/img/rw.img"
	blockURL := az.Endpoint() + "/img/rw-block.img"
	for url, typ := range map[string]string{pageURL: "page", blockURL: "block"} {
		if _, err := blob.Upload(ctx, out, url, blob.UploadOptions{Options: bo, Type: typ, CreateContainer: true}); err != nil {
			t.Fatalf("upload %s: %v", typ, err)
		}
	}

	// An image with a verity tree, even as a page blob, stays read-only.
	verityImg := filepath.Join(dir, "verity.img")
	if _, err := Create(ctx, CreateOptions{From: src, Out: verityImg, Key: key}); err != nil {
		t.Fatal(err)
	}
	verityURL := az.Endpoint() + "/img/verity.img"
	if _, err := blob.Upload(ctx, verityImg, verityURL, blob.UploadOptions{Options: bo, Type: "page", CreateContainer: true}); err != nil {
		t.Fatal(err)
	}
	if w, err := OpenWritable(ctx, Spec{Location: verityURL, Key: key, Blob: bo}); err == nil {
		w.Close()
		t.Fatal("a page blob with a verity tree opened for writing")
	} else if !errors.Is(err, ErrVerityReadOnly) || !strings.Contains(err.Error(), "ends with a verity tree") {
		t.Errorf("page blob with a verity tree: %v; want ErrVerityReadOnly", err)
	}

	_, err := OpenWritable(ctx, Spec{Location: blockURL, Key: key, Blob: bo})
	if err == nil || !errors.Is(err, blob.ErrUnsupported) || !strings.Contains(err.Error(), "image upload --type page") {
		t.Fatalf("block blob opened for writing: %v; want a refusal naming image upload --type page", err)
	}

	spec := Spec{Location: pageURL, Key: key, Blob: bo, Write: WriteOptions{Lease: blob.LeaseOptions{Duration: 15 * time.Second}}}
	w, err := OpenWritable(ctx, spec)
	if err != nil {
		t.Fatalf("OpenWritable(page blob): %v", err)
	}
	if w.Lease == nil {
		t.Fatal("no lease on a page blob opened for writing")
	}
	second, err := OpenWritable(ctx, spec)
	if err == nil {
		second.Close()
		t.Fatal("a second writer opened the leased blob")
	}
	if !errors.Is(err, blob.ErrLeased) || !strings.Contains(err.Error(), "lease") {
		t.Errorf("second writer: %v; want ErrLeased", err)
	}
	f, err := w.Writer.Create(ext4.RootIno, "written", 0o600, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	payload := bytes.Repeat([]byte("page blob "), 300000) // 3 MB: several Put Page batches
	if _, err := w.Writer.WriteAt(f.Ino, payload, 4096); err != nil {
		t.Fatal(err)
	}
	if err := w.Writer.Sync(); err != nil {
		t.Fatalf("Sync (flush to storage): %v", err)
	}
	if err := w.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}

	// Released: a new writer gets the lease at once.
	again, err := OpenWritable(ctx, spec)
	if err != nil {
		t.Fatalf("reopen after Close (lease released?): %v", err)
	}
	if err := again.Close(); err != nil {
		t.Fatal(err)
	}

	img, err := Open(ctx, Spec{Location: pageURL, Key: key, Blob: bo})
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
	if !bytes.Equal(got[4096:], payload) || !bytes.Equal(got[:4096], make([]byte, 4096)) {
		t.Errorf("the write reads back wrong from a cold open (%d bytes)", len(got))
	}
	if problems := Check(ctx, img.FS, func(ManifestEntry) {}); len(problems) != 0 {
		t.Errorf("check after writing: %v", problems)
	}
}
