package blockcache

import (
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/blobseal/blobseal/blob"
)

// fileSource is a minimal os.File-backed blob.Source (package blob's own
// file source is written elsewhere); it lists written ranges of a sparse file
// with SEEK_DATA/SEEK_HOLE, as a page blob lists its pages.
type fileSource struct {
	f     *os.File
	size  int64
	reads atomic.Int64
	mu    sync.Mutex
	got   []blob.Range
}

var (
	_ blob.Source      = (*fileSource)(nil)
	_ blob.RangeLister = (*fileSource)(nil)
)

func (s *fileSource) Size() int64    { return s.size }
func (s *fileSource) String() string { return "file:" + filepath.Base(s.f.Name()) }

func (s *fileSource) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	s.reads.Add(1)
	s.mu.Lock()
	s.got = append(s.got, blob.Range{Off: off, Len: int64(len(p))})
	s.mu.Unlock()
	return s.f.ReadAt(p, off)
}

func (s *fileSource) WrittenRanges(ctx context.Context) ([]blob.Range, error) {
	var rs []blob.Range
	fd := int(s.f.Fd())
	for off := int64(0); off < s.size; {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break
		}
		if err != nil {
			return nil, err
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return nil, err
		}
		rs = append(rs, blob.Range{Off: data, Len: hole - data})
		off = hole
	}
	return rs, nil
}

// TestFileSourceSparseImage reads a real sparse file through the cache from
// many goroutines and checks the bytes against the file, and that no request
// touched a range the file system reports as a hole.
func TestFileSourceSparseImage(t *testing.T) {
	checkNoLeak(t)
	const size = 48 << 20
	path := filepath.Join(t.TempDir(), "image.bin")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	// Data islands, page aligned so the file system keeps the rest sparse.
	for i, off := range []int64{0, 3 << 20, 10<<20 + 4096, 20 << 20, 40 << 20} {
		if _, err := f.WriteAt(randomBytes(uint64(100+i), 1<<20+i*8192), off); err != nil {
			t.Fatal(err)
		}
	}
	src := &fileSource{f: f, size: size}
	written, err := src.WrittenRanges(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(written) < 2 || rangesLen(written) >= size/2 {
		t.Skipf("file system did not keep the file sparse (%d ranges); cannot test holes", len(written))
	}
	ref, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	c := newCache(t, src, Options{BlockSize: 64 << 10, MemoryBytes: 16 << 20, MaxFetchSize: 4 << 20})

	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if g%2 == 0 { // sequential reader in 128 KiB steps
				for off := int64(g) << 20; off < size; off += 128 << 10 {
					if err := readExpect(c, ref, off, 128<<10); err != nil {
						t.Error(err)
						return
					}
				}
				return
			}
			r := rand.New(rand.NewPCG(uint64(g), 3))
			for range 300 {
				if err := readExpect(c, ref, r.Int64N(size+1000), 1+r.IntN(64<<10)); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	idx := newWrittenIndex(written, size)
	src.mu.Lock()
	defer src.mu.Unlock()
	for _, rq := range src.got {
		if got := idx.written(nil, rq.Off, rq.End()); len(got) != 1 || got[0] != rq {
			t.Errorf("request %+v touches a hole", rq)
		}
	}
	st := c.Stats()
	if st.ZeroFilled == 0 {
		t.Error("no bytes were served from holes")
	}
	t.Logf("%d written ranges, %d requests, stats %+v", len(written), len(src.got), st)
	if _, err := c.ReadAt(make([]byte, 10), size); err != io.EOF {
		t.Errorf("read at size: %v, want EOF", err)
	}
}
