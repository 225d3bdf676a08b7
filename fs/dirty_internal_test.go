package fs

import (
	"math/rand/v2"
	"slices"
	"testing"
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
			accounted += f.add(data, int64(off), runCap, func(c int) []byte { return make([]byte, 0, c) })
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
