// Package ext4 reads ext2, ext3 and ext4 filesystems entirely in userspace
// from an io.ReaderAt (in blobseal: the decrypted LUKS2/XTS volume),
// verifying metadata checksums where the filesystem has them. Writer
// (write*.go, journal*.go) changes an ext4 filesystem on a Device, through
// its jbd2 journal.
//
// Every corrupt structure surfaces as an error for the one operation that met
// it, wrapping ErrCorrupt (or ErrUnsupported) and naming the inode, so a
// server can answer EIO for that request and keep the mount up. An FS is safe
// for concurrent use by many goroutines.
package ext4

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
)

// RootIno is the inode number of the root directory.
const RootIno = 2

// Errors returned (wrapped) by this package; test them with errors.Is.
var (
	ErrNotFound    = errors.New("no such file or directory")
	ErrNoXattr     = errors.New("no such extended attribute")
	ErrCorrupt     = errors.New("corrupt ext4 filesystem")
	ErrUnsupported = errors.New("unsupported ext4 feature")
)

// Feature bits (superblock s_feature_compat / incompat / ro_compat).
const (
	compatHasJournal   = 0x4
	compatExtAttr      = 0x8
	compatDirIndex     = 0x20
	compatSparseSuper2 = 0x200

	incompatCompression = 0x1
	incompatFiletype    = 0x2
	incompatRecover     = 0x4
	incompatJournalDev  = 0x8
	incompatMetaBG      = 0x10
	incompatExtents     = 0x40
	incompat64bit       = 0x80
	incompatMMP         = 0x100
	incompatFlexBG      = 0x200
	incompatEAInode     = 0x400
	incompatDirData     = 0x1000
	incompatCsumSeed    = 0x2000
	incompatLargeDir    = 0x4000
	incompatInlineData  = 0x8000
	incompatEncrypt     = 0x10000
	incompatCasefold    = 0x20000

	roCompatSparseSuper  = 0x1
	roCompatHugeFile     = 0x8
	roCompatGdtCsum      = 0x10
	roCompatBigalloc     = 0x200
	roCompatMetadataCsum = 0x400
)

// incompatible features this reader understands; anything else is refused.
const incompatKnown = incompatFiletype | incompatMetaBG | incompatExtents | incompat64bit |
	incompatMMP | incompatFlexBG | incompatEAInode | incompatCsumSeed | incompatLargeDir |
	incompatInlineData

var incompatNames = map[uint32]string{
	incompatCompression: "compression", incompatRecover: "needs_recovery (journal not replayed; run e2fsck on the image)",
	incompatJournalDev: "journal_dev (external journal device)", incompatDirData: "dirdata",
	incompatEncrypt: "encrypt (fscrypt)", incompatCasefold: "casefold",
}

const (
	superblockOffset = 1024
	superblockSize   = 1024
	ext4Magic        = 0xEF53
	maxBlockLog      = 6 // 64 KiB blocks
)

// superblock holds the decoded fields this reader uses.
type superblock struct {
	inodesCount      uint32
	blocksCount      uint64
	rBlocksCount     uint64
	firstDataBlock   uint32
	logBlockSize     uint32
	logClusterSize   uint32
	blocksPerGroup   uint32
	inodesPerGroup   uint32
	revLevel         uint32
	firstIno         uint32
	inodeSize        uint16
	featureCompat    uint32
	featureIncompat  uint32
	featureRoCompat  uint32
	uuid             [16]byte
	reservedGdt      uint16
	journalInum      uint32
	hashSeed         [4]uint32
	defHashVersion   uint8
	descSize         uint16
	firstMetaBG      uint32
	flags            uint32
	checksumType     uint8
	checksumSeed     uint32
	overheadClusters uint32
	backupBGs        [2]uint32
}

// FS is an open, read-only ext4 filesystem. It is safe for concurrent use.
type FS struct {
	r             io.ReaderAt
	size          int64
	sb            superblock
	blockSize     uint32
	blockLog      uint32 // log2(blockSize)
	clusterRatio  uint32 // blocks per cluster (bigalloc), else 1
	journalBlocks uint64 // size of the internal journal, for StatFS
	numGroups     uint32
	descSize      uint32
	groups        []groupDesc
	csumSeed      uint32 // fs-wide metadata_csum seed
	hashSeed      [4]uint32
	hashUnsigned  bool

	blocks *lru[uint64, []byte] // metadata blocks (inode tables, tree, dir, xattr)
	inodes *lru[uint32, *Inode]

	// txBlock, set by a Writer, returns the newest version of a block the
	// journal holds in memory (open or committed, not yet home), so reads
	// of changed metadata need neither a copy nor the device.
	txBlock func(blk uint64) ([]byte, bool)
}

// Open reads and checks the superblock and group descriptors of the ext4
// filesystem in r, which is size bytes long.
func Open(r io.ReaderAt, size int64) (*FS, error) {
	if r == nil {
		return nil, errors.New("ext4: nil reader")
	}
	if size < superblockOffset+superblockSize {
		return nil, fmt.Errorf("ext4: volume of %d bytes is too small to hold a superblock: %w", size, ErrCorrupt)
	}
	raw := make([]byte, superblockSize)
	if _, err := r.ReadAt(raw, superblockOffset); err != nil {
		return nil, fmt.Errorf("ext4: reading superblock: %w", err)
	}
	f := &FS{r: r, size: size}
	if err := f.parseSuperblock(raw); err != nil {
		return nil, err
	}
	if err := f.loadGroupDescs(); err != nil {
		return nil, err
	}
	const cacheBytes = 8 << 20
	f.blocks = newLRU[uint64, []byte](cacheBytes / int(f.blockSize))
	f.inodes = newLRU[uint32, *Inode](8192)
	if f.compat(compatHasJournal) && f.sb.journalInum != 0 {
		// Only for StatFS's overhead figure; a broken journal inode does not
		// stop a read-only reader, which never replays it.
		if j, err := f.Inode(f.sb.journalInum); err == nil {
			f.journalBlocks = j.Size >> f.blockLog
		}
	}
	return f, nil
}

func (f *FS) parseSuperblock(b []byte) error {
	le := binary.LittleEndian
	if m := le.Uint16(b[0x38:]); m != ext4Magic {
		return fmt.Errorf("ext4: bad superblock magic %#04x (want %#04x): not an ext2/3/4 filesystem, or the volume was decrypted with the wrong key: %w", m, ext4Magic, ErrCorrupt)
	}
	sb := &f.sb
	sb.inodesCount = le.Uint32(b[0x0:])
	sb.blocksCount = uint64(le.Uint32(b[0x4:]))
	sb.rBlocksCount = uint64(le.Uint32(b[0x8:]))
	sb.firstDataBlock = le.Uint32(b[0x14:])
	sb.logBlockSize = le.Uint32(b[0x18:])
	sb.logClusterSize = le.Uint32(b[0x1C:])
	sb.blocksPerGroup = le.Uint32(b[0x20:])
	sb.inodesPerGroup = le.Uint32(b[0x28:])
	sb.revLevel = le.Uint32(b[0x4C:])
	sb.firstIno = 11
	sb.inodeSize = 128
	if sb.revLevel >= 1 {
		sb.firstIno = le.Uint32(b[0x54:])
		sb.inodeSize = le.Uint16(b[0x58:])
		sb.featureCompat = le.Uint32(b[0x5C:])
		sb.featureIncompat = le.Uint32(b[0x60:])
		sb.featureRoCompat = le.Uint32(b[0x64:])
	}
	copy(sb.uuid[:], b[0x68:0x78])
	sb.reservedGdt = le.Uint16(b[0xCE:])
	sb.journalInum = le.Uint32(b[0xE0:])
	for i := range sb.hashSeed {
		sb.hashSeed[i] = le.Uint32(b[0xEC+4*i:])
	}
	sb.defHashVersion = b[0xFC]
	sb.descSize = le.Uint16(b[0xFE:])
	sb.firstMetaBG = le.Uint32(b[0x104:])
	sb.flags = le.Uint32(b[0x160:])
	sb.checksumType = b[0x175]
	sb.overheadClusters = le.Uint32(b[0x248:])
	sb.backupBGs[0] = le.Uint32(b[0x24C:])
	sb.backupBGs[1] = le.Uint32(b[0x250:])
	sb.checksumSeed = le.Uint32(b[0x270:])

	if f.incompat(incompat64bit) {
		sb.blocksCount |= uint64(le.Uint32(b[0x150:])) << 32
		sb.rBlocksCount |= uint64(le.Uint32(b[0x154:])) << 32
	}

	if bad := sb.featureIncompat &^ incompatKnown; bad != 0 {
		var names []string
		for bit := uint32(1); bit != 0; bit <<= 1 {
			if bad&bit != 0 {
				if n, ok := incompatNames[bit]; ok {
					names = append(names, n)
				} else {
					names = append(names, fmt.Sprintf("%#x", bit))
				}
			}
		}
		return fmt.Errorf("ext4: filesystem uses incompatible feature(s) %v that this reader does not implement: %w", names, ErrUnsupported)
	}

	if f.roCompat(roCompatMetadataCsum) {
		if sb.checksumType != 1 {
			return fmt.Errorf("ext4: unknown metadata checksum type %d (want 1, crc32c): %w", sb.checksumType, ErrUnsupported)
		}
		want := le.Uint32(b[0x3FC:])
		if got := crc32cRaw(^uint32(0), b[:0x3FC]); got != want {
			return fmt.Errorf("ext4: superblock checksum mismatch (stored %#08x, computed %#08x): %w", want, got, ErrCorrupt)
		}
		if f.incompat(incompatCsumSeed) {
			f.csumSeed = sb.checksumSeed
		} else {
			f.csumSeed = crc32cRaw(^uint32(0), sb.uuid[:])
		}
	}

	if sb.logBlockSize > maxBlockLog {
		return fmt.Errorf("ext4: block size 2^(10+%d) is out of range: %w", sb.logBlockSize, ErrCorrupt)
	}
	f.blockLog = 10 + sb.logBlockSize
	f.blockSize = 1 << f.blockLog
	f.clusterRatio = 1
	if f.roCompat(roCompatBigalloc) {
		if sb.logClusterSize < sb.logBlockSize || sb.logClusterSize-sb.logBlockSize > 16 {
			return fmt.Errorf("ext4: bigalloc cluster size log %d is out of range: %w", sb.logClusterSize, ErrCorrupt)
		}
		f.clusterRatio = 1 << (sb.logClusterSize - sb.logBlockSize)
	}
	if sb.blocksPerGroup == 0 || uint64(sb.blocksPerGroup) > 8*uint64(f.blockSize)*uint64(f.clusterRatio) {
		return fmt.Errorf("ext4: blocks per group %d is out of range: %w", sb.blocksPerGroup, ErrCorrupt)
	}
	if sb.inodesPerGroup == 0 || sb.inodesPerGroup > 8*f.blockSize {
		return fmt.Errorf("ext4: inodes per group %d is out of range: %w", sb.inodesPerGroup, ErrCorrupt)
	}
	if sb.inodeSize < 128 || sb.inodeSize > uint16(min(f.blockSize, 1<<15)) || bits.OnesCount16(sb.inodeSize) != 1 {
		return fmt.Errorf("ext4: inode size %d is invalid: %w", sb.inodeSize, ErrCorrupt)
	}
	if (f.blockSize == 1024) != (sb.firstDataBlock == 1) && !(f.blockSize == 1024 && sb.firstDataBlock == 0) {
		return fmt.Errorf("ext4: first data block %d does not fit block size %d: %w", sb.firstDataBlock, f.blockSize, ErrCorrupt)
	}
	if sb.blocksCount <= uint64(sb.firstDataBlock) {
		return fmt.Errorf("ext4: block count %d is too small: %w", sb.blocksCount, ErrCorrupt)
	}
	if sb.blocksCount > uint64(f.size)>>f.blockLog {
		return fmt.Errorf("ext4: filesystem claims %d blocks of %d bytes but the volume holds only %d bytes (truncated image?): %w",
			sb.blocksCount, f.blockSize, f.size, ErrCorrupt)
	}
	groups := (sb.blocksCount - uint64(sb.firstDataBlock) + uint64(sb.blocksPerGroup) - 1) / uint64(sb.blocksPerGroup)
	if groups == 0 || groups > 1<<32-1 || groups*uint64(sb.inodesPerGroup) < uint64(sb.inodesCount) {
		return fmt.Errorf("ext4: %d groups of %d inodes cannot hold %d inodes: %w", groups, sb.inodesPerGroup, sb.inodesCount, ErrCorrupt)
	}
	f.numGroups = uint32(groups)
	f.descSize = 32
	if f.incompat(incompat64bit) {
		f.descSize = uint32(sb.descSize)
		if f.descSize < 64 || f.descSize > 1024 || bits.OnesCount32(f.descSize) != 1 {
			return fmt.Errorf("ext4: group descriptor size %d is invalid for a 64bit filesystem: %w", sb.descSize, ErrCorrupt)
		}
	}
	if f.sb.firstIno < 11 || f.sb.firstIno > f.sb.inodesCount {
		// Not fatal for reading, but a sign of garbage.
		return fmt.Errorf("ext4: first non-reserved inode %d is invalid: %w", f.sb.firstIno, ErrCorrupt)
	}

	f.hashSeed = sb.hashSeed
	if sb.hashSeed == [4]uint32{} {
		f.hashSeed = [4]uint32{0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476}
	}
	f.hashUnsigned = sb.flags&0x2 != 0 // EXT2_FLAGS_UNSIGNED_HASH
	return nil
}

func (f *FS) incompat(bit uint32) bool { return f.sb.featureIncompat&bit != 0 }
func (f *FS) roCompat(bit uint32) bool { return f.sb.featureRoCompat&bit != 0 }
func (f *FS) compat(bit uint32) bool   { return f.sb.featureCompat&bit != 0 }
func (f *FS) hasCsum() bool            { return f.roCompat(roCompatMetadataCsum) }

// BlockSize is the filesystem block size in bytes.
func (f *FS) BlockSize() uint32 { return f.blockSize }

// readBlock returns block blk, from the metadata cache if possible. The
// returned slice is shared: callers must not modify it.
func (f *FS) readBlock(blk uint64) ([]byte, error) {
	if f.txBlock != nil {
		if b, ok := f.txBlock(blk); ok {
			return b, nil
		}
	}
	if b, ok := f.blocks.get(blk); ok {
		return b, nil
	}
	if blk >= f.sb.blocksCount {
		return nil, fmt.Errorf("block %d is beyond the end of the filesystem (%d blocks): %w", blk, f.sb.blocksCount, ErrCorrupt)
	}
	b := make([]byte, f.blockSize)
	if err := f.readFull(b, int64(blk)<<f.blockLog); err != nil {
		return nil, fmt.Errorf("reading block %d: %w", blk, err)
	}
	f.blocks.put(blk, b)
	return b, nil
}

// readFull reads exactly len(p) bytes at off, treating a short read as an error.
func (f *FS) readFull(p []byte, off int64) error {
	return f.readFullContext(context.Background(), p, off)
}

// contextReaderAt is the volume's optional interruptible read.
type contextReaderAt interface {
	ReadAtContext(ctx context.Context, p []byte, off int64) (int, error)
}

// readFullContext is readFull that gives up when ctx ends, if the volume can.
func (f *FS) readFullContext(ctx context.Context, p []byte, off int64) error {
	var n int
	var err error
	if r, ok := f.r.(contextReaderAt); ok {
		n, err = r.ReadAtContext(ctx, p, off)
	} else {
		n, err = f.r.ReadAt(p, off)
	}
	if n == len(p) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// StatFS describes filesystem capacity like statfs(2).
type StatFS struct {
	BlockSize   uint32
	Blocks      uint64 // data blocks (total minus metadata overhead), as the kernel reports
	FreeBlocks  uint64
	AvailBlocks uint64 // free blocks usable by unprivileged users
	Inodes      uint64
	FreeInodes  uint64
	NameLen     uint32
}

// StatFS reports capacity from the group descriptors, as the kernel does at mount.
func (f *FS) StatFS() StatFS {
	var freeClusters, freeInodes uint64
	for i := range f.groups {
		freeClusters += uint64(f.groups[i].freeBlocks)
		freeInodes += uint64(f.groups[i].freeInodes)
	}
	clusterRatio := uint64(f.clusterRatio)
	overhead := f.overheadBlocks(clusterRatio)
	st := StatFS{
		BlockSize:  f.blockSize,
		Blocks:     sat(f.sb.blocksCount, overhead),
		FreeBlocks: freeClusters * clusterRatio,
		Inodes:     uint64(f.sb.inodesCount),
		FreeInodes: freeInodes,
		NameLen:    255,
	}
	// The kernel additionally keeps back 2% (at most 4096 clusters) on extent filesystems.
	var resv uint64
	if f.incompat(incompatExtents) {
		resv = min((f.sb.blocksCount/clusterRatio)/50, 4096) * clusterRatio
	}
	st.AvailBlocks = sat(st.FreeBlocks, f.sb.rBlocksCount+resv)
	return st
}

func sat(a, b uint64) uint64 {
	if a < b {
		return 0
	}
	return a - b
}
