package fs_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/blobseal/blobseal/fs"
	"github.com/blobseal/blobseal/fs/ext4"
	"github.com/blobseal/blobseal/internal/testenv"
)

// faultyTree injects failures into a real ext4 tree: reading one inode
// reports corruption, reading another panics, and looking up one name
// reports corruption.
type faultyTree struct {
	fs.Tree
	corruptIno, panicIno uint32
	corruptName          string
}

var _ fs.Tree = (*faultyTree)(nil)

func (f *faultyTree) ReadAtContext(ctx context.Context, file *ext4.Inode, p []byte, off int64) (int, error) {
	switch file.Ino {
	case f.corruptIno:
		return 0, fmt.Errorf("inode %d: extent header: %w", file.Ino, ext4.ErrCorrupt)
	case f.panicIno:
		panic("reader bug on a damaged inode")
	}
	return f.Tree.ReadAtContext(ctx, file, p, off)
}

func (f *faultyTree) Lookup(dir *ext4.Inode, name string) (uint32, error) {
	if name == f.corruptName {
		return 0, fmt.Errorf("directory %d: bad entry: %w", dir.Ino, ext4.ErrCorrupt)
	}
	return f.Tree.Lookup(dir, name)
}

func inoOf(t *testing.T, path string) uint32 {
	t.Helper()
	st, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	return uint32(st.Sys().(*syscall.Stat_t).Ino)
}

// TestFaultsGiveEIOAndMountStaysUp: a corrupt structure or a reader panic
// fails only that operation with EIO, logs the inode, and every other file
// keeps working.
func TestFaultsGiveEIOAndMountStaysUp(t *testing.T) {
	src := t.TempDir()
	for _, n := range []string{"bad", "panics", "good", "hidden"} {
		mustWrite(t, filepath.Join(src, n), []byte("content of "+n), 0o644)
	}
	img := makeImage(t, src)
	real := openImage(t, img)
	// Learn the inode numbers from a clean mount first.
	clean, cleanSrv := mountTree(t, real, nil)
	badIno, panicIno := inoOf(t, filepath.Join(clean, "bad")), inoOf(t, filepath.Join(clean, "panics"))
	if err := cleanSrv.Unmount(); err != nil {
		t.Fatal(err)
	}

	logs := &logBuffer{}
	mnt, _ := mountTree(t, &faultyTree{Tree: real, corruptIno: badIno, panicIno: panicIno, corruptName: "hidden"}, logs)
	for _, n := range []string{"bad", "panics", "bad", "bad"} {
		if _, err := os.ReadFile(filepath.Join(mnt, n)); !errors.Is(err, syscall.EIO) {
			t.Errorf("read %s: %v, want EIO", n, err)
		}
	}
	if _, err := os.Lstat(filepath.Join(mnt, "hidden")); !errors.Is(err, syscall.EIO) {
		t.Errorf("lookup of a corrupt entry: %v, want EIO", err)
	}
	if b, err := os.ReadFile(filepath.Join(mnt, "good")); err != nil || string(b) != "content of good" {
		t.Errorf("healthy file after faults: %q, %v", b, err)
	}
	out := logs.String()
	// Repeated failures of one inode log once at error level.
	if n := strings.Count(out, fmt.Sprintf("level=ERROR msg=\"filesystem operation failed\" op=read inode=%d ", badIno)); n != 1 {
		t.Errorf("%d error lines for inode %d read three times, want 1:\n%s", n, badIno, out)
	}
	for _, want := range []string{fmt.Sprintf("inode=%d", badIno), fmt.Sprintf("inode=%d", panicIno), "panicked", "corrupt"} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}
}

// TestCorruptImageGivesEIO damages real on-disk structures with debugfs: a
// file's extent header and a directory's blocks. Reading them fails with
// EIO, the log names the inode, and the rest of the tree still reads.
func TestCorruptImageGivesEIO(t *testing.T) {
	debugfs := testenv.RequireTools(t, "debugfs")[0]
	src := t.TempDir()
	mustWrite(t, filepath.Join(src, "victim"), randomBytes(t, 100000), 0o644)
	mustWrite(t, filepath.Join(src, "dir", "inside"), []byte("x"), 0o644)
	mustWrite(t, filepath.Join(src, "healthy"), []byte("still fine"), 0o644)
	img := makeImage(t, src)
	// Zero the extent header of the file (i_block[0] holds its magic) and
	// point the directory's first extent (i_block[3..5]) far past the end.
	script := "sif /victim block[0] 0\nsif /dir block[5] 0x7fffffff\n"
	cmd := exec.Command(debugfs, "-w", "-f", "-", img)
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("debugfs: %v: %s", err, out)
	}
	logs := &logBuffer{}
	mnt, _ := mountTree(t, openImage(t, img), logs)
	victimIno := inoOf(t, filepath.Join(mnt, "victim"))
	if _, err := os.ReadFile(filepath.Join(mnt, "victim")); !errors.Is(err, syscall.EIO) {
		t.Errorf("read of a file with a broken extent header: %v, want EIO", err)
	}
	if _, err := os.ReadDir(filepath.Join(mnt, "dir")); !errors.Is(err, syscall.EIO) {
		t.Errorf("readdir of a directory with a broken extent: %v, want EIO", err)
	}
	if b, err := os.ReadFile(filepath.Join(mnt, "healthy")); err != nil || string(b) != "still fine" {
		t.Errorf("healthy file: %q, %v", b, err)
	}
	if !strings.Contains(logs.String(), fmt.Sprintf("inode=%d", victimIno)) {
		t.Errorf("log does not name inode %d:\n%s", victimIno, logs.String())
	}
}
