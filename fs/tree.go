// Package fs serves an ext4 tree (package fs/ext4) over FUSE with go-fuse
// v2: lookup, getattr, readdir(plus), open, read, readlink, xattrs and
// statfs, with inode numbers taken from ext4. Mount serves an immutable
// image read-only, with long kernel cache lifetimes, and answers every
// write with EROFS; MountWritable serves an ext4.Writer and its write
// operations too (write.go), file data through a bounded dirty-data cache
// (dirty.go). A damaged structure fails only the operation that met it
// (EIO plus a log line naming the inode); the mount stays up.
package fs

import (
	"context"
	"errors"
	"io"
	"syscall"

	"github.com/blobseal/blobseal/fs/ext4"
)

// Tree is the read-only filesystem the FUSE layer serves; *ext4.FS
// implements it. It is an interface so tests can inject faults.
type Tree interface {
	Inode(ino uint32) (*ext4.Inode, error)
	ReadDir(dir *ext4.Inode) ([]ext4.DirEntry, error)
	Lookup(dir *ext4.Inode, name string) (uint32, error)
	// ReadAtContext reads file data; it gives up when ctx ends, which
	// the FUSE layer arranges shortly after the kernel interrupts the read.
	ReadAtContext(ctx context.Context, file *ext4.Inode, p []byte, off int64) (int, error)
	Readlink(link *ext4.Inode) (string, error)
	ListXattr(ino *ext4.Inode) ([]string, error)
	GetXattr(ino *ext4.Inode, name string) ([]byte, error)
	StatFS() ext4.StatFS
}

var _ Tree = (*ext4.FS)(nil)

// errnoOf maps a tree error to the errno the kernel gets, and says whether
// the error deserves a log line (anything but the ordinary "not there").
func errnoOf(err error) (errno syscall.Errno, logIt bool) {
	switch {
	case err == nil:
		return 0, false
	case errors.Is(err, ext4.ErrNotFound):
		return syscall.ENOENT, false
	case errors.Is(err, ext4.ErrNoXattr):
		return syscall.ENODATA, false
	case errors.Is(err, syscall.EINTR):
		// The kernel interrupted the request and passes EINTR on to the
		// system call; nothing is wrong with the filesystem.
		return syscall.EINTR, false
	case errors.As(err, &errno) && fsErrnos[errno]:
		// The writer's answers (EEXIST, ENOSPC, ENOTEMPTY...) are the
		// caller's business.
		return errno, false
	default:
		// ErrCorrupt, ErrUnsupported, backend I/O or decryption failures,
		// and errnos from below the filesystem (a storage connection's
		// ECONNRESET) are an I/O error to the application.
		return syscall.EIO, true
	}
}

// fsErrnos are the errnos with a filesystem meaning that the ext4 writer
// answers; they reach the application as they are.
var fsErrnos = map[syscall.Errno]bool{
	syscall.ENOENT: true, syscall.EEXIST: true, syscall.ENOTEMPTY: true, syscall.ENOSPC: true,
	syscall.ENOTDIR: true, syscall.EISDIR: true, syscall.EINVAL: true, syscall.ENAMETOOLONG: true,
	syscall.EPERM: true, syscall.EACCES: true, syscall.EROFS: true, syscall.EBUSY: true,
	syscall.EXDEV: true, syscall.EMLINK: true, syscall.EFBIG: true, syscall.ENODATA: true,
	syscall.ERANGE: true, syscall.E2BIG: true, syscall.EOPNOTSUPP: true, syscall.ELOOP: true,
	syscall.EDQUOT: true, syscall.EBADF: true,
}

// writerTree reads a filesystem that an ext4.Writer changes: each read
// runs in Writer.View, against the current inode rather than the copy the
// caller looked up earlier, with the data still in the dirty cache laid
// over it (sizes, times and contents), so a write is visible at once.
type writerTree struct {
	w     *ext4.Writer
	dirty *dirtyCache
	holds *nodeHolds
}

var _ Tree = writerTree{}

func (t writerTree) Inode(ino uint32) (in *ext4.Inode, err error) {
	err = t.w.View(func(f *ext4.FS) error {
		in, err = f.Inode(ino)
		return err
	})
	if err == nil && in.IsRegular() {
		in = t.dirty.overlay(in)
	}
	return in, err
}

func (t writerTree) ReadDir(dir *ext4.Inode) (list []ext4.DirEntry, err error) {
	err = t.w.View(func(f *ext4.FS) error {
		cur, err := f.Inode(dir.Ino)
		if err == nil {
			list, err = f.ReadDir(cur)
		}
		return err
	})
	return list, err
}

func (t writerTree) Lookup(dir *ext4.Inode, name string) (ino uint32, err error) {
	err = t.w.View(func(f *ext4.FS) error {
		cur, err := f.Inode(dir.Ino)
		if err == nil {
			ino, err = f.Lookup(cur, name)
		}
		return err
	})
	return ino, err
}

func (t writerTree) ReadAtContext(ctx context.Context, file *ext4.Inode, p []byte, off int64) (n int, err error) {
	// The dirty bytes are copied before the stored ones are read: a flush
	// finishing in between then leaves both views the same.
	pieces, dirtyEnd := t.dirty.pieces(file.Ino, off, len(p))
	err = t.w.View(func(f *ext4.FS) error {
		cur, err := f.Inode(file.Ino)
		if err == nil {
			n, err = f.ReadAtContext(ctx, cur, p, off)
		}
		return err
	})
	if err != nil && !errors.Is(err, io.EOF) {
		return n, err
	}
	if covered := int(min(int64(len(p)), dirtyEnd-off)); covered > n {
		// Written but not yet stored past the stored end: zeros up to
		// each piece, as in a hole.
		clear(p[n:covered])
		n = covered
	}
	for _, pc := range pieces {
		copy(p[pc.off-off:], pc.data)
	}
	if n == len(p) {
		err = nil
	}
	return n, err
}

func (t writerTree) Readlink(link *ext4.Inode) (target string, err error) {
	err = t.w.View(func(f *ext4.FS) error {
		target, err = f.Readlink(link)
		return err
	})
	return target, err
}

func (t writerTree) ListXattr(ino *ext4.Inode) (names []string, err error) {
	err = t.w.View(func(f *ext4.FS) error {
		cur, err := f.Inode(ino.Ino)
		if err == nil {
			names, err = f.ListXattr(cur)
		}
		return err
	})
	return names, err
}

func (t writerTree) GetXattr(ino *ext4.Inode, name string) (value []byte, err error) {
	err = t.w.View(func(f *ext4.FS) error {
		cur, err := f.Inode(ino.Ino)
		if err == nil {
			value, err = f.GetXattr(cur, name)
		}
		return err
	})
	return value, err
}

func (t writerTree) StatFS() (st ext4.StatFS) {
	_ = t.w.View(func(f *ext4.FS) error {
		st = f.StatFS()
		return nil
	})
	return st
}
