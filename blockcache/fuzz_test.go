package blockcache

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"

	"github.com/blobseal/blobseal/blob"
)

// FuzzVerifyBlock feeds arbitrary disk-cache files to the verifier: it must
// never panic, must reject anything it did not write, and must accept what it
// wrote.
func FuzzVerifyBlock(f *testing.F) {
	tag := versionTag("src", "v1", 4096)
	good := make([]byte, blockHeaderSize+100)
	encodeHeader(good[:blockHeaderSize], tag, 7, good[blockHeaderSize:])
	f.Add(good, int64(7))
	f.Add(good[:blockHeaderSize], int64(7))
	f.Add([]byte(blockMagic), int64(0))
	f.Add([]byte{}, int64(-1))
	f.Fuzz(func(t *testing.T, raw []byte, idx int64) {
		if len(raw) < blockHeaderSize {
			if err := verifyBlock(raw, nil, tag, idx); !errors.Is(err, errCorrupt) {
				t.Fatalf("short header accepted: %v", err)
			}
			return
		}
		hdr, data := raw[:blockHeaderSize], raw[blockHeaderSize:]
		err := verifyBlock(hdr, data, tag, idx)
		var want [blockHeaderSize]byte
		encodeHeader(want[:], tag, idx, data)
		if bytes.Equal(hdr, want[:]) != (err == nil) {
			t.Fatalf("verify = %v for header equal=%v to the encoding", err, bytes.Equal(hdr, want[:]))
		}
		if err != nil && !errors.Is(err, errCorrupt) {
			t.Fatalf("error does not wrap errCorrupt: %v", err)
		}
		// Round trip: what we encode verifies.
		if err := verifyBlock(want[:], data, tag, idx); err != nil {
			t.Fatalf("own encoding rejected: %v", err)
		}
	})
}

// FuzzWrittenIndex checks the written-range index against a byte map for
// arbitrary (unsorted, overlapping, out of range) lister output.
func FuzzWrittenIndex(f *testing.F) {
	f.Add([]byte{0, 10, 5, 20, 100, 3}, uint8(64), int64(0), int64(64))
	f.Add([]byte{200, 255, 0, 0}, uint8(255), int64(10), int64(30))
	f.Fuzz(func(t *testing.T, spec []byte, size8 uint8, qoff, qlen int64) {
		size := int64(size8)
		var rs []blob.Range
		for i := 0; i+1 < len(spec) && len(rs) < 32; i += 2 {
			rs = append(rs, blob.Range{Off: int64(int8(spec[i])) * 2, Len: int64(int8(spec[i+1]))})
		}
		idx := newWrittenIndex(rs, size)
		mark := make([]bool, size)
		for _, r := range rs {
			for o := max(r.Off, 0); o < r.Off+r.Len && o < size; o++ {
				mark[o] = true
			}
		}
		for i, r := range idx.ranges {
			if r.Len <= 0 || r.Off < 0 || r.End() > size || i > 0 && r.Off <= idx.ranges[i-1].End() {
				t.Fatalf("ranges not normalized: %+v", idx.ranges)
			}
		}
		qoff = min(max(qoff, 0), size)
		qend := min(qoff+min(max(qlen, 0), size), size)
		var got []bool = make([]bool, qend-qoff)
		for _, r := range idx.written(nil, qoff, qend) {
			for o := r.Off; o < r.End(); o++ {
				got[o-qoff] = true
			}
		}
		hole := true
		for o := qoff; o < qend; o++ {
			if got[o-qoff] != mark[o] {
				t.Fatalf("offset %d: written=%v, want %v (ranges %+v)", o, got[o-qoff], mark[o], rs)
			}
			hole = hole && !mark[o]
		}
		if qend > qoff && idx.isHole(qoff, qend) != hole {
			t.Fatalf("isHole(%d,%d) = %v, want %v", qoff, qend, !hole, hole)
		}
	})
}

// FuzzCacheRead drives the whole cache with fuzzed read sequences over a
// small source and checks every result against the reference.
func FuzzCacheRead(f *testing.F) {
	f.Add([]byte{0, 0, 0, 1, 255, 255, 9, 9, 9})
	f.Add(bytes.Repeat([]byte{0, 16, 0, 0}, 20))
	ref := randomBytes(77, 200000)
	f.Fuzz(func(t *testing.T, ops []byte) {
		src := newTestSource(ref, 4096)
		c, err := New(src, Options{BlockSize: 4096, MemoryBytes: 64 << 10, MaxFetchSize: 16 << 10, MaxFetches: 2})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		for i := 0; len(ops) >= 4 && i < 100; i++ { // bounded so minimizing stays quick
			off := int64(binary.LittleEndian.Uint16(ops)) * 4
			n := int(binary.LittleEndian.Uint16(ops[2:])) % 70000
			ops = ops[4:]
			if err := readExpect(c, ref, off, n); err != nil {
				t.Fatal(err)
			}
		}
		if st := c.Stats(); st.PeakMemoryBytes > st.MemoryLimit {
			t.Fatalf("peak memory %d over bound %d", st.PeakMemoryBytes, st.MemoryLimit)
		}
	})
}
