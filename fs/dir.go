package fs

import (
	"context"
	"syscall"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// dirHandle is one open directory: the entries are read once at opendir,
// and readdirplus resolves each child straight from the inode number in
// its entry instead of searching the directory again by name (which would
// make listing a large linear directory quadratic).
type dirHandle struct {
	n       *node
	entries []fuse.DirEntry // ".", "..", then the ext4 entries in disk order
	pos     int             // index of the next entry to return
	held    bool            // holds the inode (writable mounts)
}

var (
	_ gofs.FileReaddirenter = (*dirHandle)(nil)
	_ gofs.FileLookuper     = (*dirHandle)(nil)
	_ gofs.FileSeekdirer    = (*dirHandle)(nil)
	_ gofs.FileReleasedirer = (*dirHandle)(nil)
)

// Releasedir drops the hold; a directory removed while open is freed now.
func (d *dirHandle) Releasedir(ctx context.Context, releaseFlags uint32) {
	if d.held {
		if err := d.n.vol.w.Release(d.n.ino.Ino); err != nil {
			d.n.vol.fail("releasedir", d.n.ino.Ino, err)
		}
	}
}

// OpendirHandle reads the directory and lets the kernel cache the listing
// when the image is immutable.
func (n *node) OpendirHandle(ctx context.Context, flags uint32) (_ gofs.FileHandle, _ uint32, errno syscall.Errno) {
	defer n.vol.observe("readdir", n.vol.begin(), &errno)
	defer n.vol.guard("readdir", n.ino.Ino, &errno)
	if !n.ino.IsDir() {
		return nil, 0, syscall.ENOTDIR
	}
	list, err := n.vol.tree.ReadDir(n.ino)
	if err != nil {
		return nil, 0, n.vol.fail("readdir", n.ino.Ino, err)
	}
	parent := n.ino.Ino
	if _, p := n.Parent(); p != nil {
		parent = uint32(p.StableAttr().Ino)
	}
	entries := make([]fuse.DirEntry, 0, len(list)+2)
	entries = append(entries,
		fuse.DirEntry{Name: ".", Ino: uint64(n.ino.Ino), Mode: syscall.S_IFDIR},
		fuse.DirEntry{Name: "..", Ino: uint64(parent), Mode: syscall.S_IFDIR})
	for _, e := range list {
		entries = append(entries, fuse.DirEntry{Name: e.Name, Ino: uint64(e.Ino), Mode: ModeOfType(e.Type)})
	}
	for i := range entries {
		entries[i].Off = uint64(i + 1) // the offset of the entry after it
	}
	if n.vol.writable() {
		// Listings change; the hold keeps a directory removed while open
		// valid for fstat and its handle's reads, as ext4 does.
		n.vol.w.Hold(n.ino.Ino)
		return &dirHandle{n: n, entries: entries, held: true}, 0, 0
	}
	return &dirHandle{n: n, entries: entries}, fuse.FOPEN_CACHE_DIR | fuse.FOPEN_KEEP_CACHE, 0
}

// Readdirent returns the next entry, nil at the end.
func (d *dirHandle) Readdirent(ctx context.Context) (*fuse.DirEntry, syscall.Errno) {
	if d.pos >= len(d.entries) {
		return nil, 0
	}
	e := d.entries[d.pos]
	d.pos++
	return &e, 0
}

// Seekdir positions the stream at an offset handed out by Readdirent.
func (d *dirHandle) Seekdir(ctx context.Context, off uint64) syscall.Errno {
	if off > uint64(len(d.entries)) {
		return syscall.EINVAL
	}
	d.pos = int(off)
	return 0
}

// Lookup resolves the entry last returned by Readdirent (readdirplus).
func (d *dirHandle) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (_ *gofs.Inode, errno syscall.Errno) {
	defer d.n.vol.observe("lookup", d.n.vol.begin(), &errno)
	defer d.n.vol.guard("readdirplus", d.n.ino.Ino, &errno)
	if d.pos > 0 && d.pos <= len(d.entries) && d.entries[d.pos-1].Name == name {
		return d.n.newChild(ctx, "readdirplus", uint32(d.entries[d.pos-1].Ino), out)
	}
	return d.n.lookup(ctx, name, out)
}

// ModeOfType maps an ext4 directory entry file type (EXT4_FT_*) to S_IFMT
// bits; 0 (no filetype feature, or unknown) leaves the type to the lookup.
func ModeOfType(t uint8) uint32 {
	switch t {
	case 1:
		return syscall.S_IFREG
	case 2:
		return syscall.S_IFDIR
	case 3:
		return syscall.S_IFCHR
	case 4:
		return syscall.S_IFBLK
	case 5:
		return syscall.S_IFIFO
	case 6:
		return syscall.S_IFSOCK
	case 7:
		return syscall.S_IFLNK
	}
	return 0
}
