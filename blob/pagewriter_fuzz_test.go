package blob

import (
	"encoding/binary"
	"testing"
)

// FuzzPlanPuts feeds arbitrary write lists (offset, length pairs) to the
// Put Page planner: it must reject what storage would refuse and
// otherwise return runs that are aligned, at most 4 MiB, contiguous inside
// and covering exactly the written bytes.
func FuzzPlanPuts(f *testing.F) {
	f.Add([]byte{0, 0, 2, 0, 0, 0, 4, 0}, int64(1<<20))
	f.Add([]byte{0, 2, 0, 0, 0, 2, 0, 0, 0, 4, 0, 0, 0, 2, 0, 0}, int64(16<<20))
	f.Add([]byte{1, 0, 0, 0, 1, 0, 0, 0}, int64(4096))
	f.Fuzz(func(t *testing.T, spec []byte, size int64) {
		if size < 0 || size > 64<<20 {
			return
		}
		var writes []PageWrite
		for len(spec) >= 8 && len(writes) < 64 {
			off := int64(binary.LittleEndian.Uint32(spec)) * 8 // reach unaligned and large offsets
			n := int(binary.LittleEndian.Uint32(spec[4:]) % (9 << 20))
			writes = append(writes, PageWrite{Off: off, Data: make([]byte, n)})
			spec = spec[8:]
		}
		runs, err := planPuts(writes, size)
		if err != nil {
			return
		}
		var want, got int64
		for _, x := range writes {
			want += int64(len(x.Data))
		}
		for _, run := range runs {
			var n int64
			for i, x := range run {
				if x.Off%PageSize != 0 || len(x.Data)%PageSize != 0 || x.end() > size {
					t.Fatalf("run piece %+v: unaligned or past %d", x.Off, size)
				}
				if i > 0 && x.Off != run[i-1].end() {
					t.Fatalf("run not contiguous at %d", x.Off)
				}
				n += int64(len(x.Data))
			}
			if n > MaxPutPages || n == 0 {
				t.Fatalf("run of %d bytes", n)
			}
			got += n
		}
		if got != want {
			t.Fatalf("runs cover %d bytes of %d written", got, want)
		}
		if len(runs) < 2 {
			return
		}
		// A large batch's guard pieces: one page first, one page last, the
		// rest between, covering the same bytes.
		head, middle, tail := guardPieces(runs)
		lastRun := runs[len(runs)-1]
		if len(head) != 1 || head[0].Off != runs[0][0].Off || len(head[0].Data) != PageSize {
			t.Fatalf("head %d bytes at %d; want the first page at %d", len(head[0].Data), head[0].Off, runs[0][0].Off)
		}
		if len(tail) != 1 || len(tail[0]) != 1 || tail[0][0].end() != lastRun[len(lastRun)-1].end() || len(tail[0][0].Data) != PageSize {
			t.Fatalf("tail %+v; want the last page before %d", tail, lastRun[len(lastRun)-1].end())
		}
		covered := 2 * int64(PageSize)
		for _, run := range middle {
			if len(run) == 0 {
				t.Fatal("an empty middle run")
			}
			for i, x := range run {
				if len(x.Data) == 0 || len(x.Data)%PageSize != 0 || (i > 0 && x.Off != run[i-1].end()) {
					t.Fatalf("middle run piece at %d of %d bytes", x.Off, len(x.Data))
				}
				if x.Off < head[0].end() || x.end() > tail[0][0].Off {
					t.Fatalf("middle piece [%d,%d) overlaps the head or tail", x.Off, x.end())
				}
				covered += int64(len(x.Data))
			}
		}
		if covered != want {
			t.Fatalf("guard pieces cover %d bytes of %d", covered, want)
		}
	})
}
