package blockcache

import "testing"

// FuzzDirtyRuns marks arbitrary page ranges of a block dirty and checks
// that runs reports exactly the marked pages, as maximal, ordered runs:
// the flush uploads what runs reports and nothing else.
func FuzzDirtyRuns(f *testing.F) {
	f.Add([]byte{0, 1}, uint8(0))
	f.Add([]byte{0, 128}, uint8(0))
	f.Add([]byte{3, 9, 9, 70, 63, 65, 127, 128}, uint8(1))
	f.Fuzz(func(t *testing.T, spec []byte, sizeSel uint8) {
		pages := []int{8, 128, 200}[int(sizeSel)%3] // 4 KiB, 64 KiB and an odd mask tail
		d := &dirtyBlock{mask: make([]uint64, (pages+63)/64)}
		want := make([]bool, pages)
		for i := 0; i+1 < len(spec) && i < 64; i += 2 {
			from, to := int(spec[i])%(pages+1), int(spec[i+1])%(pages+1)
			if from > to {
				from, to = to, from
			}
			d.set(from, to)
			for p := from; p < to; p++ {
				want[p] = true
			}
		}
		got := make([]bool, len(d.mask)*64)
		last := -1
		d.runs(func(from, to int) {
			if from >= to || from <= last {
				t.Fatalf("run [%d,%d) after one ending at %d: empty, unordered or not maximal", from, to, last)
			}
			for p := from; p < to; p++ {
				got[p] = true
			}
			last = to
		})
		n := 0
		for p := range got {
			if p < pages && got[p] != want[p] || p >= pages && got[p] {
				t.Fatalf("page %d: runs says %v, marked %v", p, got[p], p < pages && want[p])
			}
			if got[p] {
				n++
			}
		}
		if n != d.pages() {
			t.Fatalf("runs cover %d pages, pages() counts %d", n, d.pages())
		}
	})
}
