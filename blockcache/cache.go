// Package blockcache is the read cache between a blob source and the
// decrypting volume: it serves io.ReaderAt reads from fixed-size blocks held
// under one global memory bound, fetching each block at most once at a time,
// coalescing adjacent missing blocks into large ranged reads, reading ahead
// for sequential streams, never requesting unwritten (hole) ranges, and
// optionally keeping fetched ciphertext in a bounded disk tier that survives
// restarts while the blob's ETag is unchanged.
//
// Memory is organised in extents: one extent is the run of blocks one fetch
// brought in (a single block for a random read, up to MaxFetchSize for
// read-ahead) and is the unit of accounting and eviction. The cache mutex
// guards only the block map, LRU list, stream table and accounting; fetches,
// copies to callers, allocation and disk I/O happen outside it. A reader pins
// an extent (reference count) while it waits for or copies from it, so an
// extent is never released under a reader.
//
// WriteBack makes a cache writable over a page blob (blob.PageWriter):
// written pages are held per block, read back at once, and uploaded by
// Flush, the durability point and full ordering barrier; see WriteBack.
package blockcache

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/blobseal/blobseal/blob"
)

// ErrClosed is returned by reads on a closed cache.
var ErrClosed = errors.New("blockcache: cache is closed")

// errAbandoned ends a demand fetch that every reader waiting for it gave up
// on (interrupted or past its deadline): nobody wants its bytes, and it
// would hold a request slot. A reader that arrives just then fetches anew.
var errAbandoned = errors.New("fetch abandoned: every reader waiting for it gave up")

// extent is a run of consecutive blocks fetched together.
type extent struct {
	first   int64 // first block index
	nblocks int64
	off     int64 // byte offset of the first block
	length  int64 // bytes covered (the last extent of the source may be short)
	mem     int64 // accounted bytes: length rounded up to whole pages
	ahead   bool  // created by read-ahead
	// stream is the stream whose read-ahead created the extent, and
	// streamID its identity then (the table reuses entries).
	stream   *stream
	streamID uint64

	done chan struct{} // closed when the fetch ends; then buf or err is set
	buf  []byte        // the mapping, len == mem; data is buf[:length]
	err  error
	bad  []blob.Range // ranges the Verifier rejected; reads of them fail

	// ctx bounds the fetch (FetchTimeout, Close); cancel also ends it when
	// the last reader waiting for a demand fetch gives up.
	ctx    context.Context
	cancel context.CancelFunc
	// waiters counts readers waiting for the fetch to end; abandoned is set
	// when the last of them gave up first. Both guarded by Cache.mu.
	waiters   int
	abandoned bool

	refs     int           // readers pinning the extent (and a queued disk write)
	elem     *list.Element // position in the LRU list while ready and mapped
	detached bool          // removed from the block map; free when refs drops to 0
}

func (e *extent) end() int64 { return e.off + e.length }

// Cache is a block cache over a blob.Source. It is safe for concurrent use.
type Cache struct {
	src     blob.Source
	name    string
	size    int64
	nblocks int64
	o       Options
	bs      int64
	log     *slog.Logger
	// written is nil while every byte of the source may hold data; it is
	// set from the source's written ranges.
	written atomic.Pointer[writtenIndex]
	disk    *diskTier // nil without DiskDir

	ctx     context.Context // cancelled by Close; parent of every fetch
	cancel  context.CancelFunc
	wg      sync.WaitGroup // fetch goroutines
	diskWG  sync.WaitGroup // the disk writer
	sem     chan struct{}  // one token per request slot
	zeros   []byte         // one block of zeros, read-only, for holes
	raMax   int            // read-ahead may start a fetch only below this many used slots
	rate    atomic.Uint64  // float64 bits: moving average of bytes/s of requests run alone
	getting atomic.Int64   // requests to the source in progress
	diskQ   chan *extent   // extents waiting to be written to disk

	mu      sync.Mutex
	blocks  map[int64]*extent
	lru     list.List // of *extent; front is most recently used
	used    int64
	peak    int64
	memWake chan struct{} // closed and replaced whenever memory may have become available
	streams streamTable
	closed  bool
	// diskPinned is memory pinned by extents queued for the disk writer,
	// kept under a quarter of the bound so a slow disk cannot starve reads.
	diskPinned int64

	st counters
}

var _ io.ReaderAt = (*Cache)(nil)

// New returns a cache over src. When src lists its written ranges they are
// read once here (bounded by ReadDeadline); on failure the cache treats the
// whole source as written.
func New(src blob.Source, opts Options) (*Cache, error) {
	if src == nil {
		return nil, errors.New("blockcache: nil source")
	}
	o, err := opts.normalize()
	if err != nil {
		return nil, err
	}
	if v, ok := o.Verifier.(interface{ BlockSize() int64 }); ok && (v.BlockSize() <= 0 || o.BlockSize%v.BlockSize() != 0) {
		return nil, fmt.Errorf("blockcache: BlockSize %d is not a multiple of the verifier's %d-byte blocks", o.BlockSize, v.BlockSize())
	}
	size := src.Size()
	if size < 0 {
		return nil, fmt.Errorf("blockcache: source %s reports negative size %d", src, size)
	}
	c := &Cache{
		src:     src,
		name:    src.String(),
		size:    size,
		nblocks: (size + o.BlockSize - 1) / o.BlockSize,
		o:       o,
		bs:      o.BlockSize,
		log:     o.Logger,
		sem:     make(chan struct{}, o.MaxFetches),
		raMax:   o.MaxFetches - o.MaxFetches/4,
		blocks:  make(map[int64]*extent),
		memWake: make(chan struct{}),
		zeros:   make([]byte, o.BlockSize),
	}
	c.ctx, c.cancel = context.WithCancel(context.Background())

	if rl, ok := src.(blob.RangeLister); ok {
		ctx, cancel := context.WithTimeout(c.ctx, o.ReadDeadline)
		ranges, err := rl.WrittenRanges(ctx)
		cancel()
		if err != nil {
			c.log.Warn("blockcache: cannot list written ranges; every range will be fetched", "source", c.name, "err", err)
		} else {
			c.written.Store(newWrittenIndex(ranges, size))
		}
	}
	if o.DiskDir != "" {
		version, versioned := "", false
		if v, ok := src.(blob.Versioned); ok && v.Version() != "" {
			version, versioned = v.Version(), true
		}
		c.disk, err = openDiskTier(o.DiskDir, c.name, version, versioned, c.bs, o.DiskBytes, c.log, &c.st)
		if err != nil {
			c.cancel()
			return nil, err
		}
		c.diskQ = make(chan *extent, 16)
		c.diskWG.Add(1)
		go c.diskWriter()
	}
	return c, nil
}

// Size returns the size of the source.
func (c *Cache) Size() int64 { return c.size }

// String names the cached source.
func (c *Cache) String() string { return "blockcache(" + c.name + ")" }

// ReadAt implements io.ReaderAt; it gives up after Options.ReadDeadline.
func (c *Cache) ReadAt(p []byte, off int64) (int, error) {
	return c.ReadAtContext(context.Background(), p, off)
}

// ReadAtContext reads len(p) bytes at off, like io.ReaderAt, honouring ctx
// and Options.ReadDeadline. A reader whose ctx ends stops waiting; the fetch
// it waited for goes on while other readers wait for it, and is cancelled
// when none is left (read-ahead excepted). A failed
// fetch fails the read (the source retries, see blob.RetrySource); the error
// names the source, the offset and the cause.
func (c *Cache) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("blockcache: read of %s at negative offset %d", c.name, off)
	}
	if off >= c.size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	want, atEOF := p, false
	if int64(len(p)) > c.size-off {
		want, atEOF = p[:c.size-off], true
	}
	if len(want) == 0 {
		return 0, nil
	}
	n, err := c.readRange(ctx, off, int64(len(want)), func(pos int64, b []byte) error {
		copy(want[pos-off:], b)
		return nil
	})
	if err != nil {
		return n, err
	}
	if atEOF {
		return n, io.EOF
	}
	return n, nil
}

// read hands the bytes [off, off+n) to sink in order, block by block,
// waiting for or starting fetches; each slice is cache memory (or zeros for a
// hole) valid only during the call. A fetch it starts may extend up to
// horizon (the stream's read-ahead window) so a sequential reader's miss
// becomes one large request.
func (c *Cache) read(ctx context.Context, off, n, horizon int64, sink func(pos int64, b []byte) error) (int, error) {
	end := off + n
	pos := off
	for pos < end {
		b := pos / c.bs
		if c.holeBlock(b) {
			n := min(end, c.blockEnd(b)) - pos
			if err := sink(pos, c.zeros[:n]); err != nil {
				return int(pos - off), err
			}
			c.st.zeroFilled.Add(uint64(n))
			pos += n
			continue
		}
		e, mapped, err := c.acquire(ctx, b, end, max(end, horizon))
		if err != nil {
			return int(pos - off), c.readError(ctx, pos, err)
		}
		select {
		case <-e.done:
			c.stopWaiting(e, false)
		case <-ctx.Done():
			c.stopWaiting(e, true)
			c.unpin(e)
			return int(pos - off), c.readError(ctx, pos, ctx.Err())
		}
		if errors.Is(e.err, errAbandoned) {
			// Readers that left cancelled it as this one arrived: fetch anew.
			c.unpin(e)
			continue
		}
		if e.err != nil {
			// The source's retry policy (blob.RetrySource) has given up;
			// retrying here again would only multiply its budget. The
			// failed extent has left the map, so a later read fetches anew.
			c.unpin(e)
			if errors.Is(e.err, ErrClosed) {
				return int(pos - off), ErrClosed
			}
			return int(pos - off), c.readError(ctx, pos, e.err)
		}
		stop := min(mapped, end)
		r, rejected := e.badIn(pos, stop)
		if rejected {
			stop = max(r.Off, pos)
		}
		if stop > pos {
			err = sink(pos, e.buf[pos-e.off:stop-e.off])
		}
		c.unpin(e)
		if err != nil {
			return int(pos - off), err
		}
		pos = stop
		if rejected {
			c.st.integrityErrors.Add(1)
			return int(pos - off), fmt.Errorf("blockcache: %s: bytes [%d, %d): %w", c.name, pos, r.End(), ErrIntegrity)
		}
	}
	return int(pos - off), nil
}

// ReadFunc calls fn with the bytes [off, off+n) of the source, in order, in
// slices of the cache's own memory that are valid only during the call and
// must not be written; holes come as zeros. It saves the copy ReadAt makes,
// for a caller that transforms the bytes anyway (the decrypting volume
// decrypts from here straight into the FUSE reply). Slices end at multiples
// of BlockSize or at off+n. The range must lie within the source; the read
// honours ctx and Options.ReadDeadline as ReadAtContext does, and fn's
// error ends the read.
func (c *Cache) ReadFunc(ctx context.Context, off, n int64, fn func(b []byte) error) error {
	if off < 0 || n < 0 || off > c.size || n > c.size-off {
		return fmt.Errorf("blockcache: range [%d, %d) of %s lies outside its %d bytes", off, off+n, c.name, c.size)
	}
	if n == 0 {
		return nil
	}
	_, err := c.readRange(ctx, off, n, func(_ int64, b []byte) error { return fn(b) })
	return err
}

// readRange is what ReadAtContext and ReadFunc share: the read deadline,
// stream detection (which may start read-ahead) and the read itself.
func (c *Cache) readRange(ctx context.Context, off, n int64, sink func(pos int64, b []byte) error) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, c.o.ReadDeadline)
	defer cancel()
	horizon, err := c.observe(off, n)
	if err != nil {
		return 0, err
	}
	return c.read(ctx, off, n, horizon, sink)
}

// readError builds the error of a failed read: which source, where, and
// why (the fetch's error, or the reader's context ending).
func (c *Cache) readError(ctx context.Context, pos int64, err error) error {
	if errors.Is(err, ErrClosed) {
		return ErrClosed
	}
	return fmt.Errorf("blockcache: reading %s at offset %d: %w", c.name, pos, err)
}

func (c *Cache) blockEnd(b int64) int64 { return min((b+1)*c.bs, c.size) }

// holeBlock reports whether block b may be served as zeros without a
// fetch: the source lists no written byte in it and there is no Verifier
// (with one, zeros are verified like any other bytes).
func (c *Cache) holeBlock(b int64) bool {
	return c.o.Verifier == nil && c.unwritten(b)
}

// unwritten reports whether the source lists no written byte in block b.
func (c *Cache) unwritten(b int64) bool {
	w := c.written.Load()
	return w != nil && w.isHole(b*c.bs, c.blockEnd(b))
}

// acquire returns the extent holding block b, pinned, starting a fetch of b
// and the following missing blocks up to the block holding end-1 (and
// MaxFetchSize) when b is not cached. It waits for memory when the bound is reached and everything
// is pinned or in flight. It also returns where, up to readEnd, the extent
// still holds the blocks after b: a flush may have replaced some of them
// (see keepWritten), and the extent's copy of those is older.
func (c *Cache) acquire(ctx context.Context, b, readEnd, end int64) (*extent, int64, error) {
	for {
		c.mu.Lock()
		if c.closed {
			c.mu.Unlock()
			return nil, 0, ErrClosed
		}
		if e := c.blocks[b]; e != nil {
			mapped := b + 1
			for mapped < e.first+e.nblocks && mapped*c.bs < readEnd && c.blocks[mapped] == e {
				mapped++
			}
			e.refs++
			e.waiters++
			if e.elem != nil {
				// Read-ahead keeps the place it got when it arrived: a
				// sequential reader consumes it in about that order, so
				// what it consumed is evicted before what it has yet to
				// read. Moved to the front on every read, consumed
				// extents looked newer than read-ahead that arrived
				// before the reader reached them, which eviction then
				// took and the reader fetched again (a stream reads
				// ahead up to 5/8 of its memory share, see observe):
				// 1840 MiB fetched for 1 GiB read sequentially.
				if !e.ahead {
					c.lru.MoveToFront(e.elem)
				}
				c.st.hits.Add(1)
			} else {
				c.st.pendingHits.Add(1)
			}
			c.mu.Unlock()
			return e, min(mapped*c.bs, e.end()), nil
		}
		last := min((end-1)/c.bs, c.nblocks-1)
		n := c.missingRunLocked(b, last)
		var freed []*extent
		ok := false
		for ; n >= 1; n /= 2 {
			var f []*extent
			ok, f = c.reserveLocked(c.extentMem(b, n), nil)
			freed = append(freed, f...)
			if ok {
				break
			}
		}
		if !ok {
			wake := c.memWake
			c.mu.Unlock()
			c.release(freed)
			select {
			case <-wake:
				continue
			case <-ctx.Done():
				return nil, 0, ctx.Err()
			case <-c.ctx.Done():
				return nil, 0, ErrClosed
			}
		}
		e := c.newExtentLocked(b, n, false)
		e.refs = 1
		e.waiters = 1
		c.st.misses.Add(uint64(n))
		c.wg.Add(1)
		c.mu.Unlock()
		c.release(adoptBuffers([]*extent{e}, freed))
		go c.fetch(e, false)
		return e, e.end(), nil
	}
}

// missingRunLocked returns how many blocks from b (at most up to last, and
// never across a multiple of fetchUnit) are neither cached, in flight nor
// holes. Cutting every fetch at the same aligned boundaries keeps a
// sequential stream's demand fetches and read-ahead from overlapping into
// fragments: once under way, every request is one whole aligned
// MaxFetchSize range, and storage that charges per request (Azurite, Azure
// transactions) sees the fewest requests.
func (c *Cache) missingRunLocked(b, last int64) int64 {
	unit := c.fetchUnit() / c.bs
	n := int64(1)
	for b+n <= last && (b+n)%unit != 0 && c.blocks[b+n] == nil && !c.holeBlock(b+n) {
		n++
	}
	return n
}

func (c *Cache) extentMem(b, n int64) int64 {
	return roundToPage(min((b+n)*c.bs, c.size) - b*c.bs)
}

// newExtentLocked registers a pending extent of n blocks from b.
func (c *Cache) newExtentLocked(b, n int64, ahead bool) *extent {
	off := b * c.bs
	e := &extent{
		first: b, nblocks: n, off: off,
		length: min((b+n)*c.bs, c.size) - off,
		ahead:  ahead,
		done:   make(chan struct{}),
	}
	e.ctx, e.cancel = context.WithTimeout(c.ctx, c.o.FetchTimeout)
	e.mem = roundToPage(e.length)
	for i := b; i < b+n; i++ {
		c.blocks[i] = e
	}
	c.st.inFlight.Add(1)
	return e
}

// reserveLocked accounts mem more bytes, evicting least recently used
// unpinned extents as needed. It returns false when the bound cannot be met;
// the evicted extents are returned for release outside the lock either way.
//
// Read-ahead of stream ahead (nil for demand fetches and flushes) spares
// what lies between that stream's reader and its read-ahead's end (from
// one fetch unit behind the furthest read, which the stream counts before
// the read is served and whose pieces may arrive out of order): when
// only that could make room, the stream is far enough ahead and waits for
// its reader. Evicting it fetched the same bytes twice when the reader was
// slower than storage or inside an extent that arrived early.
func (c *Cache) reserveLocked(mem int64, ahead *stream) (bool, []*extent) {
	var freed []*extent
	for el := c.lru.Back(); c.used+mem > c.o.MemoryBytes && el != nil; {
		e := el.Value.(*extent)
		el = el.Prev()
		if e.refs > 0 || ahead != nil && e.end() > ahead.next-c.fetchUnit() && e.off < ahead.raEnd {
			continue
		}
		c.detachLocked(e)
		c.used -= e.mem
		freed = append(freed, e)
		c.st.evictions.Add(1)
	}
	if c.used+mem > c.o.MemoryBytes {
		return false, freed
	}
	c.used += mem
	c.peak = max(c.peak, c.used)
	return true, freed
}

// detachLocked removes e from the block map and the LRU list.
func (c *Cache) detachLocked(e *extent) {
	if e.detached {
		return
	}
	e.detached = true
	for i := e.first; i < e.first+e.nblocks; i++ {
		if c.blocks[i] == e {
			delete(c.blocks, i)
		}
	}
	if e.elem != nil {
		c.lru.Remove(e.elem)
		e.elem = nil
	}
}

// wakeLocked tells memory waiters to look again.
func (c *Cache) wakeLocked() {
	close(c.memWake)
	c.memWake = make(chan struct{})
}

// release unmaps extents that are detached, unpinned and already unaccounted.
func (c *Cache) release(es []*extent) {
	for _, e := range es {
		if e == nil {
			continue
		}
		if err := unmapBuffer(e.buf); err != nil {
			c.log.Error("blockcache: releasing block memory", "err", err)
		}
		e.buf = nil
	}
}

// adoptBuffers hands the mappings of evicted extents to new extents,
// sparing an unmap, a map and the kernel zeroing the pages; it returns the
// evicted extents whose mappings are still to be released. A mapping of
// the same size is preferred; failing that any is taken, and fetch resizes
// it (random reads make extents of many sizes: an mmap reader's 1 MiB
// read-around windows start on any page, and exact sizes rarely met).
// Both sides are private to the caller: the evicted ones are detached and
// unpinned, the new ones not yet fetched.
func adoptBuffers(fresh, evicted []*extent) []*extent {
	for _, exact := range []bool{true, false} {
		for _, e := range fresh {
			if e.buf != nil {
				continue
			}
			for _, old := range evicted {
				if old.buf != nil && (!exact || int64(len(old.buf)) == e.mem) {
					e.buf, old.buf = old.buf, nil
					break
				}
			}
		}
	}
	return evicted
}

// stopWaiting records that a reader no longer waits for e's fetch; gaveUp
// says it left before the fetch ended. When the last waiter of a demand
// fetch gives up, the fetch is cancelled: read-ahead is kept, since its
// stream is likely to want it.
func (c *Cache) stopWaiting(e *extent, gaveUp bool) {
	c.mu.Lock()
	e.waiters--
	cancel := gaveUp && e.waiters == 0 && !e.ahead && e.elem == nil && e.err == nil && !e.detached
	if cancel {
		select {
		case <-e.done: // ended meanwhile
			cancel = false
		default:
			e.abandoned = true
		}
	}
	c.mu.Unlock()
	if cancel {
		e.cancel()
	}
}

// unpin drops a reader's reference; a detached extent is freed by its last
// reader.
func (c *Cache) unpin(e *extent) {
	c.mu.Lock()
	e.refs--
	var free bool
	if e.refs == 0 {
		if e.detached {
			c.used -= e.mem
			free = true
		}
		c.wakeLocked()
	}
	c.mu.Unlock()
	if free {
		c.release([]*extent{e})
	}
}

// fetch fills e from the disk tier and the source and publishes the result.
// A demand fetch waits for a request slot; read-ahead arrives holding one.
func (c *Cache) fetch(e *extent, haveSlot bool) {
	defer c.wg.Done()
	if !haveSlot {
		select {
		case c.sem <- struct{}{}:
		case <-e.ctx.Done():
			c.finish(e, e.buf, e.ctx.Err())
			return
		}
	}
	buf, err := e.buf, error(nil) // set when adopted from an evicted extent
	if buf != nil && int64(len(buf)) != e.mem {
		have := int64(len(buf))
		resized, rerr := resizeBuffer(buf, e.mem)
		if rerr != nil {
			c.log.Warn("blockcache: cannot reuse block memory; mapping anew", "err", rerr)
			if err := unmapBuffer(resized); err != nil {
				c.log.Error("blockcache: releasing block memory", "err", err)
			}
			resized = nil
		} else if e.mem > have {
			c.st.mappedBytes.Add(uint64(e.mem - have))
		}
		buf, e.buf = resized, nil // finish sets e.buf again
	}
	if buf == nil {
		buf, err = mapBuffer(e.mem)
		if err == nil {
			c.st.mappedBytes.Add(uint64(e.mem))
		}
	}
	ctx := e.ctx
	fromDisk := false
	if err == nil {
		fromDisk, err = c.fill(ctx, e, buf[:e.length], true)
	}
	<-c.sem
	if err == nil && c.o.Verifier != nil {
		// Hashing is CPU work: it runs without holding a request slot.
		err = c.verify(ctx, e, buf[:e.length], fromDisk)
	}
	if err != nil && c.ctx.Err() != nil {
		err = ErrClosed
	}
	c.finish(e, buf, err)
}

// verify runs the Verifier over a filled extent and records what it
// rejected. Blocks from the disk tier that fail are dropped from it and
// fetched again from the source, since local damage is not tampering.
func (c *Cache) verify(ctx context.Context, e *extent, data []byte, fromDisk bool) error {
	bad, err := c.o.Verifier.Verify(ctx, e.off, data)
	if err != nil {
		return fmt.Errorf("verifying %d bytes at offset %d: %w", len(data), e.off, err)
	}
	if len(bad) > 0 && fromDisk {
		for i := range e.nblocks {
			b := e.first + i
			if c.disk.has(b) {
				c.disk.drop(b)
				c.st.diskCorrupt.Add(1)
			}
		}
		if _, err := c.fill(ctx, e, data, false); err != nil {
			return err
		}
		if bad, err = c.o.Verifier.Verify(ctx, e.off, data); err != nil {
			return fmt.Errorf("verifying %d bytes at offset %d: %w", len(data), e.off, err)
		}
	}
	e.bad = bad
	if len(bad) > 0 {
		c.st.rejectedBytes.Add(uint64(rangesLen(bad)))
		c.log.Debug("blockcache: fetched bytes failed verification", "source", c.name, "offset", e.off, "bytes", e.length, "rejected", rangesLen(bad))
	}
	return nil
}

// fill reads the extent's bytes: blocks on disk from disk (when useDisk),
// the rest from the source in one ranged read per contiguous run (only its
// written parts when the source lists them, and without the parts the
// Verifier vouches are zeros), and zeros for holes. It reports whether any
// block came from disk.
func (c *Cache) fill(ctx context.Context, e *extent, dst []byte, useDisk bool) (bool, error) {
	fromDisk := make([]bool, e.nblocks)
	anyDisk := false
	if c.disk != nil && useDisk {
		for i := range e.nblocks {
			b := e.first + i
			if !c.disk.has(b) {
				continue
			}
			lo, hi := b*c.bs-e.off, c.blockEnd(b)-e.off
			if c.disk.read(b, dst[lo:hi]) == nil {
				fromDisk[i], anyDisk = true, true
			}
		}
	}
	var parts []blob.Range
	for i := int64(0); i < e.nblocks; {
		if fromDisk[i] {
			i++
			continue
		}
		j := i
		for j < e.nblocks && !fromDisk[j] {
			j++
		}
		lo, hi := (e.first+i)*c.bs, c.blockEnd(e.first+j-1)
		parts = parts[:0]
		if w := c.written.Load(); w != nil {
			parts = w.written(parts, lo, hi)
		} else {
			parts = append(parts, blob.Range{Off: lo, Len: hi - lo})
		}
		if v := c.o.Verifier; v != nil && len(parts) > 0 {
			if hi-lo >= zeroSkipMin {
				zeros, err := v.Zeros(ctx, lo, hi)
				if err != nil {
					return anyDisk, fmt.Errorf("asking the verifier for zero ranges of [%d, %d): %w", lo, hi, err)
				}
				parts = subtractRanges(parts, zeros, zeroGapMin)
			} else if p, ok := v.(Prefetcher); ok {
				p.Prefetch(e.off, e.end())
			}
		}
		pos := lo
		for _, r := range parts {
			clear(dst[pos-e.off : r.Off-e.off])
			if err := c.get(ctx, dst[r.Off-e.off:r.End()-e.off], r.Off); err != nil {
				return anyDisk, err
			}
			pos = r.End()
		}
		clear(dst[pos-e.off : hi-e.off])
		c.st.zeroFilled.Add(uint64(hi - lo - rangesLen(parts)))
		i = j
	}
	return anyDisk, nil
}

// subtractRanges returns parts without the runs of skip that are at least
// minLen long (both sorted and non-overlapping).
func subtractRanges(parts, skip []blob.Range, minLen int64) []blob.Range {
	var out []blob.Range
	j := 0
	for _, r := range parts {
		off, end := r.Off, r.End()
		for j < len(skip) && skip[j].End() <= off {
			j++
		}
		for k := j; k < len(skip) && skip[k].Off < end && off < end; k++ {
			s := skip[k]
			if s.Len < minLen {
				continue
			}
			if s.Off > off {
				out = append(out, blob.Range{Off: off, Len: s.Off - off})
			}
			off = max(off, s.End())
		}
		if off < end {
			out = append(out, blob.Range{Off: off, Len: end - off})
		}
	}
	return out
}

func rangesLen(rs []blob.Range) int64 {
	var n int64
	for _, r := range rs {
		n += r.Len
	}
	return n
}

// slowSplit is how many times more requests a stream keeps in flight when
// requests are slow (see Options.SlowRequestRate): fetches of half of
// MaxFetchSize, 8 MiB by default, so the 128 MiB window holds 16 of them.
// Not smaller: Azurite spends CPU per request (about 20 ms each on the
// benchmark machine), and 4 MiB fetches doubled its CPU per GiB.
const slowSplit = 2

// smallUnit is the fetch size while requests are slow: a multiple of the
// block size that divides MaxFetchSize, so small and large fetches share
// aligned boundaries and a change of mode never splits a fetch in two.
func (c *Cache) smallUnit() int64 {
	unit := c.o.MaxFetchSize / slowSplit
	unit -= unit % c.bs
	for unit > c.bs && c.o.MaxFetchSize%unit != 0 {
		unit -= c.bs
	}
	return max(unit, c.bs)
}

// fetchUnit is the size, and alignment, of fetches now: MaxFetchSize while
// requests are fast or not yet measured, smallUnit while the recent ones
// that ran (nearly) alone were slower than SlowRequestRate. A connection
// capped below the rate (Azure gives each tens of MB/s) is slow even alone,
// and throughput then grows with the requests in flight, so the read-ahead
// window (memory) holds slowSplit times as many of them. A server that is
// fast alone but shared by many requests (Azurite on a busy machine) keeps
// the large requests it prefers, since it pays per request.
func (c *Cache) fetchUnit() int64 {
	rate := math.Float64frombits(c.rate.Load())
	if c.o.SlowRequestRate > 0 && rate > 0 && rate < c.o.SlowRequestRate {
		return c.smallUnit()
	}
	return c.o.MaxFetchSize
}

// soloRequests is how many requests may run at once for one of them to
// measure what a connection gives: with more, a shared server's limit
// divides among them and a fast server looks like a slow connection.
const soloRequests = 2

// observeRate folds the throughput of a request that ran with at most
// soloRequests-1 others into the moving average that fetchUnit reads. Only
// requests of at least MaxFetchSize/16 (1 MiB) count: smaller ones
// measure latency, not throughput. A stream's first reads and the first
// steps of its read-ahead run nearly alone, so every stream measures.
// Concurrent updates may lose a sample, which an average can afford.
func (c *Cache) observeRate(n int, d time.Duration, concurrent int64) {
	if concurrent > soloRequests || int64(n) < max(c.o.MaxFetchSize/16, c.bs) || d <= 0 {
		return
	}
	sample := float64(n) / d.Seconds()
	if rate := math.Float64frombits(c.rate.Load()); rate > 0 {
		sample = rate + (sample-rate)/4
	}
	c.rate.Store(math.Float64bits(sample))
}

// get performs one ranged read and insists on every byte.
func (c *Cache) get(ctx context.Context, p []byte, off int64) error {
	start := time.Now()
	c.st.requests.Add(1)
	atStart := c.getting.Add(1)
	n, err := c.src.ReadAt(ctx, p, off)
	atEnd := c.getting.Add(-1) + 1
	took := time.Since(start)
	c.st.observeLatency(took)
	if err == nil {
		c.observeRate(n, took, max(atStart, atEnd))
	}
	c.st.bytesFetched.Add(uint64(max(n, 0)))
	if err == nil && n != len(p) || errors.Is(err, io.EOF) && n != len(p) {
		err = fmt.Errorf("short read: %d of %d bytes", n, len(p))
	} else if errors.Is(err, io.EOF) {
		err = nil // the range ends exactly at the end of the source
	}
	if err != nil {
		return fmt.Errorf("fetching %d bytes at offset %d: %w", len(p), off, err)
	}
	return nil
}

// finish publishes a fetch: on success the extent becomes cached, on failure
// it leaves the map so the next read fetches again.
func (c *Cache) finish(e *extent, buf []byte, err error) {
	c.st.inFlight.Add(-1)
	defer e.cancel() // the fetch's timer
	c.mu.Lock()
	switch {
	case c.closed && (err == nil || c.ctx.Err() != nil):
		err = ErrClosed
	case err != nil && e.abandoned:
		err = fmt.Errorf("%w (%w)", errAbandoned, err)
		c.st.abandoned.Add(1)
	}
	var free bool
	e.buf = buf
	if s := e.stream; s != nil && s.valid && s.id == e.streamID {
		s.inFlight -= e.length
	}
	if err != nil {
		if !errors.Is(err, ErrClosed) && !errors.Is(err, errAbandoned) {
			c.st.fetchErrors.Add(1)
		}
		e.err = err
		c.detachLocked(e)
		if e.refs == 0 {
			c.used -= e.mem
			free = true
		}
	} else if e.detached {
		// keepWritten dropped it while in flight: its bytes are older than a
		// write storage has acknowledged, so nobody new may read them.
		if e.refs == 0 {
			c.used -= e.mem
			free = true
		}
	} else {
		e.elem = c.lru.PushFront(e)
	}
	queueDisk := err == nil && !e.detached && c.disk != nil && c.diskPinned+e.mem <= c.o.MemoryBytes/4
	if queueDisk {
		e.refs++ // held by the disk writer
		c.diskPinned += e.mem
	}
	close(e.done)
	c.wakeLocked()
	var started, freed []*extent
	if err == nil {
		started, freed = c.topUpLocked(e)
	}
	c.mu.Unlock()
	if free {
		c.release([]*extent{e})
	}
	c.startReadAhead(started, freed)
	if err != nil {
		c.log.Debug("blockcache: fetch failed", "source", c.name, "offset", e.off, "bytes", e.length, "err", err)
	}
	if queueDisk {
		select {
		case c.diskQ <- e:
		default: // the disk is behind; skip rather than hold memory
			c.unpinDisk(e)
		}
	}
}

// diskWriter stores fetched extents in the disk tier until Close closes the
// queue; what is queued then is still written, so a clean shutdown keeps it.
func (c *Cache) diskWriter() {
	defer c.diskWG.Done()
	for e := range c.diskQ {
		c.writeDisk(e)
	}
}

// unpinDisk drops the disk writer's reference.
func (c *Cache) unpinDisk(e *extent) {
	c.mu.Lock()
	c.diskPinned -= e.mem
	c.mu.Unlock()
	c.unpin(e)
}

func (c *Cache) writeDisk(e *extent) {
	defer c.unpinDisk(e)
	for i := range e.nblocks {
		b := e.first + i
		if _, rejected := e.badIn(b*c.bs, c.blockEnd(b)); rejected || c.unwritten(b) {
			continue
		}
		lo, hi := b*c.bs-e.off, c.blockEnd(b)-e.off
		if err := c.disk.write(b, e.buf[lo:hi]); err != nil {
			c.log.Warn("blockcache: disk tier write failed", "err", err)
			return
		}
	}
}

// observe feeds the stream detector and starts read-ahead for sequential
// streams: missing blocks from off to off+n+window, in extents of up to
// MaxFetchSize, as long as request slots and memory allow. It returns how far
// a demand fetch for this read may extend: the end of the read-ahead window
// (when all request slots are busy with demand fetches, read-ahead rides on
// them), or off+n for a random read.
func (c *Cache) observe(off, n int64) (int64, error) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return 0, ErrClosed
	}
	// A stream that has read three times in a row reads ahead at least four
	// of its reads: large readers (1 MiB FUSE reads) skip the small first
	// steps of the ramp, each of which would be one more request.
	initial := max(4*c.bs, 256<<10, 4*n)
	maxWindow := c.o.MaxReadAhead
	// Sequential streams share the memory bound: each may use at most half
	// of its share, so read-ahead does not evict what others read ahead.
	if active := c.streams.activeSequential(4 * maxStreams); active > 0 {
		maxWindow = min(maxWindow, c.o.MemoryBytes/(2*active))
	}
	maxWindow = max(maxWindow-maxWindow%c.bs, 0)
	if c.o.MaxReadAhead == 0 {
		maxWindow = 0
	}
	// A read at the start of the source, or a large one, is the first of a
	// sequential pass far more often than a random read: its stream reads
	// ahead at once, in pieces fetched in parallel, instead of ramping up
	// over three reads, each a request waited for alone (the time to the
	// first byte and the first MiBs on slow connections). A read at 0
	// reads ahead 16 of its size; a large read fetches itself in parallel
	// pieces and at most MaxFetchSize beyond, which is all a random large
	// reader pays.
	// The eager window takes at most an eighth of memory, so a small
	// cache is not crowded by a guess. Only once the request rate is
	// known (see observeRate): until then the ramp's first requests,
	// which run alone, are what measures it, and without the cut to
	// smaller fetches that it brings the eager read-ahead is one large
	// request, slower than the ramp (823 against 503 ms for the first
	// 64 MiB at 50 MB/s per request).
	var eager int64
	if maxWindow > 0 && c.rate.Load() != 0 {
		if n >= eagerRead {
			eager = min(n+c.o.MaxFetchSize, maxWindow, c.o.MemoryBytes/8)
		} else if off == 0 {
			eager = min(max(initial, 16*n), maxWindow, c.o.MemoryBytes/8)
		}
	}
	eager = max(eager-eager%c.bs, 0)
	s, seq := c.streams.observe(off, n, min(initial, maxWindow), maxWindow, eager)
	if !seq || s.window == 0 {
		c.mu.Unlock()
		return off + n, nil
	}
	// Fetched read-ahead the reader has not reached yet may take up to
	// five eighths of the stream's share of memory, and at least its
	// window: room for the window to be in flight again while the reader
	// drains the last one (see readAheadLocked). The rest holds the
	// extent being read, one step of rounding and demand fetches; with
	// 3/4 a 1 GiB sequential read still fetched some read-ahead twice.
	share := c.o.MemoryBytes / max(c.streams.activeSequential(4*maxStreams), 1)
	s.reach = max(s.window, min(2*s.window, share*5/8))
	horizon, from := min(s.next+s.window, c.size), off
	if s.id == c.streams.tick {
		// The stream's first read (opened eagerly): a small read's own
		// fetch holds just its bytes, so the reader waits for no more,
		// and the read-ahead runs beside it; a large read is itself
		// fetched by the read-ahead's parallel pieces.
		horizon = off + n
		if n < eagerRead {
			from = off + n
		}
		s.eagerEnd = from + s.window
	}
	started, freed := c.readAheadLocked(s, from)
	c.mu.Unlock()
	c.startReadAhead(started, freed)
	return horizon, nil
}

// readAheadLocked reserves and registers the read-ahead of stream s, from
// off (or where its read-ahead got to) to the end of its window, as far as
// request slots and memory allow. The caller starts the returned extents
// with startReadAhead after unlocking.
func (c *Cache) readAheadLocked(s *stream, off int64) (started, freed []*extent) {
	// Read ahead of the stream's furthest read, not of this one: pieces of
	// a large read arrive out of order (see reorderPieces).
	end := s.next
	// Read ahead in whole steps of the window (or fetchUnit once the
	// window is larger), as soon as one step of the window is free: a
	// server that answers parallel requests together (Azurite does) must
	// never find the pipeline empty while the reader drains what arrived.
	//
	// The window bounds the bytes in flight, not the distance ahead of the
	// reader: a fetch that ends is replaced at once although the reader
	// has not consumed it yet (up to reach ahead). Bounding the distance
	// made a sawtooth on connections capped in throughput: the window's
	// fetches, started together, ended together; the reader drained them
	// all, and only then did the next window start, so on average half of
	// it was in flight.
	step := min(s.window, c.fetchUnit())
	reach := max(s.reach, s.window)
	if s.raEnd-end > reach-step || s.window-s.inFlight < step {
		return nil, nil
	}
	// The reach's end is rounded up to a multiple of step, so successive
	// batches of read-ahead meet at the same aligned boundaries as
	// missingRunLocked's cuts and no fetch is split in two.
	from := max(s.raEnd, off)
	to := min((end+reach+step-1)/step*step, c.size)
	b, last := from/c.bs, (to-1)/c.bs
issue:
	for b <= last {
		if c.blocks[b] != nil || c.holeBlock(b) {
			b++
			continue
		}
		if len(c.sem) >= c.raMax {
			break
		}
		nb := c.missingRunLocked(b, last)
		if b*c.bs < s.eagerEnd {
			piece := c.eagerPiece(s.window) / c.bs
			nb = min(nb, piece-b%piece)
		}
		if s.inFlight > 0 && s.inFlight+(min((b+nb)*c.bs, c.size)-b*c.bs) > s.window {
			break // whole fetches only: splitting one would add a request
		}
		mem := c.extentMem(b, nb)
		ok, f := c.reserveLocked(mem, s)
		freed = append(freed, f...)
		if !ok {
			break
		}
		select {
		case c.sem <- struct{}{}:
		default: // demand fetches took the slots meanwhile
			c.used -= mem
			break issue
		}
		e := c.newExtentLocked(b, nb, true)
		e.stream, e.streamID = s, s.id
		s.inFlight += e.length
		c.st.readAhead.Add(uint64(nb))
		started = append(started, e)
		c.wg.Add(1)
		b += nb
	}
	s.raEnd = max(s.raEnd, min(b*c.bs, c.size))
	return started, freed
}

// eagerRead is the size from which a read opens its stream's read-ahead
// at once: larger than the 1 MiB pieces a FUSE mount hands on, which come
// from random readers too (an mmap reader's read-around).
const eagerRead = 4 << 20

// eagerPiece is the fetch size of an eagerly opened stream's first
// read-ahead: a quarter of its window, so four requests run at once, cut
// at boundaries that divide fetchUnit (halving it, while a whole number of
// blocks) so later fetches stay aligned.
func (c *Cache) eagerPiece(window int64) int64 {
	piece := c.fetchUnit()
	for piece/2 >= c.bs && (piece/2)%c.bs == 0 && piece > window/4 {
		piece /= 2
	}
	return piece
}

// startReadAhead starts what readAheadLocked registered.
func (c *Cache) startReadAhead(started, freed []*extent) {
	c.release(adoptBuffers(started, freed))
	for _, e := range started {
		go c.fetch(e, true)
	}
}

// topUpLocked continues the read-ahead of the stream that started e, which
// just ended and freed its request slot. Without it read-ahead would start
// only on reads, and a reader waiting for the oldest fetch while younger
// ones end would let the requests in flight drain below the slots: on
// connections capped in throughput, that is throughput lost.
func (c *Cache) topUpLocked(e *extent) (started, freed []*extent) {
	s := e.stream
	if s == nil || c.closed || !s.valid || s.id != e.streamID || s.window == 0 {
		return nil, nil
	}
	return c.readAheadLocked(s, s.raEnd)
}

// markWritten records that storage now holds written bytes in ranges, so
// that reads no longer serve them as holes (zeros).
func (c *Cache) markWritten(ranges []blob.Range) {
	w := c.written.Load()
	if w == nil {
		return
	}
	var add []blob.Range
	for _, r := range ranges {
		if r.Len > 0 && !w.covers(r.Off, r.End()) {
			add = append(add, r)
		}
	}
	if len(add) == 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	w = c.written.Load() // the only writer is the one flush at a time; reload anyway
	c.written.Store(newWrittenIndex(append(append([]blob.Range(nil), w.ranges...), add...), c.size))
}

// keepWritten updates block b once storage acknowledged the dirty pages of
// d, so a read after a flush needs no request: when the block's new bytes
// are known exactly (every page written, or the rest of the block cached
// or a hole before the write, wasHole) they become a clean cached block of
// their own; otherwise the older copy is dropped and the next read fetches
// the block. WriteBack still overlays d while this runs, so readers see
// the new bytes throughout.
func (c *Cache) keepWritten(b int64, d *dirtyBlock, wasHole bool) {
	base, blockLen := b*c.bs, c.blockEnd(b)-b*c.bs
	full := true
	for pg := range int((blockLen + blob.PageSize - 1) / blob.PageSize) {
		if !d.has(pg) {
			full = false
			break
		}
	}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	old := c.blocks[b]
	cached := !full && !wasHole && old != nil && old.elem != nil // ready, not in flight
	if cached {
		old.refs++ // kept while its bytes are copied
	}
	if !full && !wasHole && !cached {
		free := c.dropBlockLocked(b)
		c.mu.Unlock()
		c.release([]*extent{free})
		return
	}
	// Room first, so the mapping of an extent it evicts can be reused: a
	// long sequential write keeps every block it uploads, and a fresh
	// mapping per block cost more (mmap, zero-filled page faults, munmap)
	// than the copy itself.
	mem := roundToPage(blockLen)
	ok, freed := c.reserveLocked(mem, nil)
	var buf []byte
	if ok {
		for _, ev := range freed {
			if ev != nil && int64(len(ev.buf)) == mem {
				buf, ev.buf = ev.buf, nil
				break
			}
		}
	}
	c.mu.Unlock()
	c.release(freed)
	freed = nil

	var err error
	switch {
	case !ok:
	case buf == nil:
		c.st.mappedBytes.Add(uint64(mem))
		buf, err = mapBuffer(mem) // zeroed: a hole's old bytes
	case !full && !cached:
		clear(buf) // reused: a hole's old bytes are zeros
	}
	if ok && err == nil {
		if cached {
			copy(buf, old.buf[base-old.off:base-old.off+blockLen])
		}
		d.runs(func(from, to int) {
			s, e := int64(from)*blob.PageSize, min(int64(to)*blob.PageSize, blockLen)
			copy(buf[s:e], d.data[s:e])
		})
	}
	if cached {
		c.unpin(old)
	}

	c.mu.Lock()
	if !ok || err != nil || c.closed {
		if ok {
			c.used -= mem
			c.wakeLocked()
		}
		if !c.closed {
			freed = append(freed, c.dropBlockLocked(b))
		}
		c.mu.Unlock()
		c.release(freed)
		if err != nil {
			c.log.Warn("blockcache: cannot keep an uploaded block cached; it will be fetched again", "err", err)
		} else if unmapErr := unmapBuffer(buf); unmapErr != nil {
			c.log.Error("blockcache: releasing block memory", "err", unmapErr)
		}
		return
	}
	e := &extent{first: b, nblocks: 1, off: base, length: blockLen, mem: mem, done: make(chan struct{}), buf: buf}
	close(e.done)
	freed = append(freed, c.dropBlockLocked(b))
	c.blocks[b] = e
	e.elem = c.lru.PushFront(e)
	c.mu.Unlock()
	c.release(freed)
}

// dropBlockLocked removes block b from the map: its extent leaves the cache
// once no other block of it is mapped (readers that pinned it keep it
// until they let go; acquire keeps new readers from reading b through it).
// It returns the extent to release after unlocking, if any.
func (c *Cache) dropBlockLocked(b int64) (free *extent) {
	e := c.blocks[b]
	if e == nil {
		return nil
	}
	delete(c.blocks, b)
	for i := e.first; i < e.first+e.nblocks; i++ {
		if c.blocks[i] == e {
			return nil
		}
	}
	ready := e.elem != nil
	c.detachLocked(e)
	if ready && e.refs == 0 {
		c.used -= e.mem
		c.wakeLocked()
		return e
	}
	return nil
}

// Stats returns a snapshot of the counters.
func (c *Cache) Stats() Stats {
	c.mu.Lock()
	used, peak := c.used, c.peak
	c.mu.Unlock()
	return Stats{
		Hits:            c.st.hits.Load(),
		PendingHits:     c.st.pendingHits.Load(),
		Misses:          c.st.misses.Load(),
		ReadAhead:       c.st.readAhead.Load(),
		Requests:        c.st.requests.Load(),
		Abandoned:       c.st.abandoned.Load(),
		BytesFetched:    c.st.bytesFetched.Load(),
		FetchErrors:     c.st.fetchErrors.Load(),
		InFlight:        c.st.inFlight.Load(),
		ZeroFilled:      c.st.zeroFilled.Load(),
		Evictions:       c.st.evictions.Load(),
		MemoryBytes:     used,
		PeakMemoryBytes: peak,
		MemoryLimit:     c.o.MemoryBytes,
		MappedBytes:     c.st.mappedBytes.Load(),
		DiskHits:        c.st.diskHits.Load(),
		DiskWrites:      c.st.diskWrites.Load(),
		DiskCorrupt:     c.st.diskCorrupt.Load(),
		DiskEvictions:   c.st.diskEvict.Load(),
		DiskBytes:       c.st.diskBytes.Load(),
		FetchLatency:    c.st.histogram(),
		RejectedBytes:   c.st.rejectedBytes.Load(),
		IntegrityErrors: c.st.integrityErrors.Load(),
	}
}

// Close stops fetches, waits for them and releases all block memory. Reads
// in progress fail with ErrClosed; memory they still pin is released when
// they let go.
func (c *Cache) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	c.wakeLocked()
	c.mu.Unlock()
	c.cancel()
	c.wg.Wait()
	if c.diskQ != nil {
		close(c.diskQ) // no fetch is left to send on it
		c.diskWG.Wait()
	}

	c.mu.Lock()
	var freed []*extent
	for el := c.lru.Front(); el != nil; {
		e := el.Value.(*extent)
		el = el.Next()
		c.detachLocked(e)
		if e.refs == 0 {
			c.used -= e.mem
			freed = append(freed, e)
		}
	}
	c.mu.Unlock()
	c.release(freed)
	return nil
}
