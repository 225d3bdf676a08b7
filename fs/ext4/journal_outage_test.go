package ext4

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// commitOutageDevice is a keepingDevice whose storage stops answering
// between the journal's commit block and its acknowledgement: while
// outage is set, a Sync fails retryably (keeping every write) once a
// commit block was written since the last good one.
type commitOutageDevice struct {
	keepingDevice
	commitOutage bool
	sawCommit    bool
	failedSyncs  int
}

func (d *commitOutageDevice) WriteAt(p []byte, off int64) (int, error) {
	if len(p) >= 12 && be.Uint32(p) == jbd2Magic && be.Uint32(p[4:]) == jBlockCommit {
		d.sawCommit = true
	}
	return d.keepingDevice.WriteAt(p, off)
}

func (d *commitOutageDevice) Sync() error {
	if d.commitOutage && d.sawCommit {
		d.failedSyncs++
		return fmt.Errorf("storage did not acknowledge the flush: %w", ErrSyncRetryable)
	}
	d.sawCommit = false
	return d.keepingDevice.Sync()
}

// crashImage writes what storage would hold after a crash to a file and
// opens it as the next mount would (replaying the journal), checks that
// e2fsck finds it clean once checkpointed, and returns the reopened image.
func crashImage(t *testing.T, stored []byte, name string) *Writer {
	t.Helper()
	img := filepath.Join(t.TempDir(), name)
	must(t, os.WriteFile(img, stored, 0o600))
	w := openWritable(t, img)
	must(t, w.Checkpoint())
	e2fsckClean(t, img)
	return openWritable(t, img)
}

func fileContent(t *testing.T, w *Writer, p string) ([]byte, error) {
	t.Helper()
	in, err := lookupPath(w.FS(), p)
	if err != nil {
		return nil, err
	}
	b := make([]byte, in.Size)
	_, err = w.FS().ReadAt(in, b, 0)
	return b, err
}

// TestWriterCommitOutage: an outage after the commit block was written
// makes that Sync fail with EIO but does not stop the writer; a crash at
// that point recovers to a consistent state with or without the
// transaction; once storage answers again the next Sync makes everything
// durable and the writer goes on, and the image is e2fsck-clean.
func TestWriterCommitOutage(t *testing.T) {
	img := mkfs(t, nil, "", 16)
	fh, err := os.OpenFile(img, os.O_RDWR, 0)
	must(t, err)
	defer fh.Close()
	mem, err := os.ReadFile(img)
	must(t, err)
	dev := &commitOutageDevice{keepingDevice: keepingDevice{f: fh, mem: mem}}
	w, err := OpenWritable(dev, int64(len(mem)))
	must(t, err)
	o := writerOps{w}
	synced := []byte("acknowledged before the outage")
	during := fill(3, 50_000)
	must(t, o.create("before", 0o644))
	must(t, o.writeAt("before", synced, 0))
	must(t, w.Sync())

	dev.commitOutage = true
	must(t, o.create("during", 0o644))
	must(t, o.writeAt("during", during, 0))
	must(t, o.unlink("before")) // its blocks must not be reused before this commit is durable
	err = w.Sync()
	if !errors.Is(err, ErrSyncRetryable) || !errors.Is(err, syscall.EIO) {
		t.Fatalf("Sync with the commit unacknowledged: %v, want EIO and ErrSyncRetryable", err)
	}
	if dev.failedSyncs != 1 {
		t.Fatalf("%d syncs failed, want exactly the one after the commit block", dev.failedSyncs)
	}

	// A crash now: storage holds either what the last good sync stored or
	// (had the acknowledgement only been lost) everything written.
	stored, err := os.ReadFile(img)
	must(t, err)
	old := crashImage(t, stored, "acknowledged.img")
	if got, err := fileContent(t, old, "before"); err != nil || !bytes.Equal(got, synced) {
		t.Errorf("crash before the commit is durable: before = %q, %v; want %q", got, err, synced)
	}
	if _, err := lookupPath(old.FS(), "during"); err == nil {
		t.Error("crash before the commit is durable: during exists, but its commit never reached storage")
	}
	all := crashImage(t, bytes.Clone(dev.mem), "everything.img")
	if got, err := fileContent(t, all, "during"); err != nil || !bytes.Equal(got, during) {
		t.Errorf("crash after the commit reached storage: during = %d bytes, %v; want the %d written", len(got), err, len(during))
	}
	if _, err := lookupPath(all.FS(), "before"); err == nil {
		t.Error("crash after the commit reached storage: before still exists after its unlink committed")
	}

	// Still in the outage: further syncs fail the same way, nothing is lost.
	must(t, o.create("still", 0o644))
	if err := w.Sync(); !errors.Is(err, ErrSyncRetryable) {
		t.Fatalf("second Sync during the outage: %v, want ErrSyncRetryable", err)
	}

	dev.commitOutage = false
	must(t, o.mkdir("after", 0o755))
	must(t, w.Sync()) // storage is back: everything becomes durable
	more := fill(4, 9000)
	must(t, o.writeAt("during", more, int64(len(during))))
	must(t, w.Sync()) // and the writer goes on
	must(t, w.Close())
	e2fsckClean(t, img)

	w2 := openWritable(t, img)
	if got, err := fileContent(t, w2, "during"); err != nil || !bytes.Equal(got, append(bytes.Clone(during), more...)) {
		t.Errorf("after the outage: during = %d bytes, %v; want %d", len(got), err, len(during)+len(more))
	}
	for _, p := range []string{"still", "after"} {
		if _, err := lookupPath(w2.FS(), p); err != nil {
			t.Errorf("%s lost: %v", p, err)
		}
	}
	if _, err := lookupPath(w2.FS(), "before"); err == nil {
		t.Error("before survived its unlink")
	}
}
