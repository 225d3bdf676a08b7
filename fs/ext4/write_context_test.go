package ext4

import (
	"bytes"
	"context"
	"errors"
	"os"
	"syscall"
	"testing"
	"time"
)

// ctxDevice is an image file with the optional WriteAtContext, as
// crypto.Volume has, and a Sync that can be held up.
type ctxDevice struct {
	*os.File
	onWrite  func(ctx context.Context) error // before each WriteAtContext
	syncing  chan struct{}                   // gets a value as Sync starts, if set
	syncGate chan struct{}                   // Sync waits for it, if set
}

var _ Device = (*ctxDevice)(nil)
var _ contextWriterAt = (*ctxDevice)(nil)

func (d *ctxDevice) WriteAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	if d.onWrite != nil {
		if err := d.onWrite(ctx); err != nil {
			return 0, err
		}
	}
	return d.File.WriteAt(p, off)
}

func (d *ctxDevice) Sync() error {
	if d.syncing != nil {
		d.syncing <- struct{}{}
		<-d.syncGate
	}
	return d.File.Sync()
}

func openCtxDevice(t *testing.T, img string) (*Writer, *ctxDevice) {
	t.Helper()
	fh, err := os.OpenFile(img, os.O_RDWR, 0)
	must(t, err)
	t.Cleanup(func() { fh.Close() })
	st, err := fh.Stat()
	must(t, err)
	dev := &ctxDevice{File: fh}
	w, err := OpenWritable(dev, st.Size())
	must(t, err)
	return w, dev
}

func isCancelled(err error, cause error) bool {
	return errors.Is(err, cause) && errors.Is(err, syscall.EINTR)
}

// TestWriterContextEndedFirst: an operation whose context has ended does
// nothing at all: the image stays byte for byte as it was.
func TestWriterContextEndedFirst(t *testing.T) {
	img := mkfs(t, nil, "", 16)
	w, _ := openCtxDevice(t, img)
	f, err := w.Create(RootIno, "f", 0o644, 0, 0)
	must(t, err)
	_, err = w.WriteAt(f.Ino, []byte("data"), 0)
	must(t, err)
	d, err := w.Mkdir(RootIno, "d", 0o755, 0, 0)
	must(t, err)
	must(t, w.Checkpoint())
	before, err := os.ReadFile(img)
	must(t, err)

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	mode := uint32(0o600)
	for name, op := range map[string]func() error{
		"create":  func() error { _, err := w.CreateContext(ctx, RootIno, "new", 0o644, 0, 0); return err },
		"held":    func() error { _, err := w.CreateHeld(ctx, RootIno, "new", 0o644, 0, 0); return err },
		"mknod":   func() error { _, err := w.MknodContext(ctx, RootIno, "new", sIFIFO|0o644, 0, 0, 0); return err },
		"mkdir":   func() error { _, err := w.MkdirContext(ctx, RootIno, "new", 0o755, 0, 0); return err },
		"symlink": func() error { _, err := w.SymlinkContext(ctx, RootIno, "new", "f", 0, 0); return err },
		"link":    func() error { return w.LinkContext(ctx, f.Ino, RootIno, "new") },
		"unlink":  func() error { return w.UnlinkContext(ctx, RootIno, "f") },
		"rmdir":   func() error { return w.RmdirContext(ctx, RootIno, "d") },
		"rename":  func() error { return w.RenameContext(ctx, RootIno, "f", d.Ino, "g", 0) },
		"setattr": func() error { _, err := w.SetattrContext(ctx, f.Ino, SetAttr{Mode: &mode}); return err },
		"write": func() error {
			_, err := w.WriteAtContext(ctx, f.Ino, bytes.Repeat([]byte("x"), 100_000), 0)
			return err
		},
		"truncate":    func() error { return w.TruncateContext(ctx, f.Ino, 0) },
		"fallocate":   func() error { return w.FallocateContext(ctx, f.Ino, 0, 1<<20, false) },
		"setxattr":    func() error { return w.SetXattrContext(ctx, f.Ino, "user.a", []byte("v"), 0) },
		"removexattr": func() error { return w.RemoveXattrContext(ctx, f.Ino, "user.a") },
		"sync":        func() error { return w.SyncContext(ctx) },
	} {
		if err := op(); !isCancelled(err, context.Canceled) {
			t.Errorf("%s with an ended context: %v, want context.Canceled and EINTR", name, err)
		}
	}
	w.Hold(f.Ino)
	if err := w.ReleaseContext(ctx, f.Ino); !isCancelled(err, context.Canceled) {
		t.Errorf("release with an ended context: %v, want context.Canceled and EINTR", err)
	}
	must(t, w.Release(f.Ino))
	must(t, w.Checkpoint())
	after, err := os.ReadFile(img)
	must(t, err)
	if !bytes.Equal(before, after) {
		t.Fatal("operations with an ended context changed the image")
	}
}

// TestWriterContextWaitGivesUp: an operation waiting for the change lock
// behind a slow commit returns when its context ends; the commit and the
// operations after it complete normally.
func TestWriterContextWaitGivesUp(t *testing.T) {
	img := mkfs(t, nil, "", 16)
	w, dev := openCtxDevice(t, img)
	_, err := w.Create(RootIno, "f", 0o644, 0, 0)
	must(t, err)
	dev.syncing, dev.syncGate = make(chan struct{}, 4), make(chan struct{})
	synced := make(chan error, 1)
	go func() { synced <- w.Sync() }()
	<-dev.syncing // the commit is in the device: it holds the change lock

	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	err = w.UnlinkContext(ctx, RootIno, "f")
	if !isCancelled(err, context.DeadlineExceeded) {
		t.Fatalf("unlink waiting behind a commit: %v, want context.DeadlineExceeded and EINTR", err)
	}
	if waited := time.Since(start); waited > 5*time.Second {
		t.Fatalf("unlink returned %v after its deadline", waited)
	}
	close(dev.syncGate) // the device lets the commit finish
	must(t, <-synced)
	dev.syncing = nil
	if _, err := w.lookup(RootIno, "f"); err != nil {
		t.Fatalf("the name the interrupted unlink did not remove: %v", err)
	}
	must(t, w.Unlink(RootIno, "f"))
	must(t, w.Close())
	e2fsckClean(t, img)
}

// TestWriterContextReachesDevice: a write's context reaches the volume's
// WriteAtContext with the file data; when the volume gives up on it, the
// write changes no metadata and returns its blocks, and the writer goes on
// committing (the volume did not fail).
func TestWriterContextReachesDevice(t *testing.T) {
	img := mkfs(t, nil, "", 16)
	w, dev := openCtxDevice(t, img)
	f, err := w.Create(RootIno, "f", 0o644, 0, 0)
	must(t, err)
	type key struct{}
	ctx := context.WithValue(context.Background(), key{}, "request 7")
	var seen []any
	dev.onWrite = func(c context.Context) error {
		seen = append(seen, c.Value(key{}))
		return nil
	}
	_, err = w.WriteAtContext(ctx, f.Ino, fill(1, 10_000), 0)
	must(t, err)
	if len(seen) == 0 || seen[0] != "request 7" {
		t.Fatalf("the volume's WriteAtContext saw contexts carrying %v, want the request's", seen)
	}

	// The volume gives up: the request is interrupted while it waits.
	free := w.FS().StatFS().FreeBlocks
	cctx, cancel := context.WithCancel(ctx)
	dev.onWrite = func(c context.Context) error {
		cancel()
		<-c.Done()
		return c.Err()
	}
	n, err := w.WriteAtContext(cctx, f.Ino, fill(2, 50_000), 10_000)
	if n != 0 || !isCancelled(err, context.Canceled) {
		t.Fatalf("interrupted write: %d bytes, %v; want 0, context.Canceled and EINTR", n, err)
	}
	got, err := w.FS().Inode(f.Ino)
	must(t, err)
	if got.Size != 10_000 || w.FS().StatFS().FreeBlocks != free {
		t.Fatalf("after the interrupted write: size %d, %d blocks free; want 10000, %d", got.Size, w.FS().StatFS().FreeBlocks, free)
	}
	dev.onWrite = nil
	must(t, w.Sync()) // not a device failure: commits go on
	_, err = w.WriteAtContext(ctx, f.Ino, fill(3, 50_000), 10_000)
	must(t, err)
	must(t, w.Close())
	e2fsckClean(t, img)
	fs, _ := openImage(t, img)
	in, err := lookupPath(fs, "/f")
	must(t, err)
	if want := append(fill(1, 10_000), fill(3, 50_000)...); !bytes.Equal(readAll(t, fs, in), want) {
		t.Fatal("the file does not hold what the completed writes wrote")
	}
}
