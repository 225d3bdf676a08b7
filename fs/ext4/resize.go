package ext4

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
)

const (
	compatResizeInode = 0x10 // resize_inode: reserved GDT blocks, listed by inode 7
	resizeIno         = 7
	sbStateValid      = 0x1 // s_state: cleanly unmounted
	sbStateError      = 0x2 // s_state: errors detected
	sbGroupNr         = 0x5A
	sbCsumOff         = 0x3FC
)

// ErrTooLarge is wrapped by Grow when the requested size needs more group
// descriptor blocks than the filesystem has; the error is a *GrowLimitError
// naming the largest size it can grow to.
var ErrTooLarge = errors.New("ext4: filesystem cannot grow that far")

// GrowLimitError says how far a filesystem can grow.
type GrowLimitError struct {
	MaxBytes int64 // the largest filesystem size Grow accepts
	Reason   string
}

func (e *GrowLimitError) Error() string {
	return fmt.Sprintf("%v: %s, so it can grow to at most %d bytes", ErrTooLarge, e.Reason, e.MaxBytes)
}

func (e *GrowLimitError) Unwrap() error { return ErrTooLarge }

// GrowResult describes a completed Grow.
type GrowResult struct {
	OldBlocks, NewBlocks uint64 // filesystem blocks before and after
	OldGroups, NewGroups uint32
	BlockSize            uint32
}

// Grow enlarges the ext4 filesystem on dev offline, to at most newSize
// bytes (the device must already be that large; oldSize bounds what is
// read before, the filesystem's own superblock says how large it is), the
// way resize2fs does offline: it extends the last block group and appends
// new ones, each with its bitmaps and a zeroed inode table inside it (valid
// with or without flex_bg), superblock backups and descriptor copies in the
// sparse_super groups, and keeps the resize inode's lists of reserved GDT
// block copies up to date.
//
// The descriptor table does not move: it grows into the reserved GDT
// blocks that follow it (resize_inode), as resize2fs and the kernel's
// online resize do; beyond them Grow fails with a *GrowLimitError naming
// the maximum. A trailing group too small to hold its own metadata is left
// out, as resize2fs does. Grow refuses, unchanged, a filesystem that needs
// journal recovery or e2fsck, features it does not maintain (meta_bg,
// bigalloc, sparse_super2, ...), and shrinking.
//
// Crashes: everything beyond the old end and the backups is written and
// synced first; then one jbd2 transaction (the Writer's journal) switches
// the filesystem over: the old last group's bitmap, the resize inode, the
// primary descriptors and superblock. A crash leaves the old filesystem,
// or the new one once the journal is replayed. Without a journal the same
// blocks go home in order, superblock last, and a crash among them needs
// e2fsck.
func Grow(dev Device, oldSize, newSize int64) (GrowResult, error) {
	if dev == nil {
		return GrowResult{}, errors.New("ext4: nil device")
	}
	p, sb, err := preparedGrow(dev, oldSize, newSize)
	if err != nil {
		return GrowResult{}, err
	}
	if p.blocks > p.f.sb.blocksCount {
		if err := p.write(dev, sb); err != nil {
			return GrowResult{}, err
		}
	}
	return p.result(), nil
}

// CheckGrow reports what Grow would do to the filesystem in r (oldSize
// bytes) given newSize bytes, or why it would refuse, without writing: a
// caller checks before it enlarges the device.
func CheckGrow(r io.ReaderAt, oldSize, newSize int64) (GrowResult, error) {
	if r == nil {
		return GrowResult{}, errors.New("ext4: nil reader")
	}
	p, _, err := preparedGrow(r, oldSize, newSize)
	if err != nil {
		return GrowResult{}, err
	}
	return p.result(), nil
}

func preparedGrow(r io.ReaderAt, oldSize, newSize int64) (*growPlan, []byte, error) {
	if newSize < oldSize {
		return nil, nil, fmt.Errorf("ext4: cannot shrink a filesystem (from %d to %d bytes): only growing is supported", oldSize, newSize)
	}
	f, err := Open(r, oldSize)
	if err != nil {
		return nil, nil, err
	}
	sb := make([]byte, superblockSize)
	if err := f.readFull(sb, superblockOffset); err != nil {
		return nil, nil, fmt.Errorf("ext4: reading superblock: %w", err)
	}
	if err := checkGrowable(f, sb); err != nil {
		return nil, nil, err
	}
	p, err := planGrow(f, uint64(newSize)>>f.blockLog)
	if err != nil {
		return nil, nil, err
	}
	p.oldBytes = oldSize
	return p, sb, nil
}

func (p *growPlan) result() GrowResult {
	return GrowResult{OldBlocks: p.f.sb.blocksCount, NewBlocks: p.blocks, OldGroups: p.f.numGroups, NewGroups: p.groups, BlockSize: p.f.blockSize}
}

// checkGrowable refuses what Grow cannot change consistently.
func checkGrowable(f *FS, sb []byte) error {
	le := binary.LittleEndian
	if f.incompat(incompatRecover) {
		return fmt.Errorf("ext4: cannot resize: the journal needs recovery; open the image read-write once (or run e2fsck) first: %w", ErrUnsupported)
	}
	if f.compat(compatSparseSuper2) {
		return fmt.Errorf("ext4: cannot resize a sparse_super2 filesystem (its backups would have to move): %w", ErrUnsupported)
	}
	if err := checkWritable(f, sb); err != nil {
		return fmt.Errorf("ext4: cannot resize: %w", err)
	}
	state := le.Uint16(sb[0x3A:])
	if state&sbStateError != 0 || (state&sbStateValid == 0 && !f.compat(compatHasJournal)) {
		return fmt.Errorf("ext4: cannot resize: the filesystem is marked with errors or not cleanly unmounted; run e2fsck -f on it first: %w", ErrCorrupt)
	}
	if uint32(f.sb.reservedGdt) > f.blockSize/4 {
		return fmt.Errorf("ext4: cannot resize: %d reserved GDT blocks is more than one indirect block can list (%d); run e2fsck -f: %w", f.sb.reservedGdt, f.blockSize/4, ErrCorrupt)
	}
	if le.Uint32(sb[sbLastOrphan:]) != 0 {
		return fmt.Errorf("ext4: cannot resize: the filesystem has orphaned inodes; open it read-write once (or run e2fsck) first: %w", ErrUnsupported)
	}
	for g := range f.groups {
		if err := f.groups[g].csumErr; err != nil {
			return fmt.Errorf("ext4: cannot resize a damaged filesystem (run e2fsck -f on it): %w", err)
		}
	}
	return nil
}

// growPlan is the new geometry and the metadata to write.
type growPlan struct {
	f        *FS
	blocks   uint64
	groups   uint32
	itBlocks uint64
	// The descriptor table grows into the reserved GDT blocks that follow
	// it (resize_inode): oldGdt+reserved == newGdt+newReserved.
	oldGdt, newGdt uint32
	newReserved    uint32
	oldBytes       int64 // the device size the filesystem was opened at
}

// planGrow picks the new block count: at most want, whole groups only when
// a partial last group could not hold its metadata and some data.
func planGrow(f *FS, want uint64) (*growPlan, error) {
	perBlock := f.blockSize / f.descSize
	p := &growPlan{f: f, oldGdt: (f.numGroups + perBlock - 1) / perBlock,
		itBlocks: (uint64(f.sb.inodesPerGroup)*uint64(f.sb.inodeSize) + uint64(f.blockSize) - 1) >> f.blockLog}
	p.newGdt, p.newReserved = p.oldGdt, uint32(f.sb.reservedGdt)
	// Only the resize inode's reserved blocks can become descriptor blocks
	// (it tracks them and their backups).
	var reservable uint32
	if f.compat(compatResizeInode) {
		reservable = uint32(f.sb.reservedGdt)
	}
	if want < f.sb.blocksCount {
		return nil, fmt.Errorf("ext4: cannot shrink a filesystem of %d blocks to %d", f.sb.blocksCount, want)
	}
	if !f.incompat(incompat64bit) && want > 1<<32-1 {
		want = 1<<32 - 1 // 32-bit block numbers: the format's limit
	}
	bpg := uint64(f.sb.blocksPerGroup)
	first := uint64(f.sb.firstDataBlock)
	maxGroups := uint64(p.oldGdt+reservable) * uint64(perBlock)
	if byInodes := uint64(1<<32-1) / uint64(f.sb.inodesPerGroup); byInodes < maxGroups {
		maxGroups = byInodes
	}
	maxBlocks := first + maxGroups*bpg
	if want > maxBlocks {
		return nil, &GrowLimitError{MaxBytes: int64(maxBlocks << f.blockLog),
			Reason: fmt.Sprintf("its %d group descriptor block(s) and %d reserved for growth hold %d groups of %d blocks of %d bytes (asked for %d bytes)",
				p.oldGdt, reservable, maxGroups, bpg, f.blockSize, want<<f.blockLog)}
	}
	// Every new group holds its own metadata, and room for data.
	// (Group 0 has a superblock backup: the most any group spends.)
	if p.overhead(0)+minGroupData > bpg {
		return nil, fmt.Errorf("ext4: cannot resize: a group of %d blocks cannot hold its own metadata (%d blocks with a superblock backup); run e2fsck -f: %w", bpg, p.overhead(0), ErrCorrupt)
	}
	groups := uint32((want - first + bpg - 1) / bpg)
	if groups > f.numGroups {
		last := groups - 1
		if want-f.groupFirstBlock(last) < p.overhead(last)+minGroupData {
			want = f.groupFirstBlock(last)
			groups--
		}
	}
	if f.compat(compatResizeInode) && f.sb.reservedGdt > 0 {
		// Each reserved GDT block lists its copies in one indirect block.
		perInd := f.blockSize / 4
		var backups uint32
		for g := uint32(1); g < groups; g++ {
			if f.hasSuper(g) {
				if backups++; backups > perInd {
					return nil, &GrowLimitError{MaxBytes: int64(f.groupFirstBlock(g) << f.blockLog),
						Reason: fmt.Sprintf("the resize inode lists at most %d backup groups", perInd)}
				}
			}
		}
	}
	p.blocks, p.groups = want, groups
	p.newGdt = (groups + perBlock - 1) / perBlock
	p.newReserved = uint32(f.sb.reservedGdt) - (p.newGdt - p.oldGdt)
	// The switch is one journal transaction: descriptors, the resize
	// inode's blocks, the last bitmap, the inode and superblock blocks.
	if f.compat(compatHasJournal) && f.sb.journalInum != 0 {
		need := uint64(p.newGdt) + uint64(f.sb.reservedGdt) + 4
		if 2*need > f.journalBlocks {
			return nil, fmt.Errorf("ext4: cannot resize: switching to %d groups takes a %d-block journal transaction, too large for the %d-block journal: %w",
				groups, need, f.journalBlocks, ErrUnsupported)
		}
	}
	return p, nil
}

// minGroupData is the least data room a new trailing group must have
// beyond its own metadata; smaller tails are left out (resize2fs uses 50).
const minGroupData = 50

// metaBlocks is the number of blocks at the start of group g that hold the
// superblock backup, the descriptor table and the reserved GDT blocks.
func (p *growPlan) metaBlocks(g uint32) uint64 {
	if !p.f.hasSuper(g) {
		return 0
	}
	return 1 + uint64(p.oldGdt) + uint64(p.f.sb.reservedGdt)
}

// overhead is what a new group spends on metadata: backups, two bitmaps and
// its inode table, all inside the group.
func (p *growPlan) overhead(g uint32) uint64 { return p.metaBlocks(g) + 2 + p.itBlocks }

func (p *growPlan) groupBlocks(g uint32) uint64 {
	if g+1 < p.groups {
		return uint64(p.f.sb.blocksPerGroup)
	}
	return p.blocks - p.f.groupFirstBlock(g)
}

// csumGroups reports whether descriptors carry checksums and uninit flags.
func (p *growPlan) csumGroups() bool { return p.f.hasCsum() || p.f.roCompat(roCompatGdtCsum) }

// write puts the new geometry on dev; see Grow for the order.
func (p *growPlan) write(dev Device, sb []byte) error {
	f := p.f
	bs := int(f.blockSize)
	le := binary.LittleEndian
	wr := func(blk uint64, b []byte) error {
		if _, err := dev.WriteAt(b, int64(blk)<<f.blockLog); err != nil {
			return fmt.Errorf("ext4: resize: writing block %d: %w", blk, err)
		}
		return nil
	}
	// The descriptor table, old groups as they are.
	gdt := make([]byte, int(p.newGdt)*bs)
	for nr := uint32(0); nr < p.oldGdt; nr++ {
		if err := f.readFull(gdt[int(nr)*bs:int(nr+1)*bs], int64(f.descBlock(nr))<<f.blockLog); err != nil {
			return fmt.Errorf("ext4: resize: reading group descriptor block %d: %w", nr, err)
		}
	}
	desc := func(g uint32) []byte { return gdt[g*f.descSize : (g+1)*f.descSize] }
	put32x2 := func(d []byte, lo, hi int, v uint64) {
		le.PutUint32(d[lo:], uint32(v))
		if f.descSize >= 64 {
			le.PutUint32(d[hi:], uint32(v>>32))
		}
	}
	put16x2 := func(d []byte, lo, hi int, v uint32) {
		le.PutUint16(d[lo:], uint16(v))
		if f.descSize >= 64 {
			le.PutUint16(d[hi:], uint16(v>>16))
		}
	}
	bitmapCsum := func(d []byte, bitmap []byte, inodes bool) {
		if !f.hasCsum() {
			return
		}
		n, lo, hi := f.sb.blocksPerGroup/8, 0x18, 0x38
		if inodes {
			n, lo, hi = f.sb.inodesPerGroup/8, 0x1A, 0x3A
		}
		c := crc32cRaw(f.csumSeed, bitmap[:n])
		le.PutUint16(d[lo:], uint16(c))
		if f.descSize >= 0x3C {
			le.PutUint16(d[hi:], uint16(c>>16))
		}
	}
	sealDesc := func(g uint32) {
		if c, ok := f.groupDescCsum(g, desc(g)); ok {
			le.PutUint16(desc(g)[0x1E:], c)
		}
	}

	// 1. New groups: bitmaps, zeroed inode tables, their descriptors.
	zeros := make([]byte, min(uint64(1<<20), p.itBlocks<<f.blockLog))
	seen := make([]byte, len(zeros))
	for g := f.numGroups; g < p.groups; g++ {
		start := f.groupFirstBlock(g)
		meta := p.metaBlocks(g)
		bb, ib, it := start+meta, start+meta+1, start+meta+2
		n := p.groupBlocks(g)
		bbm := make([]byte, bs)
		for i := uint64(0); i < p.overhead(g); i++ {
			setBit(bbm, uint32(i))
		}
		for i := uint32(n); i < 8*f.blockSize; i++ {
			setBit(bbm, i)
		}
		ibm := make([]byte, bs)
		for i := f.sb.inodesPerGroup; i < 8*f.blockSize; i++ {
			setBit(ibm, i)
		}
		for off := uint64(0); off < p.itBlocks<<f.blockLog; off += uint64(len(zeros)) {
			chunk := zeros[:min(uint64(len(zeros)), p.itBlocks<<f.blockLog-off)]
			at := int64(it<<f.blockLog + off)
			// A sparse image's never-written sectors read as zeros:
			// writing them would only fill its holes.
			if _, err := dev.ReadAt(seen[:len(chunk)], at); err == nil && bytes.Equal(seen[:len(chunk)], chunk) {
				continue
			}
			if _, err := dev.WriteAt(chunk, at); err != nil {
				return fmt.Errorf("ext4: resize: zeroing group %d's inode table: %w", g, err)
			}
		}
		if err := wr(bb, bbm); err != nil {
			return err
		}
		if err := wr(ib, ibm); err != nil {
			return err
		}
		// Backup reserved GDT blocks start zeroed, as mke2fs leaves them.
		if f.hasSuper(g) && p.newReserved > 0 {
			if err := wr(start+1+uint64(p.newGdt), make([]byte, int(p.newReserved)*bs)); err != nil {
				return err
			}
		}
		d := desc(g)
		clear(d)
		put32x2(d, 0x0, 0x20, bb)
		put32x2(d, 0x4, 0x24, ib)
		put32x2(d, 0x8, 0x28, it)
		put16x2(d, 0xC, 0x2C, uint32(n-p.overhead(g)))
		put16x2(d, 0xE, 0x2E, f.sb.inodesPerGroup)
		if p.csumGroups() {
			// The table is zeroed, and no inode of it is in use yet.
			le.PutUint16(d[0x12:], bgInodeUninit|bgItableZeroed)
			put16x2(d, 0x1C, 0x32, f.sb.inodesPerGroup)
		}
		bitmapCsum(d, bbm, false)
		bitmapCsum(d, ibm, true)
		sealDesc(g)
	}

	// 2. The old last group now ends later.
	last := f.numGroups - 1
	oldN := uint64(f.groupBlocks(last))
	newN := p.groupBlocks(last)
	var lastBitmap []byte
	if d := desc(last); newN > oldN {
		gd := f.groups[last]
		if gd.flags&bgBlockUninit == 0 {
			lastBitmap = make([]byte, bs)
			if err := f.readFull(lastBitmap, int64(gd.blockBitmap)<<f.blockLog); err != nil {
				return fmt.Errorf("ext4: resize: reading group %d's block bitmap: %w", last, err)
			}
			for i := oldN; i < newN; i++ {
				clearBit(lastBitmap, uint32(i))
			}
			bitmapCsum(d, lastBitmap, false)
		}
		put16x2(d, 0xC, 0x2C, gd.freeBlocks+uint32(newN-oldN))
		sealDesc(last)
	}

	// 3. The superblock's totals.
	var freeBlocks, freeInodes uint64
	for g := uint32(0); g < p.groups; g++ {
		d := desc(g)
		fb, fi := uint64(le.Uint16(d[0xC:])), uint64(le.Uint16(d[0xE:]))
		if f.descSize >= 64 {
			fb |= uint64(le.Uint16(d[0x2C:])) << 16
			fi |= uint64(le.Uint16(d[0x2E:])) << 16
		}
		freeBlocks += fb
		freeInodes += fi
	}
	nsb := append([]byte(nil), sb...)
	put64 := func(lo, hi int, v uint64) {
		le.PutUint32(nsb[lo:], uint32(v))
		if f.incompat(incompat64bit) {
			le.PutUint32(nsb[hi:], uint32(v>>32))
		}
	}
	put64(0x4, 0x150, p.blocks)
	// Reserved blocks keep their share, as resize2fs keeps the percentage.
	hi, lo := bits.Mul64(f.sb.rBlocksCount, p.blocks)
	rBlocks, _ := bits.Div64(hi, lo, f.sb.blocksCount)
	put64(0x8, 0x154, rBlocks)
	put64(0xC, 0x158, freeBlocks)
	le.PutUint32(nsb[0x0:], p.groups*f.sb.inodesPerGroup)
	le.PutUint32(nsb[0x10:], uint32(freeInodes))
	// The kernel recomputes the overhead it reports in statfs when this is 0.
	le.PutUint32(nsb[0x248:], 0)
	le.PutUint16(nsb[0xCE:], uint16(p.newReserved))

	// 4. The blocks that switch the filesystem to the new geometry, all
	// inside the old one: the old last group's bitmap, the resize inode's
	// lists and inode, the primary descriptor table (and the superblock).
	final := map[uint64][]byte{}
	if lastBitmap != nil {
		final[f.groups[last].blockBitmap] = lastBitmap
	}
	if f.compat(compatResizeInode) && f.sb.reservedGdt > 0 {
		if err := p.growResizeInode(final); err != nil {
			return err
		}
	}
	for nr := uint32(0); nr < p.newGdt; nr++ {
		final[f.descBlock(0)+uint64(nr)] = gdt[int(nr)*bs : int(nr+1)*bs]
	}

	// Everything beyond the old end and the backup copies first.
	writeSB := func(g uint32) error {
		b := append([]byte(nil), nsb...)
		le.PutUint16(b[sbGroupNr:], uint16(g))
		if f.hasCsum() {
			le.PutUint32(b[sbCsumOff:], crc32cRaw(^uint32(0), b[:sbCsumOff]))
		}
		off := int64(f.groupFirstBlock(g)) << f.blockLog
		if g == 0 {
			off = superblockOffset
		}
		if _, err := dev.WriteAt(b, off); err != nil {
			return fmt.Errorf("ext4: resize: writing group %d's superblock: %w", g, err)
		}
		return nil
	}
	for g := uint32(1); g < p.groups; g++ {
		if !f.hasSuper(g) {
			continue
		}
		if err := writeSB(g); err != nil {
			return err
		}
		if _, err := dev.WriteAt(gdt, int64(f.groupFirstBlock(g)+1)<<f.blockLog); err != nil {
			return fmt.Errorf("ext4: resize: writing group %d's descriptor copy: %w", g, err)
		}
	}
	if err := dev.Sync(); err != nil {
		return fmt.Errorf("ext4: resize: %w", err)
	}
	// Then the switch: one journal transaction when the filesystem has a
	// journal, so a crash leaves the old filesystem or (after replay) the
	// new one; without a journal, the blocks in order, superblock last.
	if f.compat(compatHasJournal) && f.sb.journalInum != 0 {
		return commitSwitch(dev, p.oldBytes, final, nsb)
	}
	for blk, b := range final {
		if err := wr(blk, b); err != nil {
			return err
		}
	}
	if err := dev.Sync(); err != nil {
		return fmt.Errorf("ext4: resize: %w", err)
	}
	if err := writeSB(0); err != nil {
		return err
	}
	if err := dev.Sync(); err != nil {
		return fmt.Errorf("ext4: resize: %w", err)
	}
	return nil
}

// commitSwitch writes the blocks and the new primary superblock as one
// transaction through the filesystem's journal (the Writer's jbd2 log),
// then checkpoints it home.
func commitSwitch(dev Device, oldBytes int64, blocks map[uint64][]byte, sb []byte) error {
	w, err := OpenWritable(dev, oldBytes)
	if err != nil {
		return fmt.Errorf("ext4: resize: opening the journal: %w", err)
	}
	if w.jw == nil {
		return fmt.Errorf("ext4: resize: the filesystem has no usable journal: %w", ErrUnsupported)
	}
	if len(blocks)+1 > w.jwChunk() {
		return fmt.Errorf("ext4: resize: %d blocks do not fit one transaction of the %d-block journal: %w", len(blocks)+1, w.jwChunk(), ErrUnsupported)
	}
	unlock := w.lockChange()
	for blk, b := range blocks {
		if err := w.writeBlock(blk, b); err != nil {
			unlock()
			return err
		}
	}
	copy(w.sb, sb)
	w.sbD = true
	err = w.flushMeta()
	unlock()
	if err != nil {
		return err
	}
	if err := w.Checkpoint(); err != nil {
		return fmt.Errorf("ext4: resize: committing the new geometry: %w", err)
	}
	return w.Close()
}

// growResizeInode prepares the resize inode's changes. Its
// double-indirect block lists the reserved GDT blocks; each of those is an
// indirect block listing its copies in the backup groups. Reserved blocks
// that become descriptor blocks leave the lists (and the inode's block
// count, with their copies); the others get their copies in the new backup
// groups appended. The changed blocks go into final.
func (p *growPlan) growResizeInode(final map[uint64][]byte) error {
	f := p.f
	le := binary.LittleEndian
	bs := f.blockSize
	in, err := f.Inode(resizeIno)
	if err != nil {
		return fmt.Errorf("ext4: resize: reading the resize inode: %w", err)
	}
	raw := append([]byte(nil), in.raw...)
	dindBlk := uint64(le.Uint32(raw[inoBlock+13*4:]))
	if dindBlk == 0 || dindBlk >= f.sb.blocksCount {
		return fmt.Errorf("ext4: resize: the resize inode has no valid double-indirect block (%d); run e2fsck -f: %w", dindBlk, ErrCorrupt)
	}
	dind := make([]byte, bs)
	if err := f.readFull(dind, int64(dindBlk)<<f.blockLog); err != nil {
		return fmt.Errorf("ext4: resize: reading the resize inode's block %d: %w", dindBlk, err)
	}
	var oldBackups, newBackups uint32
	for g := uint32(1); g < p.groups; g++ {
		if f.hasSuper(g) {
			if g < f.numGroups {
				oldBackups++
			} else {
				newBackups++
			}
		}
	}
	perInd := bs / 4 // planGrow kept oldBackups+newBackups within it
	consumed := p.newGdt - p.oldGdt
	sectors := uint64(bs / 512) // i_blocks counts 512-byte sectors
	if le.Uint32(raw[inoFlags:])&flagHugeFile != 0 {
		sectors = 1 // counted in filesystem blocks
	}
	blocks := uint64(le.Uint32(raw[inoBlocksLo:])) | uint64(le.Uint16(raw[inoBlocksHi:]))<<32
	firstReserved := uint64(superblockOffset>>f.blockLog) + 1 + uint64(p.oldGdt)
	for i := uint32(0); i < uint32(f.sb.reservedGdt); i++ {
		pblk := firstReserved + uint64(i)
		slot := (p.oldGdt + i) % perInd
		if got := uint64(le.Uint32(dind[slot*4:])); got != pblk {
			return fmt.Errorf("ext4: resize: the resize inode lists block %d where reserved GDT block %d should be; run e2fsck -f: %w", got, pblk, ErrCorrupt)
		}
		if i < consumed {
			// Now a descriptor block (written with the table); its copies
			// become descriptor copies.
			le.PutUint32(dind[slot*4:], 0)
			blocks -= uint64(1+oldBackups) * sectors
			continue
		}
		if newBackups == 0 {
			continue
		}
		ind := make([]byte, bs)
		if err := f.readFull(ind, int64(pblk)<<f.blockLog); err != nil {
			return fmt.Errorf("ext4: resize: reading reserved GDT block %d: %w", pblk, err)
		}
		k := oldBackups
		for g := f.numGroups; g < p.groups; g++ {
			if f.hasSuper(g) {
				le.PutUint32(ind[k*4:], uint32(pblk+uint64(g)*uint64(f.sb.blocksPerGroup)))
				k++
			}
		}
		blocks += uint64(newBackups) * sectors
		final[pblk] = ind
	}
	if consumed > 0 {
		final[dindBlk] = dind
	}
	le.PutUint32(raw[inoBlocksLo:], uint32(blocks))
	le.PutUint16(raw[inoBlocksHi:], uint16(blocks>>32))
	if f.hasCsum() {
		c, _ := inodeCsum(in.csumSeed, raw, in.extra)
		le.PutUint16(raw[inoCsumLo:], uint16(c))
		if len(raw) > 128 && 128+int(in.extra) >= 0x84 {
			le.PutUint16(raw[inoCsumHi:], uint16(c>>16))
		}
	}
	off := uint64((resizeIno-1)%f.sb.inodesPerGroup) * uint64(f.sb.inodeSize)
	blk := f.groups[(resizeIno-1)/f.sb.inodesPerGroup].inodeTable + off>>f.blockLog
	b, ok := final[blk]
	if !ok {
		b = make([]byte, bs)
		if err := f.readFull(b, int64(blk)<<f.blockLog); err != nil {
			return fmt.Errorf("ext4: resize: reading the resize inode's table block: %w", err)
		}
	}
	copy(b[off&uint64(bs-1):], raw)
	final[blk] = b
	return nil
}
