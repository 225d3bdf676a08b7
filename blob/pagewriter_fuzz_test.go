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
	})
}
