package image

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"path"
	"strconv"
	"syscall"
	"unicode/utf8"

	"github.com/blobseal/blobseal/fs"
	"github.com/blobseal/blobseal/fs/ext4"
)

// ManifestEntry describes one path of a tree: what `blobseal image check`
// prints, one line each.
type ManifestEntry struct {
	Path   string // absolute, slash-separated; "/" is the root
	Mode   uint32 // st_mode: type and permission bits
	UID    uint32
	GID    uint32
	Size   uint64
	Digest string // sha256 hex (files), link target (symlinks), "major,minor" (devices), "-"
}

// String formats the entry as "TYPE PERM UID:GID SIZE DIGEST PATH".
// Link targets and paths that are not plain printable UTF-8 without spaces
// are Go-quoted, so every line splits into exactly six fields.
func (e ManifestEntry) String() string {
	digest := e.Digest
	if e.Mode&syscall.S_IFMT == syscall.S_IFLNK {
		digest = strconv.Quote(digest)
	}
	return fmt.Sprintf("%c %04o %d:%d %d %s %s", typeLetter(e.Mode), e.Mode&0o7777, e.UID, e.GID, e.Size, digest, quoteIfNeeded(e.Path))
}

func typeLetter(mode uint32) byte {
	switch mode & syscall.S_IFMT {
	case syscall.S_IFREG:
		return 'f'
	case syscall.S_IFDIR:
		return 'd'
	case syscall.S_IFLNK:
		return 'l'
	case syscall.S_IFCHR:
		return 'c'
	case syscall.S_IFBLK:
		return 'b'
	case syscall.S_IFIFO:
		return 'p'
	case syscall.S_IFSOCK:
		return 's'
	}
	return '?'
}

func quoteIfNeeded(s string) string {
	if !utf8.ValidString(s) {
		return strconv.Quote(s)
	}
	for _, r := range s {
		if r <= ' ' || r == 0x7f || r == '"' || r == '\\' || !strconv.IsPrint(r) {
			return strconv.Quote(s)
		}
	}
	return s
}

// DeviceDigest is the digest column of a device node.
func DeviceDigest(major, minor uint32) string { return fmt.Sprintf("%d,%d", major, minor) }

// Check walks the whole tree, reads every byte of every file, every link
// target and every xattr, and calls emit for each path in depth-first
// order (entries of a directory in on-disk order). Damage does not stop
// the walk: each problem is returned, naming the path and inode. Link
// counts are checked against the names found. Cancelling ctx stops the
// walk with ctx's error as the last problem.
func Check(ctx context.Context, tree *ext4.FS, emit func(ManifestEntry)) []error {
	c := checker{ctx: ctx, tree: tree, emit: emit, names: make(map[uint32]int), inodes: make(map[uint32]*ext4.Inode),
		dirs: make(map[uint32]bool), buf: make([]byte, 1<<20)}
	root, err := tree.Inode(ext4.RootIno)
	if err != nil {
		return []error{fmt.Errorf("/: root inode: %w", err)}
	}
	c.visit("/", root)
	if err := ctx.Err(); err != nil {
		return append(c.problems, fmt.Errorf("check interrupted: %w", err))
	}
	for ino, n := range c.names {
		in := c.inodes[ino]
		if !in.IsDir() && int(in.Links) != n {
			c.problem("inode %d: link count %d but %d names found", ino, in.Links, n)
		}
	}
	return c.problems
}

type checker struct {
	ctx      context.Context
	tree     *ext4.FS
	emit     func(ManifestEntry)
	names    map[uint32]int // names seen per non-directory inode
	inodes   map[uint32]*ext4.Inode
	dirs     map[uint32]bool
	buf      []byte
	problems []error
}

func (c *checker) problem(format string, args ...any) {
	c.problems = append(c.problems, fmt.Errorf(format, args...))
}

func (c *checker) visit(p string, in *ext4.Inode) {
	if c.ctx.Err() != nil {
		return
	}
	e := ManifestEntry{Path: p, Mode: uint32(in.Mode), UID: in.UID, GID: in.GID, Size: in.Size, Digest: "-"}
	switch {
	case in.IsRegular():
		sum, err := c.hash(in)
		if err != nil {
			c.problem("%s (inode %d): read: %w", p, in.Ino, err)
		} else {
			e.Digest = sum
		}
	case in.IsSymlink():
		target, err := c.tree.Readlink(in)
		if err != nil {
			c.problem("%s (inode %d): readlink: %w", p, in.Ino, err)
		} else if uint64(len(target)) != in.Size {
			c.problem("%s (inode %d): link target has %d bytes, inode size %d", p, in.Ino, len(target), in.Size)
		}
		e.Digest = target
	case in.Mode&syscall.S_IFMT == syscall.S_IFCHR || in.Mode&syscall.S_IFMT == syscall.S_IFBLK:
		e.Digest = DeviceDigest(in.Major(), in.Minor())
	}
	if names, err := c.tree.ListXattr(in); err != nil {
		c.problem("%s (inode %d): list xattrs: %w", p, in.Ino, err)
	} else {
		for _, n := range names {
			if _, err := c.tree.GetXattr(in, n); err != nil {
				c.problem("%s (inode %d): xattr %q: %w", p, in.Ino, n, err)
			}
		}
	}
	c.emit(e)
	if !in.IsDir() {
		c.names[in.Ino]++
		c.inodes[in.Ino] = in
		return
	}
	if c.dirs[in.Ino] {
		c.problem("%s (inode %d): directory reached twice (loop or hard-linked directory)", p, in.Ino)
		return
	}
	c.dirs[in.Ino] = true
	entries, err := c.tree.ReadDir(in)
	if err != nil {
		c.problem("%s (inode %d): read directory: %w", p, in.Ino, err)
		return
	}
	subdirs := 0
	for _, de := range entries {
		cp := path.Join(p, de.Name)
		if de.Ino < ext4.RootIno || de.Ino == ext4.RootIno {
			c.problem("%s: entry points to reserved inode %d", cp, de.Ino)
			continue
		}
		child, err := c.tree.Inode(de.Ino)
		if err != nil {
			c.problem("%s (inode %d): %w", cp, de.Ino, err)
			continue
		}
		if t := fs.ModeOfType(de.Type); t != 0 && t != uint32(child.Mode)&syscall.S_IFMT {
			c.problem("%s (inode %d): directory entry type %d disagrees with inode mode %#o", cp, de.Ino, de.Type, child.Mode)
		}
		if child.IsDir() {
			subdirs++
		}
		c.visit(cp, child)
	}
	// dir_nlink: a directory with too many subdirectories counts 1.
	if in.Links != 1 && int(in.Links) != 2+subdirs {
		c.problem("%s (inode %d): directory link count %d, expected %d", p, in.Ino, in.Links, 2+subdirs)
	}
}

// hash reads the whole file and checks that its size is what the inode
// says.
func (c *checker) hash(in *ext4.Inode) (string, error) {
	h := sha256.New()
	var off int64
	for uint64(off) < in.Size {
		// A (damaged or huge sparse) size can mean terabytes of zeros:
		// stay cancellable between chunks.
		if err := c.ctx.Err(); err != nil {
			return "", err
		}
		want := min(uint64(len(c.buf)), in.Size-uint64(off))
		n, err := c.tree.ReadAt(in, c.buf[:want], off)
		h.Write(c.buf[:n])
		off += int64(n)
		if err != nil && !(errors.Is(err, io.EOF) && uint64(off) == in.Size) {
			return "", err
		}
		if n == 0 {
			return "", fmt.Errorf("short read at offset %d of %d", off, in.Size)
		}
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
