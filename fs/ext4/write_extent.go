package ext4

import (
	"encoding/binary"
	"fmt"
	"slices"
	"sort"
	"syscall"
)

// extent is one leaf mapping: len blocks from logical lblk at physical pblk.
type extent struct {
	lblk      uint32
	len       uint32
	pblk      uint64
	unwritten bool
}

const (
	maxInitExtent      = 32768 // longest initialized extent
	maxUnwrittenExtent = 32767
)

// extentMap is a file's whole mapping, loaded for change; the tree is
// rebuilt from it on store.
type extentMap struct {
	exts     []extent // sorted by lblk, non-overlapping
	treeBlks []uint64 // index and leaf blocks of the tree as loaded
	dataBlks uint64
}

// loadExtents reads in's complete extent tree. A block-mapped (ext3-style)
// file is read as extents, its indirect blocks standing in for tree
// blocks: storing it migrates it to an extent tree, as the kernel's
// EXT4_IOC_MIGRATE does.
func (w *Writer) loadExtents(in wInode) (*extentMap, error) {
	if !in.hasFlag(flagExtents) {
		// Devices, FIFOs, sockets and fast symlinks map no blocks; i_block
		// holds their device number or target.
		if t := in.Mode & sIFMT; t != sIFREG && t != sIFDIR && t != sIFLNK || in.IsSymlink() && w.f.isFastSymlink(in.Inode) {
			return &extentMap{}, nil
		}
		return w.loadBlockMap(in)
	}
	m := &extentMap{}
	if err := w.walkTree(in, in.iblock(), maxExtentDepth+1, m); err != nil {
		return nil, err
	}
	for i := 1; i < len(m.exts); i++ {
		if p := m.exts[i-1]; uint64(p.lblk)+uint64(p.len) > uint64(m.exts[i].lblk) {
			return nil, fmt.Errorf("ext4: inode %d: overlapping extents at logical block %d: %w", in.Ino, m.exts[i].lblk, ErrCorrupt)
		}
	}
	return m, nil
}

func (w *Writer) walkTree(in wInode, node []byte, parentDepth int, m *extentMap) error {
	le := binary.LittleEndian
	h, err := parseExtentHeader(node)
	if err != nil {
		return fmt.Errorf("ext4: inode %d: %w", in.Ino, err)
	}
	if parentDepth <= maxExtentDepth && int(h.depth) != parentDepth-1 {
		return fmt.Errorf("ext4: inode %d: extent node depth %d under a node of depth %d: %w", in.Ino, h.depth, parentDepth, ErrCorrupt)
	}
	for i := 0; i < int(h.entries); i++ {
		e := node[12+12*i:]
		if h.depth == 0 {
			x := extent{lblk: le.Uint32(e), len: uint32(extentLen(e)), pblk: uint64(le.Uint16(e[6:]))<<32 | uint64(le.Uint32(e[8:]))}
			x.unwritten = le.Uint16(e[4:]) > maxInitExtent
			if err := w.f.checkPhys(in.Inode, x.pblk, uint64(x.len), "extent"); err != nil {
				return err
			}
			if x.len == 0 || uint64(x.lblk)+uint64(x.len) > maxLogicalBlk {
				return fmt.Errorf("ext4: inode %d: extent at logical block %d of length %d: %w", in.Ino, x.lblk, x.len, ErrCorrupt)
			}
			m.exts = append(m.exts, x)
			m.dataBlks += uint64(x.len)
			continue
		}
		child := uint64(le.Uint16(e[8:]))<<32 | uint64(le.Uint32(e[4:]))
		if err := w.f.checkPhys(in.Inode, child, 1, "extent index"); err != nil {
			return err
		}
		// Each tree block once: a block listed twice would make the walk
		// exponential in the depth, and is corruption anyway.
		if slices.Contains(m.treeBlks, child) {
			return fmt.Errorf("ext4: inode %d: extent tree block %d is referenced twice: %w", in.Ino, child, ErrCorrupt)
		}
		b, err := w.f.readBlock(child)
		if err != nil {
			return fmt.Errorf("ext4: inode %d: extent tree: %w", in.Ino, err)
		}
		if err := w.f.verifyExtentBlock(in.Inode, child, b); err != nil {
			return err
		}
		m.treeBlks = append(m.treeBlks, child)
		if err := w.walkTree(in, b, int(h.depth), m); err != nil {
			return err
		}
	}
	return nil
}

// lookup returns the extent containing lblk, or the index where one
// starting at lblk would be inserted.
func (m *extentMap) find(lblk uint32) (int, bool) {
	i := sort.Search(len(m.exts), func(i int) bool { return m.exts[i].lblk+m.exts[i].len > lblk })
	return i, i < len(m.exts) && m.exts[i].lblk <= lblk
}

// punch removes the mapping of [from, to) and returns the physical ranges
// that were mapped there, for the caller to free.
func (m *extentMap) punch(from, to uint64) []extent {
	var freed, out []extent
	for _, x := range m.exts {
		s, e := uint64(x.lblk), uint64(x.lblk)+uint64(x.len)
		if e <= from || s >= to {
			out = append(out, x)
			continue
		}
		if s < from {
			out = append(out, extent{lblk: x.lblk, len: uint32(from - s), pblk: x.pblk, unwritten: x.unwritten})
		}
		cs, ce := max(s, from), min(e, to)
		freed = append(freed, extent{lblk: uint32(cs), len: uint32(ce - cs), pblk: x.pblk + (cs - s)})
		if e > to {
			out = append(out, extent{lblk: uint32(to), len: uint32(e - to), pblk: x.pblk + (to - s), unwritten: x.unwritten})
		}
	}
	m.exts = out
	for _, x := range freed {
		m.dataBlks -= uint64(x.len)
	}
	return freed
}

// insert maps [x.lblk, x.lblk+x.len), which must be unmapped, merging with
// physically contiguous neighbours of the same kind.
func (m *extentMap) insert(x extent) {
	i, _ := m.find(x.lblk)
	m.exts = append(m.exts, extent{})
	copy(m.exts[i+1:], m.exts[i:])
	m.exts[i] = x
	m.dataBlks += uint64(x.len)
	m.merge()
}

func (m *extentMap) merge() {
	out := m.exts[:0]
	for _, x := range m.exts {
		if n := len(out); n > 0 {
			p := &out[n-1]
			limit := uint32(maxInitExtent)
			if x.unwritten {
				limit = maxUnwrittenExtent
			}
			if p.unwritten == x.unwritten && p.lblk+p.len == x.lblk && p.pblk+uint64(p.len) == x.pblk && p.len+x.len <= limit {
				p.len += x.len
				continue
			}
		}
		out = append(out, x)
	}
	m.exts = out
}

// lastPhys is the physical block after the mapping's last extent, the goal
// that keeps a growing file contiguous.
func (m *extentMap) goalFor(lblk uint32) uint64 {
	i, _ := m.find(lblk)
	if i > 0 {
		p := m.exts[i-1]
		return p.pblk + uint64(p.len) + uint64(lblk-p.lblk-p.len)
	}
	if i < len(m.exts) {
		x := m.exts[i]
		if x.pblk > uint64(x.lblk-lblk) {
			return x.pblk - uint64(x.lblk-lblk)
		}
	}
	return 0
}

// storeExtents rebuilds in's extent tree from m with full nodes of minimal
// depth (in the old tree's blocks where they suffice), sets i_blocks and
// stores the inode.
func (w *Writer) storeExtents(in wInode, m *extentMap) (retErr error) {
	f := w.f
	le := binary.LittleEndian
	// The old tree's blocks are rewritten in place as far as they go; only
	// a tree that grows takes new blocks, and one that shrinks frees some.
	reuse := m.treeBlks
	m.treeBlks = nil
	defer func() {
		for _, b := range reuse {
			f.blocks.remove(b)
			if err := w.freeBlocks(b, 1); err != nil && retErr == nil {
				retErr = err
			}
		}
	}()
	perBlock := int((f.blockSize - 12) / 12)
	// Level 0 holds the leaf entries; each level above indexes the one below
	// until at most 4 entries remain for the root in i_block.
	type entry struct {
		key  uint32
		data [12]byte
	}
	cur := make([]entry, len(m.exts))
	for i, x := range m.exts {
		var e [12]byte
		le.PutUint32(e[0:], x.lblk)
		l := uint16(x.len)
		if x.unwritten {
			l += maxInitExtent
		}
		le.PutUint16(e[4:], l)
		le.PutUint16(e[6:], uint16(x.pblk>>32))
		le.PutUint32(e[8:], uint32(x.pblk))
		cur[i] = entry{x.lblk, e}
	}
	depth := 0
	goal := uint64(0)
	if len(m.exts) > 0 {
		goal = m.exts[0].pblk
	}
	for len(cur) > 4 {
		if depth >= maxExtentDepth {
			return fmt.Errorf("ext4: inode %d: %d extents need a tree deeper than %d: %w", in.Ino, len(m.exts), maxExtentDepth, syscall.EFBIG)
		}
		var next []entry
		for s := 0; s < len(cur); s += perBlock {
			chunk := cur[s:min(s+perBlock, len(cur))]
			var blk uint64
			if len(reuse) > 0 {
				blk, reuse = reuse[0], reuse[1:]
			} else {
				var err error
				if blk, _, err = w.allocBlocks(goal, 1); err != nil {
					return err
				}
			}
			goal = blk + 1
			m.treeBlks = append(m.treeBlks, blk)
			b := make([]byte, f.blockSize)
			le.PutUint16(b[0:], extentMagic)
			le.PutUint16(b[2:], uint16(len(chunk)))
			le.PutUint16(b[4:], uint16(perBlock))
			le.PutUint16(b[6:], uint16(depth))
			for i, e := range chunk {
				copy(b[12+12*i:], e.data[:])
			}
			if f.hasCsum() {
				tail := 12 + 12*perBlock
				le.PutUint32(b[tail:], crc32cRaw(in.csumSeed, b[:tail]))
			}
			if err := w.writeBlock(blk, b); err != nil {
				return err
			}
			var ix [12]byte
			le.PutUint32(ix[0:], chunk[0].key)
			le.PutUint32(ix[4:], uint32(blk))
			le.PutUint16(ix[8:], uint16(blk>>32))
			next = append(next, entry{chunk[0].key, ix})
		}
		cur = next
		depth++
	}
	ib := in.iblock()
	clear(ib)
	le.PutUint16(ib[0:], extentMagic)
	le.PutUint16(ib[2:], uint16(len(cur)))
	le.PutUint16(ib[4:], 4)
	le.PutUint16(ib[6:], uint16(depth))
	for i, e := range cur {
		copy(ib[12+12*i:], e.data[:])
	}
	in.setFlags(in.Flags | flagExtents)
	blocks := m.dataBlks + uint64(len(m.treeBlks))
	if in.fileACL != 0 {
		blocks++
	}
	in.setBlocks(blocks, f.blockLog)
	return w.storeInode(in)
}

// loadBlockMap reads a block-mapped file's data blocks as extents and
// its indirect blocks as the blocks its tree may reuse.
func (w *Writer) loadBlockMap(in wInode) (*extentMap, error) {
	f := w.f
	le := binary.LittleEndian
	per := uint64(f.blockSize / 4)
	span := min(12+per+per*per+per*per*per, maxLogicalBlk)
	runs, err := f.mapBlocks(in.Inode, 0, span)
	if err != nil {
		return nil, err
	}
	m := &extentMap{}
	for _, r := range runs {
		for done := uint64(0); !r.zero && done < r.count; {
			n := min(r.count-done, maxInitExtent)
			m.exts = append(m.exts, extent{lblk: uint32(r.lblk + done), len: uint32(n), pblk: r.pblk + done})
			m.dataBlks += n
			done += n
		}
	}
	// The indirect blocks: single ones hold data pointers, double and
	// triple ones pointers to the level below.
	seen := map[uint64]bool{}
	var walk func(blk uint64, level int) error
	walk = func(blk uint64, level int) error {
		if blk == 0 {
			return nil
		}
		if err := f.checkPhys(in.Inode, blk, 1, "indirect block"); err != nil {
			return err
		}
		if seen[blk] {
			return fmt.Errorf("ext4: inode %d: indirect block %d is referenced twice: %w", in.Ino, blk, ErrCorrupt)
		}
		seen[blk] = true
		m.treeBlks = append(m.treeBlks, blk)
		if level == 1 {
			return nil
		}
		b, err := f.readBlock(blk)
		if err != nil {
			return fmt.Errorf("ext4: inode %d: indirect block: %w", in.Ino, err)
		}
		for i := uint64(0); i < per; i++ {
			if err := walk(uint64(le.Uint32(b[4*i:])), level-1); err != nil {
				return err
			}
		}
		return nil
	}
	ib := in.iblock()
	for level := 1; level <= 3; level++ {
		if err := walk(uint64(le.Uint32(ib[4*(11+level):])), level); err != nil {
			return nil, err
		}
	}
	return m, nil
}
