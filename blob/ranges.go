package blob

import (
	"slices"
	"sort"
)

// MergeRanges sorts ranges and merges overlapping and adjacent ones (Azurite
// returns page ranges unmerged). Empty ranges are dropped. The input is
// modified.
func MergeRanges(rs []Range) []Range {
	rs = slices.DeleteFunc(rs, func(r Range) bool { return r.Len <= 0 })
	slices.SortFunc(rs, func(a, b Range) int {
		switch {
		case a.Off < b.Off:
			return -1
		case a.Off > b.Off:
			return 1
		}
		return 0
	})
	out := rs[:0]
	for _, r := range rs {
		if n := len(out); n > 0 && r.Off <= out[n-1].End() {
			if r.End() > out[n-1].End() {
				out[n-1].Len = r.End() - out[n-1].Off
			}
			continue
		}
		out = append(out, r)
	}
	return out
}

// segment is part of a read: either data to fetch or a hole to zero-fill.
type segment struct {
	off, len int64
	data     bool
}

// planRead splits [off, off+n) against sorted merged ranges into data and
// hole segments. Holes shorter than minHole between data are fetched with
// the data: one request costs more than a few hundred KiB of zeros.
func planRead(ranges []Range, off, n, minHole int64) []segment {
	end := off + n
	// First range that ends after off.
	i := sort.Search(len(ranges), func(i int) bool { return ranges[i].End() > off })
	var segs []segment
	add := func(s segment) {
		if s.len <= 0 {
			return
		}
		if k := len(segs); k > 0 && segs[k-1].data == s.data {
			segs[k-1].len += s.len
			return
		}
		segs = append(segs, s)
	}
	pos := off
	for ; i < len(ranges) && ranges[i].Off < end; i++ {
		r := ranges[i]
		if r.Off > pos {
			add(segment{off: pos, len: r.Off - pos})
		}
		s := max(r.Off, pos)
		e := min(r.End(), end)
		add(segment{off: s, len: e - s, data: true})
		pos = e
	}
	if pos < end {
		add(segment{off: pos, len: end - pos})
	}
	// Absorb short interior holes into the surrounding data.
	if minHole > 0 && len(segs) > 2 {
		out := segs[:0]
		for k := 0; k < len(segs); k++ {
			s := segs[k]
			if !s.data && s.len < minHole && len(out) > 0 && out[len(out)-1].data && k+1 < len(segs) && segs[k+1].data {
				out[len(out)-1].len += s.len + segs[k+1].len
				k++
				continue
			}
			out = append(out, s)
		}
		segs = out
	}
	return segs
}

// insertRange adds r to a merged, sorted list and returns the merged result.
func insertRange(rs []Range, r Range) []Range {
	out := make([]Range, 0, len(rs)+1)
	out = append(out, rs...)
	out = append(out, r)
	return MergeRanges(out)
}

// subtractRange removes r from a merged, sorted list.
func subtractRange(rs []Range, r Range) []Range {
	out := make([]Range, 0, len(rs)+1)
	for _, x := range rs {
		if x.End() <= r.Off || x.Off >= r.End() {
			out = append(out, x)
			continue
		}
		if x.Off < r.Off {
			out = append(out, Range{Off: x.Off, Len: r.Off - x.Off})
		}
		if x.End() > r.End() {
			out = append(out, Range{Off: r.End(), Len: x.End() - r.End()})
		}
	}
	return out
}
