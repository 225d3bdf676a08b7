package image

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
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
	// Note says what a reader of the manifest should know about the
	// entry (e.g. that its digest is a sparse one); not part of String.
	Note string `json:"note,omitempty"`
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
		dirs: make(map[uint32]bool), buf: make([]byte, 1<<20), zeros: make([]byte, 1<<20)}
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
	zeros    []byte
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
		sum, note, err := c.hash(in)
		if err != nil {
			c.problem("%s (inode %d): read: %w", p, in.Ino, err)
		} else {
			e.Digest, e.Note = sum, note
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

// fullDigestHoleLimit is how many bytes of holes a file may have before
// its digest covers only its data: hashing zeros costs about 0.6 s per GiB,
// and a sparse (or damaged) i_size can claim petabytes.
const fullDigestHoleLimit = 8 << 30

// SparseDigestPrefix marks the digest of a file with more than
// fullDigestHoleLimit bytes of holes: SHA-256 over, for each data range in
// order, its offset and length (8 bytes big-endian each) and its bytes.
const SparseDigestPrefix = "sparse-sha256:"

// hash digests a regular file, reading only its data ranges: holes are
// hashed as zeros without reading them, or, past fullDigestHoleLimit, left
// out (see SparseDigestPrefix) with a note saying so.
func (c *checker) hash(in *ext4.Inode) (digest, note string, err error) {
	ranges, err := c.tree.DataRanges(in)
	if err != nil {
		return "", "", err
	}
	var mapped uint64
	for _, r := range ranges {
		mapped += r.Len
	}
	h := sha256.New()
	sparse := in.Size-mapped > fullDigestHoleLimit
	var pos uint64 // bytes hashed so far, in the full form
	for _, r := range ranges {
		if sparse {
			var hdr [16]byte
			binary.BigEndian.PutUint64(hdr[:], r.Off)
			binary.BigEndian.PutUint64(hdr[8:], r.Len)
			h.Write(hdr[:])
		} else if err := c.hashZeros(h, r.Off-pos); err != nil {
			return "", "", err
		}
		if err := c.hashData(h, in, r); err != nil {
			return "", "", err
		}
		pos = r.Off + r.Len
	}
	if sparse {
		return SparseDigestPrefix + hex.EncodeToString(h.Sum(nil)),
			fmt.Sprintf("%d bytes of data in a file of %d bytes: the digest covers the data ranges only", mapped, in.Size), nil
	}
	if err := c.hashZeros(h, in.Size-pos); err != nil {
		return "", "", err
	}
	return hex.EncodeToString(h.Sum(nil)), "", nil
}

// hashData reads one data range through the filesystem (so every block is
// decrypted and verified) into h.
func (c *checker) hashData(h hash.Hash, in *ext4.Inode, r ext4.ByteRange) error {
	for off, end := r.Off, r.Off+r.Len; off < end; {
		if err := c.ctx.Err(); err != nil {
			return err
		}
		want := min(uint64(len(c.buf)), end-off)
		n, err := c.tree.ReadAt(in, c.buf[:want], int64(off))
		h.Write(c.buf[:n])
		off += uint64(n)
		if err != nil && !(errors.Is(err, io.EOF) && off == in.Size) {
			return err
		}
		if n == 0 {
			return fmt.Errorf("short read at offset %d of %d", off, in.Size)
		}
	}
	return nil
}

// hashZeros feeds n zero bytes (a hole) into h, cancellably.
func (c *checker) hashZeros(h hash.Hash, n uint64) error {
	clear(c.zeros)
	for n > 0 {
		if err := c.ctx.Err(); err != nil {
			return err
		}
		k := min(n, uint64(len(c.zeros)))
		h.Write(c.zeros[:k])
		n -= k
	}
	return nil
}
