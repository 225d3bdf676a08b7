package blockcache

import (
	"bytes"
	"io"
	"math/rand/v2"
	"testing"

	"github.com/blobseal/blobseal/blob"
)

// TestWithoutMatchesBitmap checks writtenIndex.without against a byte map.
func TestWithoutMatchesBitmap(t *testing.T) {
	const size = 4096
	r := rand.New(rand.NewPCG(3, 4))
	randomRanges := func(n int) []blob.Range {
		var rs []blob.Range
		for range n {
			off := r.Int64N(size)
			rs = append(rs, blob.Range{Off: off, Len: r.Int64N(300)})
		}
		return rs
	}
	for iter := range 500 {
		written, skip := randomRanges(r.IntN(8)), randomRanges(r.IntN(8))
		var want [size]bool
		for _, w := range written {
			for i := w.Off; i < min(w.End(), size); i++ {
				want[i] = true
			}
		}
		for _, s := range skip {
			for i := s.Off; i < min(s.End(), size); i++ {
				want[i] = false
			}
		}
		got := newWrittenIndex(written, size).without(skip, size)
		var have [size]bool
		for k, g := range got.ranges {
			if g.Len <= 0 || k > 0 && g.Off <= got.ranges[k-1].End() {
				t.Fatalf("iteration %d: ranges %v are not sorted, disjoint and non-empty", iter, got.ranges)
			}
			for i := g.Off; i < g.End(); i++ {
				have[i] = true
			}
		}
		if have != want {
			t.Fatalf("iteration %d: written %v without %v = %v", iter, written, skip, got.ranges)
		}
	}
}

// TestSkipRangesFetchesNothingThere: after SkipRanges, a sequential read
// over a skipped range requests none of it and reads it as zeros, while
// short skipped ranges are fetched as usual.
func TestSkipRangesFetchesNothingThere(t *testing.T) {
	const bs = 64 << 10
	data := randomBytes(9, 16<<20)
	src := newTestSource(data, bs)
	c := newCache(t, src, Options{BlockSize: bs, MaxFetchSize: 1 << 20})
	long := blob.Range{Off: 4 << 20, Len: 6 << 20}   // skipped
	short := blob.Range{Off: 12 << 20, Len: 4 << 10} // below the minimum: fetched
	c.SkipRanges([]blob.Range{long, short}, 1<<20)

	got := make([]byte, len(data))
	p := make([]byte, 128<<10)
	for off := int64(0); off < int64(len(data)); off += int64(len(p)) {
		n, err := c.ReadAt(p, off)
		if err != nil && err != io.EOF {
			t.Fatal(err)
		}
		copy(got[off:], p[:n])
	}
	want := bytes.Clone(data)
	clear(want[long.Off:long.End()])
	if !bytes.Equal(got, want) {
		t.Fatal("read differs from the source with the skipped range zeroed")
	}
	for _, req := range src.requests() {
		if req.Off < long.End() && long.Off < req.End() {
			t.Errorf("request %+v overlaps the skipped range %+v", req, long)
		}
	}
	if st := c.Stats(); st.BytesFetched != uint64(len(data))-uint64(long.Len) {
		t.Errorf("fetched %d bytes, want %d (everything but the skipped range)", st.BytesFetched, len(data)-int(long.Len))
	}
}
