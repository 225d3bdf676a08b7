package luks

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"
)

// memImage is an in-memory device (io.ReaderAt and io.WriterAt).
type memImage struct{ b []byte }

func (m *memImage) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off >= int64(len(m.b)) {
		return 0, io.EOF
	}
	n := copy(p, m.b[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (m *memImage) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(p)) > int64(len(m.b)) {
		return 0, errors.New("write beyond end of image")
	}
	return copy(m.b[off:], p), nil
}

var (
	_ io.ReaderAt = (*memImage)(nil)
	_ io.WriterAt = (*memImage)(nil)
)

var testPassphrase = []byte("0123456789abcdef0123456789abcdef")

// formatMem formats a small in-memory image with a 1 MiB data offset.
func formatMem(t testing.TB, opts FormatOptions) (*memImage, *Unlocked) {
	t.Helper()
	if opts.DataOffset == 0 {
		opts.DataOffset = 1 << 20
	}
	img := &memImage{b: make([]byte, opts.DataOffset+64<<10)}
	u, err := Format(img, testPassphrase, opts)
	if err != nil {
		t.Fatalf("Format: %v", err)
	}
	return img, u
}

// rewriteCopy edits the JSON (and optionally the binary header) of the header
// copy at off and recomputes its checksum, as a storage operator forging a
// header could.
func rewriteCopy(t testing.TB, img []byte, off int64, editJSON func(map[string]any), editBin func([]byte)) {
	t.Helper()
	hdrSize := int64(binary.BigEndian.Uint64(img[off+offHdrSize:]))
	area := img[off+binHeaderSize : off+hdrSize]
	js := area[:bytes.IndexByte(area, 0)]
	if editJSON != nil {
		dec := json.NewDecoder(bytes.NewReader(js))
		dec.UseNumber()
		var m map[string]any
		if err := dec.Decode(&m); err != nil {
			t.Fatal(err)
		}
		editJSON(m)
		out, err := json.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		if len(out) >= len(area) {
			t.Fatalf("edited JSON does not fit")
		}
		clear(area)
		copy(area, out)
	}
	if editBin != nil {
		editBin(img[off : off+binHeaderSize])
	}
	full := img[off : off+hdrSize]
	copy(full[offCsum:offCsum+lenCsum], make([]byte, lenCsum))
	copy(full[offCsum:], headerChecksum(full, sha256.New))
}

// forge applies the same edit to both header copies.
func forge(t testing.TB, img *memImage, editJSON func(map[string]any)) {
	t.Helper()
	hdrSize := int64(binary.BigEndian.Uint64(img.b[offHdrSize:]))
	rewriteCopy(t, img.b, 0, editJSON, nil)
	rewriteCopy(t, img.b, hdrSize, editJSON, nil)
}

func obj(m map[string]any, path ...string) map[string]any {
	for _, p := range path {
		m = m[p].(map[string]any)
	}
	return m
}

func readUnlock(img *memImage, pass []byte, pol Policy) (*Unlocked, error) {
	h, err := ReadHeader(img, int64(len(img.b)))
	if err != nil {
		return nil, err
	}
	return h.Unlock(img, pass, pol)
}

func TestFormatRoundTrip(t *testing.T) {
	for _, opts := range []FormatOptions{
		{},
		{KeyBytes: 32, SectorSize: 512, Hash: "sha1", Iterations: 1500},
		{PBKDF: "argon2id", ArgonMemoryKiB: 1024, ArgonThreads: 1, Label: "x"},
		{VolumeKey: bytes.Repeat([]byte{7}, 64)},
	} {
		t.Run(fmt.Sprintf("%s-%d-%d", opts.PBKDF, opts.KeyBytes, opts.SectorSize), func(t *testing.T) {
			img, want := formatMem(t, opts)
			got, err := readUnlock(img, testPassphrase, Policy{SectorSizes: []int{512, 4096}})
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got.VolumeKey, want.VolumeKey) {
				t.Fatal("volume key does not round-trip")
			}
			if opts.VolumeKey != nil && !bytes.Equal(got.VolumeKey, opts.VolumeKey) {
				t.Fatal("given volume key not used")
			}
			if got.Offset != want.Offset || got.SectorSize != want.SectorSize || got.Size != -1 || got.Cipher != CipherAESXTSPlain64 {
				t.Fatalf("segment %v, want %v", got, want)
			}
			got.Wipe()
			if !bytes.Equal(got.VolumeKey, make([]byte, len(got.VolumeKey))) {
				t.Fatal("Wipe left key bytes")
			}
		})
	}
}

func TestFormatRejectsBadOptions(t *testing.T) {
	for _, tc := range []struct {
		opts FormatOptions
		want string
	}{
		{FormatOptions{SectorSize: 8192}, "sector size 8192"},
		{FormatOptions{KeyBytes: 48}, "key size 48"},
		{FormatOptions{VolumeKey: make([]byte, 64), KeyBytes: 32}, "volume key is 64 bytes"},
		{FormatOptions{PBKDF: "scrypt"}, `PBKDF "scrypt"`},
		{FormatOptions{Iterations: 10}, "iterations 10"},
		{FormatOptions{PBKDF: "argon2id", ArgonMemoryKiB: 8 << 30}, "argon2 memory"},
		{FormatOptions{DataOffset: 64 << 10}, "raise DataOffset"},
		{FormatOptions{DataOffset: 12345}, "multiple of 4096"},
		{FormatOptions{Label: strings.Repeat("l", 48)}, "label is 48 bytes"},
		{FormatOptions{Tokens: map[string]json.RawMessage{"0": []byte(`{"keyslots":[]}`)}}, `no "type"`},
		{FormatOptions{Tokens: map[string]json.RawMessage{"99": []byte(`{"type":"x","keyslots":[]}`)}}, "token id"},
		{FormatOptions{Tokens: map[string]json.RawMessage{"0": []byte(`{"type":"x","keyslots":[],"p":"` + strings.Repeat("x", 5<<20) + `"}`)}}, "shrink the tokens"},
	} {
		img := &memImage{b: make([]byte, 2<<20)}
		_, err := Format(img, testPassphrase, tc.opts)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Format(%s): err = %v, want one mentioning %q", tc.want, err, tc.want)
		}
	}
}

func TestWrongKey(t *testing.T) {
	img, _ := formatMem(t, FormatOptions{})
	_, err := readUnlock(img, []byte("not the passphrase"), Policy{})
	if !errors.Is(err, ErrWrongKey) || !strings.Contains(err.Error(), "the key does not unlock any keyslot") {
		t.Fatalf("err = %v, want ErrWrongKey", err)
	}
}

func TestNotLUKS(t *testing.T) {
	for _, size := range []int{0, 100, 4096, 5 << 20} {
		img := &memImage{b: make([]byte, size)}
		_, err := ReadHeader(img, int64(size))
		if !errors.Is(err, ErrNotLUKS) {
			t.Errorf("%d zero bytes: err = %v, want ErrNotLUKS", size, err)
		}
	}
}

func TestTruncatedHeader(t *testing.T) {
	img, _ := formatMem(t, FormatOptions{})
	for _, size := range []int{10, 600, 4096, 8192, 20000} {
		short := &memImage{b: img.b[:size]}
		_, err := ReadHeader(short, int64(size))
		if !errors.Is(err, ErrCorruptHeader) || !strings.Contains(err.Error(), "primary copy") {
			t.Errorf("truncated to %d: err = %v, want ErrCorruptHeader about the primary copy", size, err)
		}
	}
	// Unknown device size: the short read itself is reported.
	_, err := ReadHeader(&memImage{b: img.b[:8192]}, 0)
	if !errors.Is(err, ErrCorruptHeader) || !strings.Contains(err.Error(), "device ends") {
		t.Errorf("truncated, unknown size: err = %v", err)
	}
}

func TestChecksumMismatch(t *testing.T) {
	img, want := formatMem(t, FormatOptions{})
	img.b[4096+20] ^= 1 // primary JSON
	h, err := ReadHeader(img, int64(len(img.b)))
	if err != nil {
		t.Fatalf("one damaged copy must still read: %v", err)
	}
	if len(h.Warnings) != 1 || !strings.Contains(h.Warnings[0], "primary copy at offset 0: checksum mismatch") {
		t.Errorf("warnings = %q", h.Warnings)
	}
	u, err := h.Unlock(img, testPassphrase, Policy{})
	if err != nil || !bytes.Equal(u.VolumeKey, want.VolumeKey) {
		t.Fatalf("unlock via secondary: %v", err)
	}
	img.b[16384+4096+20] ^= 1 // secondary JSON too
	_, err = ReadHeader(img, int64(len(img.b)))
	if !errors.Is(err, ErrCorruptHeader) || !strings.Contains(err.Error(), "both copies") ||
		!strings.Contains(err.Error(), "primary copy at offset 0: checksum mismatch") ||
		!strings.Contains(err.Error(), "secondary copy at offset 16384: checksum mismatch") {
		t.Fatalf("err = %v, want ErrCorruptHeader naming both copies", err)
	}
}

func TestPrimaryMagicGoneSecondaryFound(t *testing.T) {
	img, want := formatMem(t, FormatOptions{})
	clear(img.b[:4096]) // whole primary binary header wiped
	h, err := ReadHeader(img, int64(len(img.b)))
	if err != nil {
		t.Fatal(err)
	}
	u, err := h.Unlock(img, testPassphrase, Policy{})
	if err != nil || !bytes.Equal(u.VolumeKey, want.VolumeKey) {
		t.Fatalf("unlock via secondary found by scanning: %v", err)
	}
}

func TestNewerCopyWins(t *testing.T) {
	img, _ := formatMem(t, FormatOptions{Label: "old"})
	rewriteCopy(t, img.b, 16384, func(m map[string]any) {
		obj(m, "tokens")["5"] = map[string]any{"type": "newer", "keyslots": []any{}}
	}, func(b []byte) {
		binary.BigEndian.PutUint64(b[offSeqID:], 9)
		copy(b[offLabel:offLabel+lenLabel], append([]byte("new"), make([]byte, 45)...))
	})
	h, err := ReadHeader(img, int64(len(img.b)))
	if err != nil {
		t.Fatal(err)
	}
	if h.SeqID != 9 || h.Label != "new" || h.Tokens["5"] == nil {
		t.Fatalf("used seqid %d label %q; want the newer secondary copy", h.SeqID, h.Label)
	}
	if len(h.Warnings) != 1 || !strings.Contains(h.Warnings[0], "older (seqid 1)") {
		t.Errorf("warnings = %q", h.Warnings)
	}
}

func TestForgedHeaders(t *testing.T) {
	for _, tc := range []struct {
		name   string
		edit   func(map[string]any)
		pol    Policy
		is     error
		substr []string
	}{
		{"cipher_null segment", func(m map[string]any) { obj(m, "segments", "0")["encryption"] = "cipher_null-ecb" },
			Policy{}, ErrForbiddenCipher, []string{`data segment 0 asks for cipher "cipher_null-ecb"`, "aes-xts-plain64", "forged"}},
		{"cipher_null keyslot", func(m map[string]any) { obj(m, "keyslots", "0", "area")["encryption"] = "cipher_null" },
			Policy{}, ErrForbiddenCipher, []string{`keyslot 0 area asks for cipher "cipher_null"`, "forged"}},
		{"cbc segment", func(m map[string]any) { obj(m, "segments", "0")["encryption"] = "aes-cbc-essiv:sha256" },
			Policy{}, ErrForbiddenCipher, []string{`"aes-cbc-essiv:sha256" but the mount allows aes-xts-plain64`}},
		{"sector 8192", func(m map[string]any) { obj(m, "segments", "0")["sector_size"] = 8192 },
			Policy{}, ErrForbiddenSectorSize, []string{"sector size 8192 but the mount allows 512 or 4096"}},
		{"sector 4096 not in policy", nil,
			Policy{SectorSizes: []int{512}}, ErrForbiddenSectorSize, []string{"sector size 4096 but the mount allows 512"}},
		{"huge pbkdf2 iterations", func(m map[string]any) { obj(m, "keyslots", "0", "kdf")["iterations"] = 2000000000 },
			Policy{}, ErrKDFLimit, []string{"2000000000 pbkdf2 iterations", "limit 5000000"}},
		{"huge digest iterations", func(m map[string]any) { obj(m, "digests", "0")["iterations"] = 2000000000 },
			Policy{}, ErrKDFLimit, []string{"digest 0 asks for 2000000000"}},
		{"huge argon2 memory", func(m map[string]any) {
			obj(m, "keyslots", "0")["kdf"] = map[string]any{"type": "argon2id", "time": 4, "memory": 1 << 30, "cpus": 4, "salt": "c2FsdHNhbHQ="}
		}, Policy{}, ErrKDFLimit, []string{"1073741824 KiB of argon2 memory"}},
		{"huge argon2 time", func(m map[string]any) {
			obj(m, "keyslots", "0")["kdf"] = map[string]any{"type": "argon2i", "time": 1 << 30, "memory": 64, "cpus": 1, "salt": "c2FsdHNhbHQ="}
		}, Policy{}, ErrKDFLimit, []string{"time cost 1073741824"}},
		{"reencryption requirement", func(m map[string]any) {
			obj(m, "config")["requirements"] = map[string]any{"mandatory": []any{"online-reencrypt-v2"}}
		}, Policy{}, ErrUnsupported, []string{"online-reencrypt-v2", "finish it with cryptsetup"}},
		{"two segments", func(m map[string]any) {
			obj(m, "segments")["1"] = map[string]any{"type": "linear", "offset": "2097152", "size": "dynamic"}
		}, Policy{}, ErrUnsupported, []string{"2 segments"}},
		{"bad volume key size", func(m map[string]any) { obj(m, "keyslots", "0")["key_size"] = 16 },
			Policy{}, ErrCorruptHeader, []string{"keyslot 0 volume key is 16 bytes"}},
		{"all slots ignored", func(m map[string]any) { obj(m, "keyslots", "0")["priority"] = 0 },
			Policy{}, ErrWrongKey, []string{"priority"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img, _ := formatMem(t, FormatOptions{})
			if tc.edit != nil {
				forge(t, img, tc.edit)
			}
			start := time.Now()
			u, err := readUnlock(img, testPassphrase, tc.pol)
			if u != nil {
				t.Fatalf("forged header unlocked: %v", u)
			}
			if !errors.Is(err, tc.is) {
				t.Fatalf("err = %v, want errors.Is %v", err, tc.is)
			}
			for _, s := range tc.substr {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q lacks %q", err, s)
				}
			}
			if d := time.Since(start); d > 10*time.Second {
				t.Errorf("refusing took %v", d) // a guard against hangs, not a benchmark
			}
		})
	}
}

func TestCorruptJSONRejected(t *testing.T) {
	for _, tc := range []struct {
		name string
		edit func(map[string]any)
		want string
	}{
		{"key_size absurd", func(m map[string]any) { obj(m, "keyslots", "0")["key_size"] = 1 << 40 }, "key_size"},
		{"stripes absurd", func(m map[string]any) { obj(m, "keyslots", "0", "af")["stripes"] = 1 << 30 }, "stripes"},
		{"area beyond device", func(m map[string]any) { obj(m, "keyslots", "0", "area")["offset"] = "999999999999" }, "outside the keyslots area"},
		{"area too small", func(m map[string]any) { obj(m, "keyslots", "0", "area")["size"] = "4096" }, "smaller than"},
		{"offset not a string", func(m map[string]any) { obj(m, "segments", "0")["offset"] = 4096 }, "JSON string"},
		{"offset negative", func(m map[string]any) { obj(m, "segments", "0")["offset"] = "-1" }, "decimal number"},
		{"segment beyond device", func(m map[string]any) { obj(m, "segments", "0")["size"] = "99999999999" }, "beyond the end of the device"},
		{"json_size mismatch", func(m map[string]any) { obj(m, "config")["json_size"] = "4096" }, "json_size 4096"},
		{"no digests", func(m map[string]any) { delete(m, "digests") }, `no "digests"`},
		{"digest to missing keyslot", func(m map[string]any) { obj(m, "digests", "0")["keyslots"] = []any{"7"} }, "keyslot 7, which does not exist"},
		{"short digest", func(m map[string]any) { obj(m, "digests", "0")["digest"] = "AAAA" }, "digest 0 length 3"},
		{"keyslot id", func(m map[string]any) { obj(m, "keyslots")["x1"] = obj(m, "keyslots", "0") }, `keyslot id "x1"`},
		{"unknown kdf", func(m map[string]any) { obj(m, "keyslots", "0", "kdf")["type"] = "scrypt" }, `kdf type "scrypt"`},
		{"unknown hash", func(m map[string]any) { obj(m, "keyslots", "0", "af")["hash"] = "md4" }, `hash "md4"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img, _ := formatMem(t, FormatOptions{})
			forge(t, img, tc.edit)
			_, err := ReadHeader(img, int64(len(img.b)))
			if !errors.Is(err, ErrCorruptHeader) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want ErrCorruptHeader mentioning %q", err, tc.want)
			}
		})
	}
}

func TestAbsurdBinaryHeader(t *testing.T) {
	img, _ := formatMem(t, FormatOptions{})
	for _, off := range []int64{0, 16384} {
		rewriteCopy(t, img.b, off, nil, func(b []byte) { binary.BigEndian.PutUint64(b[offHdrSize:], 1<<62) })
	}
	_, err := ReadHeader(img, int64(len(img.b)))
	if !errors.Is(err, ErrCorruptHeader) || !strings.Contains(err.Error(), "hdr_size 4611686018427387904 is not a valid") {
		t.Fatalf("err = %v", err)
	}
}

func TestDeeplyNestedJSON(t *testing.T) {
	js := `{"keyslots":{},"tokens":{"0":{"type":"x","keyslots":[],"d":` + strings.Repeat("[", 100000) + strings.Repeat("]", 100000) +
		`}},"segments":{},"digests":{},"config":{"json_size":"0","keyslots_size":"0"}}`
	if _, err := parseJSON([]byte(js)); err == nil {
		t.Fatal("100000-deep JSON accepted")
	}
}

func TestKeysNeverPrinted(t *testing.T) {
	_, u := formatMem(t, FormatOptions{})
	defer u.Wipe()
	out := fmt.Sprintf("%v %+v %s %#v %x %v %+v", u, u, u, u, u, *u, *u)
	for _, leak := range []string{hex.EncodeToString(u.VolumeKey), string(u.VolumeKey), hex.EncodeToString(u.VolumeKey[:8])} {
		if strings.Contains(out, leak) {
			t.Fatalf("formatted Unlocked reveals key bytes: %s", out)
		}
	}
	if !strings.Contains(out, "512-bit key") {
		t.Errorf("String() lost its description: %s", out)
	}
}

func TestPolicyValidation(t *testing.T) {
	img, _ := formatMem(t, FormatOptions{})
	h, err := ReadHeader(img, int64(len(img.b)))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		pol  Policy
		is   error
		want string
	}{
		{Policy{Ciphers: []string{"cipher_null"}}, ErrUnsupported, `policy lists cipher "cipher_null"`},
		{Policy{SectorSizes: []int{8192}}, nil, "policy lists sector size 8192"},
	} {
		_, err := h.Unlock(img, testPassphrase, tc.pol)
		if err == nil || !strings.Contains(err.Error(), tc.want) || (tc.is != nil && !errors.Is(err, tc.is)) {
			t.Errorf("policy %+v: err = %v, want %q", tc.pol, err, tc.want)
		}
	}
	// An explicit policy equal to the defaults unlocks.
	u, err := h.Unlock(img, testPassphrase, Policy{Ciphers: []string{CipherAESXTSPlain64}, SectorSizes: []int{4096}})
	if err != nil {
		t.Fatal(err)
	}
	u.Wipe()
}

// failingReader fails every read at or beyond failAt with a storage error.
type failingReader struct {
	img    *memImage
	failAt int64
}

var errStorage = errors.New("storage: connection reset")

func (f failingReader) ReadAt(p []byte, off int64) (int, error) {
	if off+int64(len(p)) > f.failAt {
		return 0, errStorage
	}
	return f.img.ReadAt(p, off)
}

// A storage failure is reported as such, not as a missing or corrupt header.
func TestReadErrorsPassedOn(t *testing.T) {
	img, _ := formatMem(t, FormatOptions{})
	for _, failAt := range []int64{0, 4096, 16384, 20000} {
		_, err := ReadHeader(failingReader{img, failAt}, int64(len(img.b)))
		if !errors.Is(err, errStorage) || errors.Is(err, ErrNotLUKS) || errors.Is(err, ErrCorruptHeader) {
			t.Errorf("read failing at %d: err = %v, want the storage error only", failAt, err)
		}
	}
	h, err := ReadHeader(img, int64(len(img.b)))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.Unlock(failingReader{img, 32768}, testPassphrase, Policy{}); !errors.Is(err, errStorage) || errors.Is(err, ErrWrongKey) {
		t.Errorf("Unlock with failing key material read: err = %v", err)
	}
}

// A forged header with many keyslots sharing one area, each within the
// per-keyslot limits, buys at most the total budget of work: the slots
// beyond it are skipped, not derived.
func TestKDFTotalBudget(t *testing.T) {
	img, _ := formatMem(t, FormatOptions{PBKDF: "argon2id", ArgonMemoryKiB: 256, ArgonTime: 4, ArgonThreads: 1})
	forge(t, img, func(m map[string]any) {
		slots := obj(m, "keyslots")
		for i := 1; i < 32; i++ {
			slots[fmt.Sprint(i)] = slots["0"]
		}
		dg := obj(m, "digests", "0")
		ids := []any{}
		for i := range 32 {
			ids = append(ids, fmt.Sprint(i))
		}
		dg["keyslots"] = ids
	})
	pol := Policy{MaxArgonMemoryKiB: 256, MaxArgonTime: 4, MaxTotalArgonWork: 3 * 256 * 4}
	_, err := readUnlock(img, []byte("not the passphrase"), pol)
	if !errors.Is(err, ErrWrongKey) || !errors.Is(err, ErrKDFLimit) {
		t.Fatalf("err = %v, want a wrong key after a spent budget", err)
	}
	if !strings.Contains(err.Error(), "tried keyslot 0, 1, 2)") || !strings.Contains(err.Error(), "total limit 3072") {
		t.Fatalf("err = %v: want exactly three keyslots tried and the budget named", err)
	}
	// The right passphrase still unlocks: the first slot is within budget.
	if u, err := readUnlock(img, testPassphrase, pol); err != nil {
		t.Fatalf("right passphrase: %v", err)
	} else {
		u.Wipe()
	}
}

// Cancellation stops an unlock between keyslots and abandons a derivation
// in progress.
func TestUnlockCancel(t *testing.T) {
	img, _ := formatMem(t, FormatOptions{PBKDF: "argon2id", ArgonMemoryKiB: 64 << 10, ArgonTime: 10, ArgonThreads: 1})
	h, err := ReadHeader(img, int64(len(img.b)))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := h.UnlockContext(ctx, img, testPassphrase, Policy{}); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled before: %v", err)
	}
	ctx, cancel = context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, err := h.UnlockContext(ctx, img, testPassphrase, Policy{}); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("cancelled during the derivation: %v", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("a cancelled unlock took %v", d) // a guard against ignoring ctx, not a benchmark
	}
}
