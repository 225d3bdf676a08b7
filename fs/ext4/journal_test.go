package ext4

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/blobseal/blobseal/internal/testenv"
)

// ext4IocShutdown is EXT4_IOC_SHUTDOWN, _IOR('X', 125, __u32); with
// goingLogFlush the kernel commits its journal and then stops writing,
// leaving the transactions unreplayed: a crash, as xfstests' godown makes.
const (
	ext4IocShutdown = 0x8004587D
	goingLogFlush   = 1
)

// kernelCrashImage has the kernel write a workload through its journal and
// "crash" (shutdown after the log flush), returning the image, which then
// needs recovery.
func kernelCrashImage(t *testing.T, args ...string) string {
	t.Helper()
	testenv.RequireRoot(t)
	tools := testenv.RequireTools(t, "mount", "umount")
	img := mkfs(t, nil, "", 64, args...)
	mnt := t.TempDir()
	runCmd(t, nil, tools[0], "-o", "loop", img, mnt)
	mounted := true
	t.Cleanup(func() {
		if mounted {
			runCmd(t, nil, tools[1], mnt)
		}
	})
	fd, err := unix.Open(mnt, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	must(t, err)
	// Each syncfs commits a transaction; freeing metadata blocks (the
	// directory "gone") makes the kernel log revoke records.
	must(t, os.MkdirAll(filepath.Join(mnt, "dir/sub"), 0o755))
	must(t, os.MkdirAll(filepath.Join(mnt, "gone"), 0o755))
	for i := 0; i < 30; i++ {
		writeFile(t, filepath.Join(mnt, "dir", fmt.Sprintf("f%02d", i)), fill(uint64(i), 1000*i+1), 0o644)
		writeFile(t, filepath.Join(mnt, "gone", fmt.Sprintf("a-long-file-name-to-fill-blocks-%02d", i)), []byte("x"), 0o644)
	}
	must(t, unix.Syncfs(fd))
	writeFile(t, filepath.Join(mnt, "big"), fill(99, 3<<20), 0o600)
	must(t, unix.Syncfs(fd))
	must(t, os.Rename(filepath.Join(mnt, "dir/f05"), filepath.Join(mnt, "dir/sub/moved")))
	must(t, os.Remove(filepath.Join(mnt, "dir/f07")))
	must(t, os.RemoveAll(filepath.Join(mnt, "gone")))
	must(t, unix.Syncfs(fd))
	must(t, os.Symlink("dir/f01", filepath.Join(mnt, "link")))
	must(t, os.Mkdir(filepath.Join(mnt, "gone"), 0o700))
	must(t, unix.Syncfs(fd))
	err = unix.IoctlSetPointerInt(fd, ext4IocShutdown, goingLogFlush)
	unix.Close(fd)
	must(t, err)
	runCmd(t, nil, tools[1], mnt)
	mounted = false
	sb := make([]byte, 1024)
	fh, err := os.Open(img)
	must(t, err)
	_, err = fh.ReadAt(sb, 1024)
	fh.Close()
	must(t, err)
	if binary.LittleEndian.Uint32(sb[0x60:])&incompatRecover == 0 {
		t.Fatal("the kernel left no journal to recover; the test cannot check replay")
	}
	return img
}

// copyFile copies an image so two replays can be compared.
func copyFile(t *testing.T, src string) string {
	t.Helper()
	b, err := os.ReadFile(src)
	must(t, err)
	dst := filepath.Join(t.TempDir(), "copy.img")
	must(t, os.WriteFile(dst, b, 0o600))
	return dst
}

// TestRecoverKernelJournal: we replay a journal the kernel wrote; the
// result must be e2fsck-clean and show exactly the tree the kernel's own
// replay of the same image shows.
func TestRecoverKernelJournal(t *testing.T) {
	for _, v := range []struct {
		name string
		args []string
	}{
		{"csum_v3-1k", nil},
		{"csum_v3-4k", []string{"-b", "4096"}},
		{"no-csum", []string{"-O", "^metadata_csum"}},
	} {
		t.Run(v.name, func(t *testing.T) {
			tools := testenv.RequireTools(t, "mount", "umount")
			img := kernelCrashImage(t, v.args...)
			byKernel := copyFile(t, img)
			if _, err := Open(mustOpen(t, img)); !errors.Is(err, ErrUnsupported) {
				t.Fatalf("the reader opened an image needing recovery: %v", err)
			}
			w := openWritable(t, img)
			if w.ReplayedTransactions() < 4 {
				t.Fatalf("%d transactions replayed, want the workload's 4 or more", w.ReplayedTransactions())
			}
			t.Logf("replayed %d transactions", w.ReplayedTransactions())
			e2fsckClean(t, img)
			// The kernel replays its copy on a read-write mount.
			mnt := t.TempDir()
			runCmd(t, nil, tools[0], "-o", "loop", byKernel, mnt)
			runCmd(t, nil, tools[1], mnt)
			e2fsckClean(t, byKernel)
			compareTrees(t, mountCopy(t, byKernel), mountCopy(t, img))
			got, err := os.ReadFile(filepath.Join(mountCopy(t, img), "big"))
			must(t, err)
			if string(got) != string(fill(99, 3<<20)) {
				t.Error("big: content differs after replay")
			}
			// And the writer works on the recovered filesystem.
			o := writerOps{w}
			must(t, o.create("after", 0o644))
			must(t, o.writeAt("after", []byte("written after recovery"), 0))
			must(t, w.Sync())
			e2fsckClean(t, img)
		})
	}
}

func mustOpen(t *testing.T, img string) (*os.File, int64) {
	t.Helper()
	fh, err := os.Open(img)
	must(t, err)
	t.Cleanup(func() { fh.Close() })
	st, err := fh.Stat()
	must(t, err)
	return fh, st.Size()
}
