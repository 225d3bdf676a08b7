package blockcache

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"testing"

	"github.com/blobseal/blobseal/blob"
)

// TestReadFuncMatchesReadAt: ReadFunc hands over, in order and without
// gaps, exactly the bytes ReadAt returns, holes included, in slices that end
// at block boundaries or at the end of the range.
func TestReadFuncMatchesReadAt(t *testing.T) {
	const bs = 16 << 10
	size := int64(3<<20 + 777)
	src := newSparseSource(size, bs, []blob.Range{{Off: 5000, Len: 300000}, {Off: 1 << 20, Len: 2 << 20}})
	c := newCache(t, src, Options{BlockSize: bs, MemoryBytes: 1 << 20, MaxFetchSize: 256 << 10})
	r := rand.New(rand.NewPCG(5, 6))
	for range 300 {
		off := r.Int64N(size)
		n := r.Int64N(min(size-off, 600<<10) + 1)
		want := make([]byte, n)
		if _, err := c.ReadAt(want, off); err != nil && n > 0 && off+n < size {
			t.Fatal(err)
		}
		var got []byte
		pos := off
		err := c.ReadFunc(t.Context(), off, n, func(b []byte) error {
			if end := pos + int64(len(b)); end != off+n && end%bs != 0 {
				t.Errorf("slice [%d, %d) ends neither at a block boundary nor at the end %d", pos, end, off+n)
			}
			pos += int64(len(b))
			got = append(got, b...)
			return nil
		})
		if err != nil {
			t.Fatalf("ReadFunc(%d, %d): %v", off, n, err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("ReadFunc(%d, %d) differs from ReadAt", off, n)
		}
	}
	stop := errors.New("stop")
	calls := 0
	if err := c.ReadFunc(t.Context(), 0, size, func([]byte) error { calls++; return stop }); !errors.Is(err, stop) || calls != 1 {
		t.Errorf("fn's error: got %v after %d calls, want it after 1", err, calls)
	}
	for _, bad := range [][2]int64{{-1, 10}, {size - 5, 10}, {0, -1}, {size + 1, 0}} {
		if err := c.ReadFunc(t.Context(), bad[0], bad[1], func([]byte) error { return nil }); err == nil {
			t.Errorf("ReadFunc(%d, %d) outside the source: no error", bad[0], bad[1])
		}
	}
}
