package sidecar_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/blobseal/blobseal/blob"
	"github.com/blobseal/blobseal/fs/ext4"
	"github.com/blobseal/blobseal/image"
)

// TestLegacyReadWrite: EncfsSideCarArgs with read_write: true on a page
// blob made by image create --read-write (key released through the
// attestation stack) serves it writable; a write fsynced through the
// published mount point is in the blob after SIGTERM (flushed, the lease
// released: a new writer opens it at once).
func TestLegacyReadWrite(t *testing.T) {
	e := setup(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	img := filepath.Join(e.dir, "rw.img")
	if _, err := image.Create(ctx, image.CreateOptions{From: demoData, Out: img, Key: e.key, ReadWrite: true}); err != nil {
		t.Fatal(err)
	}
	bo := blob.Options{ConnectionString: e.azurite.ConnectionString()}
	u := e.azurite.Endpoint() + "/images/rw.img"
	if _, err := blob.Upload(ctx, img, u, blob.UploadOptions{Options: bo, Type: "page", CreateContainer: true}); err != nil {
		t.Fatal(err)
	}
	e.urls["page"], e.roots["page"], e.readWrite = u, "", true

	mnt := t.TempDir()
	mp := filepath.Join(mnt, "share")
	ready := filepath.Join(mnt, "ready")
	cmd := e.command(e.legacyArgs(t, map[string]string{"page": mp}), e.hostData, "--ready-file", ready)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			<-exited
		}
	}()
	waitFile(t, ready, exited, &stderr)
	sameTree(t, demoData, mp)
	payload := bytes.Repeat([]byte("written by the app container\n"), 10000)
	f, err := os.Create(filepath.Join(mp, "app-output"))
	if err != nil {
		t.Fatalf("create through the read-write mount: %v\n%s", err, stderr.String())
	}
	if _, err := f.Write(payload); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatalf("fsync: %v", err)
	}
	f.Close()
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("exit after SIGTERM: %v\n%s", err, stderr.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatal("sidecar did not exit within 30s of SIGTERM")
	}
	notMounted(t, mnt)
	if !strings.Contains(stderr.String(), "no verity tree on a writable image") {
		t.Errorf("no warning that the read-write filesystem has no integrity protection:\n%s", stderr.String())
	}

	// The lease was released: a writer opens the blob at once, and reads
	// the file from storage.
	w, err := image.OpenWritable(ctx, image.Spec{Location: u, Key: e.key, Blob: bo})
	if err != nil {
		t.Fatalf("open after the sidecar's exit (lease released?): %v", err)
	}
	defer w.Close()
	fsys := w.Writer.FS()
	root, err := fsys.Inode(ext4.RootIno)
	if err != nil {
		t.Fatal(err)
	}
	ino, err := fsys.Lookup(root, "app-output")
	if err != nil {
		t.Fatalf("app-output not in the blob: %v", err)
	}
	in, err := fsys.Inode(ino)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, in.Size)
	if _, err := fsys.ReadAt(in, got, 0); err != nil || !bytes.Equal(got, payload) {
		t.Errorf("app-output reads back %d bytes (%v), want the %d written", len(got), err, len(payload))
	}
}
