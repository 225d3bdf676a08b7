package blockcache

import (
	"sort"

	"github.com/blobseal/blobseal/blob"
)

// writtenIndex answers "which parts of [off, end) hold data" from the written
// ranges of a page blob or sparse file. Everything else reads as zeros and is
// never requested.
type writtenIndex struct {
	ranges []blob.Range // sorted, merged, non-empty, within [0, size)
}

// newWrittenIndex normalizes ranges defensively (clamps to size, sorts,
// merges) so a sloppy lister cannot make the cache skip real data.
func newWrittenIndex(in []blob.Range, size int64) *writtenIndex {
	rs := make([]blob.Range, 0, len(in))
	for _, r := range in {
		if r.Len <= 0 || r.Off >= size {
			continue
		}
		off, end := max(r.Off, 0), r.Off+r.Len
		if end < r.Off || end > size { // overflow, or past the end
			end = size
		}
		if end > off {
			rs = append(rs, blob.Range{Off: off, Len: end - off})
		}
	}
	merged := blob.MergeRanges(rs)
	return &writtenIndex{ranges: merged}
}

// first returns the index of the first range ending after off.
func (w *writtenIndex) first(off int64) int {
	return sort.Search(len(w.ranges), func(i int) bool { return w.ranges[i].End() > off })
}

// isHole reports whether [off, end) holds no written byte.
func (w *writtenIndex) isHole(off, end int64) bool {
	i := w.first(off)
	return i == len(w.ranges) || w.ranges[i].Off >= end
}

// written appends to dst the written parts of [off, end), in order.
func (w *writtenIndex) written(dst []blob.Range, off, end int64) []blob.Range {
	for i := w.first(off); i < len(w.ranges) && w.ranges[i].Off < end; i++ {
		s, e := max(w.ranges[i].Off, off), min(w.ranges[i].End(), end)
		if e > s {
			dst = append(dst, blob.Range{Off: s, Len: e - s})
		}
	}
	return dst
}

// covers reports whether [off, end) lies inside one written range.
func (w *writtenIndex) covers(off, end int64) bool {
	i := w.first(off)
	return i < len(w.ranges) && w.ranges[i].Off <= off && w.ranges[i].End() >= end
}
