package ext4

import (
	"encoding/binary"
	"fmt"
)

// The jbd2 journal, as the kernel's Documentation/filesystems/ext4/journal.rst
// and fs/jbd2/recovery.c define it. Every journal field is big-endian.

const (
	jbd2Magic = 0xC03B3998

	jBlockDescriptor = 1
	jBlockCommit     = 2
	jBlockSuperV1    = 3
	jBlockSuperV2    = 4
	jBlockRevoke     = 5

	jIncompatRevoke      = 0x1
	jIncompat64bit       = 0x2
	jIncompatAsyncCommit = 0x4
	jIncompatCsumV2      = 0x8
	jIncompatCsumV3      = 0x10
	jIncompatFastCommit  = 0x20
	jIncompatKnown       = jIncompatRevoke | jIncompat64bit | jIncompatAsyncCommit | jIncompatCsumV2 | jIncompatCsumV3

	jTagEscape   = 0x1
	jTagSameUUID = 0x2
	jTagLast     = 0x8

	jCsumCRC32C      = 4
	jSuperblockBytes = 1024
)

var be = binary.BigEndian

// journalSuper is the decoded journal superblock.
type journalSuper struct {
	blockSize uint32
	maxLen    uint32 // blocks in the journal
	first     uint32 // first log block
	sequence  uint32 // first transaction expected in the log
	start     uint32 // log block of that transaction; 0: nothing to recover
	errno     int32
	incompat  uint32
	uuid      [16]byte
	csumSeed  uint32 // crc32c(~0, uuid), for the checksum features
}

func (j *journalSuper) csum() bool { return j.incompat&(jIncompatCsumV2|jIncompatCsumV3) != 0 }

// parseJournalSuper checks a journal superblock against the filesystem's
// block size and the journal's size in blocks.
func parseJournalSuper(b []byte, fsBlockSize, journalBlocks uint32) (*journalSuper, error) {
	if len(b) < jSuperblockBytes {
		return nil, fmt.Errorf("ext4: journal superblock of %d bytes is truncated: %w", len(b), ErrCorrupt)
	}
	if m := be.Uint32(b); m != jbd2Magic {
		return nil, fmt.Errorf("ext4: journal superblock has a bad magic %#x: %w", m, ErrCorrupt)
	}
	j := &journalSuper{
		blockSize: be.Uint32(b[0xC:]),
		maxLen:    be.Uint32(b[0x10:]),
		first:     be.Uint32(b[0x14:]),
		sequence:  be.Uint32(b[0x18:]),
		start:     be.Uint32(b[0x1C:]),
		errno:     int32(be.Uint32(b[0x20:])),
	}
	switch t := be.Uint32(b[4:]); t {
	case jBlockSuperV1:
	case jBlockSuperV2:
		j.incompat = be.Uint32(b[0x28:])
		copy(j.uuid[:], b[0x30:0x40])
	default:
		return nil, fmt.Errorf("ext4: journal superblock has block type %d (want 3 or 4): %w", t, ErrCorrupt)
	}
	if j.blockSize != fsBlockSize {
		return nil, fmt.Errorf("ext4: journal block size %d differs from the filesystem's %d: %w", j.blockSize, fsBlockSize, ErrCorrupt)
	}
	if j.maxLen > journalBlocks || j.maxLen < 2 || j.first == 0 || j.first >= j.maxLen {
		return nil, fmt.Errorf("ext4: journal geometry (first %d, length %d) does not fit its %d blocks: %w", j.first, j.maxLen, journalBlocks, ErrCorrupt)
	}
	if j.start != 0 && (j.start < j.first || j.start >= j.maxLen) {
		return nil, fmt.Errorf("ext4: journal log start %d is outside %d..%d: %w", j.start, j.first, j.maxLen-1, ErrCorrupt)
	}
	if bad := j.incompat &^ jIncompatKnown; bad != 0 {
		name := fmt.Sprintf("%#x", bad)
		if bad&jIncompatFastCommit != 0 {
			name = "fast_commit"
		}
		return nil, fmt.Errorf("ext4: the journal uses feature %s, which recovery does not implement: %w", name, ErrUnsupported)
	}
	if j.csum() {
		if b[0x50] != jCsumCRC32C {
			return nil, fmt.Errorf("ext4: journal checksum type %d (want 4, crc32c): %w", b[0x50], ErrUnsupported)
		}
		if c, stored := journalSuperCsum(b), be.Uint32(b[0xFC:]); c != stored {
			return nil, fmt.Errorf("ext4: journal superblock checksum mismatch (stored %#x, computed %#x): %w", stored, c, ErrCorrupt)
		}
		j.csumSeed = crc32cRaw(^uint32(0), j.uuid[:])
	}
	return j, nil
}

func journalSuperCsum(b []byte) uint32 {
	c := crc32cRaw(^uint32(0), b[:0xFC])
	c = crc32cRaw(c, []byte{0, 0, 0, 0})
	return crc32cRaw(c, b[0x100:jSuperblockBytes])
}

// blockTailCsum is the checksum of a descriptor or revoke block (over the
// block with its last four bytes as zero) or, with off 0x10, of a commit block.
func (j *journalSuper) blockCsum(b []byte, off int) uint32 {
	c := crc32cRaw(j.csumSeed, b[:off])
	c = crc32cRaw(c, []byte{0, 0, 0, 0})
	return crc32cRaw(c, b[off+4:])
}

func (j *journalSuper) tagBytes() int {
	if j.incompat&jIncompatCsumV3 != 0 {
		return 16
	}
	n := 12
	if j.incompat&jIncompatCsumV2 != 0 {
		n += 2
	}
	if j.incompat&jIncompat64bit == 0 {
		n -= 4
	}
	return n
}

// replayBlock is one logged copy of a filesystem block.
type replayBlock struct {
	fsBlock uint64
	logPos  uint32 // where its data lies in the log
	seq     uint32
	escaped bool // its first four bytes were the journal magic
}

// journalPlan is what recovery will do: the committed blocks in log order,
// the revocations, and the transaction after the last committed one.
type journalPlan struct {
	blocks  []replayBlock
	revoked map[uint64]uint32 // block → latest transaction revoking it
	nextSeq uint32
	commits int
}

// scanJournal reads the log from j.start and returns the plan for every
// committed transaction. read returns log block i (0 ≤ i < j.maxLen) in a
// buffer of its own. A
// transaction whose descriptor, revoke or data checksums fail, or that
// names a block outside the filesystem's fsBlocks, makes the journal
// refused if it committed; the log ends at the first block that does not
// continue the expected transaction.
func scanJournal(j *journalSuper, read func(uint32) ([]byte, error), fsBlocks uint64) (*journalPlan, error) {
	plan := &journalPlan{revoked: map[uint64]uint32{}, nextSeq: j.sequence}
	if j.start == 0 {
		return plan, nil
	}
	pos, seq := j.start, j.sequence
	next := func(p uint32) uint32 {
		if p+1 >= j.maxLen {
			return j.first
		}
		return p + 1
	}
	var pending []replayBlock // the open transaction's blocks
	pendingRevokes := map[uint64]bool{}
	var damage error // the first problem in the open transaction
	bs := int(j.blockSize)
	tail := 0
	if j.csum() {
		tail = 4
	}
	for steps := uint32(0); steps < j.maxLen; steps++ {
		b, err := read(pos)
		if err != nil {
			return nil, fmt.Errorf("ext4: reading journal block %d: %w", pos, err)
		}
		if be.Uint32(b) != jbd2Magic || be.Uint32(b[8:]) != seq {
			break // end of the log
		}
		typ := be.Uint32(b[4:])
		switch typ {
		case jBlockDescriptor:
			if j.csum() && j.blockCsum(b, bs-4) != be.Uint32(b[bs-4:]) && damage == nil {
				damage = fmt.Errorf("descriptor block at log position %d has a bad checksum", pos)
			}
			tb := j.tagBytes()
			for off := 12; ; {
				if off+tb > bs-tail {
					if damage == nil {
						damage = fmt.Errorf("descriptor block at log position %d runs past its end without a last tag", pos)
					}
					break
				}
				t := b[off:]
				var blk uint64
				var flags uint32
				if j.incompat&jIncompatCsumV3 != 0 {
					blk, flags = uint64(be.Uint32(t)), be.Uint32(t[4:])
					if j.incompat&jIncompat64bit != 0 {
						blk |= uint64(be.Uint32(t[8:])) << 32
					}
				} else {
					blk, flags = uint64(be.Uint32(t)), uint32(be.Uint16(t[6:]))
					if j.incompat&jIncompat64bit != 0 {
						blk |= uint64(be.Uint32(t[8:])) << 32
					}
				}
				off += tb
				if flags&jTagSameUUID == 0 {
					off += 16
				}
				steps++
				if steps >= j.maxLen {
					return nil, fmt.Errorf("ext4: journal transaction %d is longer than the journal: %w", seq, ErrCorrupt)
				}
				pos = next(pos)
				if blk >= fsBlocks && damage == nil {
					damage = fmt.Errorf("transaction logs block %d, beyond the filesystem's %d blocks", blk, fsBlocks)
				}
				if j.csum() {
					data, err := read(pos)
					if err != nil {
						return nil, fmt.Errorf("ext4: reading journal block %d: %w", pos, err)
					}
					if !j.tagCsumOK(t, seq, data) && damage == nil {
						damage = fmt.Errorf("logged copy of block %d at log position %d has a bad checksum", blk, pos)
					}
				}
				pending = append(pending, replayBlock{fsBlock: blk, logPos: pos, seq: seq, escaped: flags&jTagEscape != 0})
				if flags&jTagLast != 0 {
					break
				}
			}
		case jBlockRevoke:
			if j.csum() && j.blockCsum(b, bs-4) != be.Uint32(b[bs-4:]) && damage == nil {
				damage = fmt.Errorf("revoke block at log position %d has a bad checksum", pos)
			}
			rec := 4
			if j.incompat&jIncompat64bit != 0 {
				rec = 8
			}
			count := int(be.Uint32(b[12:]))
			if count < 16 || count > bs-tail {
				if damage == nil {
					damage = fmt.Errorf("revoke block at log position %d claims %d bytes", pos, count)
				}
				count = 16
			}
			for off := 16; off+rec <= count; off += rec {
				blk := uint64(be.Uint32(b[off:]))
				if rec == 8 {
					blk = be.Uint64(b[off:])
				}
				pendingRevokes[blk] = true
			}
		case jBlockCommit:
			if j.csum() && j.blockCsum(b, 0x10) != be.Uint32(b[0x10:]) {
				return nil, fmt.Errorf("ext4: journal transaction %d's commit block has a bad checksum (run e2fsck -f): %w", seq, ErrCorrupt)
			}
			if damage != nil {
				return nil, fmt.Errorf("ext4: journal transaction %d is committed but damaged: %v (run e2fsck -f): %w", seq, damage, ErrCorrupt)
			}
			plan.blocks = append(plan.blocks, pending...)
			for blk := range pendingRevokes {
				plan.revoked[blk] = seq
			}
			plan.commits++
			pending, pendingRevokes = nil, map[uint64]bool{}
			seq++
			plan.nextSeq = seq
		default:
			return nil, fmt.Errorf("ext4: journal block at log position %d has unknown type %d: %w", pos, typ, ErrCorrupt)
		}
		pos = next(pos)
	}
	return plan, nil
}

func (j *journalSuper) tagCsumOK(tag []byte, seq uint32, data []byte) bool {
	var s [4]byte
	be.PutUint32(s[:], seq)
	c := crc32cRaw(crc32cRaw(j.csumSeed, s[:]), data)
	if j.incompat&jIncompatCsumV3 != 0 {
		return be.Uint32(tag[12:]) == c
	}
	return be.Uint16(tag[4:]) == uint16(c)
}

// apply writes every committed, unrevoked block to its home through write,
// in log order so later copies win.
func (p *journalPlan) apply(read func(uint32) ([]byte, error), write func(blk uint64, b []byte) error) error {
	for _, rb := range p.blocks {
		if seq, ok := p.revoked[rb.fsBlock]; ok && int32(seq-rb.seq) >= 0 {
			continue
		}
		data, err := read(rb.logPos)
		if err != nil {
			return fmt.Errorf("ext4: reading journal block %d: %w", rb.logPos, err)
		}
		data = append([]byte(nil), data...)
		if rb.escaped {
			be.PutUint32(data, jbd2Magic)
		}
		if err := write(rb.fsBlock, data); err != nil {
			return fmt.Errorf("ext4: replaying block %d: %w", rb.fsBlock, err)
		}
	}
	return nil
}

// journalArea is where the internal journal's blocks lie on the volume.
type journalArea struct {
	runs []run
	n    uint32 // blocks in the journal
}

// mapJournal maps the journal inode.
func (f *FS) mapJournal() (*journalArea, error) {
	jin, err := f.Inode(f.sb.journalInum)
	if err != nil {
		return nil, fmt.Errorf("ext4: journal inode: %w", err)
	}
	n := jin.Size >> f.blockLog
	if n < 2 || n > f.sb.blocksCount {
		return nil, fmt.Errorf("ext4: journal inode of %d bytes is not a journal: %w", jin.Size, ErrCorrupt)
	}
	runs, err := f.mapBlocks(jin, 0, n)
	if err != nil {
		return nil, fmt.Errorf("ext4: mapping the journal: %w", err)
	}
	return &journalArea{runs: runs, n: uint32(n)}, nil
}

// block maps journal block i to its volume block.
func (a *journalArea) block(i uint32) (uint64, error) {
	for _, r := range a.runs {
		if uint64(i) >= r.lblk && uint64(i) < r.lblk+r.count && !r.zero {
			return r.pblk + uint64(i) - r.lblk, nil
		}
	}
	return 0, fmt.Errorf("ext4: journal block %d is a hole: %w", i, ErrCorrupt)
}
