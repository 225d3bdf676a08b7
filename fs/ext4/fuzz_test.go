package ext4

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/blobseal/blobseal/internal/testenv"
)

// Fuzz images are stored sparsely so seeds stay a few KiB: a sequence of
// records (u32 offset, u16 length, bytes) over a zeroed image whose size is
// given by the first four bytes (capped at 1 MiB).
const fuzzMaxImage = 1 << 20

func encodeSparse(img []byte) []byte {
	out := binary.LittleEndian.AppendUint32(nil, uint32(len(img)))
	for i := 0; i < len(img); {
		if img[i] == 0 {
			i++
			continue
		}
		j := i
		zeros := 0
		for j < len(img) && zeros < 16 && j-i < 65535 {
			if img[j] == 0 {
				zeros++
			} else {
				zeros = 0
			}
			j++
		}
		end := j - zeros
		out = binary.LittleEndian.AppendUint32(out, uint32(i))
		out = binary.LittleEndian.AppendUint16(out, uint16(end-i))
		out = append(out, img[i:end]...)
		i = j
	}
	return out
}

func decodeSparse(data []byte) []byte {
	if len(data) < 4 {
		return nil
	}
	size := min(int(binary.LittleEndian.Uint32(data)), fuzzMaxImage)
	img := make([]byte, size)
	for p := data[4:]; len(p) >= 6; {
		off, n := int(binary.LittleEndian.Uint32(p)), int(binary.LittleEndian.Uint16(p[4:]))
		p = p[6:]
		n = min(n, len(p))
		if off < size {
			copy(img[off:], p[:n])
		}
		p = p[n:]
	}
	return img
}

// fuzzSeedImages builds tiny images (256 KiB, 1 KiB blocks) covering the
// main layouts, when mkfs.ext4 is installed.
func fuzzSeedImages(f testing.TB) [][]byte {
	if _, err := os.Stat("/usr/sbin/mkfs.ext4"); err != nil {
		return nil
	}
	src := f.TempDir()
	writeFile(f, filepath.Join(src, "d", "f"), []byte("hello"), 0o644)
	writeFile(f, filepath.Join(src, "big"), fill(3, 3000), 0o644)
	must(f, os.Symlink("d/f", filepath.Join(src, "l")))
	_ = setxattr(filepath.Join(src, "big"), "user.k", []byte("v"))
	var out [][]byte
	for _, args := range [][]string{
		{"-O", "^has_journal,^resize_inode", "-N", "16"},
		{"-O", "^has_journal,^resize_inode,inline_data,^metadata_csum", "-N", "16"},
		{"-t", "ext2", "-O", "^resize_inode", "-N", "16"},
	} {
		img := mkfsKiB(f, nil, src, 256, append([]string{"-b", "1024"}, args...)...)
		b, err := os.ReadFile(img)
		must(f, err)
		out = append(out, b)
	}
	return out
}

// exercise walks everything in f with bounded work, ignoring errors.
func exercise(f *FS) {
	n := 0
	buf := make([]byte, 8<<10)
	_ = f.Walk(func(p string, in *Inode) error {
		if n++; n > 300 {
			return errors.New("enough")
		}
		_, _ = f.ReadAt(in, buf, 0)
		if in.Size > uint64(len(buf)) {
			_, _ = f.ReadAt(in, buf, int64(in.Size)-int64(len(buf))+1)
		}
		if in.IsSymlink() {
			_, _ = f.Readlink(in)
		}
		if names, err := f.ListXattr(in); err == nil {
			for _, x := range names {
				_, _ = f.GetXattr(in, x)
			}
		}
		if in.IsDir() {
			if ents, err := f.ReadDir(in); err == nil {
				for i, e := range ents {
					if i > 20 {
						break
					}
					_, _ = f.Lookup(in, e.Name)
				}
			}
			_, _ = f.Lookup(in, "missing")
		}
		return nil
	})
	_ = f.StatFS()
}

func FuzzOpen(f *testing.F) {
	for _, img := range fuzzSeedImages(f) {
		f.Add(encodeSparse(img))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		img := decodeSparse(data)
		fsys, err := Open(bytes.NewReader(img), int64(len(img)))
		if err != nil {
			return
		}
		exercise(fsys)
	})
}

// fuzzBase is an intact filesystem whose block fuzzBlock the targeted
// fuzzers overwrite.
func fuzzBase(f testing.TB) []byte {
	imgs := fuzzSeedImages(f)
	if len(imgs) == 0 {
		testenv.RequireTools(f, "mkfs.ext4")
	}
	return imgs[0]
}

const fuzzBlock = 200

// FuzzExtentTree feeds arbitrary i_block contents (first 60 bytes) and an
// arbitrary tree block (the rest, stored at block fuzzBlock) to the extent
// walker through ReadAt.
func FuzzExtentTree(f *testing.F) {
	base := fuzzBase(f)
	f.Add(extentSeed())
	f.Fuzz(func(t *testing.T, data []byte) {
		fuzzExtentTree(t, base, data)
	})
}

func extentSeed() []byte {
	root := make([]byte, 60)
	binary.LittleEndian.PutUint16(root[0:], extentMagic)
	binary.LittleEndian.PutUint16(root[2:], 1)
	binary.LittleEndian.PutUint16(root[4:], 4)
	binary.LittleEndian.PutUint16(root[6:], 1)
	binary.LittleEndian.PutUint32(root[12+4:], fuzzBlock)
	leaf := make([]byte, 1024)
	binary.LittleEndian.PutUint16(leaf[0:], extentMagic)
	binary.LittleEndian.PutUint16(leaf[2:], 2)
	binary.LittleEndian.PutUint16(leaf[4:], 84)
	binary.LittleEndian.PutUint32(leaf[12:], 0)
	binary.LittleEndian.PutUint16(leaf[12+4:], 3)
	binary.LittleEndian.PutUint32(leaf[12+8:], 100)
	binary.LittleEndian.PutUint32(leaf[24:], 10)
	binary.LittleEndian.PutUint16(leaf[24+4:], 32768+5)
	binary.LittleEndian.PutUint32(leaf[24+8:], 150)
	return append(root, leaf...)
}

func fuzzExtentTree(t *testing.T, base, data []byte) {
	{
		if len(data) < 60 {
			return
		}
		img := bytes.Clone(base)
		copy(img[fuzzBlock*1024:(fuzzBlock+1)*1024], data[60:])
		fsys, err := Open(bytes.NewReader(img), int64(len(img)))
		if err != nil {
			t.Fatal(err)
		}
		raw := make([]byte, 256)
		copy(raw[0x28:0x64], data[:60])
		in := &Inode{Ino: 99, Mode: sIFREG | 0o644, Size: 1 << 40, Flags: flagExtents, raw: raw}
		buf := make([]byte, 64<<10)
		for _, off := range []int64{0, 4096, 1 << 20, 1<<40 - 100} {
			n, err := fsys.ReadAt(in, buf, off)
			if err == nil && n != len(buf) {
				t.Fatalf("short read %d without error", n)
			}
		}
		runs, err := fsys.mapBlocks(in, 0, 1<<16)
		if err == nil {
			var total uint64
			for i, r := range runs {
				if i > 0 && runs[i-1].lblk+runs[i-1].count != r.lblk {
					t.Fatalf("runs not contiguous: %+v", runs)
				}
				total += r.count
			}
			if total != 1<<16 {
				t.Fatalf("runs cover %d blocks, want %d", total, 1<<16)
			}
		}
	}
}

// FuzzDirBlock feeds an arbitrary directory block (linear leaf or htree
// root) to ReadDir and Lookup.
func FuzzDirBlock(f *testing.F) {
	base := fuzzBase(f)
	blk := dirSeed(f, base)
	f.Add(blk, false)
	f.Add(blk, true)
	f.Fuzz(func(t *testing.T, block []byte, indexed bool) {
		img := bytes.Clone(base)
		copy(img[fuzzBlock*1024:(fuzzBlock+1)*1024], block)
		fsys, err := Open(bytes.NewReader(img), int64(len(img)))
		if err != nil {
			t.Fatal(err)
		}
		raw := make([]byte, 256)
		le := binary.LittleEndian
		le.PutUint16(raw[0x28:], extentMagic)
		le.PutUint16(raw[0x28+2:], 1)
		le.PutUint16(raw[0x28+4:], 4)
		le.PutUint32(raw[0x28+12:], 0)
		le.PutUint16(raw[0x28+16:], 1)
		le.PutUint32(raw[0x28+20:], fuzzBlock)
		dir := &Inode{Ino: 99, Mode: sIFDIR | 0o755, Size: 1024, Flags: flagExtents, raw: raw}
		if indexed {
			dir.Flags |= flagIndex
		}
		ents, err := fsys.ReadDir(dir)
		for _, e := range ents {
			if e.Ino == 0 || len(e.Name) == 0 || len(e.Name) > 255 {
				t.Fatalf("bad entry returned: %+v", e)
			}
			if _, err := fsys.Lookup(dir, e.Name); err != nil && !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrNotFound) {
				t.Fatalf("lookup %q: %v", e.Name, err)
			}
		}
		_ = err
		_, _ = fsys.Lookup(dir, "x")
	})
}

// dirSeed is the root directory block of a seed image.
func dirSeed(f testing.TB, base []byte) []byte {
	fsys, err := Open(bytes.NewReader(base), int64(len(base)))
	must(f, err)
	rootIn, err := fsys.Inode(RootIno)
	must(f, err)
	runs, err := fsys.mapBlocks(rootIn, 0, 1)
	must(f, err)
	blk, err := fsys.readBlock(runs[0].pblk)
	must(f, err)
	return bytes.Clone(blk)
}

// FuzzXattr feeds arbitrary in-inode xattr areas, xattr blocks and ACLs to
// the decoders.
func FuzzXattr(f *testing.F) {
	for _, s := range xattrSeeds() {
		f.Add(s)
	}
	f.Fuzz(fuzzXattr)
}

func xattrSeeds() [][]byte {
	blk := make([]byte, 64)
	binary.LittleEndian.PutUint32(blk, xattrMagic)
	binary.LittleEndian.PutUint32(blk[8:], 1)
	e := blk[32:]
	e[0], e[1] = 1, xattrIndexUser
	binary.LittleEndian.PutUint16(e[2:], 60)
	binary.LittleEndian.PutUint32(e[8:], 4)
	e[16] = 'k'
	copy(blk[60:], "vvvv")
	acl := binary.LittleEndian.AppendUint32(binary.LittleEndian.AppendUint32(nil, 1), 0x00070001)
	acl = append(acl, 2, 0, 4, 0, 0xe8, 3, 0, 0)
	return [][]byte{blk, acl}
}

func fuzzXattr(t *testing.T, data []byte) {
	{
		if es, err := parseXattrBlock(data); err == nil {
			for _, x := range es {
				if x.valueInum == 0 && len(x.value) != int(x.valueSize) {
					t.Fatalf("value length %d, size %d", len(x.value), x.valueSize)
				}
			}
		}
		_, _ = parseXattrEntries(data, data)
		if acl, err := aclToXattr(data); err == nil && (len(acl)-4)%8 != 0 {
			t.Fatalf("converted ACL has %d bytes", len(acl))
		}
	}
}

// TestWriteFuzzCorpus regenerates the committed seed corpora when
// EXT4_WRITE_CORPUS=1; they live under testdata/fuzz/<Fuzzer>/.
func TestWriteFuzzCorpus(t *testing.T) {
	if os.Getenv("EXT4_WRITE_CORPUS") != "1" {
		t.Skip("set EXT4_WRITE_CORPUS=1 to regenerate testdata/fuzz seeds")
	}
	testenv.RequireTools(t, "mkfs.ext4")
	imgs := fuzzSeedImages(t)
	write := func(fuzzer, name string, args ...any) {
		dir := filepath.Join("testdata", "fuzz", fuzzer)
		must(t, os.MkdirAll(dir, 0o755))
		content := "go test fuzz v1\n"
		for _, a := range args {
			switch v := a.(type) {
			case []byte:
				content += fmt.Sprintf("[]byte(%q)\n", v)
			case bool:
				content += fmt.Sprintf("bool(%v)\n", v)
			}
		}
		must(t, os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644))
		t.Logf("%s/%s: %d bytes", fuzzer, name, len(content))
	}
	for i, img := range imgs {
		enc := encodeSparse(img)
		if !bytes.Equal(decodeSparse(enc), img) {
			t.Fatal("sparse encoding does not round-trip")
		}
		write("FuzzOpen", fmt.Sprintf("seed-image-%d", i), enc)
	}
	write("FuzzExtentTree", "seed-index-and-leaf", extentSeed())
	blk := dirSeed(t, imgs[0])
	write("FuzzDirBlock", "seed-root-linear", blk, false)
	write("FuzzDirBlock", "seed-root-indexed", blk, true)
	for i, s := range xattrSeeds() {
		write("FuzzXattr", fmt.Sprintf("seed-%d", i), s)
	}
}
