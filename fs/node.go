package fs

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/blobseal/blobseal/fs/ext4"
)

// volume is what every node of one mount shares. Apart from the failure
// set (a sync.Map) and the direct-I/O mode (an atomic, known only once the
// kernel has answered the mount) it is immutable after Mount, so the nodes
// need no locks.
type volume struct {
	tree      Tree
	log       *slog.Logger
	blockSize uint32
	timeout   time.Duration
	// interruptGrace is how long a read the kernel interrupted keeps
	// waiting for storage before it answers EINTR (see readContext).
	interruptGrace time.Duration
	observer       func(op string, d time.Duration, errno syscall.Errno) // nil: off
	// directIO is one of directNone, directLarge or directAll, set once the
	// kernel's capabilities are known (opens before that use the page cache).
	directIO atomic.Int32
	// failed remembers which (operation, inode) pairs have been logged at
	// error level, so a reader retrying a damaged file cannot flood the
	// log; repeats go to debug level.
	failed sync.Map
	// w changes the filesystem on a writable mount (MountWritable); nil on
	// a read-only one, where tree is the immutable image.
	w *ext4.Writer
	// readOnlyAfter closes when a writable mount must stop writing
	// (Options.ReadOnlyAfter).
	readOnlyAfter <-chan struct{}
}

type failure struct {
	op  string
	ino uint32
}

// node is one ext4 inode in the go-fuse tree. The ext4 inode is read once
// when the kernel first looks the node up: on a read-only mount the image
// is immutable, so the cached copy never goes stale. On a writable mount
// only its number and type are fixed; inode() reads the current state.
type node struct {
	gofs.Inode
	vol *volume
	ino *ext4.Inode
}

// inode returns the inode as it is now.
func (n *node) inode() (*ext4.Inode, error) {
	if !n.vol.writable() {
		return n.ino, nil
	}
	return n.vol.tree.Inode(n.ino.Ino)
}

// The operations the tree answers: reads, and the writes (write.go), which
// a read-only mount refuses with EROFS. The compile-time list documents the
// surface.
var (
	_ gofs.InodeEmbedder      = (*node)(nil)
	_ gofs.NodeLookuper       = (*node)(nil)
	_ gofs.NodeGetattrer      = (*node)(nil)
	_ gofs.NodeStatxer        = (*node)(nil)
	_ gofs.NodeOpendirHandler = (*node)(nil)
	_ gofs.NodeOpener         = (*node)(nil)
	_ gofs.NodeReader         = (*node)(nil)
	_ gofs.NodeReadlinker     = (*node)(nil)
	_ gofs.NodeListxattrer    = (*node)(nil)
	_ gofs.NodeGetxattrer     = (*node)(nil)
	_ gofs.NodeStatfser       = (*node)(nil)
	_ gofs.NodeAccesser       = (*node)(nil)

	_ gofs.NodeSetattrer      = (*node)(nil)
	_ gofs.NodeWriter         = (*node)(nil)
	_ gofs.NodeCreater        = (*node)(nil)
	_ gofs.NodeMkdirer        = (*node)(nil)
	_ gofs.NodeMknoder        = (*node)(nil)
	_ gofs.NodeLinker         = (*node)(nil)
	_ gofs.NodeSymlinker      = (*node)(nil)
	_ gofs.NodeUnlinker       = (*node)(nil)
	_ gofs.NodeRmdirer        = (*node)(nil)
	_ gofs.NodeRenamer        = (*node)(nil)
	_ gofs.NodeSetxattrer     = (*node)(nil)
	_ gofs.NodeRemovexattrer  = (*node)(nil)
	_ gofs.NodeAllocater      = (*node)(nil)
	_ gofs.NodeCopyFileRanger = (*node)(nil)
	_ gofs.NodeFsyncer        = (*node)(nil)
	_ gofs.NodeFlusher        = (*node)(nil)
	_ gofs.NodeReleaser       = (*node)(nil)
)

// fail turns a tree error into an errno, logging everything that is not an
// ordinary miss with the operation and the inode it concerns.
func (v *volume) fail(op string, ino uint32, err error) syscall.Errno {
	errno, logIt := errnoOf(err)
	if logIt {
		level := slog.LevelError
		if _, seen := v.failed.LoadOrStore(failure{op, ino}, true); seen {
			level = slog.LevelDebug
		}
		v.log.Log(context.Background(), level, "filesystem operation failed", "op", op, "inode", ino, "errno", errno.Error(), "err", err)
	}
	return errno
}

// begin starts timing an operation; without an observer it reads no clock.
func (v *volume) begin() time.Time {
	if v.observer == nil {
		return time.Time{}
	}
	return time.Now()
}

// observe reports an answered operation to Options.Observe. Deferred
// before guard, so it sees the EIO that guard substitutes for a panic:
// defer n.vol.observe("read", n.vol.begin(), &errno).
func (v *volume) observe(op string, start time.Time, errno *syscall.Errno) {
	if v.observer != nil {
		v.observer(op, time.Since(start), *errno)
	}
}

// refuse answers a write with EROFS, observed like any operation.
func (v *volume) refuse(op string) (errno syscall.Errno) {
	defer v.observe(op, v.begin(), &errno)
	return syscall.EROFS
}

// guard converts a panic inside an operation (a reader bug met on a damaged
// image) into EIO for that operation, so one bad inode cannot take the mount
// down. Use as: defer n.vol.guard("read", ino, &errno).
func (v *volume) guard(op string, ino uint32, errno *syscall.Errno) {
	if r := recover(); r != nil {
		v.guardValue(op, ino, r, errno)
	}
}

// guardValue logs a recovered panic and answers EIO.
func (v *volume) guardValue(op string, ino uint32, r any, errno *syscall.Errno) {
	v.log.Error("filesystem operation panicked; answering EIO", "op", op, "inode", ino,
		"panic", r, "stack", string(debug.Stack()))
	*errno = syscall.EIO
}

// fillAttr copies an ext4 inode into a FUSE attribute.
func (v *volume) fillAttr(in *ext4.Inode, out *fuse.Attr) {
	out.Ino = uint64(in.Ino)
	out.Size = in.Size
	out.Blocks = in.Blocks
	out.Mode = uint32(in.Mode)
	out.Nlink = uint32(in.Links)
	out.Owner = fuse.Owner{Uid: in.UID, Gid: in.GID}
	out.Rdev = in.Rdev // both ext4 and FUSE use the kernel's new_encode_dev form
	out.Blksize = v.blockSize
	atime, mtime, ctime := in.Atime, in.Mtime, in.Ctime
	out.SetTimes(&atime, &mtime, &ctime)
}

// newChild reads inode ino, fills the entry reply and returns the go-fuse
// inode for it (an existing one when ino is already known: hard links).
func (n *node) newChild(ctx context.Context, op string, ino uint32, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	if ino < ext4.RootIno || ino == ext4.RootIno && n.ino.Ino != ext4.RootIno {
		// Inode 1 is reserved and a second name for the root is a loop;
		// both mean the directory is damaged.
		return nil, n.vol.fail(op, n.ino.Ino, errors.Join(ext4.ErrCorrupt,
			errors.New("directory entry points to reserved inode or to the root")))
	}
	child, err := n.vol.tree.Inode(ino)
	if err != nil {
		return nil, n.vol.fail(op, ino, err)
	}
	n.vol.fillAttr(child, &out.Attr)
	out.SetEntryTimeout(n.vol.timeout)
	out.SetAttrTimeout(n.vol.attrTimeout())
	stable := gofs.StableAttr{
		Mode: uint32(child.Mode) & syscall.S_IFMT,
		Ino:  uint64(child.Ino),
		Gen:  uint64(child.Generation),
	}
	return n.NewInode(ctx, &node{vol: n.vol, ino: child}, stable), 0
}

// Lookup finds name in this directory.
func (n *node) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (_ *gofs.Inode, errno syscall.Errno) {
	defer n.vol.observe("lookup", n.vol.begin(), &errno)
	return n.lookup(ctx, name, out)
}

// lookup is Lookup without the observer, for callers that observe already.
func (n *node) lookup(ctx context.Context, name string, out *fuse.EntryOut) (_ *gofs.Inode, errno syscall.Errno) {
	defer n.vol.guard("lookup", n.ino.Ino, &errno)
	if len(name) > 255 {
		return nil, syscall.ENAMETOOLONG
	}
	ino, err := n.vol.tree.Lookup(n.ino, name)
	if err != nil {
		return nil, n.vol.fail("lookup", n.ino.Ino, err)
	}
	return n.newChild(ctx, "lookup", ino, out)
}

// Getattr answers from the inode read at lookup time.
func (n *node) Getattr(ctx context.Context, f gofs.FileHandle, out *fuse.AttrOut) (errno syscall.Errno) {
	defer n.vol.observe("getattr", n.vol.begin(), &errno)
	defer n.vol.guard("getattr", n.ino.Ino, &errno)
	in, err := n.inode()
	if err != nil {
		return n.vol.fail("getattr", n.ino.Ino, err)
	}
	n.vol.fillAttr(in, &out.Attr)
	out.SetTimeout(n.vol.attrTimeout())
	return 0
}

// Statx answers statx(2) like Getattr, plus the creation time that ext4
// keeps in large inodes.
func (n *node) Statx(ctx context.Context, f gofs.FileHandle, flags uint32, mask uint32, out *fuse.StatxOut) (errno syscall.Errno) {
	defer n.vol.observe("getattr", n.vol.begin(), &errno)
	defer n.vol.guard("getattr", n.ino.Ino, &errno)
	in, err := n.inode()
	if err != nil {
		return n.vol.fail("getattr", n.ino.Ino, err)
	}
	out.Mask = unix.STATX_BASIC_STATS
	out.Blksize = n.vol.blockSize
	out.Nlink = uint32(in.Links)
	out.Uid, out.Gid = in.UID, in.GID
	out.Mode = in.Mode
	out.Ino = uint64(in.Ino)
	out.Size = in.Size
	out.Blocks = in.Blocks
	out.Atime, out.Mtime, out.Ctime = sxTime(in.Atime), sxTime(in.Mtime), sxTime(in.Ctime)
	if !in.Crtime.IsZero() {
		out.Mask |= unix.STATX_BTIME
		out.Btime = sxTime(in.Crtime)
	}
	out.RdevMajor, out.RdevMinor = in.Major(), in.Minor()
	out.SetTimeout(n.vol.attrTimeout())
	return 0
}

// sxTime converts a time to statx form; seconds before 1970 wrap to the
// two's complement the kernel reads back as negative.
func sxTime(t time.Time) fuse.SxTime {
	return fuse.SxTime{Sec: uint64(t.Unix()), Nsec: uint32(t.Nanosecond())}
}

// Access is left to the kernel (default_permissions); on a read-only
// mount writes are refused here, as on any read-only filesystem.
func (n *node) Access(ctx context.Context, mask uint32) syscall.Errno {
	if mask&unix.W_OK != 0 && !n.vol.writable() {
		return syscall.EROFS
	}
	return 0
}

// Open opens a regular file. Read-only mounts let the kernel keep its page
// cache across opens, since the content never changes; so do writable ones,
// since every change comes through this mount and the kernel updates its
// cache as it writes. On a writable mount the handle holds the inode, so
// unlinking its last name keeps it alive until the handle is released.
func (n *node) Open(ctx context.Context, flags uint32) (_ gofs.FileHandle, _ uint32, errno syscall.Errno) {
	defer n.vol.observe("open", n.vol.begin(), &errno)
	defer n.vol.guard("open", n.ino.Ino, &errno)
	if !n.vol.writable() && (flags&syscall.O_ACCMODE != syscall.O_RDONLY || flags&syscall.O_TRUNC != 0) {
		return nil, 0, syscall.EROFS
	}
	if !n.ino.IsRegular() {
		return nil, 0, syscall.EINVAL
	}
	var fh gofs.FileHandle
	if n.vol.writable() && flags&syscall.O_TRUNC != 0 && flags&syscall.O_ACCMODE != syscall.O_RDONLY {
		// Only with FUSE_ATOMIC_O_TRUNC; otherwise the kernel truncates first.
		if err := n.vol.w.Truncate(n.ino.Ino, 0); err != nil {
			return nil, 0, n.vol.fail("open", n.ino.Ino, err)
		}
	}
	in, err := n.inode()
	if err != nil {
		return nil, 0, n.vol.fail("open", n.ino.Ino, err)
	}
	if n.vol.writable() {
		n.vol.w.Hold(n.ino.Ino)
		fh = &heldFile{ino: n.ino.Ino}
	}
	switch n.vol.directIO.Load() {
	case directAll:
		return fh, fuse.FOPEN_DIRECT_IO, 0
	case directLarge:
		if in.Size >= DirectIOMinSize {
			return fh, fuse.FOPEN_DIRECT_IO, 0
		}
	}
	return fh, fuse.FOPEN_KEEP_CACHE, 0
}

// Read fills dest from the file at off; a short read means end of file.
func (n *node) Read(ctx context.Context, f gofs.FileHandle, dest []byte, off int64) (_ fuse.ReadResult, errno syscall.Errno) {
	defer n.vol.observe("read", n.vol.begin(), &errno)
	defer n.vol.guard("read", n.ino.Ino, &errno)
	if off < 0 {
		return nil, syscall.EINVAL
	}
	in, err := n.inode()
	if err != nil {
		return nil, n.vol.fail("read", n.ino.Ino, err)
	}
	if uint64(off) >= in.Size {
		return fuse.ReadResultData(nil), 0
	}
	if rest := in.Size - uint64(off); uint64(len(dest)) > rest {
		dest = dest[:rest]
	}
	rctx, cancel := n.vol.readContext(ctx)
	defer cancel()
	got, err := n.vol.tree.ReadAtContext(rctx, in, dest, off)
	if err != nil && !(errors.Is(err, io.EOF) && got == len(dest)) {
		if interrupted(ctx, rctx) {
			return nil, syscall.EINTR // the reader is gone (or was signalled): not a failure to log
		}
		return nil, n.vol.fail("read", n.ino.Ino, err)
	}
	return fuse.ReadResultData(dest[:got]), 0
}

// Readlink returns the symlink target.
func (n *node) Readlink(ctx context.Context) (_ []byte, errno syscall.Errno) {
	defer n.vol.observe("readlink", n.vol.begin(), &errno)
	defer n.vol.guard("readlink", n.ino.Ino, &errno)
	if !n.ino.IsSymlink() {
		return nil, syscall.EINVAL
	}
	target, err := n.vol.tree.Readlink(n.ino)
	if err != nil {
		return nil, n.vol.fail("readlink", n.ino.Ino, err)
	}
	return []byte(target), 0
}

// Listxattr writes the NUL-separated attribute names, or only their size
// when dest is empty (the size probe of listxattr(2)).
func (n *node) Listxattr(ctx context.Context, dest []byte) (_ uint32, errno syscall.Errno) {
	defer n.vol.observe("listxattr", n.vol.begin(), &errno)
	defer n.vol.guard("listxattr", n.ino.Ino, &errno)
	names, err := n.vol.tree.ListXattr(n.ino)
	if err != nil {
		return 0, n.vol.fail("listxattr", n.ino.Ino, err)
	}
	var list []byte
	for _, name := range names {
		list = append(list, name...)
		list = append(list, 0)
	}
	return copyOut(dest, list)
}

// Getxattr returns one attribute value, ENODATA when absent.
func (n *node) Getxattr(ctx context.Context, attr string, dest []byte) (_ uint32, errno syscall.Errno) {
	defer n.vol.observe("getxattr", n.vol.begin(), &errno)
	defer n.vol.guard("getxattr", n.ino.Ino, &errno)
	value, err := n.vol.tree.GetXattr(n.ino, attr)
	if err != nil {
		return 0, n.vol.fail("getxattr", n.ino.Ino, err)
	}
	return copyOut(dest, value)
}

// copyOut implements the xattr size protocol: an empty buffer asks for the
// size, a too small one is ERANGE.
func copyOut(dest, data []byte) (uint32, syscall.Errno) {
	if len(dest) == 0 {
		return uint32(len(data)), 0
	}
	if len(dest) < len(data) {
		return uint32(len(data)), syscall.ERANGE
	}
	return uint32(copy(dest, data)), 0
}

// Statfs reports the ext4 geometry; nothing is writable, so the free
// counts are informational only.
func (n *node) Statfs(ctx context.Context, out *fuse.StatfsOut) (errno syscall.Errno) {
	defer n.vol.observe("statfs", n.vol.begin(), &errno)
	defer n.vol.guard("statfs", n.ino.Ino, &errno)
	st := n.vol.tree.StatFS()
	out.Bsize = st.BlockSize
	out.Frsize = st.BlockSize
	out.Blocks = st.Blocks
	out.Bfree = st.FreeBlocks
	out.Bavail = st.AvailBlocks
	out.Files = st.Inodes
	out.Ffree = st.FreeInodes
	out.NameLen = st.NameLen
	return 0
}
