package ext4

import (
	"encoding/binary"
	"fmt"
	"io"
)

// sbOverlay serves a volume with a replacement primary superblock, so the
// reader can open a filesystem whose needs_recovery bit it would refuse,
// just to find the journal.
type sbOverlay struct {
	r  io.ReaderAt
	sb []byte
}

func (o sbOverlay) ReadAt(p []byte, off int64) (int, error) {
	n, err := o.r.ReadAt(p, off)
	// Copy the overlapping part of [superblockOffset, +superblockSize).
	s, e := max(off, superblockOffset), min(off+int64(n), superblockOffset+superblockSize)
	if s < e {
		copy(p[s-off:e-off], o.sb[s-superblockOffset:e-superblockOffset])
	}
	return n, err
}

// recoverJournal replays the internal journal of the filesystem on dev if
// its superblock says it needs recovery, then clears needs_recovery and
// marks the journal empty. It changes nothing unless the whole log checks
// out (see scanJournal). It returns the number of transactions replayed.
func recoverJournal(dev Device, size int64) (int, error) {
	le := binary.LittleEndian
	sb := make([]byte, superblockSize)
	if _, err := dev.ReadAt(sb, superblockOffset); err != nil {
		return 0, fmt.Errorf("ext4: reading superblock: %w", err)
	}
	if le.Uint16(sb[0x38:]) != ext4Magic || le.Uint32(sb[0x60:])&incompatRecover == 0 {
		return 0, nil // not ext4 (Open says so) or nothing to recover
	}
	if le.Uint32(sb[0x60:])&incompatJournalDev != 0 || le.Uint32(sb[0x5C:])&compatHasJournal == 0 || le.Uint32(sb[0xE0:]) == 0 {
		return 0, fmt.Errorf("ext4: the filesystem needs recovery from a journal that is not internal (external journal device?): %w", ErrUnsupported)
	}
	clean := clearRecover(sb)
	f, err := Open(sbOverlay{dev, clean}, size)
	if err != nil {
		return 0, err
	}
	area, err := f.mapJournal()
	if err != nil {
		return 0, err
	}
	phys := area.block
	read := func(i uint32) ([]byte, error) {
		p, err := phys(i)
		if err != nil {
			return nil, err
		}
		buf := make([]byte, f.blockSize)
		if err := f.readFull(buf, int64(p)<<f.blockLog); err != nil {
			return nil, err
		}
		return buf, nil
	}
	jb, err := read(0)
	if err != nil {
		return 0, fmt.Errorf("ext4: reading the journal superblock: %w", err)
	}
	jsbRaw := append([]byte(nil), jb...)
	j, err := parseJournalSuper(jsbRaw, f.blockSize, area.n)
	if err != nil {
		return 0, err
	}
	if j.errno != 0 {
		return 0, fmt.Errorf("ext4: the journal records error %d from the kernel; run e2fsck -f on the image: %w", j.errno, ErrCorrupt)
	}
	plan, err := scanJournal(j, read, f.sb.blocksCount)
	if err != nil {
		return 0, err
	}
	err = plan.apply(read, func(blk uint64, b []byte) error {
		_, err := dev.WriteAt(b, int64(blk)<<f.blockLog)
		return err
	})
	if err != nil {
		return 0, err
	}
	if err := dev.Sync(); err != nil { // the homes before the log is emptied
		return 0, fmt.Errorf("ext4: syncing replayed blocks: %w", err)
	}
	// Empty the log: no start, the next transaction after the last replayed.
	be.PutUint32(jsbRaw[0x18:], plan.nextSeq)
	be.PutUint32(jsbRaw[0x1C:], 0)
	if j.csum() {
		be.PutUint32(jsbRaw[0xFC:], journalSuperCsum(jsbRaw))
	}
	p0, _ := phys(0)
	if _, err := dev.WriteAt(jsbRaw, int64(p0)<<f.blockLog); err != nil {
		return 0, fmt.Errorf("ext4: writing the journal superblock: %w", err)
	}
	// The replay may have rewritten the superblock itself: clear the flag
	// on what is there now.
	if _, err := dev.ReadAt(sb, superblockOffset); err != nil {
		return 0, fmt.Errorf("ext4: reading superblock: %w", err)
	}
	if _, err := dev.WriteAt(clearRecover(sb), superblockOffset); err != nil {
		return 0, fmt.Errorf("ext4: writing superblock: %w", err)
	}
	return plan.commits, dev.Sync()
}

// clearRecover returns a copy of a raw superblock without needs_recovery,
// re-checksummed when it has metadata_csum.
func clearRecover(sb []byte) []byte {
	le := binary.LittleEndian
	c := append([]byte(nil), sb...)
	le.PutUint32(c[0x60:], le.Uint32(c[0x60:])&^incompatRecover)
	if le.Uint32(c[0x64:])&roCompatMetadataCsum != 0 {
		le.PutUint32(c[0x3FC:], crc32cRaw(^uint32(0), c[:0x3FC]))
	}
	return c
}
