package blockcache

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/blobseal/blobseal/blob"
)

// TestConcurrentReadsMatchReference hammers a small cache (constant eviction)
// from 64 goroutines with odd offsets and lengths, reads spanning many blocks
// and reads past EOF, and checks every byte, the at-most-once rule per block
// and the memory bound.
func TestConcurrentReadsMatchReference(t *testing.T) {
	checkNoLeak(t)
	const bs = 16 << 10
	ref := randomBytes(1, 4<<20+12345) // not a whole number of blocks
	src := newTestSource(ref, bs)
	src.latency = 200 * time.Microsecond
	c := newCache(t, src, Options{BlockSize: bs, MemoryBytes: 1 << 20, MaxFetchSize: 64 << 10, MaxFetches: 8, MaxReadAhead: 256 << 10})

	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for g := range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(g), 7))
			for range 25 {
				var off int64
				var n int
				switch r.IntN(4) {
				case 0: // small, odd
					off, n = r.Int64N(int64(len(ref))), 1+r.IntN(5000)
				case 1: // spanning many blocks
					off, n = r.Int64N(int64(len(ref))), 1+r.IntN(200<<10)
				case 2: // across or past EOF
					off, n = int64(len(ref))-r.Int64N(40000), 1+r.IntN(100000)
				default: // sequential run
					off, n = r.Int64N(int64(len(ref))/2), 128<<10
					for range 4 {
						if err := readExpect(c, ref, off, n); err != nil {
							errs <- err
							return
						}
						off += int64(n)
					}
				}
				if err := readExpect(c, ref, off, n); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	// Read-ahead may still be running after the last read returns; it must
	// drain on its own, or a fetch leaked.
	st := c.Stats()
	for deadline := time.Now().Add(10 * time.Second); st.InFlight != 0 && time.Now().Before(deadline); st = c.Stats() {
		time.Sleep(time.Millisecond)
	}
	perBlock, inFlight := src.peaks()
	if perBlock != 1 {
		t.Errorf("a block had %d concurrent requests, want at most 1", perBlock)
	}
	if st.PeakMemoryBytes > st.MemoryLimit {
		t.Errorf("peak memory %d exceeds the bound %d", st.PeakMemoryBytes, st.MemoryLimit)
	}
	if st.Evictions == 0 {
		t.Errorf("no evictions with a 1 MiB cache over 4 MiB: the test did not exercise eviction")
	}
	if st.InFlight != 0 {
		t.Errorf("InFlight = %d 10 s after all reads finished", st.InFlight)
	}
	if inFlight > 8 {
		t.Errorf("%d requests in flight, MaxFetches is 8", inFlight)
	}
	t.Logf("stats: %+v", st)
}

// TestReadEdgeCases covers io.ReaderAt semantics at the edges.
func TestReadEdgeCases(t *testing.T) {
	ref := randomBytes(2, 100000)
	c := newCache(t, newTestSource(ref, 4096), Options{BlockSize: 4096, MemoryBytes: 1 << 20})
	for _, tc := range []struct {
		off int64
		n   int
	}{{0, 0}, {0, 1}, {99999, 1}, {99999, 2}, {100000, 1}, {100000, 0}, {200000, 10}, {4095, 2}, {0, 100000}, {0, 100001}} {
		if err := readExpect(c, ref, tc.off, tc.n); err != nil {
			t.Error(err)
		}
	}
	if _, err := c.ReadAt(make([]byte, 1), -1); err == nil || !strings.Contains(err.Error(), "negative offset") {
		t.Errorf("negative offset: err = %v", err)
	}
	empty := newCache(t, newTestSource(nil, 4096), Options{})
	if n, err := empty.ReadAt(make([]byte, 10), 0); n != 0 || err != io.EOF {
		t.Errorf("empty source: %d, %v; want 0, EOF", n, err)
	}
}

// TestBlockFetchedOnceForConcurrentReaders: 32 readers of one block while it
// is in flight cause one request; they all wait for it.
func TestBlockFetchedOnceForConcurrentReaders(t *testing.T) {
	ref := randomBytes(3, 1<<20)
	src := newTestSource(ref, 64<<10)
	src.latency = 100 * time.Millisecond
	c := newCache(t, src, Options{BlockSize: 64 << 10, MemoryBytes: 4 << 20, MaxReadAhead: -1})
	var wg sync.WaitGroup
	for i := range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := readExpect(c, ref, 70000+int64(i)*100, 4096); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	st := c.Stats()
	if len(src.requests()) != 1 || st.Requests != 1 {
		t.Fatalf("%d requests (stats %d) for one block read by 32 readers, want 1", len(src.requests()), st.Requests)
	}
	if st.Misses != 1 || st.Hits+st.PendingHits != 31 {
		t.Errorf("misses %d, hits %d + pending %d; want 1 and 31", st.Misses, st.Hits, st.PendingHits)
	}
}

// TestSmallRandomReadsFetchOneBlock: random 4 KiB reads fetch exactly the
// block they touch and never read ahead.
func TestSmallRandomReadsFetchOneBlock(t *testing.T) {
	const bs = 64 << 10
	src := newVirtualSource(256<<20, bs)
	c := newCache(t, src, Options{BlockSize: bs, MemoryBytes: 64 << 20})
	r := rand.New(rand.NewPCG(9, 9))
	p := make([]byte, 4096)
	for range 500 {
		readChecked(t, c, p, r.Int64N(src.size/4096)*4096)
	}
	st := c.Stats()
	for _, rq := range src.requests() {
		if rq.Len != bs || rq.Off%bs != 0 {
			t.Fatalf("random 4 KiB read caused request %+v; want exactly one %d-byte block", rq, bs)
		}
	}
	if st.ReadAhead != 0 {
		t.Errorf("random reads triggered read-ahead of %d blocks", st.ReadAhead)
	}
	if st.Requests != st.Misses || st.BytesFetched != st.Misses*bs {
		t.Errorf("requests %d, misses %d, bytes %d: want one block per miss", st.Requests, st.Misses, st.BytesFetched)
	}
}

// TestSequentialReadAheadRamps: a sequential reader in 128 KiB steps gets
// growing read-ahead up to MaxFetchSize-sized requests, far fewer requests
// than blocks, and almost no demand misses.
func TestSequentialReadAheadRamps(t *testing.T) {
	const bs = 64 << 10
	src := newVirtualSource(64<<20, bs)
	src.latency = time.Millisecond
	c := newCache(t, src, Options{BlockSize: bs, MemoryBytes: 64 << 20, MaxFetchSize: 4 << 20, MaxReadAhead: 16 << 20})
	p := make([]byte, 128<<10)
	for off := int64(0); off < src.size; off += int64(len(p)) {
		readChecked(t, c, p, off)
	}
	reqs := src.requests()
	var largest int64
	firstBig := -1
	for i, r := range reqs {
		largest = max(largest, r.Len)
		if r.Len == 4<<20 && firstBig < 0 {
			firstBig = i
		}
	}
	st := c.Stats()
	t.Logf("%d requests; first sizes %v; stats %+v", len(reqs), reqs[:min(8, len(reqs))], st)
	if largest != 4<<20 {
		t.Errorf("largest request %d, want MaxFetchSize %d", largest, 4<<20)
	}
	if firstBig < 0 || firstBig > 10 {
		t.Errorf("read-ahead reached full-size requests only at request %d", firstBig)
	}
	if reqs[0].Len >= reqs[firstBig].Len {
		t.Errorf("first request %d bytes is not smaller than later ones: no ramp", reqs[0].Len)
	}
	if len(reqs) > 40 {
		t.Errorf("%d requests for 64 MiB; coalescing should need ~16-30", len(reqs))
	}
	if st.ReadAhead == 0 || st.Misses > 4 {
		t.Errorf("read-ahead %d blocks, demand misses %d: sequential reader was not served ahead", st.ReadAhead, st.Misses)
	}
	if st.BytesFetched != uint64(src.size) {
		t.Errorf("fetched %d bytes for a %d-byte source read once", st.BytesFetched, src.size)
	}
}

// TestSequentialReadReusesMemory: a sequential read through eight times the
// bound maps fresh memory only until the bound is reached (plus two
// fetches: the ramp's first extents are smaller than the rest and cannot be
// reused for them); afterwards every extent reuses a released mapping, and the
// bytes stay right.
func TestSequentialReadReusesMemory(t *testing.T) {
	const bs = 64 << 10
	const bound = 16 << 20
	src := newVirtualSource(8*bound, bs)
	c := newCache(t, src, Options{BlockSize: bs, MemoryBytes: bound, MaxFetchSize: 2 << 20, MaxReadAhead: 8 << 20})
	p := make([]byte, 1<<20)
	for off := int64(0); off < src.size; off += int64(len(p)) {
		readChecked(t, c, p, off)
	}
	st := c.Stats()
	t.Logf("mapped %d bytes, evictions %d, peak %d", st.MappedBytes, st.Evictions, st.PeakMemoryBytes)
	if st.Evictions == 0 {
		t.Fatal("nothing was evicted: the read did not exceed the bound")
	}
	// Up to two fetch units more: the stream's first read (1 MiB) and the
	// rest of its aligned unit, read ahead at once, are smaller extents
	// whose mappings grow when larger ones reuse them.
	if st.MappedBytes > bound+2*(2<<20) {
		t.Errorf("mapped %d bytes of fresh memory for a bound of %d: evicted mappings were not reused", st.MappedBytes, bound)
	}
	if st.PeakMemoryBytes > st.MemoryLimit {
		t.Errorf("peak memory %d over the bound %d", st.PeakMemoryBytes, st.MemoryLimit)
	}
	// Random reads of single blocks need other sizes: evicted mappings give
	// way to them within the bound.
	for i := range 64 {
		readChecked(t, c, make([]byte, 4096), int64(i*7919%int(src.size/bs))*bs)
	}
	if st := c.Stats(); st.PeakMemoryBytes > st.MemoryLimit || st.MemoryBytes > st.MemoryLimit {
		t.Errorf("memory %d (peak %d) over the bound %d after random reads", st.MemoryBytes, st.PeakMemoryBytes, st.MemoryLimit)
	}
}

// TestSequentialThenRandomStopsReadAhead: read-ahead stops when the reader
// turns random.
func TestSequentialThenRandomStopsReadAhead(t *testing.T) {
	const bs = 64 << 10
	src := newVirtualSource(256<<20, bs)
	c := newCache(t, src, Options{BlockSize: bs, MemoryBytes: 128 << 20, MaxFetchSize: 4 << 20, MaxReadAhead: 8 << 20})
	p := make([]byte, 128<<10)
	for off := int64(0); off < 8<<20; off += int64(len(p)) {
		if _, err := c.ReadAt(p, off); err != nil {
			t.Fatal(err)
		}
	}
	// Let read-ahead finish, then go random far away.
	for c.Stats().InFlight > 0 {
		time.Sleep(time.Millisecond)
	}
	before := c.Stats().ReadAhead
	src.resetRequests()
	r := rand.New(rand.NewPCG(1, 2))
	for range 200 {
		off := 64<<20 + r.Int64N(128<<20)/4096*4096
		if _, err := c.ReadAt(p[:4096], off); err != nil {
			t.Fatal(err)
		}
	}
	if got := c.Stats().ReadAhead; got != before {
		t.Errorf("random reads after a sequential run read ahead %d more blocks", got-before)
	}
	for _, rq := range src.requests() {
		if rq.Len > bs {
			t.Errorf("random read caused a %d-byte request", rq.Len)
		}
	}
}

// TestHolesCauseNoRequests: unwritten ranges of a page blob are served as
// zeros without requests, and requests never cover them.
func TestHolesCauseNoRequests(t *testing.T) {
	const bs = 64 << 10
	written := []blob.Range{{Off: 100 << 10, Len: 50 << 10}, {Off: 1 << 20, Len: 3 << 20}, {Off: 6<<20 + 512, Len: 1024}}
	src := newSparseSource(8<<20, bs, written)
	c := newCache(t, src, Options{BlockSize: bs, MemoryBytes: 32 << 20, MaxFetchSize: 1 << 20})

	// A read wholly inside a hole: zero requests.
	if err := readExpect(c, src.data, 5<<20, 512<<10); err != nil {
		t.Fatal(err)
	}
	if n := len(src.requests()); n != 0 {
		t.Fatalf("reading a hole made %d requests", n)
	}
	if z := c.Stats().ZeroFilled; z != 512<<10 {
		t.Errorf("ZeroFilled = %d, want %d", z, 512<<10)
	}
	// Everything, sequentially and then randomly.
	for off := int64(0); off < src.size; off += 128 << 10 {
		if err := readExpect(c, src.data, off, 128<<10); err != nil {
			t.Fatal(err)
		}
	}
	r := rand.New(rand.NewPCG(5, 5))
	for range 200 {
		if err := readExpect(c, src.data, r.Int64N(src.size), 1+r.IntN(200<<10)); err != nil {
			t.Fatal(err)
		}
	}
	idx := newWrittenIndex(written, src.size)
	var fetched int64
	for _, rq := range src.requests() {
		if got := idx.written(nil, rq.Off, rq.End()); len(got) != 1 || got[0] != rq {
			t.Errorf("request %+v covers unwritten bytes", rq)
		}
		fetched += rq.Len
	}
	if total := rangesLen(written); fetched > total {
		t.Errorf("fetched %d bytes, only %d are written", fetched, total)
	}
}

// TestFailingSourceGivesUpThenRecovers: the cache does not retry (the
// source's RetrySource is the one retry policy): a read of an unavailable
// source fails after one request with an error naming the source; cached
// data stays readable meanwhile, and reads succeed once the source heals.
// Behind a RetrySource the same read keeps trying until ReadDeadline.
func TestFailingSourceGivesUpThenRecovers(t *testing.T) {
	checkNoLeak(t)
	ref := randomBytes(4, 2<<20)
	src := newTestSource(ref, 64<<10)
	c := newCache(t, src, Options{BlockSize: 64 << 10, MemoryBytes: 8 << 20, ReadDeadline: 400 * time.Millisecond})
	if err := readExpect(c, ref, 0, 4096); err != nil {
		t.Fatal(err)
	}
	src.failing.Store(true)
	before := len(src.requests())
	_, err := c.ReadAt(make([]byte, 4096), 1<<20)
	if err == nil {
		t.Fatal("read of a failing source succeeded")
	}
	for _, want := range []string{"test-source", "offset 1048576", "simulated storage outage"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
	if n := len(src.requests()) - before; n != 1 {
		t.Errorf("%d requests for one failed read; the cache must not retry on its own", n)
	}
	if err := readExpect(c, ref, 100, 1000); err != nil {
		t.Errorf("cached block unreadable during the outage: %v", err)
	}
	if c.Stats().FetchErrors == 0 {
		t.Error("FetchErrors not counted")
	}
	src.failing.Store(false)
	if err := readExpect(c, ref, 1<<20, 4096); err != nil {
		t.Errorf("after the source healed: %v", err)
	}

	t.Run("behind a RetrySource", func(t *testing.T) {
		src := newTestSource(ref, 64<<10)
		retrying := blob.NewRetrySource(src, blob.Options{MaxRetries: 1000, RetryDelay: 20 * time.Millisecond, MaxRetryDelay: 50 * time.Millisecond})
		c := newCache(t, retrying, Options{BlockSize: 64 << 10, MemoryBytes: 8 << 20, ReadDeadline: 400 * time.Millisecond})
		src.failing.Store(true)
		start := time.Now()
		_, err := c.ReadAt(make([]byte, 4096), 1<<20)
		took := time.Since(start)
		if err == nil || !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "simulated storage outage") {
			t.Fatalf("read of a failing source: err = %v, want the deadline and the last cause", err)
		}
		if took < 350*time.Millisecond || took > 2*time.Second {
			t.Errorf("failed after %v, want about the 400ms ReadDeadline", took)
		}
		if n := len(src.requests()); n < 3 {
			t.Errorf("only %d requests: the source did not retry", n)
		}
		// Healing within the deadline: the retries carry the read through.
		time.AfterFunc(150*time.Millisecond, func() { src.failing.Store(false) })
		if err := readExpect(c, ref, 1<<20, 4096); err != nil {
			t.Errorf("read across a short outage: %v", err)
		}
	})

	t.Run("the reader's context ends the wait", func(t *testing.T) {
		src := newTestSource(ref, 64<<10)
		src.latency = 2 * time.Second
		c := newCache(t, src, Options{BlockSize: 64 << 10, MemoryBytes: 8 << 20})
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		start := time.Now()
		if _, err := c.ReadAtContext(ctx, make([]byte, 10), 1900000); !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("cancelled read: err = %v, want context.DeadlineExceeded", err)
		}
		if took := time.Since(start); took > time.Second {
			t.Errorf("cancelled read returned after %v", took)
		}
	})
}

// TestMemoryBoundParallelStreams: 16 sequential readers over a cache much
// smaller than the data never exceed the bound and all read correct data.
func TestMemoryBoundParallelStreams(t *testing.T) {
	checkNoLeak(t)
	const bs = 64 << 10
	src := newVirtualSource(128<<20, bs)
	src.latency = 500 * time.Microsecond
	c := newCache(t, src, Options{BlockSize: bs, MemoryBytes: 16 << 20, MaxFetchSize: 2 << 20})
	var wg sync.WaitGroup
	for g := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := make([]byte, 128<<10)
			want := make([]byte, len(p))
			start := int64(g) * (8 << 20)
			for off := start; off < start+8<<20; off += int64(len(p)) {
				if _, err := c.ReadAt(p, off); err != nil {
					t.Error(err)
					return
				}
				pattern(want, off)
				if !bytes.Equal(p, want) {
					t.Errorf("wrong bytes at %d", off)
					return
				}
			}
		}()
	}
	wg.Wait()
	st := c.Stats()
	if st.PeakMemoryBytes > st.MemoryLimit || st.PeakMemoryBytes == 0 {
		t.Errorf("peak memory %d, bound %d", st.PeakMemoryBytes, st.MemoryLimit)
	}
	if perBlock, _ := src.peaks(); perBlock != 1 {
		t.Errorf("a block had %d concurrent requests", perBlock)
	}
	t.Logf("stats: %+v", st)
}

// TestCloseReleasesEverything: Close ends blocked reads with ErrClosed,
// stops all goroutines and releases memory; later reads fail cleanly.
func TestCloseReleasesEverything(t *testing.T) {
	checkNoLeak(t)
	src := newVirtualSource(64<<20, 64<<10)
	src.latency = 10 * time.Second // reads hang until Close
	c, err := New(src, Options{BlockSize: 64 << 10, MemoryBytes: 16 << 20})
	if err != nil {
		t.Fatal(err)
	}
	errs := make(chan error, 8)
	for i := range 8 {
		go func() {
			// Not at 0: a read there reads ahead over the others' blocks,
			// and the test wants eight fetches of their own.
			_, err := c.ReadAt(make([]byte, 128<<10), int64(i+1)*(1<<20))
			errs <- err
		}()
	}
	for c.Stats().InFlight < 8 {
		time.Sleep(time.Millisecond)
	}
	start := time.Now()
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	for range 8 {
		if err := <-errs; !errors.Is(err, ErrClosed) {
			t.Errorf("read blocked during Close: err = %v, want ErrClosed", err)
		}
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("Close took %v with hung requests", d)
	}
	if st := c.Stats(); st.MemoryBytes != 0 || st.InFlight != 0 {
		t.Errorf("after Close: memory %d, in flight %d; want 0", st.MemoryBytes, st.InFlight)
	}
	if _, err := c.ReadAt(make([]byte, 10), 0); !errors.Is(err, ErrClosed) {
		t.Errorf("read after Close: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

// TestCloseAfterUseFreesMemory: cached extents are unmapped by Close.
func TestCloseAfterUseFreesMemory(t *testing.T) {
	checkNoLeak(t)
	ref := randomBytes(6, 3<<20)
	c, err := New(newTestSource(ref, 64<<10), Options{BlockSize: 64 << 10, MemoryBytes: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if err := readExpect(c, ref, 0, len(ref)); err != nil {
		t.Fatal(err)
	}
	if c.Stats().MemoryBytes == 0 {
		t.Fatal("nothing cached")
	}
	c.Close()
	if m := c.Stats().MemoryBytes; m != 0 {
		t.Errorf("%d bytes still held after Close", m)
	}
}

func TestOptionsValidation(t *testing.T) {
	src := newTestSource(make([]byte, 1<<20), 4096)
	for _, tc := range []struct {
		o    Options
		want string
	}{
		{Options{BlockSize: 1000}, "multiple of 4096"},
		{Options{BlockSize: -4096}, "negative"},
		{Options{MemoryBytes: 4096, BlockSize: 4096}, "at least two blocks"},
		{Options{DiskBytes: 1 << 20}, "DiskDir"},
		{Options{ReadDeadline: -time.Second}, "negative"},
	} {
		if _, err := New(src, tc.o); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("New(%+v) err = %v, want mention of %q", tc.o.redacted(), err, tc.want)
		}
	}
	if _, err := New(nil, Options{}); err == nil {
		t.Error("New(nil) succeeded")
	}
	c := newCache(t, src, Options{MemoryBytes: 1 << 20})
	if c.o.MaxFetchSize > c.o.MemoryBytes/4 || c.o.MaxFetchSize%c.o.BlockSize != 0 {
		t.Errorf("MaxFetchSize %d not capped to a quarter of memory in whole blocks", c.o.MaxFetchSize)
	}
}

// TestFetchLatencyHistogram: each request lands in the bucket of its latency.
func TestFetchLatencyHistogram(t *testing.T) {
	src := newTestSource(randomBytes(8, 1<<20), 64<<10)
	src.latency = 30 * time.Millisecond
	c := newCache(t, src, Options{BlockSize: 64 << 10, MemoryBytes: 4 << 20, MaxReadAhead: -1})
	for _, off := range []int64{0, 300 << 10, 700 << 10} {
		if _, err := c.ReadAt(make([]byte, 100), off); err != nil {
			t.Fatal(err)
		}
	}
	h := c.Stats().FetchLatency
	if h.Count != 3 || h.Sum < 90*time.Millisecond {
		t.Fatalf("histogram count %d sum %v; want 3 requests of ≥30ms", h.Count, h.Sum)
	}
	if q := h.Quantile(0.5); q != 50*time.Millisecond && q != 100*time.Millisecond {
		t.Errorf("median bucket %v, want the 50ms (or, on a slow machine, 100ms) bucket", q)
	}
	h.Bounds[0] = time.Hour // a caller's copy must not change the cache's buckets
	if c.Stats().FetchLatency.Bounds[0] != time.Millisecond {
		t.Error("Stats shares its histogram bounds with callers")
	}
}
