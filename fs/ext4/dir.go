package ext4

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"sort"
)

// ErrNotDir is returned (wrapped) when a directory operation gets another file type.
var ErrNotDir = errors.New("not a directory")

// DirEntry is one directory entry.
type DirEntry struct {
	Name string // raw name bytes, possibly not UTF-8
	Ino  uint32
	Type uint8 // ext4 file type code (1 regular … 7 symlink); 0 if unknown
}

// ext4 directory entry file type codes.
const (
	FtUnknown = 0
	FtRegular = 1
	FtDir     = 2
	FtChrdev  = 3
	FtBlkdev  = 4
	FtFIFO    = 5
	FtSock    = 6
	FtSymlink = 7
)

const (
	dirTailSize   = 12
	dirTailType   = 0xDE
	maxNameLen    = 255
	dirRecMinSize = 12
)

var errBadDx = errors.New("bad htree index")

// decodeRecLen handles the 64 KiB-block encoding of rec_len.
func decodeRecLen(v uint16, bs int) int {
	if bs < 65536 {
		return int(v)
	}
	if v == 0 || v == 65535 {
		return bs
	}
	return int(v&65532) | int(v&3)<<16
}

// parseDirEntries walks the linear entries of one directory region, calling
// fn for each live entry; fn returning false stops the walk.
func parseDirEntries(b []byte, filetype bool, maxIno uint32, bs int, fn func(name []byte, ino uint32, typ uint8) bool) error {
	le := binary.LittleEndian
	for off := 0; off < len(b); {
		if off+8 > len(b) {
			return fmt.Errorf("directory entry at offset %d is truncated: %w", off, ErrCorrupt)
		}
		ino := le.Uint32(b[off:])
		rec := decodeRecLen(le.Uint16(b[off+4:]), bs)
		nameLen := int(b[off+6])
		if rec < dirRecMinSize || rec%4 != 0 || rec < 8+nameLen || off+rec > len(b) {
			return fmt.Errorf("directory entry at offset %d has bad record length %d (name length %d, %d bytes left): %w", off, rec, nameLen, len(b)-off, ErrCorrupt)
		}
		if ino != 0 {
			if ino > maxIno {
				return fmt.Errorf("directory entry at offset %d names inode %d, beyond the %d inodes: %w", off, ino, maxIno, ErrCorrupt)
			}
			if nameLen == 0 {
				return fmt.Errorf("directory entry at offset %d has an empty name: %w", off, ErrCorrupt)
			}
			// No name can hold these (the kernel never writes them, e2fsck
			// calls them illegal): a path served with one would be ambiguous.
			if i := bytes.IndexAny(b[off+8:off+8+nameLen], "\x00/"); i >= 0 {
				return fmt.Errorf("directory entry at offset %d has byte %#02x in its name %q: %w", off, b[off+8+i], b[off+8:off+8+nameLen], ErrCorrupt)
			}
			var typ uint8
			if filetype {
				typ = b[off+7]
			}
			if !fn(b[off+8:off+8+nameLen], ino, typ) {
				return nil
			}
		}
		off += rec
	}
	return nil
}

// forEachDirBlock calls fn for each logical block of a block-based directory.
func (f *FS) forEachDirBlock(dir *Inode, fn func(lblk uint64, b []byte) (bool, error)) error {
	nblocks := (dir.Size + uint64(f.blockSize) - 1) >> f.blockLog
	if nblocks == 0 {
		return nil
	}
	if nblocks > f.sb.blocksCount {
		return fmt.Errorf("ext4: inode %d: directory size %d exceeds the filesystem: %w", dir.Ino, dir.Size, ErrCorrupt)
	}
	runs, err := f.mapBlocks(dir, 0, nblocks)
	if err != nil {
		return err
	}
	for _, r := range runs {
		if r.zero {
			return fmt.Errorf("ext4: inode %d: directory has a hole or unwritten block at logical block %d: %w", dir.Ino, r.lblk, ErrCorrupt)
		}
		for i := uint64(0); i < r.count; i++ {
			b, err := f.readBlock(r.pblk + i)
			if err != nil {
				return fmt.Errorf("ext4: inode %d: directory block %d: %w", dir.Ino, r.lblk+i, err)
			}
			more, err := fn(r.lblk+i, b)
			if err != nil || !more {
				return err
			}
		}
	}
	return nil
}

// dirBlockAt reads logical block lblk of a directory.
func (f *FS) dirBlockAt(dir *Inode, lblk uint64) ([]byte, error) {
	if lblk >= (dir.Size+uint64(f.blockSize)-1)>>f.blockLog {
		return nil, fmt.Errorf("ext4: inode %d: htree points at block %d beyond the directory's size %d: %w", dir.Ino, lblk, dir.Size, ErrCorrupt)
	}
	runs, err := f.mapBlocks(dir, lblk, 1)
	if err != nil {
		return nil, err
	}
	if len(runs) != 1 || runs[0].zero {
		return nil, fmt.Errorf("ext4: inode %d: directory has a hole at logical block %d: %w", dir.Ino, lblk, ErrCorrupt)
	}
	b, err := f.readBlock(runs[0].pblk)
	if err != nil {
		return nil, fmt.Errorf("ext4: inode %d: directory block %d: %w", dir.Ino, lblk, err)
	}
	return b, nil
}

// isDxNode reports whether a non-root block of an indexed directory is an
// interior htree node (a fake empty entry spanning the block).
func (f *FS) isDxNode(b []byte) bool {
	le := binary.LittleEndian
	return le.Uint32(b) == 0 && decodeRecLen(le.Uint16(b[4:]), len(b)) == len(b) && b[6] == 0
}

func (f *FS) isIndexed(dir *Inode) bool {
	return f.compat(compatDirIndex) && dir.hasFlag(flagIndex) && !dir.hasFlag(flagInlineData)
}

// leafEntries returns the dirent region of a leaf block after checking its
// checksum tail when the filesystem has metadata_csum.
func (f *FS) leafEntries(dir *Inode, lblk uint64, b []byte) ([]byte, error) {
	if !f.hasCsum() {
		return b, nil
	}
	le := binary.LittleEndian
	t := b[len(b)-dirTailSize:]
	if le.Uint32(t) != 0 || le.Uint16(t[4:]) != dirTailSize || t[6] != 0 || t[7] != dirTailType {
		return nil, fmt.Errorf("ext4: inode %d: directory block %d has no checksum tail: %w", dir.Ino, lblk, ErrCorrupt)
	}
	stored := le.Uint32(t[8:])
	if c := crc32cRaw(dir.csumSeed, b[:len(b)-dirTailSize]); c != stored {
		return nil, fmt.Errorf("ext4: inode %d: directory block %d checksum mismatch (stored %#x, computed %#x): %w", dir.Ino, lblk, stored, c, ErrCorrupt)
	}
	return b[:len(b)-dirTailSize], nil
}

// scanDir calls fn for every entry ("." and ".." included for block
// directories), verifying leaf checksums and skipping htree interior nodes.
func (f *FS) scanDir(dir *Inode, fn func(name []byte, ino uint32, typ uint8) bool) error {
	if err := checkInode(dir); err != nil {
		return err
	}
	if !dir.IsDir() {
		return fmt.Errorf("ext4: inode %d: %w", dir.Ino, ErrNotDir)
	}
	ft := f.incompat(incompatFiletype)
	if dir.hasFlag(flagInlineData) {
		data, err := f.inlineData(dir)
		if err != nil {
			return err
		}
		if len(data) < 4 {
			return fmt.Errorf("ext4: inode %d: inline directory of %d bytes is too short: %w", dir.Ino, len(data), ErrCorrupt)
		}
		stopped := false
		parent := binary.LittleEndian.Uint32(data)
		if !fn([]byte(".."), parent, FtDir) {
			return nil
		}
		wrap := func(name []byte, ino uint32, typ uint8) bool {
			if !fn(name, ino, typ) {
				stopped = true
				return false
			}
			return true
		}
		first := data[4:min(len(data), 60)]
		if err := parseDirEntries(first, ft, f.sb.inodesCount, int(f.blockSize), wrap); err != nil {
			return fmt.Errorf("ext4: inode %d: inline directory: %w", dir.Ino, err)
		}
		if !stopped && len(data) > 60 {
			if err := parseDirEntries(data[60:], ft, f.sb.inodesCount, int(f.blockSize), wrap); err != nil {
				return fmt.Errorf("ext4: inode %d: inline directory (xattr part): %w", dir.Ino, err)
			}
		}
		return nil
	}
	indexed := f.isIndexed(dir)
	return f.forEachDirBlock(dir, func(lblk uint64, b []byte) (bool, error) {
		if indexed && lblk > 0 && f.isDxNode(b) {
			return true, nil
		}
		if indexed && lblk == 0 {
			// dx_root: only "." and ".." are entries; the rest is index.
			if err := f.verifyDxRoot(dir, b); err != nil && !errors.Is(err, errBadDx) {
				return false, err
			}
			more := true
			err := parseDirEntries(b, ft, f.sb.inodesCount, len(b), func(name []byte, ino uint32, typ uint8) bool {
				more = fn(name, ino, typ)
				return more
			})
			if err != nil {
				return false, fmt.Errorf("ext4: inode %d: directory block 0: %w", dir.Ino, err)
			}
			return more, nil
		}
		ents, err := f.leafEntries(dir, lblk, b)
		if err != nil {
			return false, err
		}
		more := true
		err = parseDirEntries(ents, ft, f.sb.inodesCount, len(b), func(name []byte, ino uint32, typ uint8) bool {
			more = fn(name, ino, typ)
			return more
		})
		if err != nil {
			return false, fmt.Errorf("ext4: inode %d: directory block %d: %w", dir.Ino, lblk, err)
		}
		return more, nil
	})
}

// ReadDir lists a directory without "." and "..".
func (f *FS) ReadDir(dir *Inode) ([]DirEntry, error) {
	var out []DirEntry
	err := f.scanDir(dir, func(name []byte, ino uint32, typ uint8) bool {
		if s := string(name); s != "." && s != ".." {
			out = append(out, DirEntry{Name: s, Ino: ino, Type: typ})
		}
		return true
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// Lookup returns the inode number of name in dir, or an error wrapping
// ErrNotFound. Indexed (htree) directories are searched by hash.
func (f *FS) Lookup(dir *Inode, name string) (uint32, error) {
	ino, err := f.find(dir, name)
	if err == nil && ino == 0 {
		return 0, fmt.Errorf("ext4: inode %d: %q: %w", dir.Ino, name, ErrNotFound)
	}
	return ino, err
}

// find is Lookup that returns 0 and no error for a name that is not there:
// the writer checks every new name's absence, and an error per check
// would cost more than the search.
func (f *FS) find(dir *Inode, name string) (uint32, error) {
	if err := checkInode(dir); err != nil {
		return 0, err
	}
	if !dir.IsDir() {
		return 0, fmt.Errorf("ext4: inode %d: %w", dir.Ino, ErrNotDir)
	}
	if len(name) == 0 || len(name) > maxNameLen {
		return 0, fmt.Errorf("ext4: inode %d: lookup of a %d-byte name: %w", dir.Ino, len(name), ErrNotFound)
	}
	if name == "." {
		return dir.Ino, nil // inline directories store no "." entry
	}
	if name != ".." && f.isIndexed(dir) {
		ino, err := f.dxLookup(dir, []byte(name))
		if !errors.Is(err, errBadDx) {
			return ino, err
		}
		// Unknown hash or malformed index: the kernel also falls back to a scan.
	}
	var found uint32
	want := []byte(name)
	err := f.scanDir(dir, func(n []byte, ino uint32, _ uint8) bool {
		if bytes.Equal(n, want) {
			found = ino
			return false
		}
		return true
	})
	return found, err
}

// dxLevel is one index node on the path from the root to a leaf.
type dxLevel struct {
	entries []byte // count*8 bytes; entry 0's hash field holds limit/count
	at      int
}

func (l *dxLevel) count() int        { return len(l.entries) / 8 }
func (l *dxLevel) hash(i int) uint32 { return binary.LittleEndian.Uint32(l.entries[8*i:]) }
func (l *dxLevel) block(i int) uint64 {
	return uint64(binary.LittleEndian.Uint32(l.entries[8*i+4:]) & 0x0fffffff)
}

// dxEntries checks a count/limit header at off and the node's checksum.
func (f *FS) dxEntries(dir *Inode, b []byte, off int, what string) (*dxLevel, error) {
	le := binary.LittleEndian
	limit, count := int(le.Uint16(b[off:])), int(le.Uint16(b[off+2:]))
	want := (len(b) - off) / 8
	if f.hasCsum() {
		want--
	}
	if limit != want || count == 0 || count > limit {
		return nil, fmt.Errorf("ext4: inode %d: htree %s has count %d, limit %d (want %d): %w", dir.Ino, what, count, limit, want, errBadDx)
	}
	if f.hasCsum() {
		tail := off + 8*limit
		stored := le.Uint32(b[tail+4:])
		c := crc32cRaw(dir.csumSeed, b[:off+8*count])
		c = crc32cRaw(c, b[tail:tail+4])
		c = crc32cRaw(c, []byte{0, 0, 0, 0}) // the checksum field itself, as zero
		if c != stored {
			return nil, fmt.Errorf("ext4: inode %d: htree %s checksum mismatch (stored %#x, computed %#x): %w", dir.Ino, what, stored, c, ErrCorrupt)
		}
	}
	return &dxLevel{entries: b[off : off+8*count]}, nil
}

// dxRootInfo validates block 0 of an indexed directory.
func (f *FS) dxRootInfo(dir *Inode, b []byte) (hashVersion uint8, levels int, root *dxLevel, err error) {
	le := binary.LittleEndian
	if le.Uint16(b[4:]) != 12 || b[6] != 1 || b[8] != '.' ||
		decodeRecLen(le.Uint16(b[12+4:]), len(b)) != len(b)-12 || b[12+6] != 2 {
		return 0, 0, nil, fmt.Errorf("ext4: inode %d: htree root lacks its . and .. entries: %w", dir.Ino, errBadDx)
	}
	infoLen := int(b[0x1D])
	levels = int(b[0x1E])
	maxLevels := 2
	if f.incompat(incompatLargeDir) {
		maxLevels = 3
	}
	if le.Uint32(b[0x18:]) != 0 || infoLen != 8 || levels >= maxLevels {
		return 0, 0, nil, fmt.Errorf("ext4: inode %d: htree root info is invalid (info length %d, %d levels): %w", dir.Ino, infoLen, levels, errBadDx)
	}
	hashVersion = b[0x1C]
	if hashVersion <= hashTea && f.hashUnsigned {
		hashVersion += 3
	}
	root, err = f.dxEntries(dir, b, 0x18+infoLen, "root")
	return hashVersion, levels, root, err
}

func (f *FS) verifyDxRoot(dir *Inode, b []byte) error {
	_, _, _, err := f.dxRootInfo(dir, b)
	return err
}

// dxLookup finds name through the hash index: O(levels) block reads plus
// any leaves that continue a hash collision. It returns 0 when name is not
// there.
func (f *FS) dxLookup(dir *Inode, name []byte) (uint32, error) {
	b, err := f.dirBlockAt(dir, 0)
	if err != nil {
		return 0, err
	}
	hv, levels, root, err := f.dxRootInfo(dir, b)
	if err != nil {
		return 0, err
	}
	hash, ok := dirHash(name, hv, f.hashSeed)
	if !ok {
		return 0, fmt.Errorf("ext4: inode %d: unknown htree hash version %d: %w", dir.Ino, hv, errBadDx)
	}
	// path[i] is the index node at depth i; its at field is the entry taken.
	path := []*dxLevel{root}
	descend := func(byHash bool) error {
		for {
			lv := path[len(path)-1]
			if byHash {
				lv.at = sort.Search(lv.count()-1, func(i int) bool { return lv.hash(i+1) > hash })
			}
			if len(path) == levels+1 {
				return nil
			}
			blk := lv.block(lv.at)
			nb, err := f.dirBlockAt(dir, blk)
			if err != nil {
				return err
			}
			if !f.isDxNode(nb) {
				return fmt.Errorf("ext4: inode %d: htree interior block %d is not an index node: %w", dir.Ino, blk, errBadDx)
			}
			child, err := f.dxEntries(dir, nb, 8, fmt.Sprintf("node %d", blk))
			if err != nil {
				return err
			}
			path = append(path, child)
		}
	}
	if err := descend(true); err != nil {
		return 0, err
	}
	for {
		leaf := path[len(path)-1]
		lblk := leaf.block(leaf.at)
		lb, err := f.dirBlockAt(dir, lblk)
		if err != nil {
			return 0, err
		}
		ents, err := f.leafEntries(dir, lblk, lb)
		if err != nil {
			return 0, err
		}
		var found uint32
		err = parseDirEntries(ents, f.incompat(incompatFiletype), f.sb.inodesCount, len(lb), func(n []byte, ino uint32, _ uint8) bool {
			if bytes.Equal(n, name) {
				found = ino
				return false
			}
			return true
		})
		if err != nil {
			return 0, fmt.Errorf("ext4: inode %d: directory block %d: %w", dir.Ino, lblk, err)
		}
		if found != 0 {
			return found, nil
		}
		// A hash collision may continue in the next leaf, whose starting
		// hash then equals ours with the low "continued" bit set.
		if !dxNext(&path) {
			break
		}
		if lv := path[len(path)-1]; lv.hash(lv.at)&^1 != hash {
			break
		}
		if err := descend(false); err != nil {
			return 0, err
		}
	}
	return 0, nil // not there
}

// dxNext advances path to the next leaf position: the deepest level with a
// following entry moves on and the levels below it are dropped.
func dxNext(path *[]*dxLevel) bool {
	p := *path
	for i := len(p) - 1; i >= 0; i-- {
		if p[i].at+1 < p[i].count() {
			p[i].at++
			*path = p[:i+1]
			return true
		}
	}
	return false
}

// Walk calls fn for every file reachable from the root, depth first, with
// slash-separated paths ("/" is the root). Returning fs.SkipDir from fn for
// a directory skips its contents. A directory reached twice (a loop or a
// hard-linked directory) is reported as corruption.
func (f *FS) Walk(fn func(path string, ino *Inode) error) error {
	root, err := f.Inode(RootIno)
	if err != nil {
		return err
	}
	seen := map[uint32]bool{}
	return f.walk("/", root, seen, fn)
}

func (f *FS) walk(p string, in *Inode, seen map[uint32]bool, fn func(string, *Inode) error) error {
	if err := fn(p, in); err != nil {
		if errors.Is(err, fs.SkipDir) && in.IsDir() {
			return nil
		}
		return err
	}
	if !in.IsDir() {
		return nil
	}
	if seen[in.Ino] {
		return fmt.Errorf("ext4: inode %d: directory %q is reached twice (directory loop): %w", in.Ino, p, ErrCorrupt)
	}
	seen[in.Ino] = true
	ents, err := f.ReadDir(in)
	if err != nil {
		return err
	}
	for _, e := range ents {
		child, err := f.Inode(e.Ino)
		if err != nil {
			return fmt.Errorf("%s: %w", path.Join(p, e.Name), err)
		}
		if err := f.walk(path.Join(p, e.Name), child, seen, fn); err != nil {
			return err
		}
	}
	return nil
}
