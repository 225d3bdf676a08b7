package ext4

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"sync"
	"syscall"
	"testing"

	"github.com/blobseal/blobseal/internal/testenv"
)

// cuttingDevice is an image file that loses power: after writeBudget
// writes (the last one torn after its first 4 KiB, the unit a page-cache
// write or a drive's physical sector keeps whole) or after syncBudget
// syncs, every later write and sync is silently dropped.
type cuttingDevice struct {
	f           *os.File
	mu          sync.Mutex
	writeBudget int
	syncBudget  int
	writes      int
	cut         bool
}

var _ Device = (*cuttingDevice)(nil)

func (d *cuttingDevice) ReadAt(p []byte, off int64) (int, error) { return d.f.ReadAt(p, off) }

func (d *cuttingDevice) WriteAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cut {
		return len(p), nil
	}
	d.writes++
	if d.writes == d.writeBudget {
		d.cut = true
		if len(p) > 4096 {
			d.f.WriteAt(p[:4096], off) // torn: only the first 4 KiB lands
		}
		return len(p), nil
	}
	return d.f.WriteAt(p, off)
}

func (d *cuttingDevice) Sync() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cut {
		return nil
	}
	if d.syncBudget--; d.syncBudget == 0 {
		d.cut = true
	}
	return d.f.Sync()
}

func (d *cuttingDevice) isCut() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.cut
}

// crashWorkload runs creates, writes, renames, unlinks and truncates with a
// Sync now and then (every third a Checkpoint, with checkpoints), and returns what the last Sync that completed before
// the cut made durable: path → content, for the files not changed since.
func crashWorkload(t *testing.T, w *Writer, dev *cuttingDevice, checkpoints bool) map[string][]byte {
	o := writerOps{w}
	model := map[string][]byte{}
	durable := map[string][]byte{}
	touched := map[string]bool{}
	r := rand.New(rand.NewPCG(42, 7))
	step := func(err error) bool { return err == nil || dev.isCut() }
	if !step(o.mkdir("d", 0o755)) {
		t.Fatal("mkdir d failed before the cut")
	}
	for i := 0; i < 40 && !dev.isCut(); i++ {
		p := fmt.Sprintf("d/f%02d", i)
		data := fill(uint64(i), r.IntN(60_000)+1)
		if err := o.create(p, 0o644); !step(err) {
			t.Fatalf("create %s: %v", p, err)
		}
		if err := o.writeAt(p, data, 0); !step(err) {
			t.Fatalf("write %s: %v", p, err)
		}
		model[p], touched[p] = data, true
		if i%5 == 4 {
			q := fmt.Sprintf("d/f%02d", i-3)
			if err := o.unlink(q); !step(err) {
				t.Fatalf("unlink %s: %v", q, err)
			}
			delete(model, q)
			touched[q] = true
		}
		if i%7 == 6 {
			q := fmt.Sprintf("d/f%02d", i-1)
			if _, ok := model[q]; ok {
				if err := o.truncate(q, 1000); !step(err) {
					t.Fatalf("truncate %s: %v", q, err)
				}
				model[q] = model[q][:min(1000, len(model[q]))]
				touched[q] = true
			}
		}
		if i%4 == 3 {
			sync := w.Sync
			if checkpoints && i%12 == 11 {
				sync = w.Checkpoint // cuts land in checkpoints too
			}
			err := sync()
			if dev.isCut() {
				break
			}
			if err != nil {
				t.Fatalf("Sync: %v", err)
			}
			durable = map[string][]byte{}
			for k, v := range model {
				durable[k] = v
			}
			touched = map[string]bool{}
		}
	}
	for k := range touched {
		delete(durable, k)
	}
	return durable
}

// checkDurable checks that every durable file reads back intact.
func checkDurable(t *testing.T, f *FS, durable map[string][]byte) {
	t.Helper()
	for p, want := range durable {
		in, err := lookupPath(f, p)
		if err != nil {
			t.Errorf("%s: synced before the crash but lost: %v", p, err)
			continue
		}
		if got := readAll(t, f, in); !bytes.Equal(got, want) {
			t.Errorf("%s: synced content differs after the crash (%d bytes, want %d)", p, len(got), len(want))
		}
	}
}

// TestCrashRecovery cuts the power at many points of a workload (the
// write that is cut is torn), then recovers: the filesystem must be
// e2fsck-clean and every file synced before the cut intact.
func TestCrashRecovery(t *testing.T) {
	base := mkfs(t, nil, "", 32)
	// An uncut run counts the writes.
	img := copyFile(t, base)
	fh, err := os.OpenFile(img, os.O_RDWR, 0)
	must(t, err)
	dev := &cuttingDevice{f: fh, writeBudget: -1, syncBudget: -1}
	w, err := OpenWritable(dev, 32<<20)
	must(t, err)
	crashWorkload(t, w, dev, true)
	must(t, w.Sync())
	fh.Close()
	total := dev.writes
	seed := testSeed(t, "EXT4_CRASH_SEED", 0x5eed_0002)
	t.Logf("%d writes in the workload; cut points from seed %d (rerun with EXT4_CRASH_SEED=%d)", total, seed, seed)
	r := rand.New(rand.NewPCG(seed, 1))
	points := []int{1, 2, total / 2, total - 1}
	for i := 0; i < 12; i++ {
		points = append(points, 1+r.IntN(total))
	}
	for _, k := range points {
		t.Run(fmt.Sprintf("cut-at-write-%d", k), func(t *testing.T) {
			img := copyFile(t, base)
			fh, err := os.OpenFile(img, os.O_RDWR, 0)
			must(t, err)
			defer fh.Close()
			dev := &cuttingDevice{f: fh, writeBudget: k, syncBudget: -1}
			w, err := OpenWritable(dev, 32<<20)
			must(t, err)
			durable := crashWorkload(t, w, dev, true)
			fh.Close()
			w2 := openWritable(t, img)
			e2fsckClean(t, img)
			checkDurable(t, w2.FS(), durable)
			t.Logf("%d synced files checked, %d transactions replayed", len(durable), w2.ReplayedTransactions())
		})
	}
}

// TestKernelReplaysOurJournal stops the power right after the fourth
// commit is durable, with nothing checkpointed: the kernel must replay our
// transactions to the same tree our recovery builds, e2fsck-clean, with the
// synced files.
func TestKernelReplaysOurJournal(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTools(t, "mount", "umount")
	for _, v := range []struct {
		name string
		args []string
	}{{"csum_v3-1k", nil}, {"csum_v3-4k", []string{"-b", "4096"}}, {"no-csum", []string{"-O", "^metadata_csum"}}} {
		t.Run(v.name, func(t *testing.T) {
			img := mkfs(t, nil, "", 32, v.args...)
			fh, err := os.OpenFile(img, os.O_RDWR, 0)
			must(t, err)
			// Each Sync is a barrier, the commit and a final flush; the cut
			// comes after the 4th commit.
			dev := &cuttingDevice{f: fh, writeBudget: -1, syncBudget: 3*3 + 2}
			w, err := OpenWritable(dev, 32<<20)
			must(t, err)
			durable := crashWorkload(t, w, dev, false)
			fh.Close()
			if !dev.isCut() {
				t.Fatal("the workload ended before the cut")
			}
			byKernel := copyFile(t, img)
			if _, err := Open(mustOpen(t, byKernel)); err == nil {
				t.Fatal("the crashed image does not need recovery; the test cannot check the kernel's replay")
			}
			kernelMountCycle(t, byKernel)
			e2fsckClean(t, byKernel)
			w2 := openWritable(t, img)
			if w2.ReplayedTransactions() < 4 {
				t.Errorf("our recovery replayed %d transactions, want the 4 committed before the cut", w2.ReplayedTransactions())
			}
			e2fsckClean(t, img)
			compareTrees(t, mountCopy(t, byKernel), mountCopy(t, img))
			kf, _ := openImage(t, byKernel)
			checkDurable(t, kf, durable)
			if len(durable) == 0 {
				t.Error("no synced file to check")
			}
		})
	}
}

// failingDevice returns errors for every write and sync once failing is set.
type failingDevice struct {
	*os.File
	failing bool
}

var _ Device = (*failingDevice)(nil)

func (d *failingDevice) WriteAt(p []byte, off int64) (int, error) {
	if d.failing {
		return 0, errors.New("injected device error")
	}
	return d.File.WriteAt(p, off)
}

func (d *failingDevice) Sync() error {
	if d.failing {
		return errors.New("injected device error")
	}
	return d.File.Sync()
}

// TestWriterStopsAfterDeviceError: once the device fails, nothing more is
// committed, even when it works again; reopening recovers the last
// commit, e2fsck-clean.
func TestWriterStopsAfterDeviceError(t *testing.T) {
	img := mkfs(t, nil, "", 16)
	fh, err := os.OpenFile(img, os.O_RDWR, 0)
	must(t, err)
	defer fh.Close()
	dev := &failingDevice{File: fh}
	w, err := OpenWritable(dev, 16<<20)
	must(t, err)
	o := writerOps{w}
	must(t, o.create("kept", 0o644))
	must(t, o.writeAt("kept", []byte("synced"), 0))
	must(t, w.Sync())
	dev.failing = true
	must(t, o.create("lost", 0o644))
	if err := o.writeAt("lost", []byte("data"), 0); err == nil {
		t.Fatal("a data write to a failing device succeeded")
	}
	dev.failing = false
	must(t, o.mkdir("also-lost", 0o755))
	if err := w.Sync(); !errors.Is(err, syscall.EIO) {
		t.Fatalf("Sync after a device error: %v, want EIO", err)
	}
	w2 := openWritable(t, img)
	if _, err := lookupPath(w2.FS(), "kept"); err != nil {
		t.Errorf("synced file lost: %v", err)
	}
	for _, p := range []string{"lost", "also-lost"} {
		if _, err := lookupPath(w2.FS(), p); err == nil {
			t.Errorf("%s, created after the device error, was committed", p)
		}
	}
	must(t, w2.Checkpoint())
	e2fsckClean(t, img)
}

// keepingDevice is a write-back device: writes stay in memory until a Sync
// stores them all in the file. During an outage Sync fails with
// ErrSyncRetryable and keeps them, as the page-blob write-back cache does.
type keepingDevice struct {
	f      *os.File
	mem    []byte
	outage bool
}

func (d *keepingDevice) ReadAt(p []byte, off int64) (int, error) { return copy(p, d.mem[off:]), nil }

func (d *keepingDevice) WriteAt(p []byte, off int64) (int, error) { return copy(d.mem[off:], p), nil }

func (d *keepingDevice) Sync() error {
	if d.outage {
		return fmt.Errorf("storage did not answer: %w", ErrSyncRetryable)
	}
	if _, err := d.f.WriteAt(d.mem, 0); err != nil {
		return err
	}
	return d.f.Sync()
}

// TestWriterRetriesKeptSync: a Sync that failed with ErrSyncRetryable
// (nothing lost) does not stop the writer: once the device works again the
// next Sync commits everything, including what was written during the
// outage, and the stored image is e2fsck-clean.
func TestWriterRetriesKeptSync(t *testing.T) {
	img := mkfs(t, nil, "", 16)
	fh, err := os.OpenFile(img, os.O_RDWR, 0)
	must(t, err)
	defer fh.Close()
	mem, err := os.ReadFile(img)
	must(t, err)
	dev := &keepingDevice{f: fh, mem: mem}
	w, err := OpenWritable(dev, int64(len(mem)))
	must(t, err)
	o := writerOps{w}
	must(t, o.create("before", 0o644))
	must(t, o.writeAt("before", []byte("synced"), 0))
	must(t, w.Sync())
	dev.outage = true
	must(t, o.create("during", 0o644))
	must(t, o.writeAt("during", []byte("kept through the outage"), 0))
	if err := w.Sync(); !errors.Is(err, ErrSyncRetryable) {
		t.Fatalf("Sync during the outage: %v, want ErrSyncRetryable", err)
	}
	dev.outage = false
	must(t, o.mkdir("after", 0o755))
	must(t, w.Sync())

	w2 := openWritable(t, img) // what the file holds: only what Sync stored
	for _, p := range []string{"before", "during", "after"} {
		if _, err := lookupPath(w2.FS(), p); err != nil {
			t.Errorf("%s lost: %v", p, err)
		}
	}
	must(t, w2.Checkpoint())
	e2fsckClean(t, img)
}
