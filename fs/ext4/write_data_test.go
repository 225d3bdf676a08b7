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
	"time"
)

// gateDevice is an image file whose first write into [start, end) waits
// until released, and which reports 512-byte sectors.
type gateDevice struct {
	*os.File
	mu         sync.Mutex
	start, end int64
	entered    chan struct{} // gets a value when the gated write arrives
	release    chan struct{} // closed to let it through; nil once used
}

var (
	_ Device      = (*gateDevice)(nil)
	_ sectorSizer = (*gateDevice)(nil)
)

func (d *gateDevice) SectorSize() int { return 512 }

func (d *gateDevice) WriteAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	rel := d.release
	gated := rel != nil && off >= d.start && off < d.end
	if gated {
		d.release = nil
	}
	d.mu.Unlock()
	if gated {
		d.entered <- struct{}{}
		<-rel
	}
	return d.File.WriteAt(p, off)
}

// within fails the test unless fn returns within a generous bound.
func within(t *testing.T, what string, fn func() error) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- fn() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("%s did not finish while a data write was in the volume", what)
	}
}

// stillRunning fails the test if ch delivers within a short wait.
func stillRunning(t *testing.T, what string, ch <-chan error) {
	t.Helper()
	select {
	case err := <-ch:
		t.Fatalf("%s finished (%v) while it should wait for the write in flight", what, err)
	case <-time.After(200 * time.Millisecond):
	}
}

// TestWriterOverwriteOutsideLock: while an overwrite of a file's blocks
// is in the volume, other changes and reads go on; a second write to the
// same file and a commit wait for it; everything lands.
func TestWriterOverwriteOutsideLock(t *testing.T) {
	img := mkfs(t, nil, "", 16, "-b", "1024")
	fh, err := os.OpenFile(img, os.O_RDWR, 0)
	must(t, err)
	t.Cleanup(func() { fh.Close() })
	st, err := fh.Stat()
	must(t, err)
	dev := &gateDevice{File: fh}
	w, err := OpenWritable(dev, st.Size())
	must(t, err)
	if !w.concurrentData {
		t.Fatal("a volume with 512-byte sectors under 1 KiB blocks should allow concurrent data writes")
	}
	x, err := w.Create(RootIno, "x", 0o644, 0, 0)
	must(t, err)
	y, err := w.Create(RootIno, "y", 0o644, 0, 0)
	must(t, err)
	wantX, wantY := fill(1, 64<<10), fill(2, 64<<10)
	_, err = w.WriteAt(x.Ino, wantX, 0)
	must(t, err)
	_, err = w.WriteAt(y.Ino, wantY, 0)
	must(t, err)
	must(t, w.Sync())
	var runs []run
	must(t, w.View(func(f *FS) error {
		in, err := f.Inode(x.Ino)
		if err == nil {
			runs, err = f.mapBlocks(in, 0, 1)
		}
		return err
	}))
	bs := int64(w.FS().BlockSize())
	dev.mu.Lock()
	dev.start, dev.end = int64(runs[0].pblk)*bs, int64(runs[0].pblk+1)*bs
	dev.entered, dev.release = make(chan struct{}), make(chan struct{})
	release := dev.release
	dev.mu.Unlock()

	first := make(chan error, 1)
	go func() {
		_, err := w.WriteAt(x.Ino, fill(3, 1000), 100)
		first <- err
	}()
	<-dev.entered // the overwrite is in the volume
	copy(wantX[100:], fill(3, 1000))

	within(t, "create, mkdir, rename, unlink", func() error {
		if _, err := w.Create(RootIno, "other", 0o644, 0, 0); err != nil {
			return err
		}
		d, err := w.Mkdir(RootIno, "d", 0o755, 0, 0)
		if err != nil {
			return err
		}
		if err := w.Rename(RootIno, "other", d.Ino, "moved", 0); err != nil {
			return err
		}
		return w.Unlink(d.Ino, "moved")
	})
	within(t, "writes to another file", func() error {
		if _, err := w.WriteAt(y.Ino, fill(4, 3000), 5000); err != nil { // in place
			return err
		}
		_, err := w.WriteAt(y.Ino, fill(5, 3000), 64<<10) // extending
		return err
	})
	copy(wantY[5000:], fill(4, 3000))
	wantY = append(wantY, fill(5, 3000)...)
	within(t, "reading another file", func() error {
		return w.View(func(f *FS) error {
			in, err := f.Inode(y.Ino)
			if err != nil {
				return err
			}
			got := make([]byte, len(wantY))
			if _, err := f.ReadAt(in, got, 0); err != nil {
				return err
			}
			if !bytes.Equal(got, wantY) {
				return fmt.Errorf("y reads other bytes than written")
			}
			return nil
		})
	})

	second := make(chan error, 1)
	go func() {
		_, err := w.WriteAt(x.Ino, fill(6, 1000), 30<<10) // another block of x
		second <- err
	}()
	stillRunning(t, "a second write to the same file", second)
	synced := make(chan error, 1)
	go func() { synced <- w.Sync() }()
	stillRunning(t, "a commit", synced)
	copy(wantX[30<<10:], fill(6, 1000))

	close(release)
	for _, c := range []struct {
		what string
		ch   chan error
	}{{"first write", first}, {"second write", second}, {"sync", synced}} {
		if err := <-c.ch; err != nil {
			t.Fatalf("%s: %v", c.what, err)
		}
	}
	must(t, w.Close())
	e2fsckClean(t, img)
	f, _ := openImage(t, img)
	for name, want := range map[string][]byte{"/x": wantX, "/y": wantY} {
		in, err := lookupPath(f, name)
		must(t, err)
		if !bytes.Equal(readAll(t, f, in), want) {
			t.Errorf("%s does not hold what was written", name)
		}
	}
}

// TestWriterConcurrentData runs overwrites of several files, two writers
// sharing one file, truncates, namespace changes and commits at once
// (run it with -race); every file ends as its writers left it and the
// image is e2fsck-clean.
func TestWriterConcurrentData(t *testing.T) {
	img := mkfs(t, nil, "", 32, "-b", "1024")
	w := openWritable(t, img)
	if !w.concurrentData {
		t.Fatal("an image file should allow concurrent data writes")
	}
	const size = 128 << 10
	type file struct {
		ino  uint32
		want []byte
	}
	newFile := func(name string, seed uint64) *file {
		in, err := w.Create(RootIno, name, 0o644, 0, 0)
		must(t, err)
		f := &file{ino: in.Ino, want: fill(seed, size)}
		_, err = w.WriteAt(in.Ino, f.want, 0)
		must(t, err)
		return f
	}
	var owned []*file
	for i := range 3 {
		owned = append(owned, newFile(fmt.Sprintf("owned%d", i), uint64(i)))
	}
	shared := newFile("shared", 10) // two writers, each on its half
	trunc := newFile("trunc", 11)   // overwrites and truncates, one writer
	churn, err := w.Mkdir(RootIno, "churn", 0o755, 0, 0)
	must(t, err)
	must(t, w.Sync())

	readBack := func(ino uint32, n int) []byte {
		got := make([]byte, n)
		must(t, w.View(func(f *FS) error {
			in, err := f.Inode(ino)
			if err != nil {
				return err
			}
			if in.Size != uint64(n) {
				return fmt.Errorf("inode %d has size %d, want %d", ino, in.Size, n)
			}
			_, err = f.ReadAt(in, got, 0)
			return err
		}))
		return got
	}
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	overwrite := func(f *file, lo, hi int, seed uint64, check bool) {
		defer wg.Done()
		r := rand.New(rand.NewPCG(seed, 1))
		for i := 0; i < 120; i++ {
			off := lo + r.IntN(hi-lo-1)
			n := 1 + r.IntN(min(9000, hi-off))
			data := fill(seed*1000+uint64(i), n)
			if _, err := w.WriteAt(f.ino, data, int64(off)); err != nil {
				errs <- err
				return
			}
			copy(f.want[off:], data)
			if check && i%20 == 0 && !bytes.Equal(readBack(f.ino, len(f.want)), f.want) {
				errs <- fmt.Errorf("inode %d reads other bytes than written after write %d", f.ino, i)
				return
			}
		}
	}
	for i, f := range owned {
		wg.Add(1)
		go overwrite(f, 0, size, uint64(100+i), true)
	}
	wg.Add(2)
	go overwrite(shared, 0, size/2, 200, false)
	go overwrite(shared, size/2, size, 201, false)
	wg.Add(1)
	go func() { // truncates race nothing but the file's own writes
		defer wg.Done()
		r := rand.New(rand.NewPCG(300, 1))
		for i := 0; i < 60; i++ {
			if i%3 == 0 {
				n := r.IntN(size)
				if err := w.Truncate(trunc.ino, uint64(n)); err != nil {
					errs <- err
					return
				}
				trunc.want = trunc.want[:n]
				continue
			}
			off := r.IntN(len(trunc.want) + 1)
			data := fill(uint64(400+i), 1+r.IntN(6000))
			if _, err := w.WriteAt(trunc.ino, data, int64(off)); err != nil {
				errs <- err
				return
			}
			if end := off + len(data); end > len(trunc.want) {
				trunc.want = append(trunc.want, make([]byte, end-len(trunc.want))...)
			}
			copy(trunc.want[off:], data)
		}
	}()
	stop := make(chan struct{})
	var bg sync.WaitGroup
	bg.Add(2)
	go func() { // namespace changes in their own directory
		defer bg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			name := fmt.Sprintf("f%d", i%50)
			if in, err := w.Create(churn.Ino, name, 0o644, 0, 0); err == nil {
				_, err = w.WriteAt(in.Ino, fill(uint64(i), 3000), 0)
				if err == nil && i%2 == 0 {
					err = w.Unlink(churn.Ino, name)
				}
				if err != nil {
					errs <- err
					return
				}
			}
		}
	}()
	go func() { // commits
		defer bg.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(2 * time.Millisecond):
				if err := w.Sync(); err != nil {
					errs <- err
					return
				}
			}
		}
	}()
	wg.Wait()
	close(stop)
	bg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	for _, f := range append(owned, shared, trunc) {
		if !bytes.Equal(readBack(f.ino, len(f.want)), f.want) {
			t.Errorf("inode %d does not hold what its writers wrote", f.ino)
		}
	}
	must(t, w.Close())
	e2fsckClean(t, img)
}

// TestWriterAllocHintsReuse: searches start past the blocks and inodes in
// use, yet what is freed anywhere is found again: a full filesystem with
// every third file deleted fills up again to the same free counts.
func TestWriterAllocHintsReuse(t *testing.T) {
	img := mkfs(t, nil, "", 4, "-b", "1024", "-N", "256")
	w := openWritable(t, img)
	fillUp := func(prefix string) []string {
		var names []string
		for i := 0; ; i++ {
			name := fmt.Sprintf("%s%d", prefix, i)
			in, err := w.Create(RootIno, name, 0o644, 0, 0)
			if errors.Is(err, syscall.ENOSPC) {
				return names
			}
			must(t, err)
			names = append(names, name)
			if _, err := w.WriteAt(in.Ino, fill(uint64(i), 20_000), 0); errors.Is(err, syscall.ENOSPC) {
				return names
			} else if err != nil {
				t.Fatal(err)
			}
		}
	}
	names := fillUp("a")
	full := w.FS().StatFS()
	if len(names) < 30 {
		t.Fatalf("only %d files fit; the test needs more", len(names))
	}
	for i := 0; i < len(names); i += 3 {
		must(t, w.Unlink(RootIno, names[i]))
	}
	must(t, w.Sync())
	again := fillUp("b")
	refull := w.FS().StatFS()
	if refull.FreeBlocks > full.FreeBlocks+20 || refull.FreeInodes > full.FreeInodes+1 {
		t.Fatalf("refilled to %d blocks, %d inodes free (with %d new files); first fill left %d, %d",
			refull.FreeBlocks, refull.FreeInodes, len(again), full.FreeBlocks, full.FreeInodes)
	}
	must(t, w.Close())
	e2fsckClean(t, img)
}
