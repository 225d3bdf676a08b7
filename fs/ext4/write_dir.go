package ext4

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"syscall"
)

// Directories change as the kernel changes them: a one-block directory
// that fills up becomes indexed (htree, see write_htree.go) when the
// filesystem has dir_index, an indexed one keeps its index, others grow
// linearly. An index the writer cannot maintain (an unknown hash version,
// a damaged root) is dropped as e2fsck allows: the index flag is cleared,
// the root block's ".." entry absorbs the index, and interior index blocks
// become empty entry blocks.

// checkName validates a new name the way the kernel's VFS does.
func checkName(name string) error {
	switch {
	case name == "":
		return errno(syscall.ENOENT, "empty name")
	case len(name) > maxNameLen:
		return errno(syscall.ENAMETOOLONG, "name of %d bytes (at most %d)", len(name), maxNameLen)
	case strings.ContainsAny(name, "/\x00"):
		return errno(syscall.EINVAL, "name %q contains '/' or NUL", name)
	}
	return nil
}

func direntSize(nameLen int) int { return (8 + nameLen + 3) &^ 3 }

// dirRegion is the bytes of a directory block that hold entries.
func (w *Writer) dirRegion() int {
	if w.f.hasCsum() {
		return int(w.f.blockSize) - dirTailSize
	}
	return int(w.f.blockSize)
}

// sealDirBlock writes the checksum tail of a linear directory block.
func (w *Writer) sealDirBlock(dir wInode, b []byte) {
	if !w.f.hasCsum() {
		return
	}
	le := binary.LittleEndian
	t := b[len(b)-dirTailSize:]
	clear(t)
	le.PutUint16(t[4:], dirTailSize)
	t[7] = dirTailType
	le.PutUint32(t[8:], crc32cRaw(dir.csumSeed, b[:len(b)-dirTailSize]))
}

func putDirent(b []byte, ino uint32, recLen int, name string, ft uint8) {
	le := binary.LittleEndian
	le.PutUint32(b, ino)
	le.PutUint16(b[4:], uint16(recLen))
	b[6] = byte(len(name))
	b[7] = ft
	copy(b[8:], name)
}

// fileType is the directory entry type code for an i_mode.
func (w *Writer) fileType(mode uint16) uint8 {
	if !w.f.incompat(incompatFiletype) {
		return FtUnknown
	}
	switch mode & sIFMT {
	case sIFREG:
		return FtRegular
	case sIFDIR:
		return FtDir
	case sIFCHR:
		return FtChrdev
	case sIFBLK:
		return FtBlkdev
	case sIFIFO:
		return FtFIFO
	case sIFSOCK:
		return FtSock
	case sIFLNK:
		return FtSymlink
	}
	return FtUnknown
}

// dirBlock is one block of a directory being changed.
type dirBlock struct {
	lblk, pblk uint64
	b          []byte
}

// dirBlocks is the blocks of a directory being changed, each mapped (and,
// through dirData, read) on first use: a change to an indexed directory
// costs its index path, not the directory's size.
type dirBlocks struct {
	m *extentMap // maps every block below n (checked by mapDirBlocks)
	n int
	// The first few blocks used (most changes touch no more) live here,
	// the rest in more.
	near  [6]dirBlock
	nearN int
	more  map[int]*dirBlock
}

func (d *dirBlocks) len() int { return d.n }

// at returns block i (below len).
func (d *dirBlocks) at(i int) *dirBlock {
	for k := range d.nearN {
		if d.near[k].lblk == uint64(i) {
			return &d.near[k]
		}
	}
	if b, ok := d.more[i]; ok {
		return b
	}
	j, _ := d.m.find(uint32(i))
	x := d.m.exts[j]
	return d.keep(dirBlock{lblk: uint64(i), pblk: x.pblk + uint64(i) - uint64(x.lblk)})
}

func (d *dirBlocks) keep(b dirBlock) *dirBlock {
	if d.nearN < len(d.near) {
		d.near[d.nearN] = b
		d.nearN++
		return &d.near[d.nearN-1]
	}
	if d.more == nil {
		d.more = map[int]*dirBlock{}
	}
	d.more[int(b.lblk)] = &b
	return &b
}

// add appends a new block, which m already maps, and returns its index.
func (d *dirBlocks) add(b dirBlock) int {
	b.lblk = uint64(d.n)
	d.keep(b)
	d.n++
	return d.n - 1
}

// mapDirBlocks checks that m maps every block of directory dir, with no
// hole or unwritten extent, and returns them for change.
func (w *Writer) mapDirBlocks(dir wInode, m *extentMap) (*dirBlocks, error) {
	bs := uint64(w.f.blockSize)
	n := (dir.Size + bs - 1) / bs
	if n > w.f.sb.blocksCount {
		return nil, fmt.Errorf("ext4: inode %d: directory size %d exceeds the filesystem: %w", dir.Ino, dir.Size, ErrCorrupt)
	}
	// Extent by extent: a large directory has thousands of blocks and few
	// extents.
	l := uint64(0)
	for _, x := range m.exts {
		if l >= n || uint64(x.lblk) != l || x.unwritten {
			break
		}
		l += uint64(x.len)
	}
	if l < n {
		return nil, fmt.Errorf("ext4: inode %d: directory has a hole at block %d: %w", dir.Ino, l, ErrCorrupt)
	}
	return &dirBlocks{m: m, n: int(n)}, nil
}

// dirData returns block i of a directory being changed, reading a private
// copy on first use: an indexed directory's change touches only its path.
func (w *Writer) dirData(dir wInode, blocks *dirBlocks, i int) ([]byte, error) {
	if blocks.at(i).b == nil {
		b, err := w.block(blocks.at(i).pblk)
		if err != nil {
			return nil, fmt.Errorf("ext4: inode %d: directory block %d: %w", dir.Ino, blocks.at(i).lblk, err)
		}
		blocks.at(i).b = b
	}
	return blocks.at(i).b, nil
}

// loadDir loads a directory for change, converting an indexed one to linear.
func (w *Writer) loadDir(ino uint32) (wInode, *extentMap, *dirBlocks, error) {
	dir, err := w.loadInode(ino)
	if err != nil {
		return wInode{}, nil, nil, err
	}
	if !dir.IsDir() {
		return wInode{}, nil, nil, errno(syscall.ENOTDIR, "inode %d", ino)
	}
	m, err := w.loadExtents(dir)
	if err != nil {
		return wInode{}, nil, nil, err
	}
	blocks, err := w.mapDirBlocks(dir, m)
	if err != nil {
		return wInode{}, nil, nil, err
	}
	if !dir.hasFlag(flagIndex) {
		return dir, m, blocks, nil
	}
	if w.f.isIndexed(dir.Inode) && blocks.len() > 0 {
		b0, err := w.dirData(dir, blocks, 0)
		if err != nil {
			return wInode{}, nil, nil, err
		}
		if _, _, _, err := w.f.dxRootInfo(dir.Inode, b0); err == nil {
			return dir, m, blocks, nil // an index the writer maintains
		}
	}
	// An index the writer cannot maintain (unknown hash, bad root): linear.
	le := binary.LittleEndian
	region := w.dirRegion()
	for i := range blocks.len() {
		b, err := w.dirData(dir, blocks, i)
		if err != nil {
			return wInode{}, nil, nil, err
		}
		switch {
		case i == 0:
			if le.Uint16(b[4:]) != 12 || b[8] != '.' || b[12+6] != 2 {
				return wInode{}, nil, nil, fmt.Errorf("ext4: inode %d: htree root lacks its . and .. entries: %w", ino, ErrCorrupt)
			}
			le.PutUint16(b[12+4:], uint16(region-12))
		case w.f.isDxNode(b):
			clear(b)
			putDirent(b, 0, region, "", 0)
		default:
			continue
		}
		w.sealDirBlock(dir, b)
		if err := w.writeBlock(blocks.at(i).pblk, b); err != nil {
			return wInode{}, nil, nil, err
		}
	}
	dir.setFlags(dir.Flags &^ flagIndex)
	if err := w.storeInode(dir); err != nil {
		return wInode{}, nil, nil, err
	}
	return dir, m, blocks, nil
}

// direntAt is a located live entry.
type direntAt struct {
	blk     int // index into the directory's blocks
	off     int
	prevOff int // -1 when the entry is the block's first
	ino     uint32
	ft      uint8
}

// forEachDirent walks block b's entries (checked by the reader's parser
// first), passing each one's offset and previous offset.
func (w *Writer) forEachDirent(dir wInode, lblk uint64, b []byte, fn func(off, prev, rec int) bool) error {
	region := b[:w.dirRegion()]
	if err := parseDirEntries(region, w.f.incompat(incompatFiletype), w.f.sb.inodesCount, len(b),
		func([]byte, uint32, uint8) bool { return true }); err != nil {
		return fmt.Errorf("ext4: inode %d: directory block %d: %w", dir.Ino, lblk, err)
	}
	prev := -1
	for off := 0; off < len(region); {
		rec := decodeRecLen(binary.LittleEndian.Uint16(b[off+4:]), len(b))
		if !fn(off, prev, rec) {
			return nil
		}
		prev = off
		off += rec
	}
	return nil
}

// findDirent locates name in the directory's blocks: through the hash
// index when it has one, else by scanning.
func (w *Writer) findDirent(dir wInode, blocks *dirBlocks, name string) (direntAt, error) {
	if dir.hasFlag(flagIndex) {
		return w.dxFind(dir, blocks, name)
	}
	for i := range blocks.len() {
		at, ok, err := w.findInBlock(dir, blocks, i, name)
		if err != nil || ok {
			return at, err
		}
	}
	return direntAt{}, errno(syscall.ENOENT, "inode %d: %q", dir.Ino, name)
}

// findInBlock looks for name in one linear block.
func (w *Writer) findInBlock(dir wInode, blocks *dirBlocks, i int, name string) (direntAt, bool, error) {
	le := binary.LittleEndian
	b, err := w.dirData(dir, blocks, i)
	if err != nil {
		return direntAt{}, false, err
	}
	var found *direntAt
	err = w.forEachDirent(dir, blocks.at(i).lblk, b, func(off, prev, rec int) bool {
		ino := le.Uint32(b[off:])
		nl := int(b[off+6])
		if ino != 0 && string(b[off+8:off+8+nl]) == name {
			found = &direntAt{blk: i, off: off, prevOff: prev, ino: ino, ft: b[off+7]}
			return false
		}
		return true
	})
	if err != nil || found == nil {
		return direntAt{}, false, err
	}
	return *found, true, nil
}

// addEntry inserts name → ino into directory dirIno (which must not hold
// name), in the first block with room or a new block, and stores it.
func (w *Writer) addEntry(dirIno uint32, name string, ino uint32, ft uint8) error {
	dir, m, blocks, err := w.loadDir(dirIno)
	if err != nil {
		return err
	}
	if dir.hasFlag(flagIndex) {
		return w.dxAdd(dir, m, blocks, name, ino, ft)
	}
	for i := range blocks.len() {
		if _, err := w.dirData(dir, blocks, i); err != nil {
			return err
		}
		db := *blocks.at(i)
		done, err := w.insertInBlock(dir, db, name, ino, ft)
		if err != nil {
			return err
		}
		if done {
			w.sealDirBlock(dir, db.b)
			if err := w.writeBlock(db.pblk, db.b); err != nil {
				return err
			}
			w.touch(dir, true)
			return w.storeInode(dir)
		}
	}
	if blocks.len() == 1 && w.f.compat(compatDirIndex) {
		return w.makeIndexed(dir, m, blocks, name, ino, ft)
	}
	// No room: append a block.
	lblk := uint32(blocks.len())
	goal := m.goalFor(lblk)
	if goal == 0 {
		goal = w.inodeGoal(dir.Ino)
	}
	pblk, _, err := w.allocBlocks(goal, 1)
	if err != nil {
		return err
	}
	b := make([]byte, w.f.blockSize)
	putDirent(b, ino, w.dirRegion(), name, ft)
	w.sealDirBlock(dir, b)
	if err := w.writeBlock(pblk, b); err != nil {
		return err
	}
	m.insert(extent{lblk: lblk, len: 1, pblk: pblk})
	dir.setSize(uint64(lblk+1) * uint64(w.f.blockSize))
	w.touch(dir, true)
	return w.storeExtents(dir, m)
}

// insertInBlock adds the entry to one linear block if it has room.
func (w *Writer) insertInBlock(dir wInode, db dirBlock, name string, ino uint32, ft uint8) (bool, error) {
	le := binary.LittleEndian
	need := direntSize(len(name))
	done := false
	err := w.forEachDirent(dir, db.lblk, db.b, func(off, _, rec int) bool {
		used := 0
		if le.Uint32(db.b[off:]) != 0 {
			used = direntSize(int(db.b[off+6]))
		}
		if rec-used < need {
			return true
		}
		if used > 0 {
			le.PutUint16(db.b[off+4:], uint16(used))
			off += used
		}
		putDirent(db.b[off:], ino, rec-used, name, ft)
		done = true
		return false
	})
	return done, err
}

// removeEntry deletes name from directory dirIno, merging its space into
// the previous entry, and returns the inode it named.
func (w *Writer) removeEntry(dirIno uint32, name string) (uint32, error) {
	dir, _, blocks, err := w.loadDir(dirIno)
	if err != nil {
		return 0, err
	}
	at, err := w.findDirent(dir, blocks, name)
	if err != nil {
		return 0, err
	}
	le := binary.LittleEndian
	b := blocks.at(at.blk).b
	if at.prevOff >= 0 {
		rec := decodeRecLen(le.Uint16(b[at.off+4:]), len(b))
		prevRec := decodeRecLen(le.Uint16(b[at.prevOff+4:]), len(b))
		le.PutUint16(b[at.prevOff+4:], uint16(prevRec+rec))
	} else {
		le.PutUint32(b[at.off:], 0)
	}
	w.sealDirBlock(dir, b)
	if err := w.writeBlock(blocks.at(at.blk).pblk, b); err != nil {
		return 0, err
	}
	w.touch(dir, true)
	return at.ino, w.storeInode(dir)
}

// replaceEntry points the existing entry name in dirIno at ino.
func (w *Writer) replaceEntry(dirIno uint32, name string, ino uint32, ft uint8) error {
	dir, _, blocks, err := w.loadDir(dirIno)
	if err != nil {
		return err
	}
	at, err := w.findDirent(dir, blocks, name)
	if err != nil {
		return err
	}
	b := blocks.at(at.blk).b
	binary.LittleEndian.PutUint32(b[at.off:], ino)
	b[at.off+7] = ft
	w.sealDirBlock(dir, b)
	if err := w.writeBlock(blocks.at(at.blk).pblk, b); err != nil {
		return err
	}
	w.touch(dir, true)
	return w.storeInode(dir)
}

// lookup finds name in directory dirIno through the reader (hash index
// included), mapping "not found" to ENOENT.
func (w *Writer) lookup(dirIno uint32, name string) (uint32, error) {
	ino, err := w.find(dirIno, name)
	if err == nil && ino == 0 {
		return 0, errno(syscall.ENOENT, "inode %d: %q", dirIno, name)
	}
	return ino, err
}

// find is lookup returning 0 without an error when name is not there.
func (w *Writer) find(dirIno uint32, name string) (uint32, error) {
	dir, err := w.f.Inode(dirIno)
	if err != nil {
		return 0, err
	}
	if !dir.IsDir() {
		return 0, errno(syscall.ENOTDIR, "inode %d", dirIno)
	}
	ino, err := w.f.find(dir, name)
	if errors.Is(err, ErrNotFound) {
		return 0, fmt.Errorf("%w: %w", err, syscall.ENOENT)
	}
	return ino, err
}

// newDirBlock is the first block of a new directory: "." and "..".
func (w *Writer) newDirBlock(dir wInode, parent uint32) []byte {
	b := make([]byte, w.f.blockSize)
	putDirent(b, dir.Ino, 12, ".", w.fileType(sIFDIR))
	putDirent(b[12:], parent, w.dirRegion()-12, "..", w.fileType(sIFDIR))
	w.sealDirBlock(dir, b)
	return b
}

// setDotDot points directory ino's ".." at parent.
func (w *Writer) setDotDot(ino, parent uint32) error {
	dir, _, blocks, err := w.loadDir(ino)
	if err != nil {
		return err
	}
	b, err := w.dirData(dir, blocks, 0)
	if err != nil {
		return err
	}
	if b[12+6] != 2 || b[12+8] != '.' || b[12+9] != '.' {
		return fmt.Errorf("ext4: inode %d: directory's second entry is not \"..\": %w", ino, ErrCorrupt)
	}
	binary.LittleEndian.PutUint32(b[12:], parent)
	if dir.hasFlag(flagIndex) {
		w.sealDx(dir, b, dxRootCountOff) // the root's checksum covers ".."
	} else {
		w.sealDirBlock(dir, b)
	}
	return w.writeBlock(blocks.at(0).pblk, b)
}

// isEmptyDir reports whether directory ino holds only "." and "..".
func (w *Writer) isEmptyDir(ino uint32) (bool, error) {
	in, err := w.f.Inode(ino)
	if err != nil {
		return false, err
	}
	ents, err := w.f.ReadDir(in)
	return len(ents) == 0, err
}
