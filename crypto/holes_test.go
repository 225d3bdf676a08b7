package crypto

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"testing"
)

func mustHoles(t *testing.T, runs []Run, ss int, size int64) *HoleMap {
	t.Helper()
	h, err := NewHoleMap(runs, ss, size)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func TestHoleMapWalk(t *testing.T) {
	h := mustHoles(t, []Run{{4096, 8192}, {20480, 4096}}, 4096, 32768)
	type piece struct {
		off, end int64
		hole     bool
	}
	var got []piece
	h.Walk(0, 32768, func(off, end int64, hole bool) error {
		got = append(got, piece{off, end, hole})
		return nil
	})
	want := []piece{{0, 4096, false}, {4096, 12288, true}, {12288, 20480, false}, {20480, 24576, true}, {24576, 32768, false}}
	if len(got) != len(want) {
		t.Fatalf("got %v want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("piece %d: got %v want %v", i, got[i], want[i])
		}
	}
	// A window starting inside a hole.
	got = nil
	h.Walk(8192, 16384, func(off, end int64, hole bool) error {
		got = append(got, piece{off, end, hole})
		return nil
	})
	if len(got) != 2 || got[0] != (piece{8192, 12288, true}) || got[1] != (piece{12288, 16384, false}) {
		t.Fatalf("inner window: %v", got)
	}
	if !h.Overlaps(0, 4097) || h.Overlaps(0, 4096) || h.Overlaps(12288, 20480) || !h.Overlaps(24575, 24576) {
		t.Fatal("Overlaps wrong")
	}
	var nilMap *HoleMap
	n := 0
	nilMap.Walk(0, 100, func(off, end int64, hole bool) error {
		if hole || off != 0 || end != 100 {
			t.Fatal("nil map must be all data")
		}
		n++
		return nil
	})
	if n != 1 {
		t.Fatal("nil map walk")
	}
}

func TestNewHoleMapRejects(t *testing.T) {
	for _, runs := range [][]Run{
		{{0, 0}}, {{100, 4096}}, {{0, 4096}, {4096, 4096}}, {{8192, 4096}, {0, 4096}}, {{0, 1 << 20}},
	} {
		if _, err := NewHoleMap(runs, 4096, 65536); err == nil {
			t.Errorf("accepted %v", runs)
		}
	}
}

func TestHoleTokenRoundTripAndForgery(t *testing.T) {
	key := make([]byte, 64)
	rand.Read(key)
	const size = 64 << 20
	h := mustHoles(t, []Run{{1 << 20, 4 << 20}, {10 << 20, 4096}, {size - 8192, 8192}}, 4096, size)
	raw, err := MarshalHoleToken(h, key, 4096, size)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(raw, key[:8]) {
		t.Fatal("token contains key bytes")
	}
	got, err := ParseHoleToken(raw, key, 4096, size)
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Runs()) != 3 || got.Runs()[2] != h.Runs()[2] || got.Bytes() != h.Bytes() {
		t.Fatalf("round trip: %v", got.Runs())
	}

	otherKey := append([]byte(nil), key...)
	otherKey[0] ^= 1
	if _, err := ParseHoleToken(raw, otherKey, 4096, size); !errors.Is(err, ErrHoleMapForged) {
		t.Fatalf("other key: %v", err)
	}
	if _, err := ParseHoleToken(raw, key, 4096, size*2); !errors.Is(err, ErrHoleMapForged) {
		t.Fatalf("other size: %v", err)
	}
	// Storage declares a larger hole: must not verify.
	var tok holeToken
	json.Unmarshal(raw, &tok)
	tok.Runs = base64.StdEncoding.EncodeToString(encodeRuns([]Run{{0, 8 << 20}}, 4096))
	forged, _ := json.Marshal(tok)
	if _, err := ParseHoleToken(forged, key, 4096, size); !errors.Is(err, ErrHoleMapForged) {
		t.Fatalf("forged runs: %v", err)
	}
	for _, bad := range []string{`{`, `{"type":"other"}`, `{"type":"blobseal-holes","blobseal_version":1,"sector_size":4096,"size":"67108864","runs":"!!","mac":""}`} {
		if _, err := ParseHoleToken(json.RawMessage(bad), key, 4096, size); err == nil {
			t.Errorf("accepted %s", bad)
		}
	}
}

func TestHoleFinder(t *testing.T) {
	f := holeFinder{minRun: 8192}
	f.add(0, 4096, true)     // too short alone, but...
	f.add(4096, 4096, true)  // ...grows to 8192
	f.add(8192, 4096, false) // ends it
	f.add(12288, 4096, true) // too short
	f.add(16384, 4096, false)
	f.add(20480, 16384, true) // trailing run
	got := f.result()
	want := []Run{{0, 8192}, {20480, 16384}}
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
		t.Fatalf("got %v want %v", got, want)
	}
}

func FuzzParseHoleToken(f *testing.F) {
	key := bytes.Repeat([]byte{7}, 64)
	h, _ := NewHoleMap([]Run{{4096, 8192}}, 4096, 1<<20)
	good, _ := MarshalHoleToken(h, key, 4096, 1<<20)
	f.Add([]byte(good))
	f.Add([]byte(`{"type":"blobseal-holes"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		hm, err := ParseHoleToken(data, key, 4096, 1<<20)
		if err == nil {
			for _, r := range hm.Runs() {
				if r.End() > 1<<20 || r.Off%4096 != 0 {
					t.Fatalf("invalid run accepted: %v", r)
				}
			}
		}
	})
}

func FuzzDecodeRuns(f *testing.F) {
	f.Add(encodeRuns([]Run{{0, 4096}, {8192, 4096}}, 4096))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, enc []byte) {
		runs, err := decodeRuns(enc, 4096, 1<<30)
		if err != nil {
			return
		}
		var prev int64
		for _, r := range runs {
			if r.Off < prev || r.End() > 1<<30 {
				t.Fatalf("bad run %v", r)
			}
			prev = r.End()
		}
	})
}
