package main

import (
	"strconv"
	"testing"
)

func TestParseSize(t *testing.T) {
	good := map[string]int64{"4096": 4096, "512M": 512 << 20, "2G": 2 << 30, "2GiB": 2 << 30, "64k": 64 << 10, "1T": 1 << 40, " 8MB ": 8 << 20}
	for in, want := range good {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "0", "-1M", "1.5G", "G", "12X", "99999999999T", "1e9"} {
		if got, err := parseSize(in); err == nil {
			t.Errorf("parseSize(%q) = %d, want an error", in, got)
		}
	}
}

// FuzzParseSize: any input gives a positive size or an error, never a
// panic or an overflowed value, and plain numbers round-trip.
func FuzzParseSize(f *testing.F) {
	for _, s := range []string{"4096", "512M", "2GiB", "1T", "", "-5", "9223372036854775807", "8388607T"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := parseSize(s)
		if err != nil {
			return
		}
		if n <= 0 {
			t.Fatalf("parseSize(%q) = %d", s, n)
		}
		if back, err := parseSize(strconv.FormatInt(n, 10)); err != nil || back != n {
			t.Fatalf("round trip of %d: %d, %v", n, back, err)
		}
	})
}
