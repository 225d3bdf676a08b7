package xts

import (
	"bytes"
	"crypto/aes"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/blobseal/blobseal/internal/testenv"
	xxts "golang.org/x/crypto/xts"
)

func mustHex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatalf("bad hex in test data: %v", err)
	}
	return b
}

// TestImplementationsPresent makes sure the per-implementation tests below
// really exercise the assembly on CPUs that have it, instead of quietly
// testing only the portable code.
func TestImplementationsPresent(t *testing.T) {
	got := availableImpls()
	t.Logf("implementations under test: %v (default %v)", got, bestImpl())
	if got[len(got)-1] != implGeneric {
		t.Fatalf("portable implementation missing from %v", got)
	}
	if runtime.GOARCH == "amd64" && haveVAES() != haveVAESYMM() {
		t.Logf("note: VAES on ZMM %v, on YMM %v", haveVAES(), haveVAESYMM())
	}
	if haveVAES() && bestImpl() != implVAES {
		t.Fatalf("CPU has VAES but default implementation is %v", bestImpl())
	}
	if !haveVAES() && haveAESNI() && bestImpl() != implAESNI {
		t.Fatalf("CPU has AES-NI but default implementation is %v", bestImpl())
	}
}

// TestGeneratedAssemblyUpToDate regenerates xts_amd64.s and compares, so the
// generator and the committed assembly cannot drift apart.
func TestGeneratedAssemblyUpToDate(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the generator with go run")
	}
	goTool := testenv.RequireTools(t, "go")[0]
	out := filepath.Join(t.TempDir(), "xts_amd64.s")
	cmd := exec.Command(goTool, "run", "gen_amd64.go", "-out", out)
	if msg, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go run gen_amd64.go: %v\n%s", err, msg)
	}
	want, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile("xts_amd64.s")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("xts_amd64.s is stale: run go generate ./crypto/xts")
	}
}

func TestIEEE1619Vectors(t *testing.T) {
	for _, im := range availableImpls() {
		for _, v := range ieeeVectors {
			t.Run(fmt.Sprintf("%v/vector%d", im, v.number), func(t *testing.T) {
				key, pt, ct := mustHex(t, v.key), mustHex(t, v.plaintext), mustHex(t, v.ciphertext)
				c, err := newWithImpl(key, 512, im)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				got := make([]byte, len(pt))
				if len(pt)%512 == 0 {
					// Whole sectors go through the public API.
					if err := c.Encrypt(got, pt, v.unit, 1); err != nil {
						t.Fatal(err)
					}
				} else {
					c.cryptUnit(false, got, pt, v.unit)
				}
				if !bytes.Equal(got, ct) {
					t.Fatalf("encrypt mismatch:\n got %x\nwant %x", got, ct)
				}
				// Decrypt in place.
				if len(pt)%512 == 0 {
					if err := c.Decrypt(got, got, v.unit, 1); err != nil {
						t.Fatal(err)
					}
				} else {
					c.cryptUnit(true, got, got, v.unit)
				}
				if !bytes.Equal(got, pt) {
					t.Fatalf("decrypt mismatch:\n got %x\nwant %x", got, pt)
				}
			})
		}
	}
}

// reference runs golang.org/x/crypto/xts sector by sector.
func reference(t testing.TB, decrypt bool, key, src []byte, sectorSize int, iv, ivStep uint64) []byte {
	t.Helper()
	ref, err := xxts.NewCipher(aes.NewCipher, key)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]byte, len(src))
	for off := 0; off < len(src); off += sectorSize {
		if decrypt {
			ref.Decrypt(out[off:off+sectorSize], src[off:off+sectorSize], iv)
		} else {
			ref.Encrypt(out[off:off+sectorSize], src[off:off+sectorSize], iv)
		}
		iv += ivStep
	}
	return out
}

func TestMatchesXCrypto(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, im := range availableImpls() {
		for trial := 0; trial < 24; trial++ {
			keyLen := []int{32, 64}[trial%2]
			sectorSize := 512 << (trial / 2 % 4)
			ivStep := []uint64{1, 8}[trial/8%2]
			inPlace := trial%3 == 0
			sectors := 1 + rng.IntN(9)
			// Some IVs near 2^64 so the 64-bit sector number wraps.
			iv := rng.Uint64()
			if trial%4 == 1 {
				iv = ^uint64(0) - uint64(rng.IntN(4))
			}
			name := fmt.Sprintf("%v/aes%d/%dB/step%d/%dsectors/inplace=%v", im, keyLen*4, sectorSize, ivStep, sectors, inPlace)
			t.Run(name, func(t *testing.T) {
				key := make([]byte, keyLen)
				fillRand(rng, key)
				plain := make([]byte, sectors*sectorSize)
				fillRand(rng, plain)
				c, err := newWithImpl(key, sectorSize, im)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()

				wantCT := reference(t, false, key, plain, sectorSize, iv, ivStep)
				ct := make([]byte, len(plain))
				if inPlace {
					copy(ct, plain)
					err = c.Encrypt(ct, ct, iv, ivStep)
				} else {
					err = c.Encrypt(ct, plain, iv, ivStep)
				}
				if err != nil {
					t.Fatal(err)
				}
				if i := firstDiff(ct, wantCT); i >= 0 {
					t.Fatalf("encrypt differs from x/crypto/xts at byte %d (sector %d)", i, i/sectorSize)
				}

				wantPT := reference(t, true, key, ct, sectorSize, iv, ivStep)
				if !bytes.Equal(wantPT, plain) {
					t.Fatal("reference does not round-trip; test is broken")
				}
				pt := make([]byte, len(ct))
				if inPlace {
					copy(pt, ct)
					err = c.Decrypt(pt, pt, iv, ivStep)
				} else {
					err = c.Decrypt(pt, ct, iv, ivStep)
				}
				if err != nil {
					t.Fatal(err)
				}
				if i := firstDiff(pt, plain); i >= 0 {
					t.Fatalf("decrypt differs from x/crypto/xts at byte %d (sector %d)", i, i/sectorSize)
				}
			})
		}
	}
}

// TestOddBlockCounts drives the assembly with block counts that are not a
// multiple of its batch (16 for VAES, 8 for AES-NI), so the tail paths and
// the hand-over of the running tweak between them are checked too.
func TestOddBlockCounts(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for _, im := range availableImpls() {
		for _, keyLen := range []int{32, 64} {
			key := make([]byte, keyLen)
			fillRand(rng, key)
			c, err := newWithImpl(key, 512, im)
			if err != nil {
				t.Fatal(err)
			}
			ref, err := xxts.NewCipher(aes.NewCipher, key)
			if err != nil {
				t.Fatal(err)
			}
			for blocks := 1; blocks <= 70; blocks++ {
				plain := make([]byte, 16*blocks)
				fillRand(rng, plain)
				unit := rng.Uint64()
				want := make([]byte, len(plain))
				ref.Encrypt(want, plain, unit)
				got := make([]byte, len(plain))
				c.cryptUnit(false, got, plain, unit)
				if i := firstDiff(got, want); i >= 0 {
					t.Fatalf("%v aes%d %d blocks: encrypt differs at byte %d", im, keyLen*4, blocks, i)
				}
				c.cryptUnit(true, got, got, unit)
				if i := firstDiff(got, plain); i >= 0 {
					t.Fatalf("%v aes%d %d blocks: decrypt differs at byte %d", im, keyLen*4, blocks, i)
				}
			}
			c.Close()
		}
	}
}

func TestParallelMatchesSerial(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(4))
	rng := rand.New(rand.NewPCG(5, 6))
	key := make([]byte, 64)
	fillRand(rng, key)
	for _, sectorSize := range []int{512, 4096} {
		c, err := New(key, sectorSize)
		if err != nil {
			t.Fatal(err)
		}
		// Sizes below, at and above the 256 KiB threshold, the largest not a
		// whole number of 64 KiB pieces.
		for _, size := range []int{4096, 256<<10 - 4096, 256 << 10, 301 * 4096} {
			plain := make([]byte, size)
			fillRand(rng, plain)
			const iv, step = 1 << 40, 8
			serial := make([]byte, len(plain))
			if err := c.Encrypt(serial, plain, iv, step); err != nil {
				t.Fatal(err)
			}
			par := make([]byte, len(plain))
			if err := c.EncryptParallel(par, plain, iv, step); err != nil {
				t.Fatal(err)
			}
			if i := firstDiff(par, serial); i >= 0 {
				t.Fatalf("%dB sectors, %d bytes: EncryptParallel differs at byte %d", sectorSize, size, i)
			}
			if err := c.DecryptParallel(par, par, iv, step); err != nil {
				t.Fatal(err)
			}
			if i := firstDiff(par, plain); i >= 0 {
				t.Fatalf("%dB sectors, %d bytes: in-place DecryptParallel differs at byte %d", sectorSize, size, i)
			}
		}
		c.Close()
	}
}

// opensslXTS runs OpenSSL's AES-XTS (through the Python cryptography
// package, which calls libcrypto's EVP aes-xts) over each sector, with the
// plain64 IV as the 16-byte tweak input. The `openssl enc` command cannot be
// used: OpenSSL 3.0 refuses XTS there ("enc XTS ciphers not supported").
// The key and data travel over stdin, never argv or disk.
const opensslXTS = `
import sys, json
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
hdr = json.loads(sys.stdin.buffer.readline())
data = sys.stdin.buffer.read()
key, ss = bytes.fromhex(hdr["key"]), hdr["sector"]
out = bytearray()
for i, tw in enumerate(hdr["tweaks"]):
    c = Cipher(algorithms.AES(key), modes.XTS(bytes.fromhex(tw)))
    op = c.decryptor() if hdr["decrypt"] else c.encryptor()
    out += op.update(data[i*ss:(i+1)*ss]) + op.finalize()
sys.stdout.buffer.write(out)
`

func runOpenSSLXTS(t *testing.T, python string, decrypt bool, key, data []byte, sectorSize int, iv, ivStep uint64) []byte {
	t.Helper()
	var tweaks []string
	for off := 0; off < len(data); off += sectorSize {
		var ivBlock [16]byte
		binary.LittleEndian.PutUint64(ivBlock[:], iv)
		tweaks = append(tweaks, hex.EncodeToString(ivBlock[:]))
		iv += ivStep
	}
	hdr, err := json.Marshal(map[string]any{"key": hex.EncodeToString(key), "sector": sectorSize, "tweaks": tweaks, "decrypt": decrypt})
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(python, "-c", opensslXTS)
	cmd.Stdin = io.MultiReader(bytes.NewReader(hdr), strings.NewReader("\n"), bytes.NewReader(data))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("OpenSSL XTS via python3: %v: %s", err, stderr.String())
	}
	return out
}

// TestOpenSSL cross-checks a few sectors against OpenSSL's XTS, both ways,
// for AES-128 and AES-256, with a LUKS2-style IV step of 8.
func TestOpenSSL(t *testing.T) {
	// Debian's python3 with python3-cryptography first (what .ci/run
	// installs), then whatever python3 is on PATH.
	python := ""
	for _, candidate := range []string{"/usr/bin/python3", "python3"} {
		if exec.Command(candidate, "-c", "import cryptography.hazmat.primitives.ciphers").Run() == nil {
			python = candidate
			break
		}
	}
	if python == "" {
		testenv.Unavailable(t, "python3 with the cryptography package (Debian: python3-cryptography) is needed to reach OpenSSL's XTS")
	}
	rng := rand.New(rand.NewPCG(7, 8))
	for _, keyLen := range []int{32, 64} {
		for _, sectorSize := range []int{512, 4096} {
			key := make([]byte, keyLen)
			fillRand(rng, key)
			c, err := New(key, sectorSize)
			if err != nil {
				t.Fatal(err)
			}
			plain := make([]byte, 3*sectorSize)
			fillRand(rng, plain)
			const first, step = 0xffff_fff0_0000_0001, 8
			ct := make([]byte, len(plain))
			if err := c.Encrypt(ct, plain, first, step); err != nil {
				t.Fatal(err)
			}
			if i := firstDiff(ct, runOpenSSLXTS(t, python, false, key, plain, sectorSize, first, step)); i >= 0 {
				t.Fatalf("aes%d/%dB: ciphertext differs from OpenSSL at byte %d", keyLen*4, sectorSize, i)
			}
			// Decrypt ciphertext that OpenSSL produced from different data.
			other := make([]byte, len(plain))
			fillRand(rng, other)
			theirs := runOpenSSLXTS(t, python, false, key, other, sectorSize, first, step)
			back := make([]byte, len(theirs))
			if err := c.Decrypt(back, theirs, first, step); err != nil {
				t.Fatal(err)
			}
			if i := firstDiff(back, other); i >= 0 {
				t.Fatalf("aes%d/%dB: decrypting OpenSSL ciphertext differs at byte %d", keyLen*4, sectorSize, i)
			}
			c.Close()
		}
	}
}

func TestCloseWipesKeys(t *testing.T) {
	for _, im := range availableImpls() {
		key := bytes.Repeat([]byte{0xa5}, 64)
		c, err := newWithImpl(key, 512, im)
		if err != nil {
			t.Fatal(err)
		}
		schedules := map[string][]byte{"enc": c.ks.enc[:], "dec": c.ks.dec[:], "tweak": c.ks.tweak[:]}
		if im == implVAESYMM {
			schedules["encWide"], schedules["decWide"] = c.ks.encWide[:], c.ks.decWide[:]
		} else {
			defer func() {
				// Unused by this implementation: must never have held a key.
				if !bytes.Equal(c.ks.encWide[:], make([]byte, len(c.ks.encWide))) {
					t.Errorf("%v: wide schedule filled though unused", im)
				}
			}()
		}
		for name, s := range schedules {
			if bytes.Equal(s, make([]byte, len(s))) {
				t.Fatalf("%v: %s schedule is zero before Close; test cannot tell", im, name)
			}
		}
		c.Close()
		for name, s := range schedules {
			if !bytes.Equal(s, make([]byte, len(s))) {
				t.Fatalf("%v: %s schedule not wiped by Close: %x", im, name, s)
			}
		}
		buf := make([]byte, 512)
		if err := c.Decrypt(buf, buf, 0, 1); !errors.Is(err, ErrClosed) {
			t.Fatalf("%v: Decrypt after Close returned %v, want ErrClosed", im, err)
		}
		if err := c.EncryptParallel(buf, buf, 0, 1); !errors.Is(err, ErrClosed) {
			t.Fatalf("%v: EncryptParallel after Close returned %v, want ErrClosed", im, err)
		}
	}
}

func TestBadInput(t *testing.T) {
	key := make([]byte, 64)
	for i := range key {
		key[i] = byte(i)
	}
	for _, n := range []int{0, 16, 31, 48, 65} {
		if _, err := New(make([]byte, n), 512); err == nil || !strings.Contains(err.Error(), "32 or 64 bytes") {
			t.Errorf("key of %d bytes: err = %v", n, err)
		}
	}
	for _, ss := range []int{0, 256, 513, 1000, 8192, -512} {
		if _, err := New(key, ss); err == nil || !strings.Contains(err.Error(), "sector size") {
			t.Errorf("sector size %d: err = %v", ss, err)
		}
	}
	c, err := New(key, 1024)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if c.SectorSize() != 1024 || c.KeySize() != 64 {
		t.Fatalf("SectorSize/KeySize = %d/%d", c.SectorSize(), c.KeySize())
	}
	s := c.String()
	if !strings.Contains(s, "256-bit") || strings.Contains(s, hex.EncodeToString(key[:4])) {
		t.Fatalf("String() = %q", s)
	}
	buf := make([]byte, 4096)
	if err := c.Decrypt(buf, buf[:1000], 0, 1); !errors.Is(err, ErrPartialSector) {
		t.Errorf("partial sector: err = %v", err)
	}
	if err := c.Decrypt(buf[:1024], make([]byte, 2048), 0, 1); err == nil || !strings.Contains(err.Error(), "smaller") {
		t.Errorf("short dst: err = %v", err)
	}
	if err := c.Decrypt(buf[16:16+2048], buf[:2048], 0, 1); err == nil || !strings.Contains(err.Error(), "overlap") {
		t.Errorf("partial overlap: err = %v", err)
	}
	if err := c.DecryptParallel(buf[16:16+2048], buf[:2048], 0, 1); err == nil || !strings.Contains(err.Error(), "overlap") {
		t.Errorf("partial overlap (parallel): err = %v", err)
	}
	// Empty input is zero sectors, not an error.
	if err := c.Decrypt(nil, nil, 0, 1); err != nil {
		t.Errorf("empty input: err = %v", err)
	}
	if _, err := newWithImpl(key, 512, impl(99)); err == nil {
		t.Error("unknown implementation accepted")
	}
}

// FuzzDecryptMatchesReference checks every implementation against
// golang.org/x/crypto/xts for arbitrary keys, data, IVs and sector sizes.
func FuzzDecryptMatchesReference(f *testing.F) {
	f.Add(make([]byte, 64), make([]byte, 512), uint64(0), false, uint8(0))
	f.Add(bytes.Repeat([]byte{1, 2, 3}, 11), bytes.Repeat([]byte{9}, 1536), ^uint64(0), true, uint8(1))
	f.Add([]byte("0123456789abcdef0123456789abcdefXYZ"), []byte("short"), uint64(1)<<63, false, uint8(3))
	f.Fuzz(func(t *testing.T, keySeed, data []byte, iv uint64, stepEight bool, sizeSel uint8) {
		// Derive a valid key and sector size from the inputs so most
		// executions reach the cipher; invalid ones must fail cleanly.
		keyLen := 32
		if len(keySeed) > 32 {
			keyLen = 64
		}
		key := make([]byte, keyLen)
		copy(key, keySeed)
		sectorSize := 512 << (sizeSel % 4)
		step := uint64(1)
		if stepEight {
			step = 8
		}
		// Short inputs are stretched to whole sectors by repetition so that
		// every execution reaches the cipher; the raw input checks the
		// partial-sector error path.
		sectors := min(1+len(data)/sectorSize, 4)
		buf := make([]byte, sectors*sectorSize)
		for i := 0; len(data) > 0 && i < len(buf); i += len(data) {
			copy(buf[i:], data)
		}
		want := reference(t, true, key, buf, sectorSize, iv, step)
		for _, im := range availableImpls() {
			c, err := newWithImpl(key, sectorSize, im)
			if err != nil {
				t.Fatal(err)
			}
			if len(data)%sectorSize != 0 {
				if err := c.Decrypt(make([]byte, len(data)), data, iv, step); !errors.Is(err, ErrPartialSector) {
					t.Fatalf("%v: %d bytes with %d-byte sectors: err = %v", im, len(data), sectorSize, err)
				}
			}
			got := make([]byte, len(buf))
			if err := c.Decrypt(got, buf, iv, step); err != nil {
				t.Fatalf("%v: %v", im, err)
			}
			if i := firstDiff(got, want); i >= 0 {
				t.Fatalf("%v: decrypt differs from x/crypto/xts at byte %d", im, i)
			}
			if err := c.Encrypt(got, got, iv, step); err != nil {
				t.Fatal(err)
			}
			if i := firstDiff(got, buf); i >= 0 {
				t.Fatalf("%v: encrypt does not invert decrypt at byte %d", im, i)
			}
			c.Close()
		}
	})
}

func fillRand(rng *rand.Rand, b []byte) {
	for i := 0; i+8 <= len(b); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], rng.Uint64())
	}
	for i := len(b) &^ 7; i < len(b); i++ {
		b[i] = byte(rng.Uint32())
	}
}

// firstDiff returns the first index where a and b differ, or -1.
func firstDiff(a, b []byte) int {
	n := min(len(a), len(b))
	for i := 0; i < n; i++ {
		if a[i] != b[i] {
			return i
		}
	}
	if len(a) != len(b) {
		return n
	}
	return -1
}
