package ext4

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/blobseal/blobseal/internal/testenv"
)

// growTo checks the growth with CheckGrow, then truncates img to newSize
// and grows its filesystem with Grow, as image.Resize does.
func growTo(t *testing.T, img string, newSize int64) (GrowResult, error) {
	t.Helper()
	fh, err := os.OpenFile(img, os.O_RDWR, 0)
	must(t, err)
	defer fh.Close()
	st, err := fh.Stat()
	must(t, err)
	if _, err := CheckGrow(fh, st.Size(), newSize); err != nil {
		return GrowResult{}, err
	}
	must(t, fh.Truncate(newSize))
	return Grow(fh, st.Size(), newSize)
}

// superFields reads dumpe2fs -h's numeric fields.
func superFields(t *testing.T, img string) map[string]uint64 {
	t.Helper()
	tools := testenv.RequireTools(t, "dumpe2fs")
	out := runCmd(t, nil, tools[0], "-h", img)
	m := map[string]uint64{}
	re := regexp.MustCompile(`(?m)^([A-Za-z ]+):\s+(\d+)$`)
	for _, s := range re.FindAllStringSubmatch(out, -1) {
		v, _ := strconv.ParseUint(s[2], 10, 64)
		m[s[1]] = v
	}
	return m
}

// TestGrowMatchesResize2fs grows mke2fs images of several layouts with
// Grow and, from the same starting image, with resize2fs (the independent
// reference); e2fsck must accept ours, the key figures must agree, and the
// kernel must mount it at the new size with every file intact and room for
// a file larger than the old free space.
func TestGrowMatchesResize2fs(t *testing.T) {
	testenv.RequireRoot(t)
	tools := testenv.RequireTools(t, "resize2fs", "mount", "umount")
	src := t.TempDir()
	files := map[string][]byte{}
	for i := 0; i < 12; i++ {
		name := fmt.Sprintf("f%02d", i)
		files[name] = fill(uint64(i)+7, 1000+i*97_000)
		writeFile(t, filepath.Join(src, name), files[name], 0o644)
	}
	cases := []struct {
		name           string
		oldMiB, newMiB int
		args           []string
	}{
		// mke2fs.conf's ext4 defaults: flex_bg, metadata_csum, 64bit, resize_inode.
		{name: "4k-defaults", oldMiB: 48, newMiB: 1024, args: []string{"-b", "4096"}},
		{name: "1k-blocks", oldMiB: 16, newMiB: 120, args: []string{"-b", "1024"}},
		{name: "4k-no-flex_bg", oldMiB: 48, newMiB: 600, args: []string{"-b", "4096", "-O", "^flex_bg"}},
		// 32-byte descriptors with gdt_csum (uninit_bg) instead of metadata_csum.
		{name: "1k-gdt_csum-32bit", oldMiB: 16, newMiB: 400, args: []string{"-b", "1024", "-O", "^metadata_csum,^64bit,uninit_bg"}},
		// Beyond the descriptor table's blocks: reserved GDT blocks become
		// descriptor blocks (4 of them here, one at 4 KiB).
		{name: "1k-reserved-gdt", oldMiB: 16, newMiB: 600, args: []string{"-b", "1024"}},
		{name: "4k-reserved-gdt", oldMiB: 48, newMiB: 9 << 10, args: []string{"-b", "4096", "-i", "65536"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			img := mkfs(t, nil, src, c.oldMiB, c.args...)
			ref := copyFile(t, img)
			before := superFields(t, img)
			newSize := int64(c.newMiB) << 20

			res, err := growTo(t, img, newSize)
			if err != nil {
				t.Fatalf("Grow: %v", err)
			}
			if res.NewBlocks != uint64(newSize)/uint64(res.BlockSize) || res.NewGroups <= res.OldGroups {
				t.Fatalf("Grow result %+v, want %d blocks in more groups", res, newSize/int64(res.BlockSize))
			}
			e2fsckClean(t, img)

			must(t, os.Truncate(ref, newSize))
			runCmd(t, nil, tools[0], "-f", ref)
			ours, theirs := superFields(t, img), superFields(t, ref)
			for _, k := range []string{"Block count", "Inode count", "Free blocks", "Free inodes", "Reserved block count", "Reserved GDT blocks"} {
				if ours[k] != theirs[k] {
					t.Errorf("%s: ours %d, resize2fs %d", k, ours[k], theirs[k])
				}
			}
			t.Logf("%d -> %d blocks, %d -> %d groups; free blocks ours %d, resize2fs %d; free inodes %d",
				res.OldBlocks, res.NewBlocks, res.OldGroups, res.NewGroups, ours["Free blocks"], theirs["Free blocks"], ours["Free inodes"])
			if ours["Block count"] <= before["Block count"] {
				t.Fatalf("block count did not grow: %d -> %d", before["Block count"], ours["Block count"])
			}

			mnt := t.TempDir()
			runCmd(t, nil, tools[1], "-o", "loop", img, mnt)
			mounted := true
			t.Cleanup(func() {
				if mounted {
					runCmd(t, nil, tools[2], mnt)
				}
			})
			var st unix.Statfs_t
			must(t, unix.Statfs(mnt, &st))
			bs := uint64(st.Bsize)
			t.Logf("statfs after grow: %d blocks of %d, %d free", st.Blocks, bs, st.Bfree)
			if total := st.Blocks * bs; total < uint64(newSize)*9/10 || total > uint64(newSize) {
				t.Errorf("statfs after grow: %d bytes total, want about %d", total, newSize)
			}
			for name, want := range files {
				got, err := os.ReadFile(filepath.Join(mnt, name))
				must(t, err)
				if string(got) != string(want) {
					t.Errorf("%s changed by the resize", name)
				}
			}
			oldFree := before["Free blocks"] * before["Block size"]
			big := fill(99, int(oldFree)+(1<<20))
			writeFile(t, filepath.Join(mnt, "bigger-than-old-free"), big, 0o644)
			runCmd(t, nil, tools[2], mnt)
			mounted = false
			e2fsckClean(t, img)
			f, _ := openImage(t, img)
			in, err := lookupPath(f, "/bigger-than-old-free")
			must(t, err)
			if in.Size != uint64(len(big)) {
				t.Errorf("big file: size %d, want %d", in.Size, len(big))
			}
		})
	}
}

// TestGrowRefuses checks the cases Grow must refuse, leaving the image
// unchanged, with a message naming what to do.
func TestGrowRefuses(t *testing.T) {
	tools := testenv.RequireTools(t, "debugfs")
	t.Run("beyond the reserved GDT blocks", func(t *testing.T) {
		// 1 KiB blocks, 64-byte descriptors: one table block holds 16
		// groups of 8 MiB; the table and its reserve hold (1+R)*16.
		img := mkfs(t, nil, "", 16, "-b", "1024")
		reserved := superFields(t, img)["Reserved GDT blocks"]
		maxBytes := (1 + (1+reserved)*16*8192) * 1024
		_, err := growTo(t, img, 1<<40)
		if !errors.Is(err, ErrTooLarge) || !strings.Contains(err.Error(), fmt.Sprintf("at most %d bytes", maxBytes)) {
			t.Fatalf("Grow to 1 TiB with %d reserved GDT blocks: %v, want ErrTooLarge naming the maximum of %d bytes", reserved, err, maxBytes)
		}
	})
	t.Run("beyond the descriptor table", func(t *testing.T) {
		// Without resize_inode nothing is reserved: one table block, 16
		// groups of 8 MiB.
		img := mkfs(t, nil, "", 16, "-b", "1024", "-O", "^resize_inode")
		_, err := growTo(t, img, 1<<30)
		if !errors.Is(err, ErrTooLarge) || !strings.Contains(err.Error(), "at most 134218752 bytes") {
			t.Fatalf("Grow to 1 GiB: %v, want ErrTooLarge naming the maximum of 134218752 bytes", err)
		}
		if st, err := os.Stat(img); err != nil || st.Size() != 16<<20 {
			t.Fatalf("a refused grow changed the image's size: %v %v", st.Size(), err)
		}
		e2fsckClean(t, img)
		if _, err := growTo(t, img, 134218752); err != nil {
			t.Fatalf("Grow to the named maximum: %v", err)
		}
		e2fsckClean(t, img)
	})
	t.Run("shrink", func(t *testing.T) {
		img := mkfs(t, nil, "", 16)
		fh, err := os.OpenFile(img, os.O_RDWR, 0)
		must(t, err)
		defer fh.Close()
		if _, err := Grow(fh, 16<<20, 8<<20); err == nil || !strings.Contains(err.Error(), "cannot shrink") {
			t.Fatalf("shrink: %v, want a refusal", err)
		}
	})
	t.Run("needs recovery", func(t *testing.T) {
		img := mkfs(t, nil, "", 16)
		runCmd(t, nil, tools[0], "-w", "-R", "feature needs_recovery", img)
		_, err := growTo(t, img, 64<<20)
		if err == nil || !strings.Contains(err.Error(), "needs_recovery") {
			t.Fatalf("Grow of a filesystem needing recovery: %v", err)
		}
	})
	t.Run("meta_bg", func(t *testing.T) {
		img := mkfs(t, nil, "", 16, "-O", "^resize_inode,meta_bg")
		_, err := growTo(t, img, 64<<20)
		if !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), "meta_bg") {
			t.Fatalf("Grow of a meta_bg filesystem: %v", err)
		}
	})
}

// growSeedImages are small mke2fs images with resize_inode (FuzzOpen's
// seeds have none) in a few layouts, 256 KiB in groups of 256 blocks.
func growSeedImages(f testing.TB) [][]byte {
	if _, err := os.Stat("/usr/sbin/mkfs.ext4"); err != nil {
		return nil
	}
	src := f.TempDir()
	writeFile(f, filepath.Join(src, "d", "f"), []byte("hello"), 0o644)
	writeFile(f, filepath.Join(src, "big"), fill(3, 3000), 0o644)
	var out [][]byte
	for _, args := range [][]string{
		{"-g", "256", "-N", "32"},
		{"-g", "256", "-N", "32", "-O", "^flex_bg,^metadata_csum,uninit_bg,^64bit"},
		{"-g", "256", "-N", "32", "-O", "^resize_inode,^has_journal"},
	} {
		img := mkfsKiB(f, nil, src, 256, append([]string{"-b", "1024"}, args...)...)
		b, err := os.ReadFile(img)
		must(f, err)
		out = append(out, b)
	}
	return out
}

// FuzzGrow grows damaged images (sparse-encoded, as FuzzOpen's) to four
// times their size in memory: no panic, bounded work, and a grow that
// succeeds leaves a filesystem Open accepts at the new size.
func FuzzGrow(f *testing.F) {
	for _, img := range growSeedImages(f) {
		f.Add(encodeSparse(img))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		img := decodeSparse(data)
		if len(img) == 0 {
			return
		}
		newSize := int64(4 * len(img))
		dev := &memDevice{append(img, make([]byte, 3*len(img))...)}
		res, err := Grow(dev, int64(len(img)), newSize)
		if err != nil {
			return
		}
		fsys, err := Open(dev, newSize)
		if err != nil {
			t.Fatalf("Grow succeeded (%+v) but the result does not open: %v", res, err)
		}
		if fsys.sb.blocksCount != res.NewBlocks || fsys.numGroups != res.NewGroups {
			t.Fatalf("Grow reported %+v, the superblock says %d blocks in %d groups", res, fsys.sb.blocksCount, fsys.numGroups)
		}
	})
}

// TestGrowCrash cuts the power at every write of a Grow in turn: each
// result must be a filesystem e2fsck accepts, the old one until the
// journal transaction that switches the geometry commits, the new one
// after (once the journal is replayed, as every read-write open does).
func TestGrowCrash(t *testing.T) {
	base := mkfs(t, nil, "", 48, "-b", "4096", "-i", "65536")
	const newSize = 1 << 30
	count := func() int {
		img := copyFile(t, base)
		fh, err := os.OpenFile(img, os.O_RDWR, 0)
		must(t, err)
		defer fh.Close()
		must(t, fh.Truncate(newSize))
		d := &cuttingDevice{f: fh, writeBudget: -1}
		_, err = Grow(d, 48<<20, newSize)
		must(t, err)
		return d.writes
	}
	total := count()
	var replayed, grown int
	defer func() {
		t.Logf("%d writes: %d cuts needed a journal replay, %d left the grown filesystem", total, replayed, grown)
	}()
	for n := 1; n <= total; n++ {
		img := copyFile(t, base)
		fh, err := os.OpenFile(img, os.O_RDWR, 0)
		must(t, err)
		must(t, fh.Truncate(newSize))
		_, err = Grow(&cuttingDevice{f: fh, writeBudget: n}, 48<<20, newSize)
		must(t, err)
		sb := make([]byte, superblockSize)
		_, err = fh.ReadAt(sb, superblockOffset)
		must(t, err)
		if binary.LittleEndian.Uint32(sb[0x60:])&incompatRecover != 0 {
			w, err := OpenWritable(fh, newSize)
			if err != nil {
				t.Fatalf("cut at write %d: replaying the journal: %v", n, err)
			}
			must(t, w.Close())
			replayed++
		}
		fh.Close()
		e2fsckClean(t, img)
		if f, _ := openImage(t, img); f.sb.blocksCount == 262144 {
			grown++
		}
		must(t, os.Remove(img))
	}
}

// TestGrowThenWriterFillsNewGroups: the Writer uses what Grow made, inodes
// (uninitialised, zeroed tables) and blocks of the new groups alike, and
// the result stays e2fsck-clean.
func TestGrowThenWriterFillsNewGroups(t *testing.T) {
	img := mkfs(t, nil, "", 48, "-b", "4096", "-i", "65536") // 768 inodes
	if _, err := growTo(t, img, 1<<30); err != nil {
		t.Fatal(err)
	}
	w := openWritable(t, img)
	var maxIno uint32
	for i := 0; i < 1500; i++ {
		in, err := w.Create(RootIno, fmt.Sprintf("f%04d", i), 0o644, 0, 0)
		if err != nil {
			t.Fatalf("create %d: %v", i, err)
		}
		maxIno = max(maxIno, in.Ino)
	}
	big, err := w.Create(RootIno, "big", 0o644, 0, 0)
	must(t, err)
	data := fill(5, 300<<20) // far more than the 48 MiB the filesystem had
	if _, err := w.WriteAt(big.Ino, data, 0); err != nil {
		t.Fatalf("write 300 MiB into the grown filesystem: %v", err)
	}
	must(t, w.Close())
	if maxIno <= 768 {
		t.Errorf("1500 files fit in the old group's 768 inodes? highest inode %d", maxIno)
	}
	e2fsckClean(t, img)
	f, _ := openImage(t, img)
	in, err := lookupPath(f, "/big")
	must(t, err)
	if got := readAll(t, f, in); !bytes.Equal(got, data) {
		t.Fatal("the 300 MiB file reads back wrong")
	}
}
