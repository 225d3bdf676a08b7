package image

import (
	"context"
	"crypto/rand"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/blobseal/blobseal/crypto"
	"github.com/blobseal/blobseal/fs"
	"github.com/blobseal/blobseal/internal/testenv"
)

// statTree builds a source tree whose entries carry times with nanoseconds,
// before 1970 and after 2038, and returns it. Times are set children first,
// since creating an entry changes its directory's times.
func statTree(t *testing.T) string {
	t.Helper()
	src := filepath.Join(t.TempDir(), "src")
	for _, d := range []string{"a/b", "c"} {
		if err := os.MkdirAll(filepath.Join(src, d), 0o750); err != nil {
			t.Fatal(err)
		}
	}
	data := make([]byte, 10000)
	rand.Read(data)
	for name, mode := range map[string]os.FileMode{"a/b/file": 0o640, "c/empty": 0o600, "old": 0o644, "future": 0o444} {
		if err := os.WriteFile(filepath.Join(src, name), data[:len(name)*1000], mode); err != nil {
			t.Fatal(err)
		}
	}
	must(t, os.Symlink("a/b/file", filepath.Join(src, "link")))
	must(t, os.Link(filepath.Join(src, "a/b/file"), filepath.Join(src, "c/hard")))
	must(t, unix.Mkfifo(filepath.Join(src, "c/fifo"), 0o620))
	times := map[string][2]time.Time{
		"a/b/file": {time.Unix(1577934245, 123456789), time.Unix(1577934246, 987654321)},
		"old":      {time.Unix(-1234567890, 500000000), time.Unix(-1, 1)},        // before 1970
		"future":   {time.Unix(4102444800, 999999999), time.Unix(5000000000, 7)}, // after 2038 (epoch bits)
		"link":     {time.Unix(1000000000, 111111111), time.Unix(1000000001, 222222222)},
		"c/fifo":   {time.Unix(1600000000, 333), time.Unix(1600000001, 444)},
		"c/empty":  {time.Unix(1700000000, 1), time.Unix(1700000000, 999999999)},
		"a/b":      {time.Unix(1500000000, 5), time.Unix(1500000001, 6)},
		"a":        {time.Unix(1400000000, 7), time.Unix(1400000001, 8)},
		"c":        {time.Unix(1300000000, 9), time.Unix(1300000001, 10)},
		".":        {time.Unix(1200000000, 11), time.Unix(1200000001, 12)},
	}
	for _, name := range []string{"a/b/file", "old", "future", "link", "c/fifo", "c/empty", "a/b", "a", "c", "."} {
		at := times[name]
		ts := []unix.Timespec{{Sec: at[0].Unix(), Nsec: int64(at[0].Nanosecond())}, {Sec: at[1].Unix(), Nsec: int64(at[1].Nanosecond())}}
		must(t, unix.UtimesNanoAt(unix.AT_FDCWD, filepath.Join(src, name), ts, unix.AT_SYMLINK_NOFOLLOW))
	}
	return src
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// compareStat checks that every entry of src stats the same under mnt in
// each field ext4 holds: type and mode, link count, owner, device, size,
// and atime, mtime and ctime to the nanosecond.
func compareStat(t *testing.T, src, mnt string) {
	t.Helper()
	entries := 0
	err := filepath.Walk(src, func(p string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		var want, got unix.Stat_t
		if err := unix.Lstat(p, &want); err != nil {
			return err
		}
		if err := unix.Lstat(filepath.Join(mnt, rel), &got); err != nil {
			return err
		}
		entries++
		if want.Mode&unix.S_IFMT == unix.S_IFDIR {
			want.Size, got.Size = 0, 0 // ext4 sizes directories in blocks
			want.Nlink, got.Nlink = 0, 0
		}
		type fields struct {
			Mode, UID, GID      uint32
			Nlink, Rdev         uint64
			Size                int64
			Atime, Mtime, Ctime unix.Timespec
		}
		w := fields{want.Mode, want.Uid, want.Gid, uint64(want.Nlink), want.Rdev, want.Size, want.Atim, want.Mtim, want.Ctim}
		g := fields{got.Mode, got.Uid, got.Gid, uint64(got.Nlink), got.Rdev, got.Size, got.Atim, got.Mtim, got.Ctim}
		if w != g {
			t.Errorf("%s:\n source %+v\n mount  %+v", rel, w, g)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if entries != 11 { // the root, 3 directories, 4 files (one with 2 names), a symlink, a fifo
		t.Fatalf("compared %d entries, want 11", entries)
	}
}

// TestMakeExt4KeepsStat: the image holds every stat field of the source to
// the nanosecond, as three independent readers see it: debugfs, the
// kernel's ext4 (loop mount), and blobseal's own reader through FUSE; and
// e2fsck finds the edited filesystem clean.
func TestMakeExt4KeepsStat(t *testing.T) {
	tools := testenv.RequireTools(t, "mkfs.ext4", "debugfs", "e2fsck")
	src := statTree(t)
	dir := t.TempDir()
	plain := filepath.Join(dir, "plain.ext4")
	if _, err := MakeExt4(context.Background(), src, plain, MakeOptions{}); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(tools[2], "-fn", plain).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck: %v\n%s", err, out)
	}

	// debugfs prints each time as its 32-bit seconds and its extra field.
	out, err := exec.Command(tools[1], "-R", "stat future", plain).CombinedOutput()
	if err != nil {
		t.Fatalf("debugfs: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`mtime: 0x([0-9a-f]+):([0-9a-f]+)`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("no mtime in debugfs stat:\n%s", out)
	}
	lo, _ := strconv.ParseUint(string(m[1]), 16, 32)
	extra, _ := strconv.ParseUint(string(m[2]), 16, 32)
	sec := int64(int32(lo)) + int64(extra&3)<<32
	if got := time.Unix(sec, int64(extra>>2)); !got.Equal(time.Unix(5000000000, 7)) {
		t.Errorf("debugfs: mtime of future is %v, want %v", got, time.Unix(5000000000, 7))
	}

	t.Run("kernel", func(t *testing.T) {
		testenv.RequireRoot(t)
		mnt := t.TempDir()
		if out, err := exec.Command("mount", "-t", "ext4", "-o", "loop,ro,noatime", plain, mnt).CombinedOutput(); err != nil {
			testenv.Unavailable(t, "loop mount: %v: %s", err, out)
		}
		t.Cleanup(func() {
			if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
				t.Errorf("umount: %v: %s", err, out)
			}
		})
		compareStat(t, src, mnt)
	})

	t.Run("fuse", func(t *testing.T) {
		testenv.RequireFUSE(t)
		key := make([]byte, 64)
		rand.Read(key)
		img := filepath.Join(dir, "image")
		if _, err := Create(context.Background(), CreateOptions{From: src, Out: img, Key: key, Crypto: crypto.FormatOptions{Format: "plain"}}); err != nil {
			t.Fatal(err)
		}
		opened, err := Open(context.Background(), Spec{Location: img, Key: key, Crypto: crypto.OpenOptions{Format: "plain"}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { opened.Close() })
		mnt := t.TempDir()
		srv, err := fs.Mount(context.Background(), mnt, opened.FS, fs.Options{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if err := srv.Unmount(); err != nil {
				t.Errorf("unmount: %v", err)
			}
		})
		compareStat(t, src, mnt)
	})
}
