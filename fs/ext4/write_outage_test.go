package ext4

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"syscall"
	"testing"
)

// backPressureDevice is a keepingDevice with bounded dirty memory, as the
// page-blob write-back cache has: during an outage nothing is stored, and
// once limit bytes wait for storage every further write fails with EIO
// marked ErrWriteRetryable (keeping what was taken before).
type backPressureDevice struct {
	keepingDevice
	limit, dirty int
	refused      int
}

func (d *backPressureDevice) WriteAt(p []byte, off int64) (int, error) {
	if d.outage && d.dirty+len(p) > d.limit {
		d.refused++
		return 0, fmt.Errorf("dirty memory full, storage not answering: %w (%w)", ErrWriteRetryable, syscall.EIO)
	}
	d.dirty += len(p)
	return d.keepingDevice.WriteAt(p, off)
}

func (d *backPressureDevice) Sync() error {
	if err := d.keepingDevice.Sync(); err != nil {
		return err
	}
	d.dirty = 0
	return nil
}

func newBackPressureDevice(t *testing.T, img string, limit int) *backPressureDevice {
	t.Helper()
	fh, err := os.OpenFile(img, os.O_RDWR, 0)
	must(t, err)
	t.Cleanup(func() { fh.Close() })
	mem, err := os.ReadFile(img)
	must(t, err)
	return &backPressureDevice{keepingDevice: keepingDevice{f: fh, mem: mem}, limit: limit}
}

// TestWriterResumesAfterBackPressure: during an outage writes fill the
// device's dirty memory until one fails with EIO (data writes and the
// journal's own, from commits at the end of operations); the writer is not
// stopped, and metadata changes go on until the open transaction is full
// (then one is refused whole): once storage is back the same writes, fsync
// and Close succeed,
// a failed write left no trace (e2fsck finds no leaked blocks), and the
// stored image holds every byte of every successful write.
func TestWriterResumesAfterBackPressure(t *testing.T) {
	img := mkfs(t, nil, "", 32)
	dev := newBackPressureDevice(t, img, 1<<20)
	w, err := OpenWritable(dev, int64(len(dev.mem)))
	must(t, err)
	o := writerOps{w}
	model := map[string][]byte{}
	write := func(p string, data []byte, off int64) error {
		if _, ok := model[p]; !ok {
			if err := o.create(p, 0o644); err != nil {
				return err
			}
			model[p] = nil
		}
		if err := o.writeAt(p, data, off); err != nil {
			return err
		}
		m := model[p]
		if e := int(off) + len(data); e > len(m) {
			m = append(m, make([]byte, e-len(m))...)
		}
		copy(m[off:], data)
		model[p] = m
		return nil
	}
	must(t, write("before", fill(1, 200_000), 0))
	must(t, w.Sync())

	dev.outage = true
	var failed []string // writes refused with EIO
	for i := 0; len(failed) < 8 && i < 200; i++ {
		p := fmt.Sprintf("f%d", i%6)
		var off int64
		if i%3 == 0 {
			off = 50_000 // over blocks "before"-like files already have
		}
		err := write(p, fill(uint64(10+i), 60_000), off)
		if err == nil {
			continue
		}
		if !errors.Is(err, syscall.EIO) {
			t.Fatalf("write %d during the outage: %v, want EIO", i, err)
		}
		failed = append(failed, p)
	}
	if len(failed) == 0 || dev.refused == 0 {
		t.Fatal("no write failed during the outage: the test did not fill dirty memory")
	}
	// Metadata changes go on in memory until the open transaction is full
	// and cannot be committed; then the next change is refused whole.
	var made []string
	var refused error
	for i := range 5000 {
		p := fmt.Sprintf("dir%d", i)
		if refused = o.mkdir(p, 0o755); refused != nil {
			if _, err := lookupPath(w.FS(), p); err == nil {
				t.Errorf("the refused mkdir %s is there", p)
			}
			break
		}
		made = append(made, p)
	}
	if !errors.Is(refused, syscall.EIO) || len(made) == 0 {
		t.Fatalf("mkdirs during the outage: %d made, then %v; want EIO once the transaction is full", len(made), refused)
	}
	if err := w.Sync(); !errors.Is(err, syscall.EIO) && !errors.Is(err, ErrSyncRetryable) {
		t.Fatalf("Sync during the outage: %v, want EIO", err)
	}
	if err := w.Checkpoint(); err == nil {
		t.Fatal("Checkpoint during the outage succeeded")
	}

	dev.outage = false
	for i, p := range failed {
		must(t, write(p, fill(uint64(100+i), 70_000), int64(i)*4096))
	}
	must(t, write("after", fill(7, 300_000), 0))
	must(t, w.Sync())
	must(t, w.Close())
	e2fsckClean(t, img)

	w2 := openWritable(t, img)
	for p, want := range model {
		if got, err := fileContent(t, w2, p); err != nil || !bytes.Equal(got, want) {
			t.Errorf("%s: %d bytes, %v; want the %d written", p, len(got), err, len(want))
		}
	}
	for _, p := range made {
		if _, err := lookupPath(w2.FS(), p); err != nil {
			t.Errorf("%s, made during the outage, lost: %v", p, err)
		}
	}
	t.Logf("%d writes refused during the outage (%d device writes); %d mkdirs before one was refused", len(failed), dev.refused, len(made))
}

// TestWriterCheckpointOutage: an outage in the middle of a checkpoint
// (Close, or a full log) fails it with EIO but does not stop the writer;
// a crash then recovers the last commit, and once storage is back the
// checkpoint is redone and the writer goes on, e2fsck-clean.
func TestWriterCheckpointOutage(t *testing.T) {
	img := mkfs(t, nil, "", 32)
	dev := newBackPressureDevice(t, img, 64<<10) // less than the committed blocks
	w, err := OpenWritable(dev, int64(len(dev.mem)))
	must(t, err)
	o := writerOps{w}
	for i := range 40 {
		p := fmt.Sprintf("d%d", i)
		must(t, o.mkdir(p, 0o755))
		must(t, o.create(p+"/f", 0o644))
		must(t, o.writeAt(p+"/f", fill(uint64(i), 3000), 0))
	}
	must(t, w.Sync())

	dev.outage = true
	if err := w.Close(); !errors.Is(err, syscall.EIO) {
		t.Fatalf("Close (a checkpoint) during the outage: %v, want EIO", err)
	}
	stored, err := os.ReadFile(img)
	must(t, err)
	crashed := crashImage(t, stored, "crashed.img")
	if got, err := fileContent(t, crashed, "d39/f"); err != nil || !bytes.Equal(got, fill(39, 3000)) {
		t.Errorf("crash during the checkpoint: d39/f = %d bytes, %v", len(got), err)
	}

	dev.outage = false
	must(t, o.create("after", 0o644))
	must(t, o.writeAt("after", []byte("written after the outage"), 0))
	must(t, w.Sync())
	must(t, w.Close())
	e2fsckClean(t, img)
	w2 := openWritable(t, img)
	for _, p := range []string{"d0/f", "d39/f", "after"} {
		if _, err := lookupPath(w2.FS(), p); err != nil {
			t.Errorf("%s lost: %v", p, err)
		}
	}
}
