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

// flatModel is what a file's dirty runs must amount to: the bytes
// written so far, laid out flat.
type flatModel struct {
	f         *dirtyFile
	runCap    int
	flat      []byte
	written   []bool
	accounted int64
}

func newFlatModel(size, runCap int) *flatModel {
	return &flatModel{f: &dirtyFile{}, runCap: runCap, flat: make([]byte, size), written: make([]bool, size)}
}

func (m *flatModel) write(data []byte, off int) {
	m.accounted += m.f.add(data, int64(off), m.runCap, func(c int) ([]byte, int64) { return make([]byte, 0, c), int64(c) })
	copy(m.flat[off:], data)
	for i := off; i < off+len(data); i++ {
		m.written[i] = true
	}
}

// check fails unless the runs are sorted and disjoint, cover exactly the
// bytes written, hold their latest values, and are accounted exactly.
func (m *flatModel) check(t testing.TB, where string) {
	t.Helper()
	covered := make([]bool, len(m.flat))
	var capSum, end int64
	for i, r := range m.f.runs {
		if i > 0 && r.off < m.f.runs[i-1].end() {
			t.Fatalf("%s: run %d at %d overlaps the one before (ends %d)", where, i, r.off, m.f.runs[i-1].end())
		}
		if !bytes.Equal(r.data, m.flat[r.off:r.end()]) {
			t.Fatalf("%s: run at %d (%d bytes) holds other bytes than were written there", where, r.off, len(r.data))
		}
		for j := r.off; j < r.end(); j++ {
			covered[j] = true
		}
		capSum += int64(cap(r.data))
		end = max(end, r.end())
	}
	if !slices.Equal(covered, m.written) {
		t.Fatalf("%s: the runs cover other bytes than were written", where)
	}
	if capSum != m.accounted || capSum != m.f.bytes {
		t.Fatalf("%s: runs hold %d bytes of capacity, accounted %d, file says %d", where, capSum, m.accounted, m.f.bytes)
	}
	if m.f.end != end {
		t.Fatalf("%s: end %d, runs end at %d", where, m.f.end, end)
	}
}

// TestDirtyRunsMergeLikeAFlatFile: random writes merged into runs hold
// exactly what the same writes leave in a flat buffer, the runs stay
// sorted and disjoint, and the accounted capacity is what the runs hold.
func TestDirtyRunsMergeLikeAFlatFile(t *testing.T) {
	const size, runCap = 1 << 20, 256 << 10
	for seed := range uint64(8) {
		rng := rand.New(rand.NewPCG(seed, 1))
		m := newFlatModel(size, runCap)
		for step := range 120 {
			var off, n int
			switch rng.IntN(3) {
			case 0: // the next piece of a stream
				if len(m.f.runs) > 0 {
					off = int(m.f.runs[len(m.f.runs)-1].end())
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
			m.write(data, off)
			m.check(t, fmt.Sprintf("seed %d step %d", seed, step))
		}
	}
}

// FuzzDirtyRunsMerge: any sequence of writes (6 bytes each: a stream flag
// and offset in 3, a length in 2, a fill in 1) merges into runs that
// match the flat model.
func FuzzDirtyRunsMerge(f *testing.F) {
	f.Add([]byte{0x80, 0, 0, 0x80, 0, 1, 0x80, 0, 0, 0x80, 0, 2})
	f.Add([]byte{0, 0x10, 0, 0, 0x10, 3, 0, 0x08, 0, 0x40, 0, 4, 0x80, 0, 0, 0xff, 0xff, 5})
	f.Fuzz(func(t *testing.T, ops []byte) {
		const size, runCap = 512 << 10, 160 << 10
		m := newFlatModel(size, runCap)
		for i := 0; i+6 <= len(ops) && i < 6*64; i += 6 {
			op := ops[i : i+6]
			off := (int(op[0]&0x7f)<<16 | int(op[1])<<8 | int(op[2])) % size
			if op[0]&0x80 != 0 && len(m.f.runs) > 0 { // the next piece of a stream
				off = int(m.f.runs[len(m.f.runs)-1].end()) % size
			}
			n := min(1+(int(op[3])<<8|int(op[4]))*4, size-off)
			data := make([]byte, n)
			for j := range data {
				data[j] = op[5] + byte(j*7)
			}
			m.write(data, off)
			m.check(t, fmt.Sprintf("op %d", i/6))
		}
	})
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
	c := newDirtyCache(context.Background(), w, MinDirtyLimit, 4096, slog.New(slog.DiscardHandler))
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
				if err := c.write(context.Background(), inos[i], want[i][off:off+n], int64(off)); err != nil {
					t.Errorf("write: %v", err)
					return
				}
				off += n
			}
			for range 50 {
				off := rng.IntN(perFile - 8192)
				if err := c.write(context.Background(), inos[i], want[i][off:off+8192], int64(off)); err != nil {
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
