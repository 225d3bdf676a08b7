package fs

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/blobseal/blobseal/fs/ext4"
	"github.com/blobseal/blobseal/internal/testenv"
)

func TestErrnoOf(t *testing.T) {
	cases := []struct {
		err   error
		errno syscall.Errno
		log   bool
	}{
		{fmt.Errorf("lookup x: %w", ext4.ErrNotFound), syscall.ENOENT, false},
		{fmt.Errorf("xattr: %w", ext4.ErrNoXattr), syscall.ENODATA, false},
		{fmt.Errorf("inode 12: %w", ext4.ErrCorrupt), syscall.EIO, true},
		{fmt.Errorf("inline data: %w", ext4.ErrUnsupported), syscall.EIO, true},
		{errors.New("blob read timed out"), syscall.EIO, true},
	}
	for _, c := range cases {
		errno, logIt := errnoOf(c.err)
		if errno != c.errno || logIt != c.log {
			t.Errorf("errnoOf(%v) = %v, %v; want %v, %v", c.err, errno, logIt, c.errno, c.log)
		}
	}
	if errno, logIt := errnoOf(nil); errno != 0 || logIt {
		t.Errorf("errnoOf(nil) = %v, %v", errno, logIt)
	}
}

func TestCopyOutFollowsXattrSizeProtocol(t *testing.T) {
	data := []byte("value")
	if n, errno := copyOut(nil, data); n != 5 || errno != 0 {
		t.Errorf("size probe: %d, %v", n, errno)
	}
	if _, errno := copyOut(make([]byte, 4), data); errno != syscall.ERANGE {
		t.Errorf("small buffer: %v, want ERANGE", errno)
	}
	buf := make([]byte, 10)
	if n, errno := copyOut(buf, data); n != 5 || errno != 0 || string(buf[:n]) != "value" {
		t.Errorf("copy: %d %v %q", n, errno, buf[:n])
	}
}

// Writes never reach these handlers through a "ro" mount; they must refuse
// anyway, should a kernel or mount option ever let one through.
func TestWriteHandlersRefuse(t *testing.T) {
	n := &node{}
	ctx := context.Background()
	errnos := map[string]syscall.Errno{
		"setattr":     n.Setattr(ctx, nil, &fuse.SetAttrIn{}, &fuse.AttrOut{}),
		"unlink":      n.Unlink(ctx, "x"),
		"rmdir":       n.Rmdir(ctx, "x"),
		"rename":      n.Rename(ctx, "x", n, "y", 0),
		"setxattr":    n.Setxattr(ctx, "user.x", nil, 0),
		"removexattr": n.Removexattr(ctx, "user.x"),
		"allocate":    n.Allocate(ctx, nil, 0, 1, 0),
	}
	_, errnos["write"] = n.Write(ctx, nil, []byte("x"), 0)
	_, _, _, errnos["create"] = n.Create(ctx, "x", 0, 0o644, &fuse.EntryOut{})
	_, errnos["mkdir"] = n.Mkdir(ctx, "x", 0o755, &fuse.EntryOut{})
	_, errnos["mknod"] = n.Mknod(ctx, "x", 0o644, 0, &fuse.EntryOut{})
	_, errnos["link"] = n.Link(ctx, n, "x", &fuse.EntryOut{})
	_, errnos["symlink"] = n.Symlink(ctx, "t", "x", &fuse.EntryOut{})
	_, errnos["copy_file_range"] = n.CopyFileRange(ctx, nil, 0, nil, nil, 0, 1, 0)
	errnos["access W_OK"] = n.Access(ctx, 2)
	for op, errno := range errnos {
		if errno != syscall.EROFS {
			t.Errorf("%s: %v, want EROFS", op, errno)
		}
	}
	reg := &node{ino: &ext4.Inode{Mode: syscall.S_IFREG | 0o644}}
	for _, flags := range []uint32{syscall.O_WRONLY, syscall.O_RDWR, syscall.O_RDONLY | syscall.O_TRUNC} {
		if _, _, errno := reg.Open(ctx, flags); errno != syscall.EROFS {
			t.Errorf("open flags %#x: %v, want EROFS", flags, errno)
		}
	}
	if _, fl, errno := reg.Open(ctx, syscall.O_RDONLY); errno != 0 || fl&fuse.FOPEN_KEEP_CACHE == 0 {
		t.Errorf("read-only open: flags %#x, %v; want FOPEN_KEEP_CACHE", fl, errno)
	}
}

func TestModeOfType(t *testing.T) {
	want := map[uint8]uint32{1: syscall.S_IFREG, 2: syscall.S_IFDIR, 3: syscall.S_IFCHR, 4: syscall.S_IFBLK,
		5: syscall.S_IFIFO, 6: syscall.S_IFSOCK, 7: syscall.S_IFLNK, 0: 0, 8: 0, 255: 0}
	for ft, mode := range want {
		if got := modeOfType(ft); got != mode {
			t.Errorf("modeOfType(%d) = %#o, want %#o", ft, got, mode)
		}
	}
}

func TestManifestEntryString(t *testing.T) {
	cases := []struct {
		e    ManifestEntry
		want string
	}{
		{ManifestEntry{Path: "/a/b", Mode: syscall.S_IFREG | 0o4755, UID: 1, GID: 2, Size: 3, Digest: "abc"}, "f 4755 1:2 3 abc /a/b"},
		{ManifestEntry{Path: "/sp ace", Mode: syscall.S_IFLNK | 0o777, Size: 5, Digest: "t t"}, `l 0777 0:0 5 "t t" "/sp ace"`},
		{ManifestEntry{Path: "/bad\xff", Mode: syscall.S_IFDIR | 0o700, Size: 4096, Digest: "-"}, `d 0700 0:0 4096 - "/bad\xff"`},
		{ManifestEntry{Path: "/dev", Mode: syscall.S_IFCHR | 0o600, Digest: DeviceDigest(1, 3)}, "c 0600 0:0 0 1,3 /dev"},
		{ManifestEntry{Path: "/ünï", Mode: syscall.S_IFIFO | 0o644, Digest: "-"}, "p 0644 0:0 0 - /ünï"},
	}
	for _, c := range cases {
		if got := c.e.String(); got != c.want {
			t.Errorf("String() = %q, want %q", got, c.want)
		}
		if n := len(strings.Fields(c.e.String())); n != 6 && !strings.Contains(c.e.String(), `"`) {
			t.Errorf("%q has %d fields", c.e.String(), n)
		}
	}
}

// TestEstimateTree: sparse files count their allocation, hard links count
// once, and the estimate is enough for mke2fs on the first try.
func TestEstimateTree(t *testing.T) {
	dir := t.TempDir()
	f, err := os.Create(filepath.Join(dir, "sparse"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("end"), 10<<30); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if err := os.WriteFile(filepath.Join(dir, "data"), make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if err := os.Link(filepath.Join(dir, "data"), filepath.Join(dir, fmt.Sprint("link", i))); err != nil {
			t.Fatal(err)
		}
	}
	est, err := EstimateTree(dir, 4096)
	if err != nil {
		t.Fatal(err)
	}
	if est.Inodes != 3 { // root, sparse, data (+3 links)
		t.Errorf("inodes %d, want 3", est.Inodes)
	}
	if est.MaxDirEntries != 5 {
		t.Errorf("largest directory has %d entries, want 5", est.MaxDirEntries)
	}
	if est.Blocks < 256 || est.Blocks > 300 {
		t.Errorf("blocks %d: want the 1 MiB file (256) plus little for the 10 GiB sparse one", est.Blocks)
	}
	if sz := est.ImageSize(false); sz < minImageSize || sz%(1<<20) != 0 || sz > 8<<20 {
		t.Errorf("image size %d", sz)
	}
	if j, nj := est.ImageSize(true), est.ImageSize(false); j <= nj {
		t.Errorf("journal does not add space: %d vs %d", j, nj)
	}
	if _, err := EstimateTree(filepath.Join(dir, "missing"), 4096); err == nil {
		t.Error("estimate of a missing directory succeeded")
	}
}

func TestMakeExt4Errors(t *testing.T) {
	testenv.RequireTools(t, "mkfs.ext4", "debugfs")
	src := t.TempDir()
	big := make([]byte, 8<<20)
	if _, err := rand.Read(big); err != nil { // mke2fs stores zero blocks as holes
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(src, "big"), big, 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "img")
	ctx := context.Background()
	if _, err := MakeExt4(ctx, src, out, MakeOptions{Size: 4 << 20}); err == nil || !strings.Contains(err.Error(), "mkfs.ext4") {
		t.Errorf("explicit size too small: %v", err)
	}
	if _, err := MakeExt4(ctx, src, out, MakeOptions{BlockSize: 8192}); err == nil || !strings.Contains(err.Error(), "block size") {
		t.Errorf("bad block size: %v", err)
	}
	if _, err := MakeExt4(ctx, src, out, MakeOptions{Label: strings.Repeat("l", 17)}); err == nil || !strings.Contains(err.Error(), "label") {
		t.Errorf("long label: %v", err)
	}
	if _, err := MakeExt4(ctx, filepath.Join(src, "big"), out, MakeOptions{}); err == nil || !strings.Contains(err.Error(), "not a directory") {
		t.Errorf("file as source: %v", err)
	}
	size, err := MakeExt4(ctx, src, out, MakeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(out); err != nil || st.Size() != size {
		t.Errorf("image is %v bytes (err %v), MakeExt4 said %d", st.Size(), err, size)
	}
}
