package ext4

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/blobseal/blobseal/internal/testenv"
)

// longName is entry i's 255-byte name: three fill a 1 KiB leaf, so the
// index grows fast.
func longName(i int) string {
	p := fmt.Sprintf("%07d-", i)
	return p + strings.Repeat("n", maxNameLen-len(p))
}

// fillIndexedDir links one file into a new directory "big" under names
// longName(0), ... until the index has wantLevels levels below the root
// plus extra names, or until a link fails; it returns the names linked and
// the error that stopped it (nil when wantLevels was reached).
func fillIndexedDir(t *testing.T, w *Writer, wantLevels, extra int) (int, error) {
	t.Helper()
	big, err := w.Mkdir(RootIno, "big", 0o755, 0, 0)
	must(t, err)
	target, err := w.Create(RootIno, "target", 0o644, 0, 0)
	must(t, err)
	levels := func() int {
		var lv int
		must(t, w.View(func(f *FS) error {
			dir, err := f.Inode(big.Ino)
			if err != nil {
				return err
			}
			if !dir.hasFlag(flagIndex) {
				return nil
			}
			b, err := f.dirBlockAt(dir, 0)
			if err != nil {
				return err
			}
			_, lv, _, err = f.dxRootInfo(dir, b)
			return err
		}))
		return lv
	}
	reached := -1
	for i := 0; i < linkMax-2; i++ {
		if err := w.Link(target.Ino, big.Ino, longName(i)); err != nil {
			return i, err
		}
		if i%256 == 0 && reached < 0 && levels() >= wantLevels {
			reached = i
		}
		if reached >= 0 && i >= reached+extra {
			return i + 1, nil
		}
	}
	t.Fatalf("%d links never made %d index levels", linkMax-2, wantLevels)
	return 0, nil
}

// checkBigDir: e2fsck finds the image clean and the kernel lists exactly
// the n names in /big, which all link to /target.
func checkBigDir(t *testing.T, img string, n int) {
	t.Helper()
	e2fsckClean(t, img)
	mnt := mountCopy(t, img)
	ents, err := os.ReadDir(filepath.Join(mnt, "big"))
	must(t, err)
	if len(ents) != n {
		t.Fatalf("the kernel lists %d names in /big, want %d", len(ents), n)
	}
	seen := make(map[string]bool, n)
	for _, e := range ents {
		seen[e.Name()] = true
	}
	for i := 0; i < n; i++ {
		if !seen[longName(i)] {
			t.Fatalf("the kernel does not list name %d", i)
		}
	}
	st, err := os.Stat(filepath.Join(mnt, "target"))
	must(t, err)
	if nl := st.Sys().(*syscall.Stat_t).Nlink; nl != uint64(n+1) {
		t.Fatalf("the kernel counts %d links to /target, want %d", nl, n+1)
	}
}

// TestWriterHtreeThirdLevel: with large_dir, a directory whose two-level
// index fills grows a third level, as the kernel's does; e2fsck and the
// kernel accept it and find every name.
func TestWriterHtreeThirdLevel(t *testing.T) {
	testenv.RequireRoot(t)
	img := mkfs(t, nil, "", 48, "-b", "1024", "-O", "large_dir", "-N", "2048")
	w := openWritable(t, img)
	n, err := fillIndexedDir(t, w, 2, 1500)
	if err != nil {
		t.Fatalf("link %d: %v", n, err)
	}
	t.Logf("%d names make 3 index levels", n)
	must(t, w.Close())
	checkBigDir(t, img, n)

	// The kernel keeps adding to the three-level index we built, and we
	// read what it added.
	const more = 300
	tools := testenv.RequireTools(t, "mount", "umount")
	mnt := t.TempDir()
	runCmd(t, nil, tools[0], "-o", "loop", img, mnt)
	for i := n; i < n+more; i++ {
		if err := os.Link(filepath.Join(mnt, "target"), filepath.Join(mnt, "big", longName(i))); err != nil {
			runCmd(t, nil, tools[1], mnt)
			t.Fatalf("the kernel's link %d into our index: %v", i, err)
		}
	}
	runCmd(t, nil, tools[1], mnt)
	checkBigDir(t, img, n+more)
	f, _ := openImage(t, img)
	big, err := lookupPath(f, "/big")
	must(t, err)
	for i := 0; i < n+more; i += 97 {
		if _, err := f.Lookup(big, longName(i)); err != nil {
			t.Fatalf("our lookup of name %d after the kernel's additions: %v", i, err)
		}
	}
}

// TestWriterHtreeFullWithoutLargeDir: without large_dir the index stops at
// two levels; the name that needs a third fails with ENOSPC, leaving the
// directory whole, and the kernel refuses that name the same way.
func TestWriterHtreeFullWithoutLargeDir(t *testing.T) {
	testenv.RequireRoot(t)
	img := mkfs(t, nil, "", 48, "-b", "1024", "-O", "^large_dir", "-N", "2048")
	w := openWritable(t, img)
	n, err := fillIndexedDir(t, w, 2, 0)
	if !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("after %d names: %v, want ENOSPC", n, err)
	}
	t.Logf("the index is full after %d names: %v", n, err)
	must(t, w.Close())
	checkBigDir(t, img, n)

	// The kernel, given the same image, refuses the same name.
	mnt := t.TempDir()
	tools := testenv.RequireTools(t, "mount", "umount")
	rw := copyFile(t, img)
	runCmd(t, nil, tools[0], "-o", "loop", rw, mnt)
	t.Cleanup(func() { runCmd(t, nil, tools[1], mnt) })
	err = os.Link(filepath.Join(mnt, "target"), filepath.Join(mnt, "big", longName(n)))
	if !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("the kernel's link of name %d: %v, want ENOSPC", n, err)
	}
}
