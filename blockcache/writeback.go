package blockcache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/bits"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/blobseal/blobseal/blob"
)

// PageStore is where write-back sends dirty bytes: blob.PageWriter. It
// returns nil only when storage acknowledged every write of the batch; a
// failed batch may be sent again whole.
type PageStore interface {
	WritePages(ctx context.Context, writes []blob.PageWrite) error
}

var _ PageStore = (*blob.PageWriter)(nil)

// Write-back defaults.
const (
	// DefaultDirtyBytes bounds dirty memory: 64 MiB is sixteen 4 MiB Put
	// Page calls, enough to keep a batch's requests in flight.
	DefaultDirtyBytes = 64 << 20
	// DefaultFlushInterval is how long a write may stay only in memory when
	// nobody calls Flush (the page cache's dirty_expire is 30 s; shorter
	// here, since a lost lease loses what is not uploaded).
	DefaultFlushInterval = 5 * time.Second
	// DefaultFlushTimeout bounds one Flush, retries included; on an outage
	// it then fails and the data stays dirty for the next one.
	DefaultFlushTimeout = time.Minute
)

// WriteBackOptions configures a WriteBack. Zero values select defaults.
type WriteBackOptions struct {
	// DirtyBytes bounds the memory of written, not yet acknowledged blocks
	// (dirty and uploading). A writer that would exceed it waits for a
	// flush, at most FlushTimeout; then its write fails with EIO.
	DirtyBytes int64
	// FlushInterval is the period of the background flush; negative
	// disables it.
	FlushInterval time.Duration
	// FlushTimeout bounds each Flush.
	FlushTimeout time.Duration
	// Logger receives background flush failures; nil discards them.
	Logger *slog.Logger
}

// WriteBack adds writes to a Cache: written bytes are held per block, with
// a dirty bit per 512-byte page, read back at once, and uploaded (only the
// dirty pages) by Flush, by a background flush on a timer, when dirty
// memory reaches its bound, and by Close.
//
// Ordering: Flush is a full barrier. When it returns nil, every write that
// returned before Flush was called is acknowledged by storage; writes
// made after a Flush are never uploaded in a batch before it. A journal
// commit is therefore ordered after its data by Flush(data) → WriteAt
// (commit) → Flush. Writes to disjoint bytes between two flushes have no
// order among themselves.
//
// When storage fails, Flush returns the error after FlushTimeout, the
// dirty bytes stay in memory and are sent again by the next flush, and
// reads go on. Once storage refuses the writer for good (lease lost, blob
// changed) every write and flush fails with that error.
type WriteBack struct {
	c     *Cache
	store PageStore
	// storeErr is the store's Err when it has one (blob.PageWriter): a
	// lost lease is seen by the next write, not only the next flush.
	storeErr func() error
	o        WriteBackOptions
	bs       int64
	log      *slog.Logger

	// spare holds the blocks of uploaded batches for reuse, so a stream of
	// writes does not allocate (and collect) every block it dirties.
	spare sync.Pool

	flushing chan struct{} // one token: one flush at a time, so batches are ordered
	kick     chan struct{} // asks the background flusher to run now
	stop     chan struct{}
	stopped  chan struct{}

	mu        sync.Mutex
	dirty     map[int64]*dirtyBlock // written since the last flush took them
	uploading map[int64]*dirtyBlock // taken by the flush in progress
	mem       int64                 // bytes of dirty and uploading blocks
	peak      int64
	space     chan struct{} // closed and replaced when mem shrinks
	failed    error         // storage refused the writer for good
	closed    bool

	flushes, uploaded, flushFailures uint64
}

// dirtyBlock is one cache block's written bytes: data is valid where mask
// has the page's bit.
type dirtyBlock struct {
	data []byte
	mask []uint64
}

func (d *dirtyBlock) set(from, to int) {
	for p := from; p < to; p++ {
		d.mask[p/64] |= 1 << (p % 64)
	}
}

func (d *dirtyBlock) has(p int) bool { return d.mask[p/64]&(1<<(p%64)) != 0 }

// runs calls fn for each run of dirty pages [from, to).
func (d *dirtyBlock) runs(fn func(from, to int)) {
	n := len(d.mask) * 64
	for p := 0; p < n; {
		if !d.has(p) {
			if d.mask[p/64]>>(p%64) == 0 {
				p = (p/64 + 1) * 64
			} else {
				p++
			}
			continue
		}
		q := p + 1
		for q < n && d.has(q) {
			q++
		}
		fn(p, q)
		p = q
	}
}

func (d *dirtyBlock) pages() int {
	n := 0
	for _, m := range d.mask {
		n += bits.OnesCount64(m)
	}
	return n
}

var (
	_ io.ReaderAt = (*WriteBack)(nil)
	_ io.WriterAt = (*WriteBack)(nil)
)

// NewWriteBack makes c writable through store, which must write the same
// bytes c's source reads (the PageWriter made from that source). The cache
// must have no Verifier and no disk tier: neither can follow writes.
func NewWriteBack(c *Cache, store PageStore, o WriteBackOptions) (*WriteBack, error) {
	if c.o.Verifier != nil {
		return nil, errors.New("blockcache: a verified (dm-verity) cache cannot be written; open the image without verity to write it")
	}
	if c.disk != nil {
		return nil, errors.New("blockcache: the disk tier cannot follow writes; open the cache without DiskDir to write it")
	}
	if o.DirtyBytes < 0 || o.FlushTimeout < 0 {
		return nil, fmt.Errorf("blockcache: write-back options must not be negative (DirtyBytes %d, FlushTimeout %s)", o.DirtyBytes, o.FlushTimeout)
	}
	if o.DirtyBytes == 0 {
		o.DirtyBytes = DefaultDirtyBytes
	}
	if o.DirtyBytes < 2*c.bs {
		return nil, fmt.Errorf("blockcache: DirtyBytes %d must hold at least two blocks of %d bytes", o.DirtyBytes, c.bs)
	}
	if o.FlushInterval == 0 {
		o.FlushInterval = DefaultFlushInterval
	}
	if o.FlushTimeout == 0 {
		o.FlushTimeout = DefaultFlushTimeout
	}
	log := o.Logger
	if log == nil {
		log = c.log
	}
	w := &WriteBack{
		c: c, store: store, o: o, bs: c.bs, log: log,
		flushing: make(chan struct{}, 1),
		kick:     make(chan struct{}, 1),
		stop:     make(chan struct{}),
		stopped:  make(chan struct{}),
		dirty:    make(map[int64]*dirtyBlock),
		space:    make(chan struct{}),
	}
	if e, ok := store.(interface{ Err() error }); ok {
		w.storeErr = e.Err
	}
	go w.flusher()
	return w, nil
}

// Size returns the size of the device.
func (w *WriteBack) Size() int64 { return w.c.size }

// WriteBackStats are the write-back counters.
type WriteBackStats struct {
	DirtyBytes, PeakDirtyBytes, DirtyLimit int64
	Flushes                                uint64 // flushes that uploaded something
	UploadedBytes                          uint64
	// FlushFailures counts flushes storage did not acknowledge (timeout,
	// lost lease), background ones included.
	FlushFailures uint64
}

// Stats returns a snapshot of the counters.
func (w *WriteBack) Stats() WriteBackStats {
	w.mu.Lock()
	defer w.mu.Unlock()
	return WriteBackStats{DirtyBytes: w.mem, PeakDirtyBytes: w.peak, DirtyLimit: w.o.DirtyBytes, Flushes: w.flushes,
		UploadedBytes: w.uploaded, FlushFailures: w.flushFailures}
}

// ReadAt implements io.ReaderAt (bounded by the cache's ReadDeadline).
func (w *WriteBack) ReadAt(p []byte, off int64) (int, error) {
	return w.ReadAtContext(context.Background(), p, off)
}

// ReadAtContext reads like Cache.ReadAtContext and returns written bytes
// at once, uploaded or not. The dirty bytes are copied before the cache is
// read: a flush that completes in between has already replaced (or
// dropped) the cache's older copy, so either source is current.
func (w *WriteBack) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	var over []byte
	var covered []bool // per page of [pageStart, ...)
	pageStart := off / blob.PageSize
	if off >= 0 && len(p) > 0 && off < w.c.size {
		end := min(off+int64(len(p)), w.c.size)
		w.mu.Lock()
		for b := off / w.bs; b <= (end-1)/w.bs; b++ {
			for _, m := range []map[int64]*dirtyBlock{w.uploading, w.dirty} { // older first
				d := m[b]
				if d == nil {
					continue
				}
				if over == nil {
					over = make([]byte, len(p))
					covered = make([]bool, (end-1)/blob.PageSize-pageStart+1)
				}
				base := b * w.bs
				d.runs(func(from, to int) {
					s, e := max(base+int64(from)*blob.PageSize, off), min(base+int64(to)*blob.PageSize, end)
					if s >= e {
						return
					}
					copy(over[s-off:e-off], d.data[s-base:e-base])
					for pg := s / blob.PageSize; pg <= (e-1)/blob.PageSize; pg++ {
						covered[pg-pageStart] = true
					}
				})
			}
		}
		w.mu.Unlock()
	}
	n, err := w.c.ReadAtContext(ctx, p, off)
	if over != nil && (err == nil || errors.Is(err, io.EOF)) {
		for i, ok := range covered {
			if !ok {
				continue
			}
			s := max((pageStart+int64(i))*blob.PageSize, off)
			e := min((pageStart+int64(i)+1)*blob.PageSize, off+int64(n))
			if s < e {
				copy(p[s-off:e-off], over[s-off:e-off])
			}
		}
	}
	return n, err
}

// WriteAt implements io.WriterAt; it may wait for a flush (see
// WriteAtContext).
func (w *WriteBack) WriteAt(p []byte, off int64) (int, error) {
	return w.WriteAtContext(context.Background(), p, off)
}

// WriteAtContext records p at off; the bytes read back at once and reach
// storage with the next flush. When dirty memory is at its bound it waits
// (back-pressure) for a flush to free some, for ctx, or FlushTimeout: then
// (storage is down) it fails with EIO, keeping the blocks already written
// and returning how many bytes those are. Bytes not on
// 512-byte pages are merged with the page's current content first.
func (w *WriteBack) WriteAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(p)) > w.c.size || off+int64(len(p)) < off {
		return 0, fmt.Errorf("blockcache: write [%d,+%d) outside %s of %d bytes", off, len(p), w.c.name, w.c.size)
	}
	if len(p) == 0 {
		return 0, nil
	}
	if off%blob.PageSize != 0 || len(p)%blob.PageSize != 0 {
		// Read-modify-write of the partial pages. Concurrent sub-page writes
		// to one page are not atomic; the volume writes whole sectors.
		start := off - off%blob.PageSize
		end := min((off+int64(len(p))+blob.PageSize-1)/blob.PageSize*blob.PageSize, w.c.size)
		buf := make([]byte, end-start)
		if _, err := w.ReadAtContext(ctx, buf, start); err != nil && !errors.Is(err, io.EOF) {
			return 0, fmt.Errorf("blockcache: reading the pages around a partial write at %d: %w", off, err)
		}
		copy(buf[off-start:], p)
		if _, err := w.writePages(ctx, buf, start); err != nil {
			return 0, err
		}
		return len(p), nil
	}
	return w.writePages(ctx, p, off)
}

// writePages records page-aligned bytes block by block.
func (w *WriteBack) writePages(ctx context.Context, p []byte, off int64) (int, error) {
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		b := pos / w.bs
		base := b * w.bs
		n := int(min(int64(len(p)-done), base+w.bs-pos))
		if err := w.writeBlock(ctx, b, p[done:done+n], int(pos-base)); err != nil {
			return done, err
		}
		done += n
	}
	return done, nil
}

func (w *WriteBack) writeBlock(ctx context.Context, b int64, p []byte, at int) error {
	var full *time.Timer // runs while this writer waits for dirty memory
	defer func() {
		if full != nil {
			full.Stop()
		}
	}()
	for {
		w.mu.Lock()
		if w.failed != nil {
			err := w.failed
			w.mu.Unlock()
			return err
		}
		if w.closed {
			w.mu.Unlock()
			return fmt.Errorf("blockcache: write to %s after Close", w.c.name)
		}
		if w.storeErr != nil {
			if err := w.storeErr(); err != nil {
				// Lease lost or blob changed: refuse at once rather than
				// collect bytes that can never be uploaded.
				w.mu.Unlock()
				return fmt.Errorf("blockcache: %s can no longer be written: %w", w.c.name, err)
			}
		}
		d := w.dirty[b]
		if d == nil && w.mem+w.bs > w.o.DirtyBytes {
			wait, mem := w.space, w.mem
			w.mu.Unlock()
			w.requestFlush()
			if full == nil {
				full = time.NewTimer(w.o.FlushTimeout)
			}
			select {
			case <-wait:
				continue
			case <-full.C:
				// As the kernel fails writes to a device whose writeback
				// fails: EIO, rather than waiting as long as the outage.
				return fmt.Errorf("blockcache: %s: dirty memory (%d bytes, the bound) could not be flushed within %s; storage is not taking writes, the bytes accepted so far are kept: %w",
					w.c.name, mem, w.o.FlushTimeout, syscall.EIO)
			case <-ctx.Done():
				return fmt.Errorf("blockcache: waiting for dirty memory of %s to be flushed: %w", w.c.name, ctx.Err())
			}
		}
		if d == nil && w.mem+w.bs > w.o.DirtyBytes/2 {
			// Start uploading at half the bound, so that writers fill the
			// other half while the batch is in flight.
			w.requestFlush()
		}
		if d == nil {
			d = w.newBlock()
			w.dirty[b] = d
			w.mem += w.bs
			w.peak = max(w.peak, w.mem)
		}
		copy(d.data[at:], p)
		d.set(at/blob.PageSize, (at+len(p))/blob.PageSize)
		w.mu.Unlock()
		return nil
	}
}

// newBlock returns an empty dirty block: a spare one (its old bytes are
// never read: only pages with a mask bit are) or a new one.
func (w *WriteBack) newBlock() *dirtyBlock {
	if d, ok := w.spare.Get().(*dirtyBlock); ok {
		clear(d.mask)
		return d
	}
	return &dirtyBlock{data: make([]byte, w.bs), mask: make([]uint64, (w.bs/blob.PageSize+63)/64)}
}

func (w *WriteBack) requestFlush() {
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

// Flush uploads everything written before the call and returns when
// storage has acknowledged it (the durability point of fsync), or with an
// error after FlushTimeout or when ctx ends; the bytes then stay dirty
// and are sent again by the next flush. It is a full ordering barrier (see
// WriteBack).
func (w *WriteBack) Flush(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, w.o.FlushTimeout)
	defer cancel()
	select {
	case w.flushing <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("blockcache: flush of %s: waiting for the flush in progress: %w", w.c.name, ctx.Err())
	}
	defer func() { <-w.flushing }()

	w.mu.Lock()
	if w.failed != nil {
		err := w.failed
		w.mu.Unlock()
		return err
	}
	taken := w.dirty
	w.dirty = make(map[int64]*dirtyBlock)
	w.uploading = taken
	w.mu.Unlock()
	if len(taken) == 0 {
		return nil
	}

	blocks := make([]int64, 0, len(taken))
	for b := range taken {
		blocks = append(blocks, b)
	}
	slices.Sort(blocks)
	var writes []blob.PageWrite
	var bytes uint64
	for _, b := range blocks {
		d := taken[b]
		d.runs(func(from, to int) {
			s := b*w.bs + int64(from)*blob.PageSize
			e := min(b*w.bs+int64(to)*blob.PageSize, w.c.size)
			writes = append(writes, blob.PageWrite{Off: s, Data: d.data[s-b*w.bs : e-b*w.bs]})
			bytes += uint64(e - s)
		})
	}
	// Whether each block was a hole is read before the upload marks it
	// written: then its bytes besides the written pages are known zeros.
	wasHole := make(map[int64]bool, len(taken))
	for _, b := range blocks {
		wasHole[b] = w.c.unwritten(b)
	}
	err := w.store.WritePages(ctx, writes)
	if err != nil {
		w.mu.Lock()
		w.flushFailures++
		w.restoreLocked(taken)
		if errors.Is(err, blob.ErrLeaseLost) || errors.Is(err, blob.ErrChanged) {
			w.failed = fmt.Errorf("blockcache: %s can no longer be written (%d dirty bytes were not uploaded): %w", w.c.name, w.mem, err)
			close(w.space) // writers waiting for memory see the failure
			w.space = make(chan struct{})
		}
		kept := w.mem
		w.mu.Unlock()
		return fmt.Errorf("blockcache: flush of %s failed; %d dirty bytes kept for the next flush: %w", w.c.name, kept, err)
	}
	// Update the cache before the uploaded bytes leave the overlay, so that
	// a reader always finds the new bytes in one of them. The cache keeps
	// what it can: dropping every uploaded block made a random read/write
	// workload fetch again after each flush what it had just written.
	ranges := make([]blob.Range, len(writes))
	for i, wr := range writes {
		ranges[i] = blob.Range{Off: wr.Off, Len: int64(len(wr.Data))}
	}
	w.c.markWritten(ranges)
	for _, b := range blocks {
		w.c.keepWritten(b, taken[b], wasHole[b])
	}
	w.mu.Lock()
	w.uploading = nil
	w.mem -= int64(len(taken)) * w.bs
	w.flushes++
	w.uploaded += bytes
	close(w.space)
	w.space = make(chan struct{})
	w.mu.Unlock()
	// Storage has all of it and no map refers to these blocks any more
	// (readers copy under mu, and the batch is done): reuse them.
	for _, d := range taken {
		w.spare.Put(d)
	}
	return nil
}

// restoreLocked puts the blocks of a failed upload back as dirty, under
// anything written to them since.
func (w *WriteBack) restoreLocked(taken map[int64]*dirtyBlock) {
	for b, old := range taken {
		d := w.dirty[b]
		if d == nil {
			w.dirty[b] = old
			continue
		}
		old.runs(func(from, to int) {
			for pg := from; pg < to; pg++ {
				if !d.has(pg) {
					copy(d.data[pg*blob.PageSize:(pg+1)*blob.PageSize], old.data[pg*blob.PageSize:])
					d.set(pg, pg+1)
				}
			}
		})
		w.mem -= w.bs
	}
	w.uploading = nil
	close(w.space)
	w.space = make(chan struct{})
}

// flusher flushes on the timer and when writers wait for memory.
func (w *WriteBack) flusher() {
	defer close(w.stopped)
	var tick <-chan time.Time
	if w.o.FlushInterval > 0 {
		t := time.NewTicker(w.o.FlushInterval)
		defer t.Stop()
		tick = t.C
	}
	for {
		select {
		case <-w.stop:
			return
		case <-tick:
		case <-w.kick:
		}
		if err := w.Flush(context.Background()); err != nil {
			w.mu.Lock()
			failed := w.failed != nil
			w.mu.Unlock()
			if failed { // storage refused the writer for good: Flush reports it
				w.log.Error("blockcache: storage refuses writes; dirty data cannot be uploaded", "cache", w.c.name, "err", err)
				<-w.stop
				return
			}
			w.log.Warn("blockcache: background flush failed; will retry", "cache", w.c.name, "err", err)
			// Do not spin on an outage, but retry several times within
			// FlushTimeout, which also bounds a writer waiting for memory.
			select {
			case <-w.stop:
				return
			case <-time.After(min(time.Second, w.o.FlushTimeout/4)):
			}
		}
	}
}

// Close stops the background flush and flushes what is dirty. It does not
// close the cache. Writes after Close fail.
func (w *WriteBack) Close(ctx context.Context) error {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return nil
	}
	w.closed = true
	w.mu.Unlock()
	close(w.stop)
	<-w.stopped
	return w.Flush(ctx)
}
