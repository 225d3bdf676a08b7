package fs

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/blobseal/blobseal/fs/ext4"
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
		// The writer's answers pass through; only EIO is worth a log line.
		{fmt.Errorf("ext4: mkdir %q: %w", "d", syscall.EEXIST), syscall.EEXIST, false},
		{fmt.Errorf("ext4: allocating: %w", syscall.ENOSPC), syscall.ENOSPC, false},
		{fmt.Errorf("ext4: device: %w", syscall.EIO), syscall.EIO, true},
		// An errno from below the filesystem (a storage connection) is an
		// I/O error to the application, not its own errno.
		{fmt.Errorf("fetch: %w", &net.OpError{Op: "read", Net: "tcp",
			Err: &os.SyscallError{Syscall: "read", Err: syscall.ECONNRESET}}), syscall.EIO, true},
		// A storage connection's errno is an I/O failure, not an answer.
		{fmt.Errorf("read blob: %w", &url.Error{Op: "GET", URL: "http://127.0.0.1/b", Err: &net.OpError{Op: "read", Net: "tcp",
			Err: os.NewSyscallError("read", syscall.ECONNRESET)}}), syscall.EIO, true},
		{fmt.Errorf("dial: %w", &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}), syscall.EIO, true},
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
	observed := map[string]syscall.Errno{}
	vol := &volume{observer: func(op string, d time.Duration, errno syscall.Errno) {
		if _, dup := observed[op]; dup && op != "open" {
			t.Errorf("%s observed twice", op)
		}
		observed[op] = errno
	}}
	n := &node{vol: vol}
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
	for op := range errnos {
		if op == "access W_OK" { // the kernel's permission probe, not a write
			continue
		}
		if got, ok := observed[op]; !ok || got != syscall.EROFS {
			t.Errorf("refused %s: observed %v (seen %t), want EROFS", op, got, ok)
		}
	}
	reg := &node{vol: vol, ino: &ext4.Inode{Mode: syscall.S_IFREG | 0o644}}
	for _, flags := range []uint32{syscall.O_WRONLY, syscall.O_RDWR, syscall.O_RDONLY | syscall.O_TRUNC} {
		if _, _, errno := reg.Open(ctx, flags); errno != syscall.EROFS {
			t.Errorf("open flags %#x: %v, want EROFS", flags, errno)
		}
	}
	if _, fl, errno := reg.Open(ctx, syscall.O_RDONLY); errno != 0 || fl&fuse.FOPEN_KEEP_CACHE == 0 {
		t.Errorf("read-only open: flags %#x, %v; want FOPEN_KEEP_CACHE", fl, errno)
	}
	if got, ok := observed["open"]; !ok || got != 0 {
		t.Errorf("last open observed as %v (seen %t), want success", got, ok)
	}
}

func TestModeOfType(t *testing.T) {
	want := map[uint8]uint32{1: syscall.S_IFREG, 2: syscall.S_IFDIR, 3: syscall.S_IFCHR, 4: syscall.S_IFBLK,
		5: syscall.S_IFIFO, 6: syscall.S_IFSOCK, 7: syscall.S_IFLNK, 0: 0, 8: 0, 255: 0}
	for ft, mode := range want {
		if got := ModeOfType(ft); got != mode {
			t.Errorf("ModeOfType(%d) = %#o, want %#o", ft, got, mode)
		}
	}
}

// BenchmarkGetattrObserve prices the Observe hook on the cheapest
// operation: off (nil) it must cost nothing measurable.
func BenchmarkGetattrObserve(b *testing.B) {
	in := &ext4.Inode{Ino: 12, Mode: syscall.S_IFREG | 0o644}
	for _, bc := range []struct {
		name    string
		observe func(string, time.Duration, syscall.Errno)
	}{
		{"off", nil},
		{"on", func(string, time.Duration, syscall.Errno) {}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			n := &node{vol: &volume{observer: bc.observe}, ino: in}
			var out fuse.AttrOut
			for b.Loop() {
				if errno := n.Getattr(context.Background(), nil, &out); errno != 0 {
					b.Fatal(errno)
				}
			}
		})
	}
}
