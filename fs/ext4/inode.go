package ext4

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"time"
)

// Inode is the decoded metadata of one file. Obtain it from FS.Inode.
type Inode struct {
	Ino        uint32
	Mode       uint16 // raw i_mode including the S_IFMT type bits
	UID, GID   uint32
	Size       uint64
	Links      uint16
	Atime      time.Time
	Mtime      time.Time
	Ctime      time.Time
	Crtime     time.Time // zero when the inode has no creation time field
	Rdev       uint32    // device number encoded like Linux new_encode_dev
	Flags      uint32    // i_flags (EXT4_*_FL)
	Blocks     uint64    // allocated space in 512-byte units
	Generation uint32

	raw      []byte // the on-disk inode (shared, read-only)
	extra    uint16 // i_extra_isize
	fileACL  uint64 // xattr block
	csumSeed uint32 // per-inode metadata_csum seed
}

// File type bits of Mode.
const (
	sIFMT   = 0xF000
	sIFSOCK = 0xC000
	sIFLNK  = 0xA000
	sIFREG  = 0x8000
	sIFBLK  = 0x6000
	sIFDIR  = 0x4000
	sIFCHR  = 0x2000
	sIFIFO  = 0x1000
)

// Inode flags used by the reader.
const (
	flagHugeFile   = 0x40000
	flagIndex      = 0x1000
	flagExtents    = 0x80000
	flagEAInode    = 0x200000
	flagInlineData = 0x10000000
)

func (i *Inode) IsDir() bool     { return i.Mode&sIFMT == sIFDIR }
func (i *Inode) IsRegular() bool { return i.Mode&sIFMT == sIFREG }
func (i *Inode) IsSymlink() bool { return i.Mode&sIFMT == sIFLNK }

// Major is the device major number of a character or block device.
func (i *Inode) Major() uint32 { return (i.Rdev & 0xfff00) >> 8 }

// Minor is the device minor number of a character or block device.
func (i *Inode) Minor() uint32 { return (i.Rdev & 0xff) | ((i.Rdev >> 12) & 0xfff00) }

// iblock returns the 60-byte i_block area (extent root, block map, inline data, symlink).
func (i *Inode) iblock() []byte { return i.raw[0x28:0x64] }

func (i *Inode) hasFlag(fl uint32) bool { return i.Flags&fl != 0 }

// Inode reads inode number ino. Errors name the inode.
func (f *FS) Inode(ino uint32) (*Inode, error) {
	if ino == 0 || ino > f.sb.inodesCount {
		return nil, fmt.Errorf("ext4: inode %d is out of range (1..%d): %w", ino, f.sb.inodesCount, ErrCorrupt)
	}
	if in, ok := f.inodes.get(ino); ok {
		cp := *in
		return &cp, nil
	}
	in, err := f.loadInode(ino)
	if err != nil {
		return nil, err
	}
	f.inodes.put(ino, in)
	cp := *in
	return &cp, nil
}

func (f *FS) loadInode(ino uint32) (*Inode, error) {
	g := (ino - 1) / f.sb.inodesPerGroup
	idx := (ino - 1) % f.sb.inodesPerGroup
	gd := &f.groups[g]
	if gd.csumErr != nil {
		return nil, fmt.Errorf("ext4: inode %d: %w", ino, gd.csumErr)
	}
	if f.hasCsum() || f.roCompat(roCompatGdtCsum) {
		if gd.flags&bgInodeUninit != 0 || (gd.itableUnused <= f.sb.inodesPerGroup && idx >= f.sb.inodesPerGroup-gd.itableUnused) {
			return nil, fmt.Errorf("ext4: inode %d is not in use (group %d's inode table is not initialized there): %w", ino, g, ErrCorrupt)
		}
	}
	isz := uint64(f.sb.inodeSize)
	off := uint64(idx) * isz
	blk := gd.inodeTable + off>>f.blockLog
	if gd.inodeTable < uint64(f.sb.firstDataBlock) || blk >= f.sb.blocksCount {
		return nil, fmt.Errorf("ext4: inode %d: group %d inode table at block %d is out of range: %w", ino, g, gd.inodeTable, ErrCorrupt)
	}
	b, err := f.readBlock(blk)
	if err != nil {
		return nil, fmt.Errorf("ext4: inode %d: %w", ino, err)
	}
	inOff := off & uint64(f.blockSize-1)
	// Copy so a cached inode does not pin its whole inode-table block.
	raw := bytes.Clone(b[inOff : inOff+isz])
	return f.parseInode(ino, raw)
}

func (f *FS) parseInode(ino uint32, raw []byte) (*Inode, error) {
	le := binary.LittleEndian
	in := &Inode{Ino: ino, raw: raw}
	if len(raw) > 128 {
		in.extra = le.Uint16(raw[0x80:])
		if 128+int(in.extra) > len(raw) || in.extra&3 != 0 {
			return nil, fmt.Errorf("ext4: inode %d: extra inode size %d does not fit a %d-byte inode: %w", ino, in.extra, len(raw), ErrCorrupt)
		}
	}
	gen := le.Uint32(raw[0x64:])
	if f.hasCsum() {
		in.csumSeed = crc32cU32(crc32cU32(f.csumSeed, ino), gen)
		if err := f.verifyInodeCsum(in); err != nil {
			return nil, err
		}
	}
	in.Mode = le.Uint16(raw[0x0:])
	in.UID = uint32(le.Uint16(raw[0x2:])) | uint32(le.Uint16(raw[0x78:]))<<16
	in.GID = uint32(le.Uint16(raw[0x18:])) | uint32(le.Uint16(raw[0x7A:]))<<16
	in.Size = uint64(le.Uint32(raw[0x4:]))
	if in.IsRegular() || f.incompat(incompatLargeDir) {
		in.Size |= uint64(le.Uint32(raw[0x6C:])) << 32
	}
	in.Links = le.Uint16(raw[0x1A:])
	in.Flags = le.Uint32(raw[0x20:])
	in.Generation = gen
	in.Blocks = uint64(le.Uint32(raw[0x1C:]))
	if f.roCompat(roCompatHugeFile) {
		in.Blocks |= uint64(le.Uint16(raw[0x74:])) << 32
		if in.hasFlag(flagHugeFile) {
			in.Blocks <<= f.blockLog - 9
		}
	}
	if in.hasFlag(flagInlineData) && in.IsRegular() {
		// Like the kernel's getattr for regular files: report the inline bytes so tools do
		// not take the file for entirely sparse.
		in.Blocks += (in.Size + 511) >> 9
	}
	in.fileACL = uint64(le.Uint32(raw[0x68:]))
	if f.incompat(incompat64bit) {
		in.fileACL |= uint64(le.Uint16(raw[0x76:])) << 32
	}
	in.Atime = in.time(0x08, 0x8C)
	in.Ctime = in.time(0x0C, 0x84)
	in.Mtime = in.time(0x10, 0x88)
	if in.fits(0x94) {
		in.Crtime = in.time(0x90, 0x94)
	} else if in.fits(0x90) {
		in.Crtime = time.Unix(int64(int32(le.Uint32(raw[0x90:]))), 0)
	}
	if t := in.Mode & sIFMT; t == sIFCHR || t == sIFBLK {
		old := le.Uint32(raw[0x28:])
		if old != 0 {
			major, minor := (old>>8)&0xff, old&0xff
			in.Rdev = minor&0xff | major<<8 | (minor&^0xff)<<12
		} else {
			in.Rdev = le.Uint32(raw[0x2C:])
		}
	}
	return in, nil
}

// fits reports whether the 4-byte field at off lies within 128+i_extra_isize.
func (i *Inode) fits(off int) bool {
	return len(i.raw) > 128 && off+4 <= 128+int(i.extra)
}

func (i *Inode) time(secOff, extraOff int) time.Time {
	sec := int64(int32(binary.LittleEndian.Uint32(i.raw[secOff:])))
	var nsec int64
	if i.fits(extraOff) {
		extra := binary.LittleEndian.Uint32(i.raw[extraOff:])
		sec += int64(extra&3) << 32
		nsec = int64(extra >> 2)
		if nsec > 999999999 {
			nsec = 999999999 // invalid on disk; keep the time normalized
		}
	}
	return time.Unix(sec, nsec)
}

func (f *FS) verifyInodeCsum(in *Inode) error {
	c, stored := inodeCsum(in.csumSeed, in.raw, in.extra)
	if c != stored {
		return fmt.Errorf("ext4: inode %d: checksum mismatch (stored %#x, computed %#x): %w", in.Ino, stored, c, ErrCorrupt)
	}
	return nil
}

// inodeCsum computes the metadata_csum checksum of the raw inode (16 bits
// when the inode has no room for the high half) and returns the stored one.
func inodeCsum(seed uint32, raw []byte, extra uint16) (computed, stored uint32) {
	le := binary.LittleEndian
	c := crc32cRaw(seed, raw[:0x7C])
	c = crc32cZeros(c, 2)
	c = crc32cRaw(c, raw[0x7E:128])
	stored = uint32(le.Uint16(raw[0x7C:]))
	full := false
	if len(raw) > 128 {
		c = crc32cRaw(c, raw[128:0x82])
		off := 0x82
		if 128+int(extra) >= 0x84 {
			c = crc32cZeros(c, 2)
			off = 0x84
			stored |= uint32(le.Uint16(raw[0x82:])) << 16
			full = true
		}
		c = crc32cRaw(c, raw[off:])
	}
	if !full {
		c &= 0xFFFF
	}
	return c, stored
}
