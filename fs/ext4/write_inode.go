package ext4

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"time"
)

// Inode field offsets the writer sets (see the kernel's struct ext4_inode).
const (
	inoMode        = 0x00
	inoUIDLo       = 0x02
	inoSizeLo      = 0x04
	inoAtime       = 0x08
	inoCtime       = 0x0C
	inoMtime       = 0x10
	inoDtime       = 0x14
	inoGIDLo       = 0x18
	inoLinks       = 0x1A
	inoBlocksLo    = 0x1C
	inoFlags       = 0x20
	inoBlock       = 0x28
	inoGeneration  = 0x64
	inoFileACLLo   = 0x68
	inoSizeHi      = 0x6C
	inoBlocksHi    = 0x74
	inoUIDHi       = 0x78
	inoGIDHi       = 0x7A
	inoCsumLo      = 0x7C
	inoExtraIsize  = 0x80
	inoCsumHi      = 0x82
	inoCtimeExtra  = 0x84
	inoMtimeExtra  = 0x88
	inoAtimeExtra  = 0x8C
	inoCrtime      = 0x90
	inoCrtimeExtra = 0x94
)

// wInode is an inode being changed: its raw bytes and the decoded view the
// reader's functions (mapBlocks, scanDir) take.
type wInode struct {
	*Inode
}

// loadInode returns a private, modifiable copy of inode ino.
func (w *Writer) loadInode(ino uint32) (wInode, error) {
	in, err := w.f.Inode(ino)
	if err != nil {
		return wInode{}, err
	}
	in.raw = append([]byte(nil), in.raw...)
	return wInode{in}, nil
}

// storeInode checksums the raw inode, writes it into its table block and
// refreshes the reader's caches.
func (w *Writer) storeInode(in wInode) error {
	f := w.f
	raw := in.raw
	if f.hasCsum() {
		in.csumSeed = crc32cU32(crc32cU32(f.csumSeed, in.Ino), binary.LittleEndian.Uint32(raw[inoGeneration:]))
		c, _ := inodeCsum(in.csumSeed, raw, in.extra)
		binary.LittleEndian.PutUint16(raw[inoCsumLo:], uint16(c))
		if len(raw) > 128 && 128+int(in.extra) >= 0x84 {
			binary.LittleEndian.PutUint16(raw[inoCsumHi:], uint16(c>>16))
		}
	}
	g, idx := (in.Ino-1)/f.sb.inodesPerGroup, (in.Ino-1)%f.sb.inodesPerGroup
	off := uint64(idx) * uint64(f.sb.inodeSize)
	blk := f.groups[g].inodeTable + off>>f.blockLog
	b, err := w.block(blk)
	if err != nil {
		return fmt.Errorf("ext4: inode %d: %w", in.Ino, err)
	}
	copy(b[off&uint64(f.blockSize-1):], raw)
	if err := w.writeBlock(blk, b); err != nil {
		return err
	}
	parsed, err := f.parseInode(in.Ino, append([]byte(nil), raw...))
	if err != nil {
		return fmt.Errorf("ext4: inode %d: re-reading what was written: %w", in.Ino, err)
	}
	f.inodes.put(in.Ino, parsed)
	*in.Inode = *parsed
	in.raw = raw
	return nil
}

// newInode builds a fresh in-memory inode; the caller sets its content and
// stores it.
func (w *Writer) newInode(ino uint32, mode uint16, uid, gid uint32) wInode {
	f := w.f
	raw := make([]byte, f.sb.inodeSize)
	in := wInode{&Inode{Ino: ino, raw: raw}}
	le := binary.LittleEndian
	if len(raw) > 128 {
		in.extra = uint16(min(32, len(raw)-128))
		le.PutUint16(raw[inoExtraIsize:], in.extra)
	}
	gen := rand.Uint32()
	le.PutUint32(raw[inoGeneration:], gen)
	in.Generation = gen
	if f.hasCsum() {
		in.csumSeed = crc32cU32(crc32cU32(f.csumSeed, ino), gen)
	}
	in.setMode(mode)
	in.setOwner(uid, gid)
	in.setLinks(1)
	now := w.now()
	in.setTime(inoAtime, inoAtimeExtra, now)
	in.setTime(inoCtime, inoCtimeExtra, now)
	in.setTime(inoMtime, inoMtimeExtra, now)
	in.setTime(inoCrtime, inoCrtimeExtra, now)
	return in
}

func (in wInode) setMode(mode uint16) {
	binary.LittleEndian.PutUint16(in.raw[inoMode:], mode)
	in.Mode = mode
}

func (in wInode) setOwner(uid, gid uint32) {
	le := binary.LittleEndian
	le.PutUint16(in.raw[inoUIDLo:], uint16(uid))
	le.PutUint16(in.raw[inoUIDHi:], uint16(uid>>16))
	le.PutUint16(in.raw[inoGIDLo:], uint16(gid))
	le.PutUint16(in.raw[inoGIDHi:], uint16(gid>>16))
}

func (in wInode) setLinks(n uint16) {
	binary.LittleEndian.PutUint16(in.raw[inoLinks:], n)
	in.Links = n
}

func (in wInode) setFlags(fl uint32) {
	binary.LittleEndian.PutUint32(in.raw[inoFlags:], fl)
	in.Flags = fl
}

func (in wInode) setSize(size uint64) {
	le := binary.LittleEndian
	le.PutUint32(in.raw[inoSizeLo:], uint32(size))
	le.PutUint32(in.raw[inoSizeHi:], uint32(size>>32))
	in.Size = size
}

// setBlocks stores i_blocks given in filesystem blocks (huge_file's block
// units are never needed below 2^32 sectors... of 512 bytes ×2^48).
func (in wInode) setBlocks(blocks uint64, blockLog uint32) {
	sectors := blocks << (blockLog - 9)
	le := binary.LittleEndian
	le.PutUint32(in.raw[inoBlocksLo:], uint32(sectors))
	le.PutUint16(in.raw[inoBlocksHi:], uint16(sectors>>32))
	in.Blocks = sectors
}

// setTime encodes t like the kernel's ext4_encode_extra_time: 32 signed
// seconds, and in the extra field two epoch bits and the nanoseconds.
func (in wInode) setTime(secOff, extraOff int, t time.Time) {
	le := binary.LittleEndian
	sec := t.Unix()
	if in.fits(extraOff) {
		le.PutUint32(in.raw[secOff:], uint32(sec))
		epoch := uint32((sec-int64(int32(sec)))>>32) & 3
		le.PutUint32(in.raw[extraOff:], epoch|uint32(t.Nanosecond())<<2)
		return
	}
	if extraOff == inoCrtimeExtra && !in.fits(inoCrtime) {
		return // no creation time field at all
	}
	le.PutUint32(in.raw[secOff:], uint32(int32(max(min(sec, 1<<31-1), -1<<31))))
}

// touch sets ctime and mtime (a content change) or ctime alone.
func (w *Writer) touch(in wInode, mtime bool) {
	now := w.now()
	in.setTime(inoCtime, inoCtimeExtra, now)
	if mtime {
		in.setTime(inoMtime, inoMtimeExtra, now)
	}
}
