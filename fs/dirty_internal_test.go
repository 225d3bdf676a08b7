package fs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/blobseal/blobseal/fs/ext4"
	"github.com/blobseal/blobseal/internal/testenv"
)

// TestDirtyRunsMergeLikeAFlatFile: random writes merged into runs hold
// exactly what the same writes leave in a flat buffer, the runs stay
// sorted and disjoint, and the accounted capacity is what the runs hold.
func TestDirtyRunsMergeLikeAFlatFile(t *testing.T) {
	const size, runCap = 1 << 20, 256 << 10
	for seed := range uint64(8) {
		rng := rand.New(rand.NewPCG(seed, 1))
		flat := make([]byte, size)
		written := make([]bool, size)
		f := &dirtyFile{}
		var accounted int64
		for step := range 120 {
			var off, n int
			switch rng.IntN(3) {
			case 0: // the next piece of a stream
				if len(f.runs) > 0 {
					off = int(f.runs[len(f.runs)-1].end())
				}
				n = streamingWrite
			case 1: // small and anywhere
				off, n = rng.IntN(size-4096), 1+rng.IntN(4096)
			default: // large and anywhere: spans runs
				off, n = rng.IntN(size/2), 1+rng.IntN(size/2)
			}
			if off+n > size {
				continue
			}
			data := make([]byte, n)
			for i := range data {
				data[i] = byte(rng.Uint32())
			}
			accounted += f.add(data, int64(off), runCap, func(c int) ([]byte, int64) { return make([]byte, 0, c), int64(c) })
			copy(flat[off:], data)
			for i := off; i < off+n; i++ {
				written[i] = true
			}

			got := make([]byte, size)
			covered := make([]bool, size)
			var capSum, end int64
			for i, r := range f.runs {
				if i > 0 && r.off < f.runs[i-1].end() {
					t.Fatalf("seed %d step %d: run %d at %d overlaps the one before (ends %d)", seed, step, i, r.off, f.runs[i-1].end())
				}
				copy(got[r.off:], r.data)
				for j := r.off; j < r.end(); j++ {
					covered[j] = true
				}
				capSum += int64(cap(r.data))
				end = max(end, r.end())
			}
			if !slices.Equal(covered, written) {
				t.Fatalf("seed %d step %d: the runs cover other bytes than were written", seed, step)
			}
			for i := range got {
				if written[i] && got[i] != flat[i] {
					t.Fatalf("seed %d step %d: byte %d is %d, want %d", seed, step, i, got[i], flat[i])
				}
			}
			if capSum != accounted || capSum != f.bytes {
				t.Fatalf("seed %d step %d: runs hold %d bytes of capacity, accounted %d, file says %d", seed, step, capSum, accounted, f.bytes)
			}
			if f.end != end {
				t.Fatalf("seed %d step %d: end %d, runs end at %d", seed, step, f.end, end)
			}
		}
	}
}

// TestDirtyCacheStaysWithinItsBound: writers putting eight times the
// bound through the cache into a real ext4 Writer never find more than
// the bound held (they wait for the background flusher instead), and once
// flushed every file holds exactly what was written.
func TestDirtyCacheStaysWithinItsBound(t *testing.T) {
	tools := testenv.RequireTools(t, "mkfs.ext4")
	img := filepath.Join(t.TempDir(), "bound.ext4")
	if out, err := exec.Command(tools[0], "-q", "-F", "-b", "4096", img, "128M").CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v: %s", err, out)
	}
	dev, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	st, err := dev.Stat()
	if err != nil {
		t.Fatal(err)
	}
	w, err := ext4.OpenWritable(dev, st.Size())
	if err != nil {
		t.Fatal(err)
	}
	c := newDirtyCache(w, minDirtyLimit, slog.New(slog.DiscardHandler))
	defer c.close()

	const writers, perFile = 4, 8 << 20
	var peak atomic.Int64
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			c.mu.Lock()
			used := c.used
			c.mu.Unlock()
			if used > peak.Load() {
				peak.Store(used)
			}
			select {
			case <-stop:
				return
			default:
				runtime.Gosched()
			}
		}
	}()
	want := make([][]byte, writers)
	inos := make([]uint32, writers)
	var wg sync.WaitGroup
	for i := range writers {
		in, err := w.Create(ext4.RootIno, fmt.Sprintf("f%d", i), 0o644, 0, 0)
		if err != nil {
			t.Fatal(err)
		}
		inos[i] = in.Ino
		want[i] = make([]byte, perFile)
		rng := rand.New(rand.NewPCG(uint64(i), 2))
		for j := range want[i] {
			want[i][j] = byte(rng.Uint32())
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Sequential pieces of varying size, then overwrites anywhere.
			for off := 0; off < perFile; {
				n := min(perFile-off, 4096+rng.IntN(1<<20))
				if err := c.write(inos[i], want[i][off:off+n], int64(off)); err != nil {
					t.Errorf("write: %v", err)
					return
				}
				off += n
			}
			for range 50 {
				off := rng.IntN(perFile - 8192)
				if err := c.write(inos[i], want[i][off:off+8192], int64(off)); err != nil {
					t.Errorf("overwrite: %v", err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(stop)
	<-sampled
	if p := peak.Load(); p > c.limit || p == 0 {
		t.Errorf("peak dirty memory %d bytes, bound %d", p, c.limit)
	}
	if err := c.flushAll(); err != nil {
		t.Fatal(err)
	}
	c.trim()
	c.mu.Lock()
	used, files := c.used, len(c.files)
	c.mu.Unlock()
	if used != 0 || files != 0 {
		t.Errorf("after flushing: %d bytes accounted, %d files tracked", used, files)
	}
	tree := writerTree{w: w, dirty: c}
	for i, ino := range inos {
		in, err := tree.Inode(ino)
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, perFile)
		if n, err := tree.ReadAtContext(context.Background(), in, got, 0); n != perFile || (err != nil && !errors.Is(err, io.EOF)) {
			t.Fatalf("file %d: read %d bytes, %v", i, n, err)
		}
		if !bytes.Equal(got, want[i]) || in.Size != perFile {
			t.Errorf("file %d: size %d, content equal %t", i, in.Size, bytes.Equal(got, want[i]))
		}
	}
}
