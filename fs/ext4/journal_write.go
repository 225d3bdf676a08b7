package ext4

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"syscall"
)

// With has_journal the writer works like jbd2 in ordered mode: changed
// metadata blocks collect in memory (the open transaction) while file data
// goes straight to its blocks; a commit appends the transaction to the log
// (descriptor blocks with the journal's tag format and checksums, the block
// copies), makes it and the data durable, then writes the commit block and
// makes that durable. Committed blocks stay in memory until a checkpoint
// writes them home and empties the log: when the log runs short, on
// Checkpoint and on Close. A crash before a commit block is durable loses
// that transaction whole; recovery (ours or the kernel's) replays every
// committed one. Blocks freed in the open transaction, and blocks with a
// logged copy not yet checkpointed, are not given out for data, so a replay
// never overwrites file data with old metadata (what revoke records do in
// the kernel).

// dirtyOverlay shows the reader the open transaction's blocks over the
// device, so lookups see what the writer has changed but not yet committed.
type dirtyOverlay struct {
	dev      io.ReaderAt
	blockLog uint32            // 0 until the superblock is known
	dirty    map[uint64][]byte // the open transaction
	logged   map[uint64][]byte // committed, not yet home
}

func (o *dirtyOverlay) ReadAt(p []byte, off int64) (int, error) {
	n, err := o.dev.ReadAt(p, off)
	if len(o.dirty)+len(o.logged) == 0 || o.blockLog == 0 {
		return n, err
	}
	bs := int64(1) << o.blockLog
	for blk := off >> o.blockLog; blk<<o.blockLog < off+int64(n); blk++ {
		b, ok := o.dirty[uint64(blk)]
		if !ok {
			b, ok = o.logged[uint64(blk)]
		}
		if !ok {
			continue
		}
		s, e := max(off, blk<<o.blockLog), min(off+int64(n), (blk+1)*bs)
		copy(p[s-off:e-off], b[s-blk<<o.blockLog:e-blk<<o.blockLog])
	}
	return n, err
}

// journalWriter is the log the writer commits to.
type journalWriter struct {
	j     *journalSuper
	raw   []byte // the journal superblock as on disk
	area  *journalArea
	seq   uint32 // the next transaction's id
	head  uint32 // the next free log block; 0 while the log is empty
	limit int    // commit once this many blocks are dirty
}

// logBlock maps log block i to its volume block.
// block returns the transaction's or the log's copy of blk, if any.
func (o *dirtyOverlay) block(blk uint64) ([]byte, bool) {
	if b, ok := o.dirty[blk]; ok {
		return b, true
	}
	b, ok := o.logged[blk]
	return b, ok
}

func (jw *journalWriter) logBlock(i uint32) (uint64, error) { return jw.area.block(i) }

// openJournal prepares the (already recovered, empty) internal journal.
func (w *Writer) openJournal() error {
	f := w.f
	area, err := f.mapJournal()
	if err != nil {
		return err
	}
	jw := &journalWriter{area: area}
	p0, err := jw.logBlock(0)
	if err != nil {
		return err
	}
	jw.raw = make([]byte, f.blockSize)
	if err := f.readFull(jw.raw, int64(p0)<<f.blockLog); err != nil {
		return fmt.Errorf("ext4: reading the journal superblock: %w", err)
	}
	if jw.j, err = parseJournalSuper(jw.raw, f.blockSize, area.n); err != nil {
		return err
	}
	if jw.j.errno != 0 {
		return fmt.Errorf("ext4: the journal records error %d from the kernel; run e2fsck -f on the image: %w", jw.j.errno, ErrCorrupt)
	}
	if jw.j.start != 0 {
		return fmt.Errorf("ext4: the journal holds transactions but the filesystem is not marked for recovery; run e2fsck -f on the image: %w", ErrCorrupt)
	}
	jw.seq = jw.j.sequence
	jw.limit = int(jw.j.maxLen-jw.j.first) / 4
	w.jw = jw
	return nil
}

// tagsPerDescriptor is how many blocks one descriptor block can describe
// (the first tag carries the 16-byte journal UUID).
func (jw *journalWriter) tagsPerDescriptor() int {
	room := int(jw.j.blockSize) - 12 - 16
	if jw.j.csum() {
		room -= 4
	}
	return room / jw.j.tagBytes()
}

// commit makes the open transaction durable in the log. Without a journal
// it only flushes. The caller holds both locks.
func (w *Writer) commit() error {
	blks, err := w.prepareCommit()
	if err != nil || len(blks) == 0 {
		return err
	}
	if err := w.logTransactions(blks); err != nil {
		return err
	}
	if len(blks) <= w.jwChunk() {
		w.finishCommit(blks)
	}
	return nil
}

// jwChunk is the most blocks one transaction can carry: the log with its
// descriptors and commit block.
func (w *Writer) jwChunk() int {
	if w.jw == nil {
		return 0
	}
	per := w.jw.tagsPerDescriptor()
	room := int(w.jw.j.maxLen-w.jw.j.first) - 1
	return room * per / (per + 1)
}

// logNeed is the log blocks a transaction of n blocks takes.
func (w *Writer) logNeed(n int) uint32 {
	per := w.jw.tagsPerDescriptor()
	return uint32(n + (n+per-1)/per + 1)
}

// prepareCommit flushes the descriptors and superblock into the open
// transaction and returns its blocks, sorted, having made room in the log
// (a checkpoint) if it fits there at all. The superblock copy carries
// needs_recovery, so no crash during a later checkpoint finds the flag
// gone too early. Under both locks.
func (w *Writer) prepareCommit() ([]uint64, error) {
	// Overwrites in flight finish first: the blocks this commit frees for
	// reuse may be theirs.
	w.dataInFlight.Wait()
	if w.jw != nil {
		if err := w.dev.failed(); err != nil {
			return nil, err
		}
	}
	if err := w.flushMeta(); err != nil {
		return nil, err
	}
	if w.jw == nil || len(w.dirty) == 0 {
		return nil, nil
	}
	f, jw := w.f, w.jw
	blks := make([]uint64, 0, len(w.dirty))
	for b := range w.dirty {
		blks = append(blks, b)
	}
	slices.Sort(blks)
	sbBlk := uint64(superblockOffset >> f.blockLog)
	if b, ok := w.dirty[sbBlk]; ok {
		sb := b[superblockOffset-int(sbBlk<<f.blockLog):][:superblockSize]
		le := binary.LittleEndian
		le.PutUint32(sb[0x60:], le.Uint32(sb[0x60:])|incompatRecover)
		if f.hasCsum() {
			le.PutUint32(sb[0x3FC:], crc32cRaw(^uint32(0), sb[:0x3FC]))
		}
	}
	if n := len(blks); n <= w.jwChunk() && jw.head != 0 && jw.head+w.logNeed(n) > jw.j.maxLen {
		if err := w.checkpoint(); err != nil { // the log is short: empty it first
			return nil, err
		}
	}
	return blks, nil
}

// logTransactions writes blks (the open transaction) to the log and
// commits it. A transaction that fits the log (prepareCommit made room)
// only does device I/O and touches no state readers see, so Sync runs it
// unlocked. Operations commit at their end once a quarter of the log is
// used, so only one changing more blocks than the whole log is split,
// each piece atomic, under the locks (it checkpoints between pieces and
// finishes the commit itself).
func (w *Writer) logTransactions(blks []uint64) error {
	chunk := w.jwChunk()
	if len(blks) <= chunk {
		return w.writeTransaction(blks)
	}
	for len(blks) > 0 {
		n := min(chunk, len(blks))
		if w.jw.head != 0 && w.jw.head+w.logNeed(n) > w.jw.j.maxLen {
			if err := w.checkpoint(); err != nil {
				return err
			}
		}
		if err := w.writeTransaction(blks[:n]); err != nil {
			return err
		}
		w.finishCommit(blks[:n])
		blks = blks[n:]
	}
	return nil
}

// finishCommit moves committed blocks from the open transaction to the
// checkpoint list. Under both locks.
func (w *Writer) finishCommit(blks []uint64) {
	for _, b := range blks {
		w.logged[b] = w.dirty[b]
		delete(w.dirty, b)
	}
	if len(w.dirty) == 0 {
		clear(w.pendingFree)
	}
}

// checkpoint writes every committed block home and empties the log.
// Under both locks.
func (w *Writer) checkpoint() error {
	if w.jw == nil || len(w.logged) == 0 {
		return nil
	}
	if err := w.checkpointIO(); err != nil {
		return err
	}
	w.checkpointDone()
	return nil
}

// checkpointIO is the device side of a checkpoint: it reads the committed
// blocks and writes, so Checkpoint runs it without the reader lock. A
// retryable failure (an outage) leaves the committed blocks to the next
// checkpoint, which writes them all again: the log still holds them until
// the journal superblock says it is empty.
func (w *Writer) checkpointIO() error {
	for blk, b := range w.logged {
		if _, err := w.dev.retryableWriteAt(b, int64(blk)<<w.f.blockLog); err != nil {
			return fmt.Errorf("ext4: checkpointing block %d: %w", blk, err)
		}
	}
	if err := w.dev.retryableSync(); err != nil {
		return fmt.Errorf("ext4: checkpoint: %w", err)
	}
	// Every logged block is home now, so the log may start again whatever
	// happens next: the next transaction rewrites the journal superblock
	// and needs_recovery, and a replay of the old log rewrites the same
	// blocks.
	w.jw.head = 0
	if err := w.writeJournalSuper(0, w.jw.seq); err != nil {
		return err
	}
	return w.setRecoverFlag(false)
}

// checkpointDone forgets the checkpointed blocks, which are now home. The
// cache drops its older versions of them; it does not take the log's
// buffers, which an operation that committed midway (allocBlocks) may
// still be changing.
func (w *Writer) checkpointDone() {
	for blk := range w.logged {
		w.f.blocks.remove(blk)
	}
	clear(w.logged)
}

// writeTransaction appends the dirty blocks blks to the log and commits
// them. A failure before the commit block leaves the log as it was, so
// the next commit writes the transaction again.
func (w *Writer) writeTransaction(blks []uint64) (err error) {
	f, jw, j := w.f, w.jw, w.jw.j
	bs := int(f.blockSize)
	// The filesystem is marked as needing recovery while the log is used.
	first := jw.head == 0
	if first {
		defer func() {
			if err != nil && jw.head == j.first {
				jw.head = 0 // not started: the retry writes the journal superblock again
			}
		}()
		if err := w.setRecoverFlag(true); err != nil {
			return err
		}
		jw.head = j.first
	}
	pos := jw.head
	writeLog := func(b []byte) error {
		p, err := jw.logBlock(pos)
		if err != nil {
			return err
		}
		if _, err := w.dev.retryableWriteAt(b, int64(p)<<f.blockLog); err != nil {
			return fmt.Errorf("ext4: writing journal block %d: %w", pos, err)
		}
		pos++
		return nil
	}
	header := func(typ uint32) []byte {
		b := make([]byte, bs)
		be.PutUint32(b, jbd2Magic)
		be.PutUint32(b[4:], typ)
		be.PutUint32(b[8:], jw.seq)
		return b
	}
	per := jw.tagsPerDescriptor()
	tb := j.tagBytes()
	for s := 0; s < len(blks); s += per {
		group := blks[s:min(s+per, len(blks))]
		desc := header(jBlockDescriptor)
		copies := make([][]byte, len(group))
		off := 12
		for i, blk := range group {
			data := w.dirty[blk] // only read while the log is written
			var flags uint32
			if be.Uint32(data) == jbd2Magic {
				// The log's copy is escaped; the block itself stays.
				data = bytes.Clone(data)
				flags |= jTagEscape
				be.PutUint32(data, 0)
			}
			if i > 0 {
				flags |= jTagSameUUID
			}
			if i == len(group)-1 {
				flags |= jTagLast
			}
			t := desc[off:]
			be.PutUint32(t, uint32(blk))
			var csum uint32
			if j.csum() {
				var sq [4]byte
				be.PutUint32(sq[:], jw.seq)
				csum = crc32cRaw(crc32cRaw(j.csumSeed, sq[:]), data)
			}
			if j.incompat&jIncompatCsumV3 != 0 {
				be.PutUint32(t[4:], flags)
				be.PutUint32(t[8:], uint32(blk>>32))
				be.PutUint32(t[12:], csum)
			} else {
				be.PutUint16(t[4:], uint16(csum))
				be.PutUint16(t[6:], uint16(flags))
				if j.incompat&jIncompat64bit != 0 {
					be.PutUint32(t[8:], uint32(blk>>32))
				}
			}
			off += tb
			if i == 0 {
				copy(desc[off:], j.uuid[:])
				off += 16
			}
			copies[i] = data
		}
		if j.csum() {
			be.PutUint32(desc[bs-4:], j.blockCsum(desc, bs-4))
		}
		if err := writeLog(desc); err != nil {
			return err
		}
		for _, c := range copies {
			if err := writeLog(c); err != nil {
				return err
			}
		}
	}
	// The log start in the journal superblock (for the first transaction
	// since the log was emptied), then a barrier: data, descriptors and
	// copies are durable before the commit block is.
	if first {
		if err := w.writeJournalSuper(j.first, jw.seq); err != nil {
			return err
		}
	}
	if err := w.dev.retryableSync(); err != nil {
		return fmt.Errorf("ext4: journal barrier: %w", err)
	}
	commit := header(jBlockCommit)
	now := w.now()
	be.PutUint64(commit[0x30:], uint64(now.Unix()))
	be.PutUint32(commit[0x38:], uint32(now.Nanosecond()))
	if j.csum() {
		be.PutUint32(commit[0x10:], j.blockCsum(commit, 0x10))
	}
	if err := writeLog(commit); err != nil {
		return err
	}
	if err := w.dev.retryableSync(); err != nil {
		if !errors.Is(err, ErrSyncRetryable) {
			return fmt.Errorf("ext4: committing transaction %d: %w", jw.seq, err)
		}
		// The device keeps the commit block: the transaction is committed
		// but not yet durable. The log moves past it while its blocks stay
		// in the open transaction (and blocks it freed stay unusable), so
		// the next commit logs them again after it; a replay with or
		// without this one is consistent.
		jw.head = pos
		jw.seq++
		return fmt.Errorf("ext4: transaction %d is committed but not yet durable; the next sync retries: %w (%w)", jw.seq-1, err, syscall.EIO)
	}
	jw.head = pos
	jw.seq++
	return nil
}

func (w *Writer) writeJournalSuper(start, seq uint32) error {
	jw := w.jw
	be.PutUint32(jw.raw[0x18:], seq)
	be.PutUint32(jw.raw[0x1C:], start)
	if jw.j.csum() {
		be.PutUint32(jw.raw[0xFC:], journalSuperCsum(jw.raw))
	}
	p0, err := jw.logBlock(0)
	if err != nil {
		return err
	}
	if _, err := w.dev.retryableWriteAt(jw.raw, int64(p0)<<w.f.blockLog); err != nil {
		return fmt.Errorf("ext4: writing the journal superblock: %w", err)
	}
	return nil
}

// setRecoverFlag sets or clears needs_recovery in the superblock on disk
// (not in the transaction: it describes the log, as the kernel's does).
func (w *Writer) setRecoverFlag(on bool) error {
	le := binary.LittleEndian
	sb := make([]byte, superblockSize)
	if _, err := w.dev.ReadAt(sb, superblockOffset); err != nil {
		return fmt.Errorf("ext4: reading superblock: %w", err)
	}
	v := le.Uint32(sb[0x60:]) &^ incompatRecover
	if on {
		v |= incompatRecover
	}
	le.PutUint32(sb[0x60:], v)
	if w.f.hasCsum() {
		le.PutUint32(sb[0x3FC:], crc32cRaw(^uint32(0), sb[:0x3FC]))
	}
	if _, err := w.dev.retryableWriteAt(sb, superblockOffset); err != nil {
		return fmt.Errorf("ext4: writing superblock: %w", err)
	}
	return nil
}
