package luks

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/blobseal/blobseal/crypto/xts"
	"github.com/blobseal/blobseal/internal/testenv"
)

// fastArgon keeps cryptsetup's argon2 keyslots cheap in tests.
var fastArgon = []string{"--pbkdf-memory", "32768", "--pbkdf-force-iterations", "4", "--pbkdf-parallel", "2"}

type tool struct {
	t          *testing.T
	cryptsetup string
	dir        string
}

func newTool(t *testing.T, extra ...string) *tool {
	t.Helper()
	paths := testenv.RequireTools(t, append([]string{"cryptsetup"}, extra...)...)
	return &tool{t: t, cryptsetup: paths[0], dir: t.TempDir()}
}

func (c *tool) run(args ...string) string {
	c.t.Helper()
	out, err := c.try(args...)
	if err != nil {
		c.t.Fatalf("cryptsetup %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func (c *tool) try(args ...string) (string, error) {
	cmd := exec.Command(c.cryptsetup, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

// keyFile writes a random 32-byte passphrase (like the HSM-released secret).
func (c *tool) keyFile(name string) (string, []byte) {
	c.t.Helper()
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		c.t.Fatal(err)
	}
	p := filepath.Join(c.dir, name)
	if err := os.WriteFile(p, key, 0o600); err != nil {
		c.t.Fatal(err)
	}
	return p, key
}

func (c *tool) emptyImage(name string, size int64) string {
	c.t.Helper()
	p := filepath.Join(c.dir, name)
	f, err := os.Create(p)
	if err != nil {
		c.t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		c.t.Fatal(err)
	}
	return p
}

// dumpVolumeKey parses `luksDump --dump-volume-key`.
func (c *tool) dumpVolumeKey(img, keyFile string) []byte {
	c.t.Helper()
	out := c.run("luksDump", "--dump-volume-key", "--batch-mode", "--key-file", keyFile, img)
	i := strings.Index(out, "MK dump:")
	if i < 0 {
		c.t.Fatalf("no MK dump in luksDump output:\n%s", out)
	}
	hexText := strings.Join(strings.Fields(out[i+len("MK dump:"):]), "")
	key, err := hex.DecodeString(hexText)
	if err != nil || (len(key) != 32 && len(key) != 64) {
		c.t.Fatalf("cannot parse MK dump %q: %v", hexText, err)
	}
	return key
}

type dumpedSegment struct {
	offset, size int64 // size -1: whole device
	sectorSize   int
	cipher       string
}

var (
	reSegOffset = regexp.MustCompile(`(?m)^\s+offset: (\d+) \[bytes\]`)
	reSegLength = regexp.MustCompile(`(?m)^\s+length: (\S.*)$`)
	reSegSector = regexp.MustCompile(`(?m)^\s+sector: (\d+) \[bytes\]`)
	reSegCipher = regexp.MustCompile(`(?m)^\s+cipher: (\S+)`)
	reL1Payload = regexp.MustCompile(`(?m)^Payload offset:\s+(\d+)`)
	reL1Cipher  = regexp.MustCompile(`(?m)^Cipher name:\s+(\S+)\s*\nCipher mode:\s+(\S+)`)
)

// dumpSegment parses the data segment from `luksDump`.
func (c *tool) dumpSegment(img string) dumpedSegment {
	c.t.Helper()
	out := c.run("luksDump", img)
	if m := reL1Payload.FindStringSubmatch(out); m != nil { // LUKS1
		sectors, _ := strconv.ParseInt(m[1], 10, 64)
		cm := reL1Cipher.FindStringSubmatch(out)
		if cm == nil {
			c.t.Fatalf("no cipher in LUKS1 dump:\n%s", out)
		}
		return dumpedSegment{offset: sectors * 512, size: -1, sectorSize: 512, cipher: cm[1] + "-" + cm[2]}
	}
	seg := out[strings.Index(out, "Data segments:"):strings.Index(out, "Keyslots:")]
	var d dumpedSegment
	m1, m2, m3, m4 := reSegOffset.FindStringSubmatch(seg), reSegLength.FindStringSubmatch(seg), reSegSector.FindStringSubmatch(seg), reSegCipher.FindStringSubmatch(seg)
	if m1 == nil || m2 == nil || m3 == nil || m4 == nil {
		c.t.Fatalf("cannot parse data segment from luksDump:\n%s", seg)
	}
	d.offset, _ = strconv.ParseInt(m1[1], 10, 64)
	d.size = -1
	if !strings.Contains(m2[1], "whole device") {
		n, err := strconv.ParseInt(strings.Fields(m2[1])[0], 10, 64)
		if err != nil {
			c.t.Fatalf("cannot parse segment length %q", m2[1])
		}
		d.size = n
	}
	d.sectorSize, _ = strconv.Atoi(m3[1])
	d.cipher = m4[1]
	return d
}

func openImage(t *testing.T, path string) (*os.File, int64) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	return f, st.Size()
}

// TestReadCryptsetupImages: for images cryptsetup formatted with many
// options, Unlock yields exactly the volume key and segment cryptsetup reports.
func TestReadCryptsetupImages(t *testing.T) {
	c := newTool(t)
	cases := []struct {
		name     string
		version  int
		args     []string
		slot     int
		label    string
		addKeyTo int // >0: also luksAddKey a second passphrase into this slot and unlock with it
		hdrSize  int64
	}{
		{name: "pbkdf2-sha1-512-aes128", version: 2, args: []string{"--pbkdf", "pbkdf2", "--hash", "sha1", "--pbkdf-force-iterations", "1000", "--sector-size", "512", "--key-size", "256"}},
		{name: "azure-tooling", version: 2, args: []string{"--cipher", "aes-xts-plain64", "--sector-size", "4096", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"}},
		{name: "pbkdf2-sha512-label", version: 2, label: "blobseal-test", args: []string{"--pbkdf", "pbkdf2", "--hash", "sha512", "--pbkdf-force-iterations", "2000", "--label", "blobseal-test"}},
		{name: "argon2i-512", version: 2, args: append([]string{"--pbkdf", "argon2i", "--sector-size", "512"}, fastArgon...)},
		{name: "argon2id-slot3-aes128", version: 2, slot: 3, args: append([]string{"--pbkdf", "argon2id", "--key-slot", "3", "--key-size", "256"}, fastArgon...)},
		{name: "metadata-64k-keyslots-1m-offset", version: 2, hdrSize: 64 << 10, args: []string{"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--luks2-metadata-size", "64k", "--luks2-keyslots-size", "1m", "--offset", "8192"}},
		{name: "added-key-slot5", version: 2, addKeyTo: 5, args: []string{"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"}},
		{name: "luks1-sha256", version: 1, args: []string{"--type", "luks1", "--pbkdf-force-iterations", "1000"}},
		{name: "luks1-sha1-aes128-slot2", version: 1, slot: 2, args: []string{"--type", "luks1", "--hash", "sha1", "--key-size", "256", "--pbkdf-force-iterations", "1000", "--key-slot", "2"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := &tool{t: t, cryptsetup: c.cryptsetup, dir: t.TempDir()}
			img := c.emptyImage("img", 20<<20)
			keyPath, key := c.keyFile("key")
			args := []string{"luksFormat", "--batch-mode", "--key-file", keyPath}
			if tc.version == 2 {
				args = append(args, "--type", "luks2")
			}
			c.run(append(append(args, tc.args...), img)...)
			unlockWith, wantSlot := key, tc.slot
			if tc.addKeyTo > 0 {
				newPath, newKey := c.keyFile("key2")
				c.run("luksAddKey", "--batch-mode", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
					"--key-file", keyPath, "--new-key-slot", strconv.Itoa(tc.addKeyTo), img, newPath)
				unlockWith, wantSlot = newKey, tc.addKeyTo
			}
			wantKey := c.dumpVolumeKey(img, keyPath)
			wantSeg := c.dumpSegment(img)

			f, size := openImage(t, img)
			h, err := ReadHeader(f, size)
			if err != nil {
				t.Fatalf("ReadHeader: %v", err)
			}
			if h.Version != tc.version {
				t.Errorf("Version = %d, want %d", h.Version, tc.version)
			}
			if h.Label != tc.label {
				t.Errorf("Label = %q, want %q", h.Label, tc.label)
			}
			if tc.hdrSize != 0 && h.MetadataSize != tc.hdrSize {
				t.Errorf("MetadataSize = %d, want %d", h.MetadataSize, tc.hdrSize)
			}
			if uuid := strings.TrimSpace(c.run("luksUUID", img)); h.UUID != uuid {
				t.Errorf("UUID = %q, cryptsetup says %q", h.UUID, uuid)
			}
			if len(h.Warnings) != 0 {
				t.Errorf("unexpected warnings on a clean image: %q", h.Warnings)
			}
			u, err := h.Unlock(f, unlockWith, Policy{})
			if err != nil {
				t.Fatalf("Unlock: %v", err)
			}
			defer u.Wipe()
			if !bytes.Equal(u.VolumeKey, wantKey) {
				t.Errorf("volume key differs from cryptsetup's (%d vs %d bytes)", len(u.VolumeKey), len(wantKey))
			}
			if u.Offset != wantSeg.offset || u.Size != wantSeg.size || u.SectorSize != wantSeg.sectorSize || u.Cipher != wantSeg.cipher {
				t.Errorf("segment = offset %d size %d sector %d cipher %s; cryptsetup: %+v", u.Offset, u.Size, u.SectorSize, u.Cipher, wantSeg)
			}
			if u.Keyslot != wantSlot {
				t.Errorf("Keyslot = %d, want %d", u.Keyslot, wantSlot)
			}
			// The wrong key is reported as such, not as a generic failure.
			wrong := bytes.Repeat([]byte{0x5a}, 32)
			if _, err := h.Unlock(f, wrong, Policy{}); !errors.Is(err, ErrWrongKey) || !strings.Contains(err.Error(), "does not unlock any keyslot") {
				t.Errorf("wrong key: err = %v, want ErrWrongKey", err)
			}
		})
	}
}

// TestDecryptCryptsetupEncryptedData checks the Unlocked description against
// data that cryptsetup itself encrypted (offline reencrypt --encrypt of an
// ext4 image): decrypting with crypto/xts must give back the original bytes.
func TestDecryptCryptsetupEncryptedData(t *testing.T) {
	for _, tc := range []struct {
		name       string
		block      string
		sectorSize string
		args       []string
	}{
		{name: "4096-pbkdf2", block: "4096", sectorSize: "4096", args: []string{"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"}},
		{name: "512-argon2id", block: "1024", sectorSize: "512", args: append([]string{"--pbkdf", "argon2id"}, fastArgon...)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newTool(t, "mkfs.ext4")
			mkfs := testenv.RequireTools(t, "mkfs.ext4")[0]
			img := c.emptyImage("img", 40<<20)
			if out, err := exec.Command(mkfs, "-q", "-F", "-b", tc.block, img, "8M").CombinedOutput(); err != nil {
				t.Fatalf("mkfs.ext4: %v\n%s", err, out)
			}
			plain, err := os.ReadFile(img)
			if err != nil {
				t.Fatal(err)
			}
			plain = plain[:8<<20]
			keyPath, key := c.keyFile("key")
			c.run(append([]string{"reencrypt", "--encrypt", "--batch-mode", "--type", "luks2", "--key-file", keyPath,
				"--reduce-device-size", "32M", "--sector-size", tc.sectorSize}, append(tc.args, img)...)...)

			f, size := openImage(t, img)
			h, err := ReadHeader(f, size)
			if err != nil {
				t.Fatal(err)
			}
			u, err := h.Unlock(f, key, Policy{})
			if err != nil {
				t.Fatal(err)
			}
			defer u.Wipe()
			cipher, err := xts.New(u.VolumeKey, u.SectorSize)
			if err != nil {
				t.Fatal(err)
			}
			got := make([]byte, len(plain))
			if err := readAtFull(f, got, u.Offset); err != nil {
				t.Fatal(err)
			}
			// plain64 IVs count 512-byte units from the segment start, plus iv_tweak.
			if err := cipher.Decrypt(got, got, u.IVTweak, uint64(u.SectorSize/512)); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, plain) {
				t.Fatalf("decrypted data differs from the original ext4 image (sector %d, offset %d)", u.SectorSize, u.Offset)
			}
			if got[1080] != 0x53 || got[1081] != 0xef {
				t.Fatalf("no ext4 magic in decrypted superblock")
			}
		})
	}
}

// TestFormatAcceptedByCryptsetup: our writer's images open in cryptsetup with
// the passphrase, refuse a wrong one, and give back our volume key.
func TestFormatAcceptedByCryptsetup(t *testing.T) {
	c := newTool(t)
	bigToken := []byte(`{"type":"blobseal-holes","keyslots":[],"map":"` + strings.Repeat("ab", 20000) + `"}`)
	for _, tc := range []struct {
		name    string
		opts    FormatOptions
		hdrSize int64
	}{
		{name: "defaults", opts: FormatOptions{}, hdrSize: 16 << 10},
		{name: "argon2id-512-aes128-label", opts: FormatOptions{PBKDF: "argon2id", ArgonMemoryKiB: 8192, ArgonThreads: 2, SectorSize: 512, KeyBytes: 32, Label: "mylabel"}, hdrSize: 16 << 10},
		{name: "argon2i-sha512", opts: FormatOptions{PBKDF: "argon2i", ArgonMemoryKiB: 8192, ArgonThreads: 2, Hash: "sha512", DataOffset: 4 << 20}, hdrSize: 16 << 10},
		{name: "large-token", opts: FormatOptions{Tokens: map[string]json.RawMessage{"3": bigToken}}, hdrSize: 64 << 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := &tool{t: t, cryptsetup: c.cryptsetup, dir: t.TempDir()}
			img := c.emptyImage("img", 20<<20)
			keyPath, key := c.keyFile("key")
			f, err := os.OpenFile(img, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			u, err := Format(f, key, tc.opts)
			if err != nil {
				t.Fatalf("Format: %v", err)
			}
			defer u.Wipe()

			dump := c.run("luksDump", img)
			if !strings.Contains(dump, "Version:       \t2") {
				t.Errorf("luksDump does not show a LUKS2 header:\n%s", dump)
			}
			if want := "Metadata area: \t" + strconv.FormatInt(tc.hdrSize, 10); !strings.Contains(dump, want) {
				t.Errorf("luksDump lacks %q:\n%s", want, dump)
			}
			c.run("open", "--test-passphrase", "--key-file", keyPath, img)
			wrongPath, _ := c.keyFile("wrong")
			if out, err := c.try("open", "--test-passphrase", "--key-file", wrongPath, img); err == nil {
				t.Errorf("cryptsetup accepted a wrong passphrase:\n%s", out)
			}
			if got := c.dumpVolumeKey(img, keyPath); !bytes.Equal(got, u.VolumeKey) {
				t.Errorf("cryptsetup's volume key differs from ours")
			}
			seg := c.dumpSegment(img)
			if seg.offset != u.Offset || seg.size != -1 || seg.sectorSize != u.SectorSize || seg.cipher != CipherAESXTSPlain64 {
				t.Errorf("cryptsetup segment %+v, ours %v", seg, u)
			}
			if tc.opts.Label != "" && !regexp.MustCompile(`(?m)^Label:\s+`+tc.opts.Label+`$`).MatchString(dump) {
				t.Errorf("label %q missing from luksDump:\n%s", tc.opts.Label, dump)
			}
			if tc.opts.Tokens != nil && !strings.Contains(dump, "blobseal-holes") {
				t.Errorf("token missing from luksDump")
			}

			// Damage the primary JSON: cryptsetup and our reader use the secondary.
			if _, err := f.WriteAt([]byte("garbage"), 4096+10); err != nil {
				t.Fatal(err)
			}
			h, err := ReadHeader(f, 20<<20)
			if err != nil {
				t.Fatalf("ReadHeader with damaged primary: %v", err)
			}
			if len(h.Warnings) == 0 || !strings.Contains(h.Warnings[0], "checksum") {
				t.Errorf("warnings %q do not report the damaged primary", h.Warnings)
			}
			u2, err := h.Unlock(f, key, Policy{})
			if err != nil {
				t.Fatalf("Unlock via secondary: %v", err)
			}
			defer u2.Wipe()
			if !bytes.Equal(u2.VolumeKey, u.VolumeKey) {
				t.Errorf("volume key via the secondary copy differs")
			}
			if tc.opts.Tokens != nil && !bytes.Equal(h.Tokens["3"], bigToken) {
				t.Errorf("token 3 did not round-trip")
			}
			// cryptsetup opens it too (and, having write access, repairs the primary).
			c.run("open", "--test-passphrase", "--key-file", keyPath, img)
			if h, err := ReadHeader(f, 20<<20); err != nil {
				t.Errorf("after cryptsetup's repair: %v", err)
			} else if len(h.Warnings) != 0 {
				t.Errorf("after cryptsetup's repair: warnings %q", h.Warnings)
			}
		})
	}
}

// TestKeyslotPriorityLikeCryptsetup: a slot set to "ignore" is skipped by
// both cryptsetup and Unlock; "prefer" is parsed and still unlocks.
func TestKeyslotPriorityLikeCryptsetup(t *testing.T) {
	c := newTool(t)
	img := c.emptyImage("img", 20<<20)
	key1Path, key1 := c.keyFile("key1")
	key2Path, key2 := c.keyFile("key2")
	c.run("luksFormat", "--batch-mode", "--type", "luks2", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file", key1Path, img)
	c.run("luksAddKey", "--batch-mode", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file", key1Path, "--new-key-slot", "2", img, key2Path)
	want := c.dumpVolumeKey(img, key1Path)

	for _, tc := range []struct {
		priority     string
		wantPriority int
		key2Opens    bool
	}{{"prefer", 2, true}, {"ignore", 0, false}} {
		c.run("config", "--priority", tc.priority, "--key-slot", "2", img)
		_, csErr := c.try("open", "--test-passphrase", "--key-file", key2Path, img)
		if (csErr == nil) != tc.key2Opens {
			t.Fatalf("priority %s: cryptsetup open with key 2: err %v, expected opens=%v", tc.priority, csErr, tc.key2Opens)
		}
		f, size := openImage(t, img)
		h, err := ReadHeader(f, size)
		if err != nil {
			t.Fatal(err)
		}
		if len(h.Keyslots) != 2 || h.Keyslots[1].ID != 2 || h.Keyslots[1].Priority != tc.wantPriority {
			t.Fatalf("priority %s: keyslots %+v", tc.priority, h.Keyslots)
		}
		u, err := h.Unlock(f, key2, Policy{})
		if tc.key2Opens {
			if err != nil || u.Keyslot != 2 || !bytes.Equal(u.VolumeKey, want) {
				t.Fatalf("priority %s: key 2: %v", tc.priority, err)
			}
			u.Wipe()
		} else if !errors.Is(err, ErrWrongKey) {
			t.Fatalf("priority %s: key 2 should be refused like cryptsetup does: %v", tc.priority, err)
		}
		u, err = h.Unlock(f, key1, Policy{})
		if err != nil || u.Keyslot != 0 || !bytes.Equal(u.VolumeKey, want) {
			t.Fatalf("priority %s: key 1: %v", tc.priority, err)
		}
		u.Wipe()
	}
}

// TestTruncatedLUKS1 cuts a cryptsetup LUKS1 image inside its header and
// inside its key material.
func TestTruncatedLUKS1(t *testing.T) {
	c := newTool(t)
	img := c.emptyImage("img", 4<<20)
	keyPath, key := c.keyFile("key")
	c.run("luksFormat", "--batch-mode", "--type", "luks1", "--pbkdf-force-iterations", "1000", "--key-file", keyPath, img)
	raw, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	_, err = ReadHeader(&memImage{b: raw[:300]}, 300)
	if !errors.Is(err, ErrCorruptHeader) || !strings.Contains(err.Error(), "shorter than the 592-byte LUKS1 header") {
		t.Errorf("LUKS1 cut at 300 bytes: %v", err)
	}
	_, err = ReadHeader(&memImage{b: raw[:100<<10]}, 100<<10)
	if !errors.Is(err, ErrCorruptHeader) || !strings.Contains(err.Error(), "beyond the end of the device") {
		t.Errorf("LUKS1 cut at 100 KiB: %v", err)
	}
	// Device size unknown: the short read of the key material is reported on Unlock.
	h, err := ReadHeader(&memImage{b: raw[:100<<10]}, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.Unlock(&memImage{b: raw[:100<<10]}, key, Policy{}); err == nil || !strings.Contains(err.Error(), "device ends inside") {
		t.Errorf("Unlock of truncated LUKS1: %v", err)
	}
}
