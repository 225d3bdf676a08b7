package fs

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"syscall"
	"time"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/blobseal/blobseal/fs/ext4"
)

// The write operations. Metadata changes go straight to the ext4 Writer,
// which journals them (committed by fsync, by the periodic commit, or when
// a transaction fills a quarter of the journal) and writes file data in
// place before the metadata that points at it commits (ordered mode).
//
// File data goes through a dirty-data cache in this process (dirty.go):
// write(2) (split at 1 MiB by the kernel) lands in a per-file buffer and
// returns; the buffers reach the Writer in large contiguous runs, so the
// allocator sees whole extents and the journal one change per run rather
// than per write. They are flushed by fsync of the file (then the journal
// commits), by close (FLUSH, and RELEASE after the last mmap goes: close-
// to-open consistency, and the place writeback errors are reported), by
// any truncate, fallocate or attribute change of the file (which must
// follow its data), by the background flusher past a quarter of the bound
// and by a writer waiting at the bound, by the periodic commit, and at
// unmount. Getattr and read see dirty sizes and data at once (writerTree).
//
// Why not the kernel's writeback cache (FUSE_WRITEBACK_CACHE)? It would
// batch small writes for less code, but the kernel then owns mtime and
// ctime and sends them back later as SETATTR, and the Writer can set mtime
// but not ctime: every ctime on disk would be the time of writeback, which
// the differential tests against the kernel's ext4 catch (tried: every
// written file's ctime differed, by the writeback delay). Here the data
// reaches the Writer at close at the latest, so what a stat shows after
// close is what the image keeps.
//
// Limits: a file's ctime becomes the time of its flush (microseconds
// after the last write when that is a close), and so does its mtime when
// the flush comes within mtimeSlack (later ones put the write's time
// back); st_blocks counts appended dirty data, not holes filled; syncfs(2)
// does not reach this process (go-fuse has no SYNCFS), so it is the
// periodic commit that stores such data within commitInterval.
//
// A read-only mount answers every write operation with EROFS.

// opContext is the context a metadata change passes down: like a read's,
// it outlives an INTERRUPT by the interrupt grace. Go programs and others
// get signals all the time (Go's preemption sends SIGURG), and the kernel's
// ext4 never fails an unlink or a create with EINTR; only a change still
// waiting (for the Writer's lock, for storage) after the grace gives up.
func (v *volume) opContext(req context.Context) (context.Context, context.CancelFunc) {
	return v.readContext(req)
}

// writable reports whether the mount changes the image: a writable mount
// whose ReadOnlyAfter closed no longer does.
func (v *volume) writable() bool { return v.w != nil && !v.demoted() }

// demoted reports whether a writable mount was turned read-only.
func (v *volume) demoted() bool {
	select {
	case <-v.readOnlyAfter: // nil: never
		return true
	default:
		return false
	}
}

// attrTimeout is how long the kernel may trust attributes. Every change
// comes through this mount, and the kernel invalidates what its own
// requests change (sizes after writes, link counts after unlink, ctimes
// after rename); the short timeout on a writable mount bounds any case it
// misses, such as the mtime of a file a directory operation touched.
func (v *volume) attrTimeout() time.Duration {
	if v.writable() && v.timeout > writableAttrTimeout {
		return writableAttrTimeout
	}
	return v.timeout
}

const writableAttrTimeout = time.Second

// dirty returns the mount's dirty-data cache; nil on a read-only mount.
func (v *volume) dirty() *dirtyCache {
	if t, ok := v.tree.(writerTree); ok {
		return t.dirty
	}
	return nil
}

// holds returns the mount's node holds; nil on a read-only mount.
func (v *volume) holds() *nodeHolds {
	if t, ok := v.tree.(writerTree); ok {
		return t.holds
	}
	return nil
}

// nodeHolds counts the holds go-fuse nodes keep until the kernel forgets
// them (see heldEntry). Keyed by node, not inode number: a node the
// kernel forgot and looked up again is a new one, holding nothing.
type nodeHolds struct {
	mu    sync.Mutex
	count map[*node]int
}

func newNodeHolds() *nodeHolds { return &nodeHolds{count: map[*node]int{}} }

func (h *nodeHolds) add(n *node) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.count[n]++
}

// take removes and returns n's holds.
func (h *nodeHolds) take(n *node) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	c := h.count[n]
	delete(h.count, n)
	return c
}

// takeAll removes and returns every node's holds.
func (h *nodeHolds) takeAll() map[*node]int {
	h.mu.Lock()
	defer h.mu.Unlock()
	all := h.count
	h.count = map[*node]int{}
	return all
}

var _ gofs.NodeOnForgetter = (*node)(nil)

// OnForget drops the holds of a node the kernel no longer knows; an inode
// removed meanwhile is freed now.
func (n *node) OnForget() {
	holds := n.vol.holds()
	if holds == nil {
		return
	}
	n.releaseHolds(holds.take(n))
}

func (n *node) releaseHolds(count int) {
	for range count {
		if err := n.vol.w.Release(n.ino.Ino); err != nil {
			n.vol.fail("forget", n.ino.Ino, err)
		}
	}
}

// heldFile is an open regular file of a writable mount; it holds its inode
// (ext4.Writer.Hold) until released, so an unlinked open file lives on.
type heldFile struct{ ino uint32 }

// change is deferred by every write operation: it observes op and turns a
// panic into EIO, as guard and observe do for reads.
func (n *node) change(op string, errno *syscall.Errno) (done func()) {
	start := n.vol.begin()
	return func() {
		if r := recover(); r != nil {
			n.vol.guardValue(op, n.ino.Ino, r, errno)
		}
		n.vol.observe(op, start, errno)
	}
}

// owner returns who creates a file in this directory: the caller, with
// the group of a set-group-ID directory (which a new directory inherits
// along with the bit), as ext4 does.
func (n *node) owner(ctx context.Context, mode uint32) (uid, gid, outMode uint32) {
	if c, ok := fuse.FromContext(ctx); ok {
		uid, gid = c.Uid, c.Gid
	}
	if dir, err := n.inode(); err == nil && dir.Mode&syscall.S_ISGID != 0 {
		gid = dir.GID
		if mode&syscall.S_IFMT == syscall.S_IFDIR {
			mode |= syscall.S_ISGID
		}
	}
	return uid, gid, mode
}

// Create makes and opens a regular file.
func (n *node) Create(ctx context.Context, name string, flags uint32, mode uint32, out *fuse.EntryOut) (_ *gofs.Inode, _ gofs.FileHandle, _ uint32, errno syscall.Errno) {
	defer n.change("create", &errno)()
	if !n.vol.writable() {
		return nil, nil, 0, syscall.EROFS
	}
	uid, gid, mode := n.owner(ctx, mode)
	// Held in the same change that makes it: an unlink racing the open
	// cannot free it before the handle exists. The handle owns the hold.
	ctx, done := n.vol.opContext(ctx)
	defer done()
	in, err := n.vol.w.CreateHeld(ctx, n.ino.Ino, name, mode&0o7777, uid, gid)
	if err != nil {
		return nil, nil, 0, n.vol.fail("create", n.ino.Ino, err)
	}
	return n.entry(ctx, in, out), &heldFile{ino: in.Ino}, 0, 0
}

// entry fills the entry reply for in, an inode a change just made or
// linked and returned (so it is not read again), and returns its go-fuse
// inode: an existing one when in is already known (hard links).
func (n *node) entry(ctx context.Context, in *ext4.Inode, out *fuse.EntryOut) *gofs.Inode {
	n.vol.fillAttr(in, &out.Attr)
	out.SetEntryTimeout(n.vol.timeout)
	out.SetAttrTimeout(n.vol.attrTimeout())
	stable := gofs.StableAttr{Mode: uint32(in.Mode) & syscall.S_IFMT, Ino: uint64(in.Ino), Gen: uint64(in.Generation)}
	return n.NewInode(ctx, &node{vol: n.vol, ino: in}, stable)
}

// heldEntry is entry for an inode a …Held change holds: the hold passes
// to the go-fuse node and ends when the kernel forgets it (OnForget), so
// the inode the kernel was just told about cannot be freed, and its
// number reused, while the kernel still knows it.
func (n *node) heldEntry(ctx context.Context, in *ext4.Inode, out *fuse.EntryOut) *gofs.Inode {
	child := n.entry(ctx, in, out)
	n.vol.holds().add(child.Operations().(*node))
	return child
}

// Mknod makes a FIFO, socket, device node or regular file.
func (n *node) Mknod(ctx context.Context, name string, mode uint32, rdev uint32, out *fuse.EntryOut) (_ *gofs.Inode, errno syscall.Errno) {
	defer n.change("mknod", &errno)()
	if !n.vol.writable() {
		return nil, syscall.EROFS
	}
	uid, gid, mode := n.owner(ctx, mode)
	ctx, done := n.vol.opContext(ctx)
	defer done()
	in, err := n.vol.w.MknodHeld(ctx, n.ino.Ino, name, mode, rdev, uid, gid)
	if err != nil {
		return nil, n.vol.fail("mknod", n.ino.Ino, err)
	}
	return n.heldEntry(ctx, in, out), 0
}

// Mkdir makes a directory.
func (n *node) Mkdir(ctx context.Context, name string, mode uint32, out *fuse.EntryOut) (_ *gofs.Inode, errno syscall.Errno) {
	defer n.change("mkdir", &errno)()
	if !n.vol.writable() {
		return nil, syscall.EROFS
	}
	uid, gid, mode := n.owner(ctx, mode|syscall.S_IFDIR)
	ctx, done := n.vol.opContext(ctx)
	defer done()
	in, err := n.vol.w.MkdirHeld(ctx, n.ino.Ino, name, mode&0o7777, uid, gid)
	if err != nil {
		return nil, n.vol.fail("mkdir", n.ino.Ino, err)
	}
	return n.heldEntry(ctx, in, out), 0
}

// Symlink makes a symbolic link to target.
func (n *node) Symlink(ctx context.Context, target, name string, out *fuse.EntryOut) (_ *gofs.Inode, errno syscall.Errno) {
	defer n.change("symlink", &errno)()
	if !n.vol.writable() {
		return nil, syscall.EROFS
	}
	uid, gid, _ := n.owner(ctx, syscall.S_IFLNK)
	ctx, done := n.vol.opContext(ctx)
	defer done()
	in, err := n.vol.w.SymlinkHeld(ctx, n.ino.Ino, name, target, uid, gid)
	if err != nil {
		return nil, n.vol.fail("symlink", n.ino.Ino, err)
	}
	return n.heldEntry(ctx, in, out), 0
}

// Link gives target another name in this directory.
func (n *node) Link(ctx context.Context, target gofs.InodeEmbedder, name string, out *fuse.EntryOut) (_ *gofs.Inode, errno syscall.Errno) {
	defer n.change("link", &errno)()
	if !n.vol.writable() {
		return nil, syscall.EROFS
	}
	t, ok := target.(*node)
	if !ok {
		return nil, syscall.EXDEV
	}
	ctx, done := n.vol.opContext(ctx)
	defer done()
	in, err := n.vol.w.LinkHeld(ctx, t.ino.Ino, n.ino.Ino, name)
	if err != nil {
		return nil, n.vol.fail("link", n.ino.Ino, err)
	}
	return n.heldEntry(ctx, in, out), 0
}

// Unlink removes a name of a non-directory.
func (n *node) Unlink(ctx context.Context, name string) (errno syscall.Errno) {
	defer n.change("unlink", &errno)()
	if !n.vol.writable() {
		return syscall.EROFS
	}
	ctx, done := n.vol.opContext(ctx)
	defer done()
	return n.vol.failed0("unlink", n.ino.Ino, n.vol.w.UnlinkContext(ctx, n.ino.Ino, name))
}

// Rmdir removes an empty directory.
func (n *node) Rmdir(ctx context.Context, name string) (errno syscall.Errno) {
	defer n.change("rmdir", &errno)()
	if !n.vol.writable() {
		return syscall.EROFS
	}
	ctx, done := n.vol.opContext(ctx)
	defer done()
	return n.vol.failed0("rmdir", n.ino.Ino, n.vol.w.RmdirContext(ctx, n.ino.Ino, name))
}

// Rename moves name to newParent/newName (renameat2 flags NOREPLACE and
// EXCHANGE; the writer refuses WHITEOUT with EINVAL).
func (n *node) Rename(ctx context.Context, name string, newParent gofs.InodeEmbedder, newName string, flags uint32) (errno syscall.Errno) {
	defer n.change("rename", &errno)()
	if !n.vol.writable() {
		return syscall.EROFS
	}
	np, ok := newParent.(*node)
	if !ok {
		return syscall.EXDEV
	}
	ctx, done := n.vol.opContext(ctx)
	defer done()
	return n.vol.failed0("rename", n.ino.Ino, n.vol.w.RenameContext(ctx, n.ino.Ino, name, np.ino.Ino, newName, flags))
}

// Setattr changes size, mode, owner and times (truncate, chmod, chown,
// utimensat with UTIME_NOW and UTIME_OMIT: the kernel sends only what is set).
func (n *node) Setattr(ctx context.Context, f gofs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) (errno syscall.Errno) {
	defer n.change("setattr", &errno)()
	if !n.vol.writable() {
		return syscall.EROFS
	}
	ino := n.ino.Ino
	if n.ino.IsRegular() {
		// Data first: a truncate or an explicit mtime must come after the
		// writes before it. A failure stays for fsync or close to report.
		if err := n.vol.dirty().flushContext(ctx, ino); ctx.Err() != nil {
			return n.vol.fail("setattr", ino, err)
		}
	}
	if size, ok := in.GetSize(); ok {
		if err := n.vol.w.TruncateContext(ctx, ino, size); err != nil {
			return n.vol.fail("setattr", ino, err)
		}
	}
	var a ext4.SetAttr
	var set bool
	if mode, ok := in.GetMode(); ok {
		a.Mode, set = &mode, true
	}
	if uid, ok := in.GetUID(); ok {
		a.UID, set = &uid, true
	}
	if gid, ok := in.GetGID(); ok {
		a.GID, set = &gid, true
	}
	if t, ok := in.GetATime(); ok {
		a.Atime, set = &t, true
	}
	if t, ok := in.GetMTime(); ok {
		a.Mtime, set = &t, true
	}
	var cur *ext4.Inode
	if set {
		// The change returns the inode as it left it: no second read.
		in, err := n.vol.w.SetattrContext(ctx, ino, a)
		if err != nil {
			return n.vol.fail("setattr", ino, err)
		}
		cur = in
		if cur.IsRegular() { // writes may have come in since the flush
			cur = n.vol.dirty().overlay(cur)
		}
	} else {
		in, err := n.inode()
		if err != nil {
			return n.vol.fail("setattr", ino, err)
		}
		cur = in
	}
	n.vol.fillAttr(cur, &out.Attr)
	out.SetTimeout(n.vol.attrTimeout())
	return 0
}

// Write writes data at off (the kernel has resolved O_APPEND to an offset).
func (n *node) Write(ctx context.Context, f gofs.FileHandle, data []byte, off int64) (_ uint32, errno syscall.Errno) {
	defer n.change("write", &errno)()
	if !n.vol.writable() {
		return 0, syscall.EROFS
	}
	if off < 0 {
		return 0, syscall.EINVAL
	}
	if err := n.vol.dirty().write(ctx, n.ino.Ino, data, off); err != nil {
		return 0, n.vol.fail("write", n.ino.Ino, err)
	}
	return uint32(len(data)), 0
}

// Allocate is fallocate(2): mode 0 and FALLOC_FL_KEEP_SIZE.
func (n *node) Allocate(ctx context.Context, f gofs.FileHandle, off uint64, size uint64, mode uint32) (errno syscall.Errno) {
	defer n.change("allocate", &errno)()
	if !n.vol.writable() {
		return syscall.EROFS
	}
	if mode&^unix.FALLOC_FL_KEEP_SIZE != 0 {
		return syscall.EOPNOTSUPP
	}
	// The size must include what was written; a flush failure stays for
	// fsync or close to report.
	if err := n.vol.dirty().flushContext(ctx, n.ino.Ino); ctx.Err() != nil {
		return n.vol.fail("allocate", n.ino.Ino, err)
	}
	return n.vol.failed0("allocate", n.ino.Ino, n.vol.w.FallocateContext(ctx, n.ino.Ino, off, size, mode&unix.FALLOC_FL_KEEP_SIZE != 0))
}

// CopyFileRange is left to the kernel's generic copy (ENOSYS makes it
// fall back to reads and writes, and stop asking).
func (n *node) CopyFileRange(context.Context, gofs.FileHandle, uint64, *gofs.Inode, gofs.FileHandle, uint64, uint64, uint64) (_ uint32, errno syscall.Errno) {
	defer n.change("copy_file_range", &errno)()
	if !n.vol.writable() {
		return 0, syscall.EROFS
	}
	return 0, syscall.ENOSYS
}

// Setxattr sets an extended attribute (flags XATTR_CREATE, XATTR_REPLACE).
func (n *node) Setxattr(ctx context.Context, attr string, data []byte, flags uint32) (errno syscall.Errno) {
	defer n.change("setxattr", &errno)()
	if !n.vol.writable() {
		return syscall.EROFS
	}
	ctx, done := n.vol.opContext(ctx)
	defer done()
	return n.vol.failed0("setxattr", n.ino.Ino, n.vol.w.SetXattrContext(ctx, n.ino.Ino, attr, data, int(flags)))
}

// Removexattr removes an extended attribute (ENODATA when absent).
func (n *node) Removexattr(ctx context.Context, attr string) (errno syscall.Errno) {
	defer n.change("removexattr", &errno)()
	if !n.vol.writable() {
		return syscall.EROFS
	}
	ctx, done := n.vol.opContext(ctx)
	defer done()
	return n.vol.failed0("removexattr", n.ino.Ino, n.vol.w.RemoveXattrContext(ctx, n.ino.Ino, attr))
}

// Fsync writes out the file's dirty data, then commits the journal: all
// metadata so far, not only this file's, is durable when it returns (as
// with ext4's single journal). Fsync of a directory writes out every
// file's data first. A flush failure since the last report is answered
// here (and cleared), as the kernel reports writeback errors.
func (n *node) Fsync(ctx context.Context, f gofs.FileHandle, flags uint32) (errno syscall.Errno) {
	defer n.change("fsync", &errno)()
	if n.vol.w == nil {
		return 0
	}
	if n.vol.demoted() {
		// Writes not stored before the mount turned read-only are lost:
		// fsync must not claim them.
		n.vol.dirty().discard(n.ino.Ino)
		return syscall.EIO
	}
	var flushErr error
	if n.ino.IsRegular() {
		flushErr = n.vol.dirty().sync(ctx, n.ino.Ino)
	} else {
		_ = n.vol.dirty().flushAll() // each file's error waits for its own fsync or close
	}
	if ctx.Err() != nil { // interrupted: nothing is claimed durable
		return n.vol.fail("fsync", n.ino.Ino, interruptedErr("fsync", n.ino.Ino, ctx.Err()))
	}
	if err := n.vol.w.SyncContext(ctx); err != nil {
		return n.vol.fail("fsync", n.ino.Ino, err)
	}
	return n.vol.failed0("fsync", n.ino.Ino, flushErr)
}

// Flush (every close) writes out the file's dirty data and reports a
// failure to store it, so close(2) is where a writer learns of ENOSPC or
// EIO it has not yet seen; it promises no durability (no journal commit).
func (n *node) Flush(ctx context.Context, f gofs.FileHandle) (errno syscall.Errno) {
	if _, ok := f.(*heldFile); !ok || n.vol.w == nil {
		return 0
	}
	defer n.change("flush", &errno)()
	if n.vol.demoted() {
		if n.vol.dirty().discard(n.ino.Ino) {
			return syscall.EIO
		}
		return 0
	}
	return n.vol.failed0("flush", n.ino.Ino, n.vol.dirty().sync(ctx, n.ino.Ino))
}

// Release writes out what a shared mapping dirtied after the last close,
// then drops the handle's hold; a file unlinked while open is freed now.
// The kernel ignores RELEASE's answer, so a flush failure here is logged.
func (n *node) Release(ctx context.Context, f gofs.FileHandle) (errno syscall.Errno) {
	h, ok := f.(*heldFile)
	if !ok || n.vol.w == nil {
		return 0
	}
	if !n.vol.writable() {
		n.vol.dirty().discard(h.ino)
		return 0
	}
	defer n.change("release", &errno)()
	// Not the request's context: a release the kernel gave up on would
	// leave the hold, and an unlinked file, forever.
	ctx = context.WithoutCancel(ctx)
	if err := n.vol.dirty().sync(ctx, h.ino); err != nil {
		n.vol.log.Error("data written to a file could not be stored, and no close or fsync was left to report it",
			"inode", h.ino, "err", err)
	}
	return n.vol.failed0("release", h.ino, n.vol.w.ReleaseContext(ctx, h.ino))
}

// failed0 is fail for operations that return only an errno; nil is 0.
func (v *volume) failed0(op string, ino uint32, err error) syscall.Errno {
	if err == nil {
		return 0
	}
	return v.fail(op, ino, err)
}

// commitInterval is how often a writable mount commits the journal on its
// own, as ext4's default commit=5: a crash loses at most that much of what
// was not fsynced.
const commitInterval = 5 * time.Second

// commitEvery writes out dirty data and syncs w every interval until stop
// closes, or until the mount turned read-only (its writer can store
// nothing more).
func (s *Server) commitEvery(w *ext4.Writer, dirty *dirtyCache, interval time.Duration, stop, readOnly <-chan struct{}) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-readOnly: // nil: never
			return
		case <-t.C:
			if err := dirty.flushAll(); err != nil {
				s.log.Error("periodic flush of written data failed; reported at the file's next fsync or close", "err", err)
			}
			dirty.trim()
			if err := w.SyncContext(dirty.ctx); err != nil {
				s.log.Error("periodic journal commit failed", "err", err)
			}
		}
	}
}

// closeWriter writes out what is still dirty and flushes the filesystem
// once the kernel has let go of it.
func (s *Server) closeWriter(w *ext4.Writer, dirty *dirtyCache, holds *nodeHolds) {
	dirty.close()
	if err := dirty.flushAll(); err != nil {
		s.flushErr = fmt.Errorf("write out file data at unmount: %w", err)
		s.log.Error("writing out file data at unmount failed", "err", err)
	}
	// The kernel has let go of every node, whether or not it said so.
	for n, count := range holds.takeAll() {
		n.releaseHolds(count)
	}
	if err := w.Close(); err != nil {
		s.flushErr = errors.Join(s.flushErr, fmt.Errorf("flush the filesystem at unmount: %w", err))
		s.log.Error("flushing the filesystem at unmount failed; the image replays its journal at the next mount", "err", err)
		return
	}
	if s.flushErr == nil {
		s.log.Info("filesystem flushed and clean")
	}
}

// Err reports, once Done is closed, whether a writable mount's filesystem
// was flushed cleanly at its end; nil for read-only mounts.
func (s *Server) Err() error {
	<-s.done
	return s.flushErr
}
