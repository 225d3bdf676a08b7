package ext4

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
)

// run maps count logical blocks starting at lblk. A hole (or unwritten
// extent) reads as zeros; otherwise the blocks are contiguous from pblk.
type run struct {
	lblk, count uint64
	pblk        uint64
	zero        bool
}

const (
	extentMagic    = 0xF30A
	maxExtentDepth = 5
	maxLogicalBlk  = 1 << 32 // logical block numbers are 32-bit
)

// mapBlocks returns runs covering exactly [lblk, lblk+count) of in's data.
func (f *FS) mapBlocks(in *Inode, lblk, count uint64) ([]run, error) {
	if count == 0 {
		return nil, nil
	}
	end := lblk + count
	if end > maxLogicalBlk || end < lblk {
		return nil, fmt.Errorf("ext4: inode %d: logical block %d is beyond the 2^32 block limit (absurd size %d?): %w", in.Ino, end-1, in.Size, ErrCorrupt)
	}
	m := runMerger{start: lblk}
	var err error
	if in.hasFlag(flagExtents) {
		err = f.walkExtents(in, in.iblock(), maxExtentDepth+1, 0, maxLogicalBlk, lblk, end, &m)
	} else {
		err = f.walkBlockMap(in, lblk, end, &m)
	}
	if err != nil {
		return nil, err
	}
	m.fillTo(end)
	return m.runs, nil
}

// runMerger collects mapped ranges in logical order, fills gaps with holes
// and merges physically contiguous neighbours so each becomes one read.
type runMerger struct {
	start uint64 // next logical block not yet covered
	runs  []run
}

func (m *runMerger) fillTo(lblk uint64) {
	if lblk > m.start {
		m.add(run{lblk: m.start, count: lblk - m.start, zero: true})
	}
}

func (m *runMerger) add(r run) {
	m.fillTo(r.lblk)
	if n := len(m.runs); n > 0 {
		last := &m.runs[n-1]
		if last.zero && r.zero || !last.zero && !r.zero && last.pblk+last.count == r.pblk {
			last.count += r.count
			m.start = r.lblk + r.count
			return
		}
	}
	m.runs = append(m.runs, r)
	m.start = r.lblk + r.count
}

func (f *FS) checkPhys(in *Inode, pblk, count uint64, what string) error {
	if pblk < uint64(f.sb.firstDataBlock) || pblk == 0 || pblk+count > f.sb.blocksCount || pblk+count < pblk {
		return fmt.Errorf("ext4: inode %d: %s points at blocks %d..%d, outside the filesystem (%d blocks): %w",
			in.Ino, what, pblk, pblk+count-1, f.sb.blocksCount, ErrCorrupt)
	}
	return nil
}

type extentHeader struct {
	entries, max, depth uint16
}

// parseExtentHeader checks an extent node header found in node (the 60-byte
// i_block or a tree block).
func parseExtentHeader(node []byte) (extentHeader, error) {
	le := binary.LittleEndian
	if len(node) < 12 {
		return extentHeader{}, fmt.Errorf("extent node of %d bytes is too short: %w", len(node), ErrCorrupt)
	}
	if m := le.Uint16(node[0:]); m != extentMagic {
		return extentHeader{}, fmt.Errorf("bad extent header magic %#04x: %w", m, ErrCorrupt)
	}
	h := extentHeader{entries: le.Uint16(node[2:]), max: le.Uint16(node[4:]), depth: le.Uint16(node[6:])}
	if int(h.max)*12+12 > len(node) || h.entries > h.max {
		return h, fmt.Errorf("extent header claims %d of %d entries in a %d-byte node: %w", h.entries, h.max, len(node), ErrCorrupt)
	}
	if h.depth > maxExtentDepth {
		return h, fmt.Errorf("extent tree depth %d exceeds %d: %w", h.depth, maxExtentDepth, ErrCorrupt)
	}
	return h, nil
}

// walkExtents visits the extent node, covering logical blocks [lo, hi), and
// reports the parts of [from, to) it maps. parentDepth bounds the depth so a
// cycle of tree blocks cannot recurse forever.
func (f *FS) walkExtents(in *Inode, node []byte, parentDepth int, lo, hi, from, to uint64, m *runMerger) error {
	le := binary.LittleEndian
	h, err := parseExtentHeader(node)
	if err != nil {
		return fmt.Errorf("ext4: inode %d: %w", in.Ino, err)
	}
	if parentDepth <= maxExtentDepth && int(h.depth) != parentDepth-1 {
		return fmt.Errorf("ext4: inode %d: extent node depth %d under a node of depth %d: %w", in.Ino, h.depth, parentDepth, ErrCorrupt)
	}
	n := int(h.entries)
	key := func(i int) uint64 { return uint64(le.Uint32(node[12+12*i:])) }
	for i := 0; i < n; i++ {
		k := key(i)
		if k < lo || k >= hi || i > 0 && k <= key(i-1) {
			return fmt.Errorf("ext4: inode %d: extent entries out of order or outside their parent's range: %w", in.Ino, ErrCorrupt)
		}
	}
	// Binary search for the first entry that can intersect [from, to).
	first := 0
	for l, r := 0, n; l < r; {
		mid := (l + r) / 2
		if key(mid) <= from {
			first = mid
			l = mid + 1
		} else {
			r = mid
		}
	}
	if h.depth == 0 {
		prevEnd := lo
		if first > 0 {
			e := node[12+12*(first-1):]
			prevEnd = key(first-1) + uint64(extentLen(e))
		}
		for i := first; i < n; i++ {
			e := node[12+12*i:]
			start := key(i)
			if start >= to {
				break
			}
			length := uint64(extentLen(e))
			if length == 0 || start+length > hi || start < prevEnd {
				return fmt.Errorf("ext4: inode %d: extent at logical block %d (length %d) overlaps another or its parent's range: %w", in.Ino, start, length, ErrCorrupt)
			}
			prevEnd = start + length
			if start+length <= from {
				continue
			}
			pblk := uint64(le.Uint16(e[6:]))<<32 | uint64(le.Uint32(e[8:]))
			if err := f.checkPhys(in, pblk, length, "extent"); err != nil {
				return err
			}
			s, t := max(start, from), min(start+length, to)
			m.add(run{lblk: s, count: t - s, pblk: pblk + (s - start), zero: le.Uint16(e[4:]) > 32768})
		}
		return nil
	}
	for i := first; i < n; i++ {
		start := key(i)
		if start >= to {
			break
		}
		end := hi
		if i+1 < n {
			end = key(i + 1)
		}
		if end <= from {
			continue
		}
		e := node[12+12*i:]
		child := uint64(le.Uint16(e[8:]))<<32 | uint64(le.Uint32(e[4:]))
		if err := f.checkPhys(in, child, 1, "extent index"); err != nil {
			return err
		}
		b, err := f.readBlock(child)
		if err != nil {
			return fmt.Errorf("ext4: inode %d: extent tree: %w", in.Ino, err)
		}
		if err := f.verifyExtentBlock(in, child, b); err != nil {
			return err
		}
		if err := f.walkExtents(in, b, int(h.depth), start, end, from, to, m); err != nil {
			return err
		}
	}
	return nil
}

func extentLen(e []byte) uint16 {
	l := binary.LittleEndian.Uint16(e[4:])
	if l > 32768 {
		l -= 32768 // unwritten (preallocated) extent
	}
	return l
}

func (f *FS) verifyExtentBlock(in *Inode, blk uint64, b []byte) error {
	if !f.hasCsum() {
		return nil
	}
	h, err := parseExtentHeader(b)
	if err != nil {
		return fmt.Errorf("ext4: inode %d: extent block %d: %w", in.Ino, blk, err)
	}
	tail := 12 + 12*int(h.max)
	if tail+4 > len(b) {
		return fmt.Errorf("ext4: inode %d: extent block %d has no room for its checksum: %w", in.Ino, blk, ErrCorrupt)
	}
	stored := binary.LittleEndian.Uint32(b[tail:])
	if c := crc32cRaw(in.csumSeed, b[:tail]); c != stored {
		return fmt.Errorf("ext4: inode %d: extent block %d checksum mismatch (stored %#x, computed %#x): %w", in.Ino, blk, stored, c, ErrCorrupt)
	}
	return nil
}

// walkBlockMap maps [from, to) through the legacy direct/indirect block map.
func (f *FS) walkBlockMap(in *Inode, from, to uint64, m *runMerger) error {
	le := binary.LittleEndian
	ib := in.iblock()
	ppb := uint64(f.blockSize / 4)
	base := uint64(0)
	span := uint64(1)
	for slot := 0; slot < 15 && base < to; slot++ {
		level := 0
		if slot >= 12 {
			level = slot - 11
		}
		span = 1
		for i := 0; i < level; i++ {
			span *= ppb
		}
		if base+span > from {
			ptr := uint64(le.Uint32(ib[4*slot:]))
			if err := f.walkIndirect(in, ptr, level, base, span, from, to, m); err != nil {
				return err
			}
		}
		base += span
	}
	if base < to {
		return fmt.Errorf("ext4: inode %d: logical block %d is beyond what a block map can address: %w", in.Ino, to-1, ErrCorrupt)
	}
	return nil
}

func (f *FS) walkIndirect(in *Inode, ptr uint64, level int, base, span, from, to uint64, m *runMerger) error {
	if ptr == 0 {
		return nil // hole; the merger fills it
	}
	if level == 0 {
		if err := f.checkPhys(in, ptr, 1, "block map entry"); err != nil {
			return err
		}
		m.add(run{lblk: base, count: 1, pblk: ptr})
		return nil
	}
	if err := f.checkPhys(in, ptr, 1, "indirect block pointer"); err != nil {
		return err
	}
	b, err := f.readBlock(ptr)
	if err != nil {
		return fmt.Errorf("ext4: inode %d: indirect block: %w", in.Ino, err)
	}
	child := span / uint64(f.blockSize/4)
	firstIdx := uint64(0)
	if from > base {
		firstIdx = (from - base) / child
	}
	for j := firstIdx; j < uint64(f.blockSize/4); j++ {
		cb := base + j*child
		if cb >= to {
			break
		}
		p := uint64(binary.LittleEndian.Uint32(b[4*j:]))
		if err := f.walkIndirect(in, p, level-1, cb, child, from, to, m); err != nil {
			return err
		}
	}
	return nil
}

// ReadAt reads file data at off with io.ReaderAt semantics (io.EOF at Size).
// Holes and unwritten extents read as zeros; each physically contiguous run
// is one ReadAt on the volume.
func (f *FS) ReadAt(file *Inode, p []byte, off int64) (int, error) {
	return f.ReadAtContext(context.Background(), file, p, off)
}

// ReadAtContext is ReadAt that gives up when ctx ends, when the volume
// can (it implements ReadAtContext, as crypto.Volume does): the FUSE layer
// passes the request's context so an interrupted reader is not kept
// waiting for storage. Metadata (extent blocks) is read without ctx; it is
// small and cached.
func (f *FS) ReadAtContext(ctx context.Context, file *Inode, p []byte, off int64) (int, error) {
	if err := checkInode(file); err != nil {
		return 0, err
	}
	if off < 0 {
		return 0, fmt.Errorf("ext4: inode %d: negative offset %d", file.Ino, off)
	}
	if uint64(off) >= file.Size {
		return 0, io.EOF
	}
	n := len(p)
	if rem := file.Size - uint64(off); uint64(n) > rem {
		n = int(rem)
	}
	if err := f.readData(ctx, file, p[:n], uint64(off)); err != nil {
		return 0, err
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func checkInode(in *Inode) error {
	if in == nil || in.raw == nil {
		return fmt.Errorf("ext4: inode was not obtained from FS.Inode: %w", ErrCorrupt)
	}
	return nil
}

// readData fills p from byte offset off of in, which the caller has already
// clamped to the file size.
func (f *FS) readData(ctx context.Context, in *Inode, p []byte, off uint64) error {
	if len(p) == 0 {
		return nil
	}
	if in.hasFlag(flagInlineData) {
		data, err := f.inlineData(in)
		if err != nil {
			return err
		}
		if off+uint64(len(p)) > uint64(len(data)) {
			return fmt.Errorf("ext4: inode %d: size %d exceeds its %d bytes of inline data: %w", in.Ino, in.Size, len(data), ErrCorrupt)
		}
		copy(p, data[off:])
		return nil
	}
	bs := uint64(f.blockSize)
	first := off >> f.blockLog
	last := (off + uint64(len(p)) - 1) >> f.blockLog
	runs, err := f.mapBlocks(in, first, last-first+1)
	if err != nil {
		return err
	}
	for _, r := range runs {
		rs, re := r.lblk*bs, (r.lblk+r.count)*bs // file bytes this run covers
		s, e := max(rs, off), min(re, off+uint64(len(p)))
		dst := p[s-off : e-off]
		if r.zero {
			clear(dst)
			continue
		}
		phys := r.pblk*bs + (s - rs)
		if err := f.readFullContext(ctx, dst, int64(phys)); err != nil {
			return fmt.Errorf("ext4: inode %d: reading %d bytes at volume offset %d: %w", in.Ino, len(dst), phys, err)
		}
	}
	return nil
}

// inlineData returns the whole inline content: i_block, then the value of
// the system.data xattr.
func (f *FS) inlineData(in *Inode) ([]byte, error) {
	ib := in.iblock()
	if in.Size <= uint64(len(ib)) {
		return ib[:in.Size], nil
	}
	rest, err := f.getXattrRaw(in, xattrIndexSystem, "data")
	if err != nil {
		return nil, fmt.Errorf("ext4: inode %d: inline data continuation: %w", in.Ino, err)
	}
	out := make([]byte, 0, len(ib)+len(rest))
	return append(append(out, ib...), rest...), nil
}
