package ext4

import (
	"encoding/binary"
	"fmt"
)

// groupDesc is a decoded block group descriptor.
type groupDesc struct {
	blockBitmap  uint64
	inodeBitmap  uint64
	inodeTable   uint64
	freeBlocks   uint32
	freeInodes   uint32
	usedDirs     uint32
	itableUnused uint32
	flags        uint16
	// csumErr is set when the descriptor's checksum does not match. Like the
	// kernel on a read-only mount, Open still succeeds; inodes of this group
	// then fail with an error naming them.
	csumErr error
}

const bgInodeUninit = 0x1

// hasSuper reports whether group g holds a superblock backup (and, without
// meta_bg, a copy of the group descriptor table).
func (f *FS) hasSuper(g uint32) bool {
	if g == 0 {
		return true
	}
	if f.compat(compatSparseSuper2) {
		return g == f.sb.backupBGs[0] || g == f.sb.backupBGs[1]
	}
	if g <= 1 || !f.roCompat(roCompatSparseSuper) {
		return true
	}
	if g&1 == 0 {
		return false
	}
	return isPower(g, 3) || isPower(g, 5) || isPower(g, 7)
}

func isPower(g, base uint32) bool {
	n := uint64(base)
	for n < uint64(g) {
		n *= uint64(base)
	}
	return n == uint64(g)
}

func (f *FS) groupFirstBlock(g uint32) uint64 {
	return uint64(f.sb.firstDataBlock) + uint64(g)*uint64(f.sb.blocksPerGroup)
}

// descBlock returns where descriptor block nr lives, honouring meta_bg.
func (f *FS) descBlock(nr uint32) uint64 {
	if !f.incompat(incompatMetaBG) || nr < f.sb.firstMetaBG {
		// The table follows the superblock's block (block 1 with 1 KiB
		// blocks even when bigalloc makes s_first_data_block 0).
		return uint64(superblockOffset>>f.blockLog) + uint64(nr) + 1
	}
	g := nr * (f.blockSize / f.descSize)
	blk := f.groupFirstBlock(g)
	if f.hasSuper(g) {
		blk++
	}
	if f.blockSize == 1024 && nr == 0 && f.sb.firstDataBlock == 0 {
		blk++
	}
	return blk
}

func (f *FS) loadGroupDescs() error {
	perBlock := f.blockSize / f.descSize
	nBlocks := (f.numGroups + perBlock - 1) / perBlock
	if uint64(nBlocks) >= f.sb.blocksCount {
		return fmt.Errorf("ext4: %d group descriptor blocks do not fit in %d blocks: %w", nBlocks, f.sb.blocksCount, ErrCorrupt)
	}
	f.groups = make([]groupDesc, f.numGroups)
	buf := make([]byte, 0, 64*f.blockSize)
	// Contiguous descriptor blocks (all of them without meta_bg) are read
	// with one ReadAt per run of up to 64 blocks.
	for nr := uint32(0); nr < nBlocks; {
		start := f.descBlock(nr)
		run := uint32(1)
		for nr+run < nBlocks && run < 64 && f.descBlock(nr+run) == start+uint64(run) {
			run++
		}
		if start+uint64(run) > f.sb.blocksCount {
			return fmt.Errorf("ext4: group descriptor block %d is beyond the end of the filesystem: %w", start, ErrCorrupt)
		}
		buf = buf[:run*f.blockSize]
		if err := f.readFull(buf, int64(start)<<f.blockLog); err != nil {
			return fmt.Errorf("ext4: reading group descriptors at block %d: %w", start, err)
		}
		for i := uint32(0); i < run*perBlock; i++ {
			g := nr*perBlock + i
			if g >= f.numGroups {
				break
			}
			f.groups[g] = f.parseGroupDesc(g, buf[i*f.descSize:(i+1)*f.descSize])
		}
		nr += run
	}
	return nil
}

func (f *FS) parseGroupDesc(g uint32, d []byte) groupDesc {
	le := binary.LittleEndian
	gd := groupDesc{
		blockBitmap:  uint64(le.Uint32(d[0x0:])),
		inodeBitmap:  uint64(le.Uint32(d[0x4:])),
		inodeTable:   uint64(le.Uint32(d[0x8:])),
		freeBlocks:   uint32(le.Uint16(d[0xC:])),
		freeInodes:   uint32(le.Uint16(d[0xE:])),
		usedDirs:     uint32(le.Uint16(d[0x10:])),
		flags:        le.Uint16(d[0x12:]),
		itableUnused: uint32(le.Uint16(d[0x1C:])),
	}
	if f.descSize >= 64 {
		gd.blockBitmap |= uint64(le.Uint32(d[0x20:])) << 32
		gd.inodeBitmap |= uint64(le.Uint32(d[0x24:])) << 32
		gd.inodeTable |= uint64(le.Uint32(d[0x28:])) << 32
		gd.freeBlocks |= uint32(le.Uint16(d[0x2C:])) << 16
		gd.freeInodes |= uint32(le.Uint16(d[0x2E:])) << 16
		gd.usedDirs |= uint32(le.Uint16(d[0x30:])) << 16
		gd.itableUnused |= uint32(le.Uint16(d[0x32:])) << 16
	}
	stored := le.Uint16(d[0x1E:])
	if computed, ok := f.groupDescCsum(g, d); ok && computed != stored {
		gd.csumErr = fmt.Errorf("group %d descriptor checksum mismatch (stored %#04x, computed %#04x): %w", g, stored, computed, ErrCorrupt)
	}
	return gd
}

// groupDescCsum computes the descriptor checksum; ok is false when the
// filesystem has neither metadata_csum nor gdt_csum.
func (f *FS) groupDescCsum(g uint32, d []byte) (uint16, bool) {
	switch {
	case f.hasCsum():
		c := crc32cU32(f.csumSeed, g)
		c = crc32cRaw(c, d[:0x1E])
		c = crc32cZeros(c, 2)
		c = crc32cRaw(c, d[0x20:f.descSize])
		return uint16(c), true
	case f.roCompat(roCompatGdtCsum):
		var gle [4]byte
		binary.LittleEndian.PutUint32(gle[:], g)
		c := crc16(0xFFFF, f.sb.uuid[:])
		c = crc16(c, gle[:])
		c = crc16(c, d[:0x1E])
		if f.incompat(incompat64bit) && f.descSize > 32 {
			c = crc16(c, d[0x20:f.descSize])
		}
		return c, true
	}
	return 0, false
}

// overheadBlocks estimates the metadata blocks the kernel subtracts in statfs.
func (f *FS) overheadBlocks(clusterRatio uint64) uint64 {
	if f.sb.overheadClusters != 0 {
		return uint64(f.sb.overheadClusters) * clusterRatio
	}
	perBlock := f.blockSize / f.descSize
	gdtBlocks := uint64((f.numGroups + perBlock - 1) / perBlock)
	itBlocks := (uint64(f.sb.inodesPerGroup)*uint64(f.sb.inodeSize) + uint64(f.blockSize) - 1) >> f.blockLog
	total := uint64(f.sb.firstDataBlock)
	for g := uint32(0); g < f.numGroups; g++ {
		if f.hasSuper(g) {
			total++
			if !f.incompat(incompatMetaBG) {
				total += gdtBlocks + uint64(f.sb.reservedGdt)
			}
		}
		if f.incompat(incompatMetaBG) {
			idx := g % perBlock
			if idx == 0 || idx == 1 || idx == perBlock-1 {
				total++
			}
		}
		total += 2 + itBlocks
	}
	return total + f.journalBlocks
}
