package fs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"syscall"
	"time"

	"github.com/blobseal/blobseal/fs/ext4"
)

// DefaultDirtyLimit is how much written data a writable mount holds in
// memory before writers wait for it to reach the filesystem.
const DefaultDirtyLimit = 64 << 20

// mtimeSlack is how much later than the last write a flush may stamp a
// file's mtime before the flush puts the write's time back (one more
// journaled inode change, not worth making at every close).
const mtimeSlack = 50 * time.Millisecond

// MinDirtyLimit, the smallest write cache, keeps room for a few maximal FUSE writes (1 MiB each), so
// a writer always fits once the cache has drained.
const MinDirtyLimit = 4 << 20

// dirtyCache holds data written through a writable mount until it is
// flushed to the ext4 Writer in large contiguous runs, so the allocator
// sees whole extents and a write(2) costs a copy rather than a journaled
// change. Memory is bounded: past a quarter of the limit a background
// flusher writes out the file with the most dirty data; at the limit a
// writer waits for it (back-pressure). Readers see dirty data and sizes
// at once (writerTree overlays them). Flush errors are kept per file and
// reported by the next fsync or close of it, as the kernel does with
// writeback errors.
//
// One mutex guards the bookkeeping and is never held across a Writer call;
// a per-file busy flag keeps that file's flushes in order.
type dirtyCache struct {
	// ctx is the mount's lifetime: flushes write with it, not with the
	// request that asked for them, so an interrupted fsync or close
	// stops waiting but never stops a flush halfway (its data was
	// acknowledged to the writer and must reach the filesystem).
	ctx       context.Context
	w         *ext4.Writer
	log       *slog.Logger
	limit     int64
	blockSize uint32

	mu    sync.Mutex
	cond  *sync.Cond // signalled when used drops or a file stops being busy
	used  int64      // capacity of the runs buffered and in flight, and of spare
	files map[uint32]*dirtyFile

	// spare keeps emptied streaming-run buffers (counted in used, and
	// let go when a writer needs the room), so a stream reuses memory
	// instead of clearing fresh buffers.
	spare [][]byte

	// small recycles the buffers of small runs by size class (see
	// smallClass): an untar writes thousands of small files, and each
	// file's buffer would otherwise be garbage once flushed. Not counted
	// in used: a pooled buffer is memory the collector may take.
	small [smallClasses]sync.Pool

	kick chan struct{} // wakes the background flusher
	stop chan struct{}
	done chan struct{}
}

// dirtyFile is one inode's unflushed data.
type dirtyFile struct {
	ino  uint32
	runs []dirtyRun // sorted by offset, not overlapping

	inflight []dirtyRun // taken by the flush in progress, still visible to readers
	bytes    int64      // capacity of runs (what the cache accounts)
	end      int64      // largest offset+len of runs and inflight: the size they imply
	mtime    time.Time  // of the last buffered write
	busy     bool       // a flush of this file is running
	err      error      // a flush failure not yet reported
}

type dirtyRun struct {
	off  int64
	data []byte
}

func (r dirtyRun) end() int64 { return r.off + int64(len(r.data)) }

func newDirtyCache(ctx context.Context, w *ext4.Writer, limit int64, blockSize uint32, log *slog.Logger) *dirtyCache {
	if limit <= 0 {
		limit = DefaultDirtyLimit
	}
	limit = max(limit, MinDirtyLimit)
	c := &dirtyCache{
		ctx: ctx, w: w, log: log, limit: limit, blockSize: blockSize,
		files: map[uint32]*dirtyFile{},
		kick:  make(chan struct{}, 1),
		stop:  make(chan struct{}),
		done:  make(chan struct{}),
	}
	c.cond = sync.NewCond(&c.mu)
	go c.flusher()
	return c
}

// background is the amount of dirty data the flusher starts at: early
// enough that writing out overlaps with the application's next writes,
// late enough that runs are long.
func (c *dirtyCache) background() int64 { return c.limit / 4 }

// write buffers data at off for ino. It waits while the cache is full,
// and answers a flush error not yet reported instead of buffering more
// (a writer filling a full filesystem stops at once, not at close). When
// ctx ends while it waits (the kernel interrupted the write), it returns
// an error matching EINTR and buffers nothing.
func (c *dirtyCache) write(ctx context.Context, ino uint32, data []byte, off int64) error {
	if len(data) == 0 {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for waits := 0; ; waits++ {
		if err := ctx.Err(); err != nil {
			return interruptedErr("write", ino, err)
		}
		if f := c.files[ino]; f != nil && f.err != nil {
			return f.err
		}
		// At most what add can grow by: the data, or a fresh streaming
		// run when no spare one is left.
		need := int64(len(data))
		if len(c.spare) == 0 {
			need = max(need, c.runCap())
		}
		if c.used+need <= c.limit {
			break
		}
		if len(c.spare) > 0 {
			c.dropSpare()
			continue
		}
		c.wake()
		if waits == 0 {
			// Only a writer that waits pays for the wake-up on interrupt.
			defer context.AfterFunc(ctx, c.broadcast)()
		}
		c.cond.Wait()
	}
	f := c.files[ino]
	if f == nil {
		f = &dirtyFile{ino: ino}
		c.files[ino] = f
	}
	c.used += f.add(data, off, int(c.runCap()), c.buffer)
	f.mtime = time.Now()
	if c.used >= c.background() {
		c.wake()
	}
	return nil
}

// runCap is the capacity a streaming write's run is given up front, so a
// sequence of writes fills one buffer instead of regrowing it, and the
// size of the contiguous runs the Writer then gets: 4 MiB, which is also
// the largest write the encrypting volume below serves from its buffer
// pool (a larger one costs it a fresh buffer, cleared, per write).
func (c *dirtyCache) runCap() int64 { return min(4<<20, c.limit/8) }

// streamingWrite is the smallest write taken for part of a stream (the
// kernel sends large sequential writes in pieces of up to 1 MiB).
const streamingWrite = 128 << 10

// add merges data at off into the runs and returns how much their
// capacity grew: the memory the cache accounts.
func (f *dirtyFile) add(data []byte, off int64, runCap int, buffer func(size int) ([]byte, int64)) int64 {
	end := off + int64(len(data))
	// The runs that overlap [off, end).
	lo := sort.Search(len(f.runs), func(i int) bool { return f.runs[i].end() > off })
	hi := lo
	for hi < len(f.runs) && f.runs[hi].off < end {
		hi++
	}
	var grown int64
	switch {
	case lo == hi && lo > 0 && f.runs[lo-1].end() == off && int64(cap(f.runs[lo-1].data)) >= end-f.runs[lo-1].off:
		// The next piece of a stream, with room in its run.
		r := &f.runs[lo-1]
		r.data = append(r.data, data...)
	case lo == hi: // a new run
		size := len(data)
		if len(data) >= streamingWrite {
			size = max(size, runCap)
		}
		buf, fresh := buffer(size)
		buf = append(buf, data...)
		f.runs = append(f.runs, dirtyRun{})
		copy(f.runs[lo+1:], f.runs[lo:])
		f.runs[lo] = dirtyRun{off: off, data: buf}
		f.bytes += int64(cap(buf)) - fresh // a spare buffer was counted already
		grown = fresh
	case hi == lo+1 && f.runs[lo].off <= off && end-f.runs[lo].off <= int64(cap(f.runs[lo].data)):
		// Inside one run, or extending it within its capacity.
		r := &f.runs[lo]
		if n := end - r.off; n > int64(len(r.data)) {
			r.data = r.data[:n]
		}
		copy(r.data[off-r.off:], data)
	default: // over several runs, or growing one: rebuild them as one
		start, stop := min(off, f.runs[lo].off), max(end, f.runs[hi-1].end())
		buf := make([]byte, stop-start)
		var old int64
		for _, r := range f.runs[lo:hi] {
			copy(buf[r.off-start:], r.data)
			old += int64(cap(r.data))
		}
		copy(buf[off-start:], data)
		f.runs[lo] = dirtyRun{off: start, data: buf}
		f.runs = append(f.runs[:lo+1], f.runs[hi:]...)
		grown = int64(len(buf)) - old
	}
	f.bytes += grown
	f.end = max(f.end, end)
	return grown
}

// buffer returns an empty buffer of capacity at least size and how much
// it adds to used: nothing for a spare one. Called with mu held.
func (c *dirtyCache) buffer(size int) ([]byte, int64) {
	if n := len(c.spare); n > 0 && cap(c.spare[n-1]) == size {
		b := c.spare[n-1]
		c.spare = c.spare[:n-1]
		return b, 0
	}
	if class := smallClass(size); class >= 0 {
		if b, ok := c.small[class].Get().(*[]byte); ok {
			return (*b)[:0], int64(cap(*b))
		}
		n := smallMin << class
		return make([]byte, 0, n), int64(n)
	}
	return make([]byte, 0, size), int64(size)
}

// Small run buffers come in power-of-two classes from smallMin up to
// below streamingWrite (larger writes start streaming runs).
const (
	smallMin     = 4 << 10
	smallClasses = 5 // 4 KiB .. 64 KiB
)

// smallClass returns the class whose buffers hold size bytes, or -1.
func smallClass(size int) int {
	for class := range smallClasses {
		if size <= smallMin<<class {
			return class
		}
	}
	return -1
}

// recycle keeps a flushed small buffer for the next small run.
func (c *dirtyCache) recycle(b []byte) {
	if class := smallClass(cap(b)); class >= 0 && cap(b) == smallMin<<class {
		b = b[:0]
		c.small[class].Put(&b)
	}
}

// dropSpare lets the spare buffers go. Called with mu held.
func (c *dirtyCache) dropSpare() {
	for _, b := range c.spare {
		c.used -= int64(cap(b))
	}
	c.spare = nil
}

// wake nudges the flusher without waiting.
func (c *dirtyCache) wake() {
	select {
	case c.kick <- struct{}{}:
	default:
	}
}

// flusher writes out the largest dirty file while the cache is above its
// background threshold, until close.
func (c *dirtyCache) flusher() {
	defer close(c.done)
	for {
		select {
		case <-c.stop:
			return
		case <-c.kick:
		}
		for {
			c.mu.Lock()
			var victim *dirtyFile
			if c.used >= c.background() {
				for _, f := range c.files {
					if !f.busy && f.bytes > 0 && (victim == nil || f.bytes > victim.bytes) {
						victim = f
					}
				}
			}
			c.mu.Unlock()
			if victim == nil {
				break
			}
			if err := c.flushFile(victim.ino); err != nil {
				c.log.Debug("background flush failed; reported at the file's next fsync or close", "inode", victim.ino, "err", err)
			}
		}
	}
}

// broadcast wakes every waiter, so one whose context ended can leave.
func (c *dirtyCache) broadcast() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.cond.Broadcast()
}

// interruptedErr is the error of an operation its request's context ended
// before it was done: it matches the context's error and EINTR, which the
// kernel passes on to the interrupted system call.
func interruptedErr(op string, ino uint32, err error) error {
	return fmt.Errorf("%s of inode %d not done: %w (%w)", op, ino, err, syscall.EINTR)
}

// flushContext is flushFile for a request: it returns when the flush is
// done or when ctx ends, whichever comes first; an abandoned flush goes
// on (with the mount's context) and keeps its error for the next report.
func (c *dirtyCache) flushContext(ctx context.Context, ino uint32) error {
	if err := ctx.Err(); err != nil {
		return interruptedErr("flush", ino, err)
	}
	c.mu.Lock()
	f := c.files[ino]
	idle := f == nil || !f.busy && len(f.runs) == 0
	c.mu.Unlock()
	if idle { // the common case (setattr, release after close): nothing to wait for
		return nil
	}
	done := make(chan error, 1)
	go func() { done <- c.flushFile(ino) }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return interruptedErr("flush", ino, ctx.Err())
	}
}

// flushFile writes ino's dirty data to the Writer, after any flush of it
// already running, and returns the error of this flush (also kept for the
// next report). Failed data is dropped, as the kernel drops pages whose
// writeback failed: the error is what the application gets.
func (c *dirtyCache) flushFile(ino uint32) error {
	c.mu.Lock()
	f := c.files[ino]
	for f != nil && f.busy {
		c.cond.Wait()
		f = c.files[ino]
	}
	if f == nil || len(f.runs) == 0 {
		c.mu.Unlock()
		return nil
	}
	f.busy = true
	runs, mtime := f.runs, f.mtime
	f.runs, f.inflight, f.bytes = nil, runs, 0
	c.mu.Unlock()

	var err error
	for _, r := range runs {
		if _, err = c.w.WriteAtContext(c.ctx, ino, r.data, r.off); err != nil {
			break
		}
	}
	if err == nil && time.Since(mtime) > mtimeSlack {
		// The Writer stamped the flush's time; the file was last written
		// earlier, and that is what stat showed meanwhile.
		_, err = c.w.SetattrContext(c.ctx, ino, ext4.SetAttr{Mtime: &mtime})
	}

	c.mu.Lock()
	defer c.mu.Unlock()
	for _, r := range runs {
		if int64(cap(r.data)) == c.runCap() {
			c.spare = append(c.spare, r.data[:0])
		} else {
			// Nothing refers to it any more: the Writer has copied it and
			// readers take copies under mu.
			c.used -= int64(cap(r.data))
			c.recycle(r.data)
		}
	}
	f.inflight, f.busy = nil, false
	if err != nil && f.err == nil {
		f.err = err
	}
	f.end = 0
	for _, r := range f.runs {
		f.end = max(f.end, r.end())
	}
	c.forgetIfClean(f)
	c.cond.Broadcast()
	return err
}

// forgetIfClean drops f's entry once nothing about it remains to tell.
// Called with mu held.
func (c *dirtyCache) forgetIfClean(f *dirtyFile) {
	if !f.busy && len(f.runs) == 0 && f.err == nil && c.files[f.ino] == f {
		delete(c.files, f.ino)
	}
}

// sync flushes ino and returns, and so clears, the error its flushes met
// since the last report: the fsync and close contract. When ctx ends
// first it returns an error matching EINTR and leaves the error, if any,
// for the next report.
func (c *dirtyCache) sync(ctx context.Context, ino uint32) error {
	if err := c.flushContext(ctx, ino); errors.Is(err, syscall.EINTR) && ctx.Err() != nil {
		return err
	} // any other error is kept in f.err
	c.mu.Lock()
	defer c.mu.Unlock()
	f := c.files[ino]
	if f == nil {
		return nil
	}
	err := f.err
	f.err = nil
	c.forgetIfClean(f)
	return err
}

// flushAll writes out every file's dirty data; each file's error stays
// for its own fsync or close. It returns the first error met.
func (c *dirtyCache) flushAll() error {
	c.mu.Lock()
	inos := make([]uint32, 0, len(c.files))
	for ino := range c.files {
		inos = append(inos, ino)
	}
	c.mu.Unlock()
	var first error
	for _, ino := range inos {
		if err := c.flushFile(ino); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// discard drops ino's dirty data unwritten (a mount turned read-only can
// store nothing) and reports whether there was any.
func (c *dirtyCache) discard(ino uint32) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	f := c.files[ino]
	if f == nil {
		return false
	}
	lost := len(f.runs) > 0 || f.err != nil
	c.used -= f.bytes
	f.runs, f.bytes, f.err = nil, 0, nil
	c.forgetIfClean(f)
	c.cond.Broadcast()
	return lost
}

// trim lets idle memory go: the spare buffers, between bursts.
func (c *dirtyCache) trim() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.dropSpare()
	c.cond.Broadcast()
}

// close stops the background flusher; what is dirty stays for flushAll.
func (c *dirtyCache) close() {
	close(c.stop)
	<-c.done
}

// overlay returns in with the size and times its dirty data implies, so
// getattr sees a write at once.
func (c *dirtyCache) overlay(in *ext4.Inode) *ext4.Inode {
	if c == nil {
		return in
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	f := c.files[in.Ino]
	if f == nil || f.end == 0 && len(f.runs) == 0 {
		return in
	}
	if end := uint64(f.end); end > in.Size {
		// Appended data counts as the blocks it will take, as ext4's
		// delayed allocation reserves them: du sees a file grow.
		bs := uint64(c.blockSize)
		in.Blocks += (end - in.Size + bs - 1) / bs * bs / 512
		in.Size = end
	}
	if !f.mtime.IsZero() && f.mtime.After(in.Mtime) {
		in.Mtime, in.Ctime = f.mtime, f.mtime
	}
	return in
}

// piece is a copy of dirty bytes at off, taken for a reader.
type piece struct {
	off  int64
	data []byte
}

// pieces copies the dirty bytes of ino within [off, off+n): in-flight
// ones first, newer buffered ones after, so applying them in order gives
// the current content. It also returns the size the dirty data implies.
func (c *dirtyCache) pieces(ino uint32, off int64, n int) ([]piece, int64) {
	if c == nil {
		return nil, 0
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	f := c.files[ino]
	if f == nil {
		return nil, 0
	}
	end := off + int64(n)
	var out []piece
	for _, list := range [][]dirtyRun{f.inflight, f.runs} {
		for _, r := range list {
			lo, hi := max(off, r.off), min(end, r.end())
			if lo < hi {
				out = append(out, piece{off: lo, data: append([]byte(nil), r.data[lo-r.off:hi-r.off]...)})
			}
		}
	}
	return out, f.end
}
