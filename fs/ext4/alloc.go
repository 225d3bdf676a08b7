package ext4

import (
	"encoding/binary"
	"fmt"
	"syscall"
)

// Group descriptor flags the writer maintains.
const (
	bgBlockUninit  = 0x2
	bgItableZeroed = 0x4
)

// desc returns group g's raw descriptor inside its cached descriptor block.
func (w *Writer) desc(g uint32) []byte {
	perBlock := w.f.blockSize / w.f.descSize
	b := w.gdt[g/perBlock]
	off := (g % perBlock) * w.f.descSize
	return b[off : off+w.f.descSize]
}

// put16x2 stores v's low 16 bits at lo and, on 64-byte descriptors, its
// high 16 bits at hi: the split most descriptor counters use.
func (w *Writer) put16x2(d []byte, lo, hi int, v uint32) {
	binary.LittleEndian.PutUint16(d[lo:], uint16(v))
	if w.f.descSize >= 64 {
		binary.LittleEndian.PutUint16(d[hi:], uint16(v>>16))
	}
}

// updateDesc applies fn to group g's descriptor, re-checksums it and marks
// its block for writing; the reader's decoded copy follows.
func (w *Writer) updateDesc(g uint32, fn func(gd *groupDesc)) {
	gd := &w.f.groups[g] // readers are out: the change holds mu
	fn(gd)
	d := w.desc(g)
	le := binary.LittleEndian
	w.put16x2(d, 0xC, 0x2C, gd.freeBlocks)
	w.put16x2(d, 0xE, 0x2E, gd.freeInodes)
	w.put16x2(d, 0x10, 0x30, gd.usedDirs)
	w.put16x2(d, 0x1C, 0x32, gd.itableUnused)
	le.PutUint16(d[0x12:], gd.flags)
	if c, ok := w.f.groupDescCsum(g, d); ok {
		le.PutUint16(d[0x1E:], c)
	}
	w.gdtD[g/(w.f.blockSize/w.f.descSize)] = true
}

// setBitmapCsum records a bitmap's checksum in its descriptor (metadata_csum).
func (w *Writer) setBitmapCsum(g uint32, bitmap []byte, inodes bool) {
	if !w.f.hasCsum() {
		return
	}
	d := w.desc(g)
	n, lo, hi := w.f.sb.blocksPerGroup/8, 0x18, 0x38
	if inodes {
		n, lo, hi = w.f.sb.inodesPerGroup/8, 0x1A, 0x3A
	}
	w.put16x2(d, lo, hi, crc32cRaw(w.f.csumSeed, bitmap[:n]))
}

// sbFreeBlocks is the superblock's free block count.
func (w *Writer) sbFreeBlocks() uint64 {
	le := binary.LittleEndian
	v := uint64(le.Uint32(w.sb[0xC:]))
	if w.f.incompat(incompat64bit) {
		v |= uint64(le.Uint32(w.sb[0x158:])) << 32
	}
	return v
}

// addSBFree adjusts the superblock's free block and inode counters.
func (w *Writer) addSBFree(blocks, inodes int64) {
	le := binary.LittleEndian
	if blocks != 0 {
		v := uint64(int64(w.sbFreeBlocks()) + blocks)
		le.PutUint32(w.sb[0xC:], uint32(v))
		if w.f.incompat(incompat64bit) {
			le.PutUint32(w.sb[0x158:], uint32(v>>32))
		}
	}
	if inodes != 0 {
		le.PutUint32(w.sb[0x10:], uint32(int64(le.Uint32(w.sb[0x10:]))+inodes))
	}
	w.sbD = true
}

// allocHints holds, per group, a bit of its block or inode bitmap below
// which every bit is set, so a search for a free one starts there instead
// of at the group's start each time. Allocations move it up past what they
// saw in use; frees move it down. The zero value is valid (no knowledge).
type allocHints []uint32

func (h allocHints) get(g uint32) uint32 {
	if int(g) < len(h) {
		return h[g]
	}
	return 0
}

func (h *allocHints) set(g, v uint32) {
	for int(g) >= len(*h) {
		*h = append(*h, 0)
	}
	(*h)[g] = v
}

func bitSet(b []byte, i uint32) bool { return b[i/8]&(1<<(i%8)) != 0 }
func setBit(b []byte, i uint32)      { b[i/8] |= 1 << (i % 8) }
func clearBit(b []byte, i uint32)    { b[i/8] &^= 1 << (i % 8) }

// blockBitmapView is group g's block bitmap for reading only: the
// transaction's or the cache's copy, or the one blockBitmap builds.
func (w *Writer) blockBitmapView(g uint32) ([]byte, error) {
	gd := &w.f.groups[g]
	if gd.flags&bgBlockUninit != 0 {
		return w.blockBitmap(g)
	}
	b, err := w.f.readBlock(gd.blockBitmap)
	if err != nil {
		return nil, fmt.Errorf("ext4: group %d block bitmap: %w", g, err)
	}
	return b, nil
}

// blockBitmap returns a modifiable copy of group g's block bitmap, built
// the way the kernel's ext4_init_block_bitmap does for a BLOCK_UNINIT group:
// superblock backup and descriptor copies, every group's bitmaps and inode
// table that lie inside g, and the padding past the group's end.
func (w *Writer) blockBitmap(g uint32) ([]byte, error) {
	gd := &w.f.groups[g]
	if gd.flags&bgBlockUninit == 0 {
		b, err := w.block(gd.blockBitmap)
		if err != nil {
			return nil, fmt.Errorf("ext4: group %d block bitmap: %w", g, err)
		}
		return b, nil
	}
	f := w.f
	b := make([]byte, f.blockSize)
	first := f.groupFirstBlock(g)
	n := f.groupBlocks(g)
	mark := func(blk, count uint64) {
		for i := uint64(0); i < count; i++ {
			if blk+i >= first && blk+i < first+uint64(n) {
				setBit(b, uint32(blk+i-first))
			}
		}
	}
	if f.hasSuper(g) {
		perBlock := f.blockSize / f.descSize
		gdtBlocks := uint64((f.numGroups + perBlock - 1) / perBlock)
		mark(first, 1+gdtBlocks+uint64(f.sb.reservedGdt))
	}
	itBlocks := (uint64(f.sb.inodesPerGroup)*uint64(f.sb.inodeSize) + uint64(f.blockSize) - 1) >> f.blockLog
	for i := range f.groups {
		o := &f.groups[i]
		mark(o.blockBitmap, 1)
		mark(o.inodeBitmap, 1)
		mark(o.inodeTable, itBlocks)
	}
	for i := n; i < 8*f.blockSize; i++ {
		setBit(b, i)
	}
	return b, nil
}

// groupBlocks is the number of blocks in group g (the last may be short).
func (f *FS) groupBlocks(g uint32) uint32 {
	if g+1 < f.numGroups {
		return f.sb.blocksPerGroup
	}
	return uint32(f.sb.blocksCount - f.groupFirstBlock(g))
}

// storeBlockBitmap writes group g's block bitmap and its checksum.
func (w *Writer) storeBlockBitmap(g uint32, b []byte) error {
	if err := w.writeBlock(w.f.groups[g].blockBitmap, b); err != nil {
		return err
	}
	w.setBitmapCsum(g, b, false)
	w.updateDesc(g, func(gd *groupDesc) { gd.flags &^= bgBlockUninit })
	return nil
}

// allocBlocks allocates up to want contiguous blocks, the first free run at
// or after goal (wrapping around the filesystem), and returns its start and
// length. It fails with ENOSPC when no block is free.
// metaReserve is how many blocks file data leaves free, so the metadata an
// operation still has to write after its data (extent tree blocks, a
// directory block) finds room and a full filesystem stays consistent.
const metaReserve = 2 * (maxExtentDepth + 1)

// allocData is allocBlocks for file data: it stops metaReserve blocks short
// of full.
func (w *Writer) allocData(goal uint64, want uint32) (uint64, uint32, error) {
	free := w.sbFreeBlocks()
	if free <= metaReserve {
		return 0, 0, errno(syscall.ENOSPC, "no free block for %d more (%d kept for metadata)", want, metaReserve)
	}
	return w.allocBlocks(goal, uint32(min(uint64(want), free-metaReserve)))
}

func (w *Writer) allocBlocks(goal uint64, want uint32) (uint64, uint32, error) {
	start, n, err := w.allocFree(goal, want)
	if isErrno(err, syscall.ENOSPC) && len(w.pendingFree)+len(w.logged) > 0 {
		// Blocks held back for the journal's sake become usable once the
		// open transaction commits and the log is checkpointed.
		if err := w.commit(); err != nil {
			return 0, 0, err
		}
		if err := w.checkpoint(); err != nil {
			return 0, 0, err
		}
		return w.allocFree(goal, want)
	}
	return start, n, err
}

func (w *Writer) allocFree(goal uint64, want uint32) (uint64, uint32, error) {
	f := w.f
	if goal < uint64(f.sb.firstDataBlock) || goal >= f.sb.blocksCount {
		goal = uint64(f.sb.firstDataBlock)
	}
	g0 := uint32((goal - uint64(f.sb.firstDataBlock)) / uint64(f.sb.blocksPerGroup))
	for i := uint32(0); i <= f.numGroups; i++ {
		g := (g0 + i) % f.numGroups
		if f.groups[g].freeBlocks == 0 {
			continue
		}
		start := uint32(0)
		if i == 0 {
			start = uint32(goal - f.groupFirstBlock(g))
		}
		// The search reads the bitmap in place; only a find changes it.
		b, err := w.blockBitmapView(g)
		if err != nil {
			return 0, 0, err
		}
		n := f.groupBlocks(g)
		base := f.groupFirstBlock(g)
		held := len(w.pendingFree)+len(w.logged) > 0
		free := func(i uint32) bool {
			if bitSet(b, i) {
				return false
			}
			if !held {
				return true
			}
			if w.pendingFree[base+uint64(i)] {
				return false
			}
			_, logged := w.logged[base+uint64(i)]
			return !logged
		}
		// Below the group's hint every block is in use: start there.
		hint := w.blockHint.get(g)
		fromHint := start <= hint
		firstClear := n // the first clear bit seen from the hint on
		for s := max(start, hint); s < n; s++ {
			if s%8 == 0 && b[s/8] == 0xff {
				s += 7 // a byte of used blocks at once
				continue
			}
			if !bitSet(b, s) && firstClear == n {
				firstClear = s
			}
			if !free(s) {
				continue
			}
			e := s
			for e < n && e-s < want && free(e) {
				e++
			}
			if fromHint {
				if firstClear == s {
					firstClear = e
				}
				w.blockHint.set(g, firstClear)
			}
			if b, err = w.blockBitmap(g); err != nil {
				return 0, 0, err
			}
			for i := s; i < e; i++ {
				setBit(b, i)
			}
			if err := w.storeBlockBitmap(g, b); err != nil {
				return 0, 0, err
			}
			w.updateDesc(g, func(gd *groupDesc) { gd.freeBlocks -= e - s })
			w.addSBFree(-int64(e-s), 0)
			first := f.groupFirstBlock(g) + uint64(s)
			for i := uint64(0); i < uint64(e-s); i++ {
				// Perhaps metadata once (even in this transaction); not now.
				f.blocks.remove(first + i)
				delete(w.dirty, first+i)
			}
			return first, e - s, nil
		}
		if fromHint {
			w.blockHint.set(g, firstClear)
		}
	}
	return 0, 0, errno(syscall.ENOSPC, "no free block for %d more", want)
}

// freeBlocks returns count blocks from blk to the free pool.
func (w *Writer) freeBlocks(blk, count uint64) error {
	f := w.f
	for count > 0 {
		if blk < uint64(f.sb.firstDataBlock) || blk >= f.sb.blocksCount {
			return fmt.Errorf("ext4: freeing block %d outside the filesystem: %w", blk, ErrCorrupt)
		}
		g := uint32((blk - uint64(f.sb.firstDataBlock)) / uint64(f.sb.blocksPerGroup))
		first := f.groupFirstBlock(g)
		n := min(count, first+uint64(f.groupBlocks(g))-blk)
		b, err := w.blockBitmap(g)
		if err != nil {
			return err
		}
		if bit := uint32(blk - first); bit < w.blockHint.get(g) {
			w.blockHint.set(g, bit)
		}
		for i := uint64(0); i < n; i++ {
			bit := uint32(blk + i - first)
			if !bitSet(b, bit) {
				return fmt.Errorf("ext4: freeing block %d, which is already free: %w", blk+i, ErrCorrupt)
			}
			clearBit(b, bit)
			if w.jw != nil {
				w.pendingFree[blk+i] = true
			}
		}
		if err := w.storeBlockBitmap(g, b); err != nil {
			return err
		}
		w.updateDesc(g, func(gd *groupDesc) { gd.freeBlocks += uint32(n) })
		w.addSBFree(int64(n), 0)
		blk += n
		count -= n
	}
	return nil
}

// inodeBitmap returns a modifiable copy of group g's inode bitmap; an
// INODE_UNINIT group's is all free with the padding bits set.
func (w *Writer) inodeBitmap(g uint32) ([]byte, error) {
	gd := &w.f.groups[g]
	if gd.flags&bgInodeUninit == 0 {
		b, err := w.block(gd.inodeBitmap)
		if err != nil {
			return nil, fmt.Errorf("ext4: group %d inode bitmap: %w", g, err)
		}
		return b, nil
	}
	b := make([]byte, w.f.blockSize)
	for i := w.f.sb.inodesPerGroup; i < 8*w.f.blockSize; i++ {
		setBit(b, i)
	}
	return b, nil
}

func (w *Writer) storeInodeBitmap(g uint32, b []byte) error {
	if err := w.writeBlock(w.f.groups[g].inodeBitmap, b); err != nil {
		return err
	}
	w.setBitmapCsum(g, b, true)
	return nil
}

// allocInode takes a free inode, preferring group pref; directories go to
// the group with the most free blocks among those with free inodes, so
// trees spread out as the kernel's Orlov allocator spreads them.
func (w *Writer) allocInode(pref uint32, dir bool) (uint32, error) {
	f := w.f
	if dir {
		best := -1
		for g := range f.groups {
			if f.groups[g].freeInodes > 0 && (best < 0 || f.groups[g].freeBlocks > f.groups[best].freeBlocks) {
				best = g
			}
		}
		if best >= 0 {
			pref = uint32(best)
		}
	}
	ipg := f.sb.inodesPerGroup
	for i := uint32(0); i < f.numGroups; i++ {
		g := (pref + i) % f.numGroups
		if f.groups[g].freeInodes == 0 {
			continue
		}
		b, err := w.inodeBitmap(g)
		if err != nil {
			return 0, err
		}
		start := w.inodeHint.get(g) // every inode below it is in use
		if g == 0 {
			start = max(start, f.sb.firstIno-1)
		}
		for idx := start; idx < ipg; idx++ {
			if idx%8 == 0 && b[idx/8] == 0xff {
				idx += 7 // a byte of used inodes at once
				continue
			}
			if bitSet(b, idx) {
				continue
			}
			w.inodeHint.set(g, idx+1)
			setBit(b, idx)
			if err := w.storeInodeBitmap(g, b); err != nil {
				return 0, err
			}
			csumGroups := f.hasCsum() || f.roCompat(roCompatGdtCsum)
			w.updateDesc(g, func(gd *groupDesc) {
				gd.freeInodes--
				gd.flags &^= bgInodeUninit
				if dir {
					gd.usedDirs++
				}
				if csumGroups && gd.itableUnused > ipg-(idx+1) {
					gd.itableUnused = ipg - (idx + 1)
				}
			})
			w.addSBFree(0, -1)
			return g*ipg + idx + 1, nil
		}
	}
	return 0, errno(syscall.ENOSPC, "no free inode")
}

// freeInode marks ino free in its group.
func (w *Writer) freeInode(ino uint32, dir bool) error {
	f := w.f
	g, idx := (ino-1)/f.sb.inodesPerGroup, (ino-1)%f.sb.inodesPerGroup
	b, err := w.inodeBitmap(g)
	if err != nil {
		return err
	}
	if !bitSet(b, idx) {
		return fmt.Errorf("ext4: freeing inode %d, which is already free: %w", ino, ErrCorrupt)
	}
	clearBit(b, idx)
	if idx < w.inodeHint.get(g) {
		w.inodeHint.set(g, idx)
	}
	if err := w.storeInodeBitmap(g, b); err != nil {
		return err
	}
	w.updateDesc(g, func(gd *groupDesc) {
		gd.freeInodes++
		if dir {
			gd.usedDirs--
		}
	})
	w.addSBFree(0, 1)
	return nil
}
