package luks

import (
	"bytes"
	"errors"
	"testing"
)

// cheapPolicy keeps fuzzed KDF parameters from dominating fuzzing time; a
// forged cost above it must come back as ErrKDFLimit, never a hang.
var cheapPolicy = Policy{MaxIterations: 2000, MaxArgonMemoryKiB: 256, MaxArgonTime: 4, MaxArgonThreads: 2}

// FuzzReadHeader feeds arbitrary devices (binary headers plus JSON areas) to
// ReadHeader and, when one parses, to Unlock. Committed seeds include real
// cryptsetup headers (testdata/fuzz/FuzzReadHeader).
func FuzzReadHeader(f *testing.F) {
	img, _ := formatMem(f, FormatOptions{DataOffset: 192 << 10, KeyBytes: 32})
	f.Add(img.b[:32<<10])
	f.Add(img.b)
	argon, _ := formatMem(f, FormatOptions{DataOffset: 192 << 10, KeyBytes: 32, PBKDF: "argon2id", ArgonMemoryKiB: 64, ArgonThreads: 1})
	f.Add(argon.b)
	f.Add([]byte("LUKS\xba\xbe\x00\x02"))
	f.Add([]byte("LUKS\xba\xbe\x00\x01"))
	f.Fuzz(func(t *testing.T, data []byte) {
		r := bytes.NewReader(data)
		h, err := ReadHeader(r, int64(len(data)))
		if err != nil {
			if h != nil {
				t.Fatal("header returned with an error")
			}
			if !errors.Is(err, ErrNotLUKS) && !errors.Is(err, ErrCorruptHeader) {
				t.Fatalf("error is neither ErrNotLUKS nor ErrCorruptHeader: %v", err)
			}
			return
		}
		if h.Version != 1 && h.Version != 2 {
			t.Fatalf("version %d", h.Version)
		}
		u, err := h.Unlock(r, testPassphrase, cheapPolicy)
		if err == nil {
			if len(u.VolumeKey) != 32 && len(u.VolumeKey) != 64 || u.Cipher != CipherAESXTSPlain64 || !validSectorSize(u.SectorSize) {
				t.Fatalf("unlocked an invalid volume: %v", u)
			}
			u.Wipe()
		}
	})
}

// FuzzParseJSON feeds arbitrary LUKS2 JSON metadata to the parser; whatever
// it accepts must be internally consistent.
func FuzzParseJSON(f *testing.F) {
	img, _ := formatMem(f, FormatOptions{DataOffset: 192 << 10, KeyBytes: 32})
	area := img.b[binHeaderSize:]
	f.Add(area[:bytes.IndexByte(area, 0)])
	f.Add([]byte(`{"keyslots":{},"tokens":{},"segments":{},"digests":{},"config":{"json_size":"12288","keyslots_size":"0"}}`))
	f.Add([]byte(`{"keyslots":null}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		md, err := parseJSON(data)
		if err != nil {
			return
		}
		for _, k := range md.Keyslots {
			if k.Type == "luks2" && afSectors(k.KeySize, k.AF.Stripes) > k.Area.Size {
				t.Fatalf("keyslot %d accepted with too small an area", k.ID)
			}
		}
		for _, d := range md.Digests {
			if len(d.Value) < 16 {
				t.Fatalf("digest %d accepted with %d bytes", d.ID, len(d.Value))
			}
		}
	})
}
