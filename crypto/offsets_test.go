package crypto

import "testing"

func TestSpanOfTable(t *testing.T) {
	const size = 16 * 4096
	cases := []struct {
		name      string
		off, n    int64
		ss        int
		want      Span
		wantBytes int64
	}{
		{"aligned single sector", 0, 4096, 4096, Span{0, 4096, 0}, 4096},
		{"first byte", 0, 1, 4096, Span{0, 4096, 0}, 1},
		{"last byte", size - 1, 1, 4096, Span{size - 4096, size, 4095}, 1},
		{"straddles two sectors", 4095, 2, 4096, Span{0, 8192, 4095}, 2},
		{"unaligned middle", 5000, 10000, 4096, Span{4096, 16384, 904}, 10000},
		{"clipped at end", size - 100, 1000, 4096, Span{size - 4096, size, 3996}, 100},
		{"whole volume", 0, size, 4096, Span{0, size, 0}, size},
		{"past end", size, 10, 4096, Span{size, size, 0}, 0},
		{"zero length", 100, 0, 4096, Span{100, 100, 0}, 0},
		{"negative offset", -1, 10, 4096, Span{-1, -1, 0}, 0},
		{"512 sectors unaligned", 511, 2, 512, Span{0, 1024, 511}, 2},
		{"512 sectors aligned run", 1024, 2048, 512, Span{1024, 3072, 0}, 2048},
		{"overflowing length", 10, 1<<63 - 1, 4096, Span{0, size, 10}, size - 10},
	}
	for _, c := range cases {
		got, n := SpanOf(c.off, c.n, size, c.ss)
		if got != c.want || n != c.wantBytes {
			t.Errorf("%s: SpanOf(%d,%d) = %+v,%d; want %+v,%d", c.name, c.off, c.n, got, n, c.want, c.wantBytes)
		}
	}
}

// TestSpanOfSweep checks the invariants for every offset and length over a
// small volume, for each sector size.
func TestSpanOfSweep(t *testing.T) {
	for _, ss := range []int{512, 1024, 2048, 4096} {
		size := int64(4 * ss)
		for off := int64(0); off <= size; off += 7 {
			for n := int64(0); n <= size+int64(ss); n += 13 {
				sp, got := SpanOf(off, n, size, ss)
				want := min(n, max(size-off, 0))
				if got != want {
					t.Fatalf("ss=%d off=%d n=%d: %d bytes, want %d", ss, off, n, got, want)
				}
				if got == 0 {
					continue
				}
				if sp.Start%int64(ss) != 0 || sp.End%int64(ss) != 0 || sp.End > size {
					t.Fatalf("ss=%d off=%d n=%d: unaligned or out of range %+v", ss, off, n, sp)
				}
				if sp.Start+int64(sp.Skip) != off || sp.Start+int64(sp.Skip)+got > sp.End {
					t.Fatalf("ss=%d off=%d n=%d: span %+v does not cover the request", ss, off, n, sp)
				}
				if sp.End-(off+got) >= int64(ss) || sp.Skip >= ss {
					t.Fatalf("ss=%d off=%d n=%d: span %+v is wider than needed", ss, off, n, sp)
				}
			}
		}
	}
}

func TestIVOf(t *testing.T) {
	cases := []struct {
		off    int64
		unit   int
		tweak  uint64
		wantIV uint64
	}{
		{0, 512, 0, 0},
		{4096, 512, 0, 8}, // LUKS2 with 4096-byte sectors steps by 8
		{8192, 512, 0, 16},
		{4096, 4096, 0, 1},     // large-sector IVs
		{0, 512, 32768, 32768}, // iv_tweak is added
		{1 << 40, 512, 5, 1<<31 + 5},
	}
	for _, c := range cases {
		if got := IVOf(c.off, c.unit, c.tweak); got != c.wantIV {
			t.Errorf("IVOf(%d,%d,%d) = %d, want %d", c.off, c.unit, c.tweak, got, c.wantIV)
		}
	}
	if IVStep(4096, 512) != 8 || IVStep(512, 512) != 1 || IVStep(4096, 4096) != 1 {
		t.Error("IVStep wrong")
	}
}

func TestCheckGeometry(t *testing.T) {
	if checkGeometry(4096, 8192) != nil || checkGeometry(512, 512) != nil {
		t.Fatal("valid geometry refused")
	}
	for _, c := range []struct {
		ss   int
		size int64
	}{{8192, 8192}, {1000, 1000}, {4096, 4097}, {4096, -4096}, {0, 0}} {
		if checkGeometry(c.ss, c.size) == nil {
			t.Errorf("geometry %d/%d accepted", c.ss, c.size)
		}
	}
}
