// Package fs serves a read-only ext4 tree (package fs/ext4) over FUSE with
// go-fuse v2: lookup, getattr, readdir(plus), open, read, readlink, xattrs
// and statfs, with inode numbers taken from ext4 and long kernel cache
// lifetimes because the image never changes under the mount. Every write
// answers EROFS. A damaged structure fails only the operation that met it
// (EIO plus a log line naming the inode); the mount stays up.
package fs

import (
	"context"
	"errors"
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
	default: // ErrCorrupt, ErrUnsupported, backend I/O or decryption failures
		return syscall.EIO, true
	}
}
