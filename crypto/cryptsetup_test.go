package crypto

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blobseal/blobseal/crypto/luks"
	"github.com/blobseal/blobseal/internal/testenv"
	xxts "golang.org/x/crypto/xts"
)

// These tests use cryptsetup as the independent reference: images it
// encrypted must open here byte for byte, and images written here must
// open in cryptsetup and decrypt, with the key it reports, independently of
// this package's reader.

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// makeExt4 builds a small ext4 image from a generated directory.
func makeExt4(t *testing.T, dir string, sizeMiB int, blockSize int) []byte {
	t.Helper()
	src := filepath.Join(dir, "src")
	os.MkdirAll(filepath.Join(src, "sub"), 0o755)
	rnd := mrand.New(mrand.NewPCG(1, uint64(sizeMiB)))
	for i := range 20 {
		data := make([]byte, rnd.IntN(200_000))
		for j := range data {
			data[j] = byte(rnd.Uint32())
		}
		os.WriteFile(filepath.Join(src, "sub", fmt.Sprintf("f%02d", i)), data, 0o644)
	}
	img := filepath.Join(dir, "plain.ext4")
	run(t, "mkfs.ext4", "-q", "-F", "-b", fmt.Sprint(blockSize), "-d", src, img, fmt.Sprintf("%dM", sizeMiB))
	data, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func writeKey(t *testing.T, dir string, n int) (string, []byte) {
	t.Helper()
	key := make([]byte, n)
	rand.Read(key)
	path := filepath.Join(dir, "key.bin")
	if err := os.WriteFile(path, key, 0o600); err != nil {
		t.Fatal(err)
	}
	return path, key
}

func openFile(t *testing.T, path string) (*os.File, int64) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	st, _ := f.Stat()
	return f, st.Size()
}

// dumpVolumeKey asks cryptsetup for the volume key of an image.
func dumpVolumeKey(t *testing.T, img, keyFile string) []byte {
	t.Helper()
	out := run(t, "cryptsetup", "luksDump", "--dump-volume-key", "--batch-mode", "--key-file", keyFile, img)
	i := strings.Index(out, "MK dump:")
	if i < 0 {
		t.Fatalf("no MK dump in:\n%s", out)
	}
	var hexDigits strings.Builder
	for _, f := range strings.Fields(out[i+len("MK dump:"):]) {
		if len(f) != 2 {
			break
		}
		hexDigits.WriteString(f)
	}
	key, err := hex.DecodeString(hexDigits.String())
	if err != nil {
		t.Fatal(err)
	}
	return key
}

func TestOpenImagesCryptsetupEncrypted(t *testing.T) {
	testenv.RequireTools(t, "cryptsetup", "mkfs.ext4")
	cases := []struct {
		name string
		args []string
		slot string
	}{
		{"luks2 pbkdf2 sector512 xts512", []string{"--type", "luks2", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--sector-size", "512"}, ""},
		{"luks2 pbkdf2 sector4096 xts256 (Azure tooling style)", []string{"--type", "luks2", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--sector-size", "4096", "--key-size", "256"}, ""},
		{"luks2 argon2id sector4096", []string{"--type", "luks2", "--pbkdf", "argon2id", "--pbkdf-memory", "32768", "--pbkdf-force-iterations", "4", "--sector-size", "4096"}, ""},
		{"luks2 argon2i sha512 slot 3", []string{"--type", "luks2", "--pbkdf", "argon2i", "--pbkdf-memory", "16384", "--pbkdf-force-iterations", "4", "--hash", "sha512", "--key-slot", "3"}, "3"},
		// LUKS1 reencryption needs device-mapper, so these are encrypted as
		// LUKS2 and converted by cryptsetup (the payload is unchanged).
		{"luks1 sha1 (converted)", []string{"--type", "luks2", "--pbkdf", "pbkdf2", "--hash", "sha1", "--pbkdf-force-iterations", "1000", "--sector-size", "512", "+luks1"}, ""},
		{"luks1 xts256 sha256 (converted)", []string{"--type", "luks2", "--pbkdf", "pbkdf2", "--key-size", "256", "--pbkdf-force-iterations", "1000", "--sector-size", "512", "+luks1"}, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			orig := makeExt4(t, dir, 8, 4096)
			img := filepath.Join(dir, "plain.ext4")
			if err := os.Truncate(img, int64(len(orig))+32<<20); err != nil {
				t.Fatal(err)
			}
			keyFile, key := writeKey(t, dir, 32)
			extra := c.args
			toLUKS1 := extra[len(extra)-1] == "+luks1"
			if toLUKS1 {
				extra = extra[:len(extra)-1]
			}
			args := append([]string{"reencrypt", "--encrypt", "--batch-mode", "--cipher", "aes-xts-plain64",
				"--reduce-device-size", "32M", "--key-file", keyFile}, extra...)
			run(t, "cryptsetup", append(args, img)...)
			if toLUKS1 {
				run(t, "cryptsetup", "convert", "--batch-mode", "--type", "luks1", img)
				if dump := run(t, "cryptsetup", "luksDump", img); !strings.Contains(dump, "Version:       \t1") {
					t.Fatalf("not converted to LUKS1:\n%s", dump)
				}
			}
			f, size := openFile(t, img)
			vol, err := Open(f, size, key, OpenOptions{})
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			defer vol.Close()
			if c.slot != "" && fmt.Sprint(vol.Info().Keyslot) != c.slot {
				t.Errorf("unlocked keyslot %d, want %s", vol.Info().Keyslot, c.slot)
			}
			got := make([]byte, len(orig))
			if _, err := vol.ReadAt(got, 0); err != nil {
				t.Fatalf("ReadAt: %v", err)
			}
			if !bytes.Equal(got, orig) {
				t.Fatalf("decrypted payload differs from the original ext4 image")
			}
			// Unaligned reads agree with the aligned whole.
			for range 50 {
				off := mrand.Int64N(int64(len(orig)) - 1)
				n := 1 + mrand.Int64N(min(int64(len(orig))-off, 70000))
				p := make([]byte, n)
				if _, err := vol.ReadAt(p, off); err != nil {
					t.Fatalf("ReadAt(%d,%d): %v", off, n, err)
				}
				if !bytes.Equal(p, orig[off:off+n]) {
					t.Fatalf("ReadAt(%d,%d) differs", off, n)
				}
			}
			// The wrong key is named as such.
			bad := append([]byte(nil), key...)
			bad[0] ^= 1
			if _, err := Open(f, size, bad, OpenOptions{}); !errors.Is(err, luks.ErrWrongKey) {
				t.Fatalf("wrong key gave %v", err)
			}
		})
	}
}

// TestCreateImageOpensInCryptsetup writes an image and checks it with
// cryptsetup, then decrypts it with the key cryptsetup reports using
// golang.org/x/crypto/xts directly, not this package's reader.
func TestCreateImageOpensInCryptsetup(t *testing.T) {
	testenv.RequireTools(t, "cryptsetup", "mkfs.ext4")
	for _, c := range []struct {
		name string
		opts FormatOptions
	}{
		{"pbkdf2 4096 no holes", FormatOptions{NoHoles: true}},
		{"argon2id 512 holes", FormatOptions{PBKDF: "argon2id", Iterations: 4, ArgonMemoryKiB: 16384, ArgonThreads: 1, SectorSize: 512}},
		{"pbkdf2 4096 aes128", FormatOptions{KeyBytes: 32}},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			orig := makeExt4(t, dir, 24, 4096)
			keyFile, pass := writeKey(t, dir, 32)
			out := filepath.Join(dir, "enc.img")
			dst, err := os.Create(out)
			if err != nil {
				t.Fatal(err)
			}
			res, err := CreateImage(context.Background(), dst, bytes.NewReader(orig), int64(len(orig)), pass, c.opts)
			if err != nil {
				t.Fatalf("CreateImage: %v", err)
			}
			dst.Close()

			dump := run(t, "cryptsetup", "luksDump", out)
			if !strings.Contains(dump, "aes-xts-plain64") {
				t.Fatalf("luksDump:\n%s", dump)
			}
			run(t, "cryptsetup", "open", "--test-passphrase", "--key-file", keyFile, out)
			wrong := filepath.Join(dir, "wrong.bin")
			os.WriteFile(wrong, []byte("not the key"), 0o600)
			if err := exec.Command("cryptsetup", "open", "--test-passphrase", "--key-file", wrong, out).Run(); err == nil {
				t.Fatal("cryptsetup accepted a wrong key")
			}
			vk := dumpVolumeKey(t, out, keyFile)

			f, size := openFile(t, out)
			vol, err := Open(f, size, pass, OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer vol.Close()
			info := vol.Info()
			if len(vk)*8 != info.KeyBits {
				t.Fatalf("cryptsetup key is %d bits, ours %d", len(vk)*8, info.KeyBits)
			}
			// Independent decryption of every sector that was stored.
			ref, err := xxts.NewCipher(aes.NewCipher, vk)
			if err != nil {
				t.Fatal(err)
			}
			ss := int64(info.SectorSize)
			ct := make([]byte, ss)
			pt := make([]byte, ss)
			checked := 0
			for off := int64(0); off < int64(len(orig)); off += ss {
				if _, err := f.ReadAt(ct, info.DataOffset+off); err != nil {
					t.Fatal(err)
				}
				if isZero(ct) {
					if c.opts.NoHoles || !isZero(orig[off:off+ss]) {
						t.Fatalf("sector at %d was not stored (plaintext zero: %v)", off, isZero(orig[off:off+ss]))
					}
					continue
				}
				ref.Decrypt(pt, ct, uint64(off/512))
				if !bytes.Equal(pt, orig[off:off+ss]) {
					t.Fatalf("sector at %d does not decrypt to the plaintext with cryptsetup's key", off)
				}
				checked++
			}
			if c.opts.NoHoles && (res.HoleBytes != 0 || info.ZeroSectors) {
				t.Fatal("NoHoles image has holes")
			}
			if !c.opts.NoHoles && (res.HoleBytes == 0 || !info.ZeroSectors) {
				t.Fatal("sparse ext4 image produced no holes")
			}
			t.Logf("%d sectors checked independently, %d hole bytes", checked, res.HoleBytes)
			got := make([]byte, len(orig))
			if _, err := vol.ReadAt(got, 0); err != nil && err != io.EOF {
				t.Fatal(err)
			}
			if !bytes.Equal(got, orig) {
				t.Fatal("our reader does not return the plaintext")
			}
		})
	}
}
