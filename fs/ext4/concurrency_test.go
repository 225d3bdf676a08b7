package ext4

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/blobseal/blobseal/internal/testenv"
)

// countingReader counts ReadAt calls on the volume.
type countingReader struct {
	r     io.ReaderAt
	calls atomic.Int64
}

func (c *countingReader) ReadAt(p []byte, off int64) (int, error) {
	c.calls.Add(1)
	return c.r.ReadAt(p, off)
}

var _ io.ReaderAt = (*countingReader)(nil)

// TestReadAtCoalesces checks that a read spanning many blocks of a
// contiguous file is one volume ReadAt, and a read across a hole is one
// ReadAt per data run.
func TestReadAtCoalesces(t *testing.T) {
	testenv.RequireTools(t, "mkfs.ext4")
	src := t.TempDir()
	writeFile(t, filepath.Join(src, "contig"), fill(4, 4<<20), 0o644)
	fh, err := os.Create(filepath.Join(src, "holey"))
	must(t, err)
	_, err = fh.WriteAt(fill(5, 64<<10), 0)
	must(t, err)
	_, err = fh.WriteAt(fill(6, 64<<10), 1<<20)
	must(t, err)
	must(t, fh.Close())
	data, err := os.ReadFile(mkfs(t, nil, src, 16, "-b", "4096"))
	must(t, err)
	cr := &countingReader{r: bytes.NewReader(data)}
	f, err := Open(cr, int64(len(data)))
	must(t, err)
	for _, c := range []struct {
		path      string
		off, n    int64
		wantCalls int64
	}{
		{"/contig", 12345, 1 << 20, 1},
		{"/contig", 0, 4 << 20, 1},
		{"/holey", 1000, (1 << 20) + 1000, 2},
	} {
		in, err := lookupPath(f, c.path)
		must(t, err)
		if _, err := f.ReadAt(in, make([]byte, 1), 0); err != nil { // warm metadata
			t.Fatal(err)
		}
		buf := make([]byte, c.n)
		before := cr.calls.Load()
		if _, err := f.ReadAt(in, buf, c.off); err != nil && err != io.EOF {
			t.Fatal(err)
		}
		if got := cr.calls.Load() - before; got != c.wantCalls {
			t.Errorf("%s [%d,+%d): %d volume reads, want %d", c.path, c.off, c.n, got, c.wantCalls)
		}
	}
}

// TestConcurrentUse reads, looks up and lists from many goroutines at once
// (run with -race) and checks every result against a serial read.
func TestConcurrentUse(t *testing.T) {
	testenv.RequireTools(t, "mkfs.ext4")
	src := t.TempDir()
	for i := 0; i < 40; i++ {
		writeFile(t, filepath.Join(src, fmt.Sprintf("d%d", i%4), fmt.Sprintf("f%02d", i)), fill(uint64(i), 1000*i+1), 0o644)
	}
	data, err := os.ReadFile(mkfs(t, nil, src, 8, "-b", "1024"))
	must(t, err)
	f, err := Open(bytes.NewReader(data), int64(len(data)))
	must(t, err)
	want := map[string][]byte{}
	for i := 0; i < 40; i++ {
		want[fmt.Sprintf("/d%d/f%02d", i%4, i)] = fill(uint64(i), 1000*i+1)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for g := 0; g < 16; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for rep := 0; rep < 5; rep++ {
				for p, w := range want {
					in, err := lookupPath(f, p)
					if err != nil {
						errs <- err
						return
					}
					got := make([]byte, len(w))
					if n, err := f.ReadAt(in, got, 0); n != len(w) || (err != nil && err != io.EOF) || !bytes.Equal(got, w) {
						errs <- fmt.Errorf("%s: %d bytes, %v, equal=%v", p, n, err, bytes.Equal(got, w))
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}
