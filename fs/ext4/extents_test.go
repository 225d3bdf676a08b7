package ext4

import (
	"bytes"
	"encoding/binary"
	"io"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/blobseal/blobseal/internal/testenv"
)

// TestUnwrittenAndDeepExtents has the kernel write a heavily fragmented file
// (an extent tree two index levels deep at 1 KiB blocks) and preallocate
// unwritten extents with fallocate, then checks both read exactly as the
// kernel reads them.
func TestUnwrittenAndDeepExtents(t *testing.T) {
	tools := testenv.RequireTools(t, "mkfs.ext4", "mount", "umount", "fallocate")
	testenv.RequireRoot(t)
	img := mkfs(t, nil, "", 48, "-b", "1024", "-O", "^has_journal")
	mnt := t.TempDir()
	runCmd(t, nil, tools[1], "-o", "loop", img, mnt)
	mounted := true
	defer func() {
		if mounted {
			runCmd(t, nil, tools[2], mnt)
		}
	}()
	// 30,000 one-block extents separated by holes: > 4*84 leaves of 84
	// extents, so the tree needs depth 2.
	fh, err := os.Create(filepath.Join(mnt, "fragmented"))
	must(t, err)
	for i := int64(0); i < 30000; i++ {
		_, err := fh.WriteAt(fill(uint64(i), 1024), 2*i*1024)
		must(t, err)
	}
	must(t, fh.Close())
	// Unwritten extents: preallocated, then partly written.
	pre := filepath.Join(mnt, "prealloc")
	runCmd(t, nil, tools[3], "-l", "1M", pre)
	fh, err = os.OpenFile(pre, os.O_WRONLY, 0)
	must(t, err)
	_, err = fh.WriteAt(fill(9, 10000), 300000)
	must(t, err)
	must(t, fh.Sync())
	must(t, fh.Close())
	// Preallocated beyond EOF too (KEEP_SIZE).
	runCmd(t, nil, tools[3], "-n", "-o", "1M", "-l", "1M", pre)
	runCmd(t, nil, tools[2], mnt)
	mounted = false

	f, _ := openImage(t, img)
	frag, err := lookupPath(f, "/fragmented")
	must(t, err)
	if d := binary.LittleEndian.Uint16(frag.iblock()[6:]); d < 2 {
		t.Errorf("extent tree depth %d, want >= 2", d)
	} else {
		t.Logf("fragmented file: extent tree depth %d", d)
	}
	prealloc, err := lookupPath(f, "/prealloc")
	must(t, err)
	runs, err := f.mapBlocks(prealloc, 0, prealloc.Size>>f.blockLog)
	must(t, err)
	unwritten := 0
	for _, r := range runs {
		if r.zero {
			unwritten++
		}
	}
	if unwritten == 0 {
		t.Errorf("prealloc has no unwritten extents: %+v", runs)
	}

	kmnt := mountRO(t, img)
	for _, p := range []string{"/fragmented", "/prealloc"} {
		in, err := lookupPath(f, p)
		must(t, err)
		if fileHash(t, f, in) != hostHash(t, filepath.Join(kmnt, p)) {
			t.Errorf("%s: content differs from the kernel's", p)
		}
	}
	got := make([]byte, 20000)
	n, err := f.ReadAt(prealloc, got, 290000)
	if n != len(got) || (err != nil && err != io.EOF) {
		t.Fatalf("ReadAt: %d, %v", n, err)
	}
	want := append(make([]byte, 10000), fill(9, 10000)...)
	if !bytes.Equal(got, want) {
		t.Error("unwritten region is not zeros followed by the written data")
	}
	compareWithKernel(t, f, img) // kernel-written files carry nanosecond times
	var st unix.Stat_t
	must(t, unix.Stat(filepath.Join(kmnt, "prealloc"), &st))
	if uint64(st.Blocks) != prealloc.Blocks {
		t.Errorf("prealloc blocks %d, kernel %d", prealloc.Blocks, st.Blocks)
	}
}

// TestEAInodeXattr has the kernel store an xattr value larger than a block,
// which the ea_inode feature keeps in its own inode, and reads it back.
func TestEAInodeXattr(t *testing.T) {
	tools := testenv.RequireTools(t, "mkfs.ext4", "mount", "umount")
	testenv.RequireRoot(t)
	img := mkfs(t, nil, "", 8, "-b", "1024", "-O", "ea_inode")
	mnt := t.TempDir()
	runCmd(t, nil, tools[1], "-o", "loop", img, mnt)
	p := filepath.Join(mnt, "file")
	must(t, os.WriteFile(p, []byte("data"), 0o644))
	huge := fill(77, 5000)
	err := unix.Setxattr(p, "user.huge", huge, 0)
	runCmd(t, nil, tools[2], mnt)
	must(t, err)

	f, _ := openImage(t, img)
	in, err := lookupPath(f, "/file")
	must(t, err)
	got, err := f.GetXattr(in, "user.huge")
	must(t, err)
	if !bytes.Equal(got, huge) {
		t.Errorf("user.huge: %d bytes, want the %d written", len(got), len(huge))
	}
	es, err := f.allXattrs(in)
	must(t, err)
	inEAInode := false
	for _, e := range es {
		inEAInode = inEAInode || (e.name == "huge" && e.valueInum != 0)
	}
	if !inEAInode {
		t.Error("user.huge is not stored in an EA inode; the test does not exercise ea_inode")
	}
	compareWithKernel(t, f, img)
}
