package ext4

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Device is a writable volume: what the reader needs plus writes and a
// durability barrier. *os.File is one; the page-blob volume will be another.
type Device interface {
	io.ReaderAt
	io.WriterAt
	// Sync returns once every completed WriteAt is durable.
	Sync() error
}

var _ Device = (*os.File)(nil)

// Features the writer keeps consistent. Anything else set in the superblock
// makes OpenWritable refuse, naming the feature: writing without maintaining
// it would leave a filesystem e2fsck rejects.
const (
	// has_journal: the writer commits through the internal journal and
	// recovers it. resize_inode, sparse_super2, stable_inodes and
	// orphan_file (orphans go on the older s_last_orphan list) are left
	// untouched, which is valid.
	writeCompat = compatHasJournal | compatExtAttr | 0x10 /* resize_inode */ | compatDirIndex |
		compatSparseSuper2 | 0x800 /* stable_inodes */ | 0x1000 /* orphan_file */
	writeIncompat = incompatFiletype | incompatExtents | incompat64bit | incompatFlexBG |
		incompatCsumSeed | incompatLargeDir
	writeRoCompat = roCompatSparseSuper | roCompatLargeFile | roCompatHugeFile | roCompatGdtCsum |
		roCompatDirNlink | 0x40 /* extra_isize */ | roCompatMetadataCsum

	roCompatLargeFile = 0x2
	roCompatDirNlink  = 0x20
)

// featureNames names the features the writer refuses, for the error message.
var featureNames = map[string]map[uint32]string{
	"compat": {0x1: "dir_prealloc", 0x2: "imagic_inodes", 0x400: "fast_commit"},
	"incompat": {incompatCompression: "compression", incompatRecover: "needs_recovery", incompatJournalDev: "journal_dev",
		incompatMetaBG: "meta_bg", incompatMMP: "mmp", incompatEAInode: "ea_inode", incompatDirData: "dirdata",
		incompatInlineData: "inline_data", incompatEncrypt: "encrypt", incompatCasefold: "casefold"},
	"ro_compat": {0x80: "snapshot", 0x100: "quota", roCompatBigalloc: "bigalloc", 0x800: "replica", 0x1000: "read-only",
		0x2000: "project", 0x4000: "shared_blocks", 0x8000: "verity", 0x10000: "orphan_present"},
}

// WritableFeatures lists, for documentation and error messages, the
// features a filesystem may have for OpenWritable to accept it.
const WritableFeatures = "has_journal (internal), ext_attr, resize_inode, dir_index, " +
	"sparse_super, sparse_super2, filetype, extent (required), 64bit, flex_bg, metadata_csum, metadata_csum_seed, " +
	"gdt_csum/uninit_bg, large_dir, large_file, huge_file, dir_nlink, extra_isize, stable_inodes, orphan_file (unused)"

// Writer changes an ext4 filesystem in place. Its changing methods are
// serialized; reads go through View, which runs alongside other reads but
// never alongside a change (the reader's group table and caches change).
//
// With a journal (has_journal), every operation's metadata joins a jbd2
// transaction that Sync commits (journal_write.go): a crash loses at most
// what was not synced, and leaves a filesystem that replays to consistency.
// Without one, metadata goes straight home and the filesystem is marked
// not clean until Close, so a crash sends it to e2fsck.
type Writer struct {
	changeMu changeLock // see lockChange
	mu       sync.RWMutex
	f        *FS
	dev      *trackedDevice // the volume; remembers its first error
	sb       []byte         // the primary superblock, 1024 bytes
	gdt      [][]byte       // descriptor blocks, by descriptor block number
	gdtD     map[uint32]bool
	sbD      bool
	now      func() time.Time // the clock for timestamps; tests pin it

	replayed int // journal transactions replayed at open

	jw          *journalWriter    // nil without a journal: writes go home directly
	dirty       map[uint64][]byte // the open transaction's metadata blocks
	logged      map[uint64][]byte // committed blocks not yet checkpointed home
	pendingFree map[uint64]bool   // blocks freed in it, not reusable before it commits
	holds       map[uint32]int    // open handles per inode (Hold, Release)
	blockHint   allocHints        // where block searches start, per group
	inodeHint   allocHints        // where inode searches start, per group

	unlockChange func() // unlockChangeLocks, as lockChange returns it

	// Overwrites outside the change lock (write_data.go).
	concurrentData bool           // the volume allows them
	dataLocks      inodeLocks     // per inode, taken before the change lock
	dataInFlight   sync.WaitGroup // added to under the change lock; commits wait
}

// ReplayedTransactions is the number of journal transactions that
// OpenWritable replayed because the filesystem needed recovery.
func (w *Writer) ReplayedTransactions() int { return w.replayed }

// OpenWritable opens the ext4 filesystem on dev (size bytes) for writing.
// A journal that needs recovery is replayed first (and refused, unchanged,
// if damaged), then the orphan list is emptied. It refuses, naming them,
// features the writer cannot maintain, and a filesystem marked with errors
// or damaged descriptors, saying which e2fsck to run.
func OpenWritable(dev Device, size int64) (w *Writer, err error) {
	if dev == nil {
		return nil, errors.New("ext4: nil device")
	}
	replayed, err := recoverJournal(dev, size)
	if err != nil {
		return nil, err
	}
	// The reader sees the volume through the open transaction.
	ov := &dirtyOverlay{dev: dev, dirty: map[uint64][]byte{}, logged: map[uint64][]byte{}}
	f, err := Open(ov, size)
	if err != nil {
		return nil, err
	}
	ov.blockLog = f.blockLog
	f.txBlock = ov.block
	sb := make([]byte, superblockSize)
	if err := f.readFull(sb, superblockOffset); err != nil {
		return nil, fmt.Errorf("ext4: reading superblock: %w", err)
	}
	if err := checkWritable(f, sb); err != nil {
		return nil, err
	}
	for g := range f.groups {
		if f.groups[g].csumErr != nil {
			return nil, fmt.Errorf("ext4: refusing to write a damaged filesystem (run e2fsck -f on it): %w", f.groups[g].csumErr)
		}
	}
	w = &Writer{f: f, dev: &trackedDevice{Device: dev}, sb: sb, gdtD: map[uint32]bool{}, now: time.Now, replayed: replayed,
		dirty: ov.dirty, logged: ov.logged, pendingFree: map[uint64]bool{}, holds: map[uint32]int{}}
	w.unlockChange = w.unlockChangeLocks
	w.changeMu = make(changeLock, 1)
	w.concurrentData = concurrentData(dev, f.blockSize)
	if f.compat(compatHasJournal) && f.sb.journalInum != 0 {
		if err := w.openJournal(); err != nil {
			return nil, err
		}
	}
	defer func() {
		if err == nil && binary.LittleEndian.Uint32(w.sb[sbLastOrphan:]) != 0 {
			err = w.processOrphans()
		}
		if err != nil {
			w = nil
		}
	}()
	perBlock := f.blockSize / f.descSize
	for nr := uint32(0); nr < (f.numGroups+perBlock-1)/perBlock; nr++ {
		b := make([]byte, f.blockSize)
		if err := f.readFull(b, int64(f.descBlock(nr))<<f.blockLog); err != nil {
			return nil, fmt.Errorf("ext4: reading group descriptor block %d: %w", nr, err)
		}
		w.gdt = append(w.gdt, b)
	}
	var freeBlocks, freeInodes uint64
	for g := range f.groups {
		freeBlocks += uint64(f.groups[g].freeBlocks)
		freeInodes += uint64(f.groups[g].freeInodes)
	}
	// The kernel keeps the superblock's totals only approximately; start
	// from the descriptors' exact counts, as it does at mount.
	le := binary.LittleEndian
	w.addSBFree(int64(freeBlocks)-int64(w.sbFreeBlocks()), int64(freeInodes)-int64(le.Uint32(sb[0x10:])))
	if w.jw == nil {
		if err := w.setClean(false); err != nil {
			return nil, err
		}
		if err := dev.Sync(); err != nil {
			return nil, fmt.Errorf("ext4: marking the filesystem in use: %w", err)
		}
	}
	return w, nil
}

func checkWritable(f *FS, sb []byte) error {
	le := binary.LittleEndian
	var bad []string
	for _, c := range []struct {
		kind      string
		have, ok  uint32
		knownBits map[uint32]string
	}{
		{"compat", f.sb.featureCompat, writeCompat, featureNames["compat"]},
		{"incompat", f.sb.featureIncompat, writeIncompat, featureNames["incompat"]},
		{"ro_compat", f.sb.featureRoCompat, writeRoCompat, featureNames["ro_compat"]},
	} {
		for bit := uint32(1); bit != 0; bit <<= 1 {
			if c.have&bit != 0 && c.ok&bit == 0 {
				name, ok := c.knownBits[bit]
				if !ok {
					name = fmt.Sprintf("unknown %s feature %#x", c.kind, bit)
				}
				bad = append(bad, name)
			}
		}
	}
	if len(bad) > 0 {
		return fmt.Errorf("ext4: cannot open read-write: the filesystem uses %s, which the writer does not maintain (it supports: %s): %w",
			strings.Join(bad, ", "), WritableFeatures, ErrUnsupported)
	}
	if !f.incompat(incompatExtents) {
		return fmt.Errorf("ext4: cannot open read-write: the filesystem lacks the extent feature (ext2/ext3 layout); the writer creates extent-mapped files only: %w", ErrUnsupported)
	}
	if f.compat(compatHasJournal) && f.sb.journalInum == 0 {
		return fmt.Errorf("ext4: cannot open read-write: the journal is on an external device, which the writer does not use: %w", ErrUnsupported)
	}
	if f.blockSize > 32768 {
		return fmt.Errorf("ext4: cannot open read-write: %d-byte blocks are not supported for writing: %w", f.blockSize, ErrUnsupported)
	}
	const stateValid, stateErrors = 0x1, 0x2
	if st := le.Uint16(sb[0x3A:]); st&stateErrors != 0 || st&stateValid == 0 {
		return fmt.Errorf("ext4: cannot open read-write: the filesystem is marked as having errors or was not cleanly unmounted (state %#x); run e2fsck -f on the image first: %w", st, ErrCorrupt)
	}
	return nil
}

// FS is the reader over the same volume; it sees every completed write.
// Use it directly only while no Writer method runs; otherwise use View.
func (w *Writer) FS() *FS { return w.f }

// View runs fn with the reader while no change is in progress.
func (w *Writer) View(fn func(f *FS) error) error {
	w.mu.RLock()
	defer w.mu.RUnlock()
	return fn(w.f)
}

// lockChange serializes a change: changeMu orders the changers (Sync's
// device I/O included), mu keeps readers out while memory changes. It
// returns the unlock (made once, so no operation allocates one).
func (w *Writer) lockChange() func() {
	w.changeMu.Lock()
	w.mu.Lock()
	return w.unlockChange
}

// lockChangeContext is lockChange for an operation on behalf of ctx: it
// gives up waiting when ctx ends, and refuses to start a change for an
// ended ctx. Once it returns the unlock, the change runs to its end
// whatever ctx does (no metadata change stops halfway).
func (w *Writer) lockChangeContext(ctx context.Context, what string) (func(), error) {
	if err := w.changeMu.LockContext(ctx); err != nil {
		return nil, cancelled(what, err)
	}
	w.mu.Lock()
	if err := w.roomForChange(); err != nil {
		w.unlockChange()
		return nil, fmt.Errorf("ext4: %s not done: the open transaction is full and could not be committed: %w", what, asEIO(err))
	}
	return w.unlockChange, nil
}

// roomForChange commits a full open transaction before the next change
// starts. It is full only when a commit at the end of an operation failed
// retryably (an outage, see endOp): then the change is refused whole, so
// the transaction stays bounded while storage is away.
func (w *Writer) roomForChange() error {
	if w.jw == nil || len(w.dirty)+len(w.gdtD)+1 < w.jw.limit {
		return nil
	}
	return w.commit()
}

// retryable reports whether a device error lost nothing and a later
// attempt may succeed (an outage of a write-back device).
func retryable(err error) bool {
	return errors.Is(err, ErrWriteRetryable) || errors.Is(err, ErrSyncRetryable)
}

// asEIO makes sure err maps to EIO for the caller (a FUSE answer).
func asEIO(err error) error {
	if errors.Is(err, syscall.EIO) {
		return err
	}
	return fmt.Errorf("%w (%w)", err, syscall.EIO)
}

// cancelled is the error of an operation not done because its context
// ended: it matches both the context's error and EINTR (the FUSE
// request's answer).
func cancelled(what string, err error) error {
	return fmt.Errorf("ext4: %s not done: %w (%w)", what, err, syscall.EINTR)
}

func (w *Writer) unlockChangeLocks() {
	w.mu.Unlock()
	w.changeMu.Unlock()
}

// changeLock is a mutex whose Lock can give up when a context ends: a
// change waiting behind a long commit returns when its request is
// interrupted.
type changeLock chan struct{}

func (l changeLock) Lock()   { l <- struct{}{} }
func (l changeLock) Unlock() { <-l }

// LockContext locks unless ctx has ended, before or while waiting.
func (l changeLock) LockContext(ctx context.Context) error {
	select {
	case l <- struct{}{}:
		if err := ctx.Err(); err != nil { // both were ready; select chose at random
			<-l
			return err
		}
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Sync commits the open transaction and makes everything durable; when it
// returns, a crash loses nothing written before it (fsync, syncfs).
// Readers (View) go on while it writes the log and waits for the device:
// no other change runs then, so nothing they see moves.
func (w *Writer) Sync() error { return w.SyncContext(context.Background()) }

// SyncContext is Sync for ctx: it gives up waiting for other changes when
// ctx ends; a commit, once begun, completes.
func (w *Writer) SyncContext(ctx context.Context) error {
	if err := w.changeMu.LockContext(ctx); err != nil {
		return cancelled("sync", err)
	}
	return w.sync(false)
}

// Checkpoint is Sync that also writes every committed block home and
// empties the journal, leaving an image that needs no recovery (for
// e2fsck, the kernel, or a copy).
func (w *Writer) Checkpoint() error {
	w.changeMu.Lock()
	return w.sync(true)
}

// sync commits, and checkpoints if asked; the caller holds changeMu,
// which sync releases.
func (w *Writer) sync(checkpoint bool) error {
	defer w.changeMu.Unlock()
	w.dataInFlight.Wait() // readers go on meanwhile
	w.mu.Lock()
	blks, err := w.prepareCommit()
	if err == nil && len(blks) > w.jwChunk() {
		err = w.logTransactions(blks) // larger than the log: in pieces, locked
		blks = nil
	}
	w.mu.Unlock()
	if err != nil {
		return err
	}
	if len(blks) > 0 {
		if err := w.logTransactions(blks); err != nil {
			return err
		}
		w.mu.Lock()
		w.finishCommit(blks)
		w.mu.Unlock()
	}
	if checkpoint && w.jw != nil && len(w.logged) > 0 {
		if err := w.checkpointIO(); err != nil {
			return err
		}
		w.mu.Lock()
		w.checkpointDone()
		w.mu.Unlock()
	}
	return w.dev.retryableSync() // everything before is committed
}

// endOp ends an operation. With a journal, the transaction commits once
// it holds a quarter of the log; its descriptor and superblock changes
// join it then (prepareCommit), not once per operation. Without one they
// go home now.
func (w *Writer) endOp() error {
	if w.jw == nil {
		return w.flushMeta()
	}
	if len(w.dirty)+len(w.gdtD)+1 >= w.jw.limit {
		if err := w.commit(); err != nil && !retryable(err) {
			return err
		}
		// A retryable failure keeps the operation, done in memory, in the
		// open transaction: the next sync, or the next change
		// (roomForChange), commits it.
	}
	return nil
}

// Close syncs. The device stays open; its owner closes it.
func (w *Writer) Close() error {
	if err := w.Checkpoint(); err != nil {
		return err
	}
	defer w.lockChange()()
	if w.jw == nil {
		if err := w.setClean(true); err != nil {
			return err
		}
		return w.dev.Sync()
	}
	return nil
}

// setClean sets or clears the superblock's "cleanly unmounted" state, as
// the kernel does for a filesystem without a journal.
func (w *Writer) setClean(clean bool) error {
	const stateValid = 0x1
	st := binary.LittleEndian.Uint16(w.sb[0x3A:]) &^ stateValid
	if clean {
		st |= stateValid
	}
	binary.LittleEndian.PutUint16(w.sb[0x3A:], st)
	w.sbD = true
	return w.flushMeta()
}

// flushMeta writes changed group descriptor blocks and the superblock.
func (w *Writer) flushMeta() error {
	for nr := range w.gdtD {
		// A copy: w.gdt keeps changing after the transaction commits.
		blk := w.f.descBlock(nr)
		b, ok := w.dirty[blk]
		if !ok {
			b = make([]byte, len(w.gdt[nr]))
		}
		copy(b, w.gdt[nr])
		if err := w.writeBlock(blk, b); err != nil {
			return err
		}
		delete(w.gdtD, nr)
	}
	if !w.sbD {
		return nil
	}
	le := binary.LittleEndian
	now := w.now().Unix()
	le.PutUint32(w.sb[0x30:], uint32(now)) // s_wtime
	w.sb[0x274] = byte(now >> 32)
	if w.f.hasCsum() {
		le.PutUint32(w.sb[0x3FC:], crc32cRaw(^uint32(0), w.sb[:0x3FC]))
	}
	w.sbD = false
	if w.jw != nil {
		blk := uint64(superblockOffset >> w.f.blockLog)
		b, err := w.block(blk)
		if err != nil {
			return err
		}
		copy(b[superblockOffset-int(blk<<w.f.blockLog):], w.sb)
		return w.writeBlock(blk, b)
	}
	if _, err := w.dev.WriteAt(w.sb, superblockOffset); err != nil {
		return fmt.Errorf("ext4: writing superblock: %w", err)
	}
	w.f.blocks.remove(superblockOffset >> w.f.blockLog)
	return nil
}

// block returns metadata block blk for change. A block the open
// transaction holds is returned as is: changes apply to it in place, no
// copy per change. Any other block is copied once (the cache's and the
// committed log's copies never change: a checkpoint may be writing them);
// the copy joins the transaction when writeBlock is given it.
func (w *Writer) block(blk uint64) ([]byte, error) {
	if b, ok := w.dirty[blk]; ok {
		return b, nil
	}
	b, err := w.f.readBlock(blk)
	if err != nil {
		return nil, err
	}
	return bytes.Clone(b), nil
}

// writeBlock writes a whole metadata block: with a journal it joins the
// open transaction, which takes ownership of b (the caller changes it only
// through block or writeBlock from now on); without one it goes home.
func (w *Writer) writeBlock(blk uint64, b []byte) error {
	if w.jw != nil {
		if l, ok := w.logged[blk]; ok && len(l) > 0 && &l[0] == &b[0] {
			b = bytes.Clone(b) // the committed copy stays as committed
		}
		w.dirty[blk] = b
		return nil
	}
	if _, err := w.dev.WriteAt(b, int64(blk)<<w.f.blockLog); err != nil {
		w.f.blocks.remove(blk)
		return fmt.Errorf("ext4: writing block %d: %w", blk, err)
	}
	w.f.blocks.put(blk, b)
	return nil
}

// errno wraps a syscall.Errno with what failed, so callers can both read
// the message and map it with errors.Is / errors.As.
func errno(e syscall.Errno, format string, args ...any) error {
	return fmt.Errorf("ext4: "+format+": %w", append(args, e)...)
}

// remove drops k from the cache (a freed or rewritten block).
func (c *lru[K, V]) remove(k K) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.items[k]; ok {
		c.order.Remove(e)
		delete(c.items, k)
	}
}

// trackedDevice remembers the first error of the device it wraps. After
// one, the writer commits nothing more, so the volume keeps its last
// committed, consistent state (as the kernel aborts its journal).
type trackedDevice struct {
	Device
	mu  sync.Mutex
	err error
}

func (d *trackedDevice) note(err error) error {
	if err != nil {
		d.mu.Lock()
		if d.err == nil {
			d.err = err
		}
		d.mu.Unlock()
	}
	return err
}

func (d *trackedDevice) WriteAt(p []byte, off int64) (int, error) {
	n, err := d.Device.WriteAt(p, off)
	return n, d.note(err)
}

// ErrWriteRetryable marks a device write failure that lost nothing the
// device took before: storage is unavailable for now (a write-back cache
// whose dirty memory could not be flushed during an outage) and a later
// write may succeed. Some of the failed write's bytes may have been taken.
var ErrWriteRetryable = errors.New("the device keeps every earlier write and may take this one later")

// retryableWriteAt is WriteAt for writes the journal redoes on its own
// (log blocks before their commit, the journal superblock, checkpoints): a
// failure marked ErrWriteRetryable is not recorded, so the writer goes on.
func (d *trackedDevice) retryableWriteAt(p []byte, off int64) (int, error) {
	n, err := d.Device.WriteAt(p, off)
	if errors.Is(err, ErrWriteRetryable) {
		return n, err
	}
	return n, d.note(err)
}

func (d *trackedDevice) Sync() error { return d.note(d.Device.Sync()) }

// contextWriterAt is the volume's optional interruptible write
// (crypto.Volume has it, and passes ctx on to a write-back cache).
type contextWriterAt interface {
	WriteAtContext(ctx context.Context, p []byte, off int64) (int, error)
}

// writeAtContext writes file data on behalf of ctx. A write that ends
// because ctx did, or that failed retryably (ErrWriteRetryable), is the
// caller's to undo, not a failure of the device.
func (d *trackedDevice) writeAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	var n int
	var err error
	if cw, ok := d.Device.(contextWriterAt); ok {
		n, err = cw.WriteAtContext(ctx, p, off)
	} else {
		n, err = d.Device.WriteAt(p, off)
	}
	if err != nil && undoable(ctx, err) {
		return n, err
	}
	return n, d.note(err)
}

// undoable reports whether a failed data write leaves the device usable:
// ctx ended, or the device failed retryably. The write's caller undoes
// what it planned and reports the error; the writer goes on.
func undoable(ctx context.Context, err error) bool {
	return errors.Is(err, ErrWriteRetryable) || (ctx.Err() != nil && errors.Is(err, ctx.Err()))
}

// ErrSyncRetryable marks a device Sync failure that lost nothing: the
// device still holds every write it took and a later Sync may succeed (a
// write-back cache whose upload timed out during a storage outage).
var ErrSyncRetryable = errors.New("the device keeps every write for the next sync")

// retryableSync is Sync for barriers: a failure marked ErrSyncRetryable is
// not recorded, so the writer goes on and the next sync retries. Before a
// commit block, the next commit writes the same transaction again
// (uncommitted log blocks are free to overwrite); after one, the commit
// keeps its log space and its blocks are logged again (writeTransaction).
func (d *trackedDevice) retryableSync() error {
	err := d.Device.Sync()
	if errors.Is(err, ErrSyncRetryable) {
		return err
	}
	return d.note(err)
}

// failed returns the device's first error, wrapped as EIO.
func (d *trackedDevice) failed() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.err == nil {
		return nil
	}
	return fmt.Errorf("ext4: the device failed (%v); nothing more is committed; reopen to continue from the last commit: %w", d.err, syscall.EIO)
}
