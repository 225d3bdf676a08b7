package blockcache

import (
	"context"
	"net/http"
	"testing"
	"time"

	"github.com/blobseal/blobseal/blob"
)

// readSequentially reads the whole of c in 1 MiB reads, as a FUSE mount
// hands a sequential reader's requests on, checking every byte, and waits
// for read-ahead to drain. It returns how long the reads took.
func readSequentially(t *testing.T, c *Cache) time.Duration {
	t.Helper()
	start := time.Now()
	p := make([]byte, 1<<20)
	for off := int64(0); off < c.Size(); off += int64(len(p)) {
		readChecked(t, c, p[:min(int64(len(p)), c.Size()-off)], off)
	}
	took := time.Since(start)
	for deadline := time.Now().Add(10 * time.Second); c.Stats().InFlight != 0 && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
	}
	if n := c.Stats().InFlight; n != 0 {
		t.Fatalf("%d fetches still in flight 10 s after the last read", n)
	}
	return took
}

// TestSlowConnectionsKeepMoreInFlight reads a source whose every request is
// capped at 25 MB/s with 2 ms of latency each way (like the Azure-like proxy
// of bench/e2e, at half its rate so that the checking reader keeps up on a
// busy machine) and checks that one sequential stream keeps at least 16
// requests in flight with the default options, within the memory bound,
// fetching every block exactly once in aligned requests. With the cut to
// smaller fetches disabled the same window holds only 8 of them.
func TestSlowConnectionsKeepMoreInFlight(t *testing.T) {
	const size = 256 << 20
	run := func(t *testing.T, o Options) (*testSource, Stats, time.Duration) {
		src := newVirtualSource(size, DefaultBlockSize)
		src.latency, src.connRate = 4*time.Millisecond, 25e6
		c := newCache(t, src, o)
		took := readSequentially(t, c)
		return src, c.Stats(), took
	}
	checkOnce := func(t *testing.T, src *testSource, st Stats, unit int64) {
		t.Helper()
		perBlock, _ := src.peaks()
		if perBlock != 1 {
			t.Errorf("a block had %d concurrent requests, want 1", perBlock)
		}
		if st.BytesFetched != size {
			t.Errorf("fetched %d bytes of a %d-byte source: some block was fetched twice", st.BytesFetched, size)
		}
		if st.PeakMemoryBytes > st.MemoryLimit {
			t.Errorf("peak memory %d exceeds the bound %d", st.PeakMemoryBytes, st.MemoryLimit)
		}
		for _, r := range src.requests() {
			if r.Off/unit != (r.End()-1)/unit {
				t.Errorf("request [%d, %d) crosses a multiple of %d", r.Off, r.End(), unit)
				break
			}
		}
	}

	var slow, capped time.Duration
	t.Run("adaptive", func(t *testing.T) {
		src, st, took := run(t, Options{})
		_, inFlight := src.peaks()
		if inFlight < 16 {
			t.Errorf("a sequential stream reached %d requests in flight, want at least 16", inFlight)
		}
		if inFlight > DefaultMaxFetches {
			t.Errorf("%d requests in flight, MaxFetches is %d", inFlight, DefaultMaxFetches)
		}
		// The first requests, before the rate is known, may be up to
		// MaxFetchSize: all requests respect its alignment.
		checkOnce(t, src, st, DefaultMaxFetchSize)
		// After the first few large requests measured the rate, fetches are
		// MaxFetchSize/slowSplit: the request count shows the switch.
		if min, max := uint64(size/DefaultMaxFetchSize*3/2), uint64(size/(DefaultMaxFetchSize/slowSplit)+16); st.Requests < min || st.Requests > max {
			t.Errorf("%d requests for %d MiB, want between %d and %d (mostly %d MiB fetches)", st.Requests, size>>20, min, max, DefaultMaxFetchSize/slowSplit>>20)
		}
		slow = took
		t.Logf("%d requests, peak %d in flight, peak memory %d MiB, %.0f MB/s", st.Requests, inFlight, st.PeakMemoryBytes>>20, size/took.Seconds()/1e6)
	})
	t.Run("never-smaller", func(t *testing.T) {
		src, st, took := run(t, Options{SlowRequestRate: -1})
		_, inFlight := src.peaks()
		// The window of 128 MiB holds eight 16 MiB fetches, plus the demand
		// fetch that may ride ahead of it.
		if inFlight > 9 {
			t.Errorf("%d requests in flight with 16 MiB fetches in a 128 MiB window, want at most 9", inFlight)
		}
		checkOnce(t, src, st, DefaultMaxFetchSize)
		capped = took
		t.Logf("%d requests, peak %d in flight, peak memory %d MiB, %.0f MB/s", st.Requests, inFlight, st.PeakMemoryBytes>>20, size/took.Seconds()/1e6)
	})
	t.Logf("25 MB/s per request: %.0f MB/s adaptive, %.0f MB/s with 16 MiB fetches only", size/slow.Seconds()/1e6, size/capped.Seconds()/1e6)
}

// TestSmallMemoryBoundsSlowStream checks that the cut to smaller fetches
// does not grow memory: with a 32 MiB bound the window is 16 MiB, and a
// stream over slow connections stays within the bound however many
// requests that window holds.
func TestSmallMemoryBoundsSlowStream(t *testing.T) {
	const size = 64 << 20
	src := newVirtualSource(size, DefaultBlockSize)
	src.latency, src.connRate = 4*time.Millisecond, 50e6
	c := newCache(t, src, Options{MemoryBytes: 32 << 20})
	readSequentially(t, c)
	st := c.Stats()
	_, inFlight := src.peaks()
	if st.PeakMemoryBytes > 32<<20 {
		t.Errorf("peak memory %d exceeds the 32 MiB bound", st.PeakMemoryBytes)
	}
	// MaxFetchSize is capped at 8 MiB (a quarter of memory), fetches are
	// cut to 4 MiB, and the 16 MiB window holds four of them.
	if inFlight < 4 {
		t.Errorf("%d requests in flight, want at least 4 of 4 MiB in a 16 MiB window", inFlight)
	}
	t.Logf("%d requests, peak %d in flight, peak memory %d MiB", st.Requests, inFlight, st.PeakMemoryBytes>>20)
}

// TestFastSourceKeepsLargeFetches checks that storage answering faster than
// SlowRequestRate keeps MaxFetchSize requests: Azurite and Azure bill per
// request, and loopback throughput must not pay for the slow-link mode.
func TestFastSourceKeepsLargeFetches(t *testing.T) {
	const size = 256 << 20
	src := newVirtualSource(size, DefaultBlockSize)
	src.latency = time.Millisecond
	c := newCache(t, src, Options{})
	readSequentially(t, c)
	st := c.Stats()
	large := 0
	for _, r := range src.requests() {
		if r.Len == DefaultMaxFetchSize {
			large++
		}
	}
	if want := size/DefaultMaxFetchSize - 4; large < want {
		t.Errorf("%d of %d requests were %d MiB, want at least %d", large, st.Requests, DefaultMaxFetchSize>>20, want)
	}
	t.Logf("%d requests, %d of them %d MiB", st.Requests, large, DefaultMaxFetchSize>>20)
}

// TestTransportAllowsMaxFetches checks that blobseal's HTTP transport can
// keep DefaultMaxFetches connections to one storage account open and
// reusable: a smaller per-host limit would queue requests in the transport,
// and a smaller idle pool would redial (TCP and TLS) between fetches.
func TestTransportAllowsMaxFetches(t *testing.T) {
	tr, ok := blob.NewHTTPClient().Transport.(*http.Transport)
	if !ok {
		t.Fatalf("blob.NewHTTPClient's transport is %T, want *http.Transport", blob.NewHTTPClient().Transport)
	}
	if tr.MaxConnsPerHost != 0 && tr.MaxConnsPerHost < DefaultMaxFetches {
		t.Errorf("MaxConnsPerHost %d is below DefaultMaxFetches %d", tr.MaxConnsPerHost, DefaultMaxFetches)
	}
	if tr.MaxIdleConnsPerHost < DefaultMaxFetches {
		t.Errorf("MaxIdleConnsPerHost %d is below DefaultMaxFetches %d", tr.MaxIdleConnsPerHost, DefaultMaxFetches)
	}
	if tr.MaxIdleConns != 0 && tr.MaxIdleConns < DefaultMaxFetches {
		t.Errorf("MaxIdleConns %d is below DefaultMaxFetches %d", tr.MaxIdleConns, DefaultMaxFetches)
	}
}

// TestSharedServerKeepsLargeFetches reads a source that answers one request
// at 400 MB/s but serializes them (one server, like Azurite on two cores):
// eight requests in flight each see 50 MB/s, as on a capped connection, yet
// more of them would not help, and only the larger requests that storage
// paying per request prefers may be kept.
func TestSharedServerKeepsLargeFetches(t *testing.T) {
	const size = 256 << 20
	src := newVirtualSource(size, DefaultBlockSize)
	src.serverCost = func(n int) time.Duration { return time.Duration(float64(n) / 400e6 * float64(time.Second)) }
	c := newCache(t, src, Options{})
	readSequentially(t, c)
	st := c.Stats()
	large := 0
	for _, r := range src.requests() {
		if r.Len == DefaultMaxFetchSize {
			large++
		}
	}
	if want := size/DefaultMaxFetchSize - 4; large < want {
		t.Errorf("%d of %d requests were %d MiB, want at least %d: a shared server was taken for slow connections", large, st.Requests, DefaultMaxFetchSize>>20, want)
	}
	t.Logf("%d requests, %d of them %d MiB", st.Requests, large, DefaultMaxFetchSize>>20)
}

// heldSource holds every request that starts at offset held until release
// is closed; other requests go straight to the testSource.
type heldSource struct {
	*testSource
	held    int64
	release chan struct{}
}

func (s heldSource) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	if off == s.held {
		select {
		case <-s.release:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
	return s.testSource.ReadAt(ctx, p, off)
}

// TestEndedFetchesAreReplacedWhileReaderWaits: the read-ahead window bounds
// the bytes in flight, not the distance ahead of the reader. While the
// reader waits for the oldest fetch, fetches behind it that end are
// replaced at once, so on connections capped in throughput the requests in
// flight stay at the window instead of draining to the one the reader
// waits for (the sawtooth that kept the Azure-like mount at half the raw
// download). Deterministic: one request is held, the rest answer at once.
func TestEndedFetchesAreReplacedWhileReaderWaits(t *testing.T) {
	checkNoLeak(t)
	const (
		bs     = 64 << 10
		unit   = 1 << 20
		window = 8 << 20
		held   = 16 << 20
	)
	src := heldSource{newVirtualSource(64<<20, bs), held, make(chan struct{})}
	c := newCache(t, src, Options{BlockSize: bs, MaxFetchSize: unit, MaxReadAhead: window, MemoryBytes: 64 << 20})
	done := make(chan error, 1)
	go func() {
		p := make([]byte, 1<<20)
		for off := int64(0); off < held+unit; off += int64(len(p)) {
			if _, err := c.ReadAt(p, off); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	// The reader reaches the held fetch and waits there; every other fetch
	// of its window ends. The window is then refilled beyond it.
	furthest := func() (end int64) {
		for _, r := range src.requests() {
			end = max(end, r.End())
		}
		return end
	}
	deadline := time.Now().Add(10 * time.Second)
	for furthest() < held+window+window/2 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	got := furthest()
	close(src.release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	t.Logf("read-ahead reached %d MiB while the reader waited at %d MiB", got>>20, held>>20)
	if got < held+window+window/2 {
		t.Errorf("while the reader waited at %d MiB, read-ahead reached only %d MiB: ended fetches were not replaced (a window of %d MiB from the reader ends at %d MiB)",
			held>>20, got>>20, window>>20, (held+window)>>20)
	}
	if st := c.Stats(); st.PeakMemoryBytes > st.MemoryLimit {
		t.Errorf("peak memory %d over the bound %d", st.PeakMemoryBytes, st.MemoryLimit)
	}
}

// TestLongSequentialReadFetchesEachBlockOnce: a stream's read-ahead
// reaches up to 5/8 of its memory share ahead of the reader, so in a read
// longer than the memory bound eviction must take what the reader consumed
// before what it has yet to read. In plain LRU order it did not (consumed
// extents were touched after read-ahead arrived) and a 1 GiB read fetched
// 1840 MiB. Over connections capped at 50 MB/s each, so that read-ahead
// runs far ahead while the reader waits.
func TestLongSequentialReadFetchesEachBlockOnce(t *testing.T) {
	const (
		bound = 256 << 20
		size  = 4 * bound
	)
	src := newVirtualSource(size, DefaultBlockSize)
	src.latency, src.connRate = 4*time.Millisecond, 50e6
	c := newCache(t, src, Options{MemoryBytes: bound})
	took := readSequentially(t, c)
	st := c.Stats()
	t.Logf("%.0f MB/s, %d MiB fetched for %d MiB, %d requests, %d evictions", size/took.Seconds()/1e6, st.BytesFetched>>20, size>>20, st.Requests, st.Evictions)
	if st.BytesFetched != size {
		t.Errorf("fetched %d bytes to read %d once: read-ahead was evicted before the reader reached it", st.BytesFetched, size)
	}
	if st.PeakMemoryBytes > st.MemoryLimit {
		t.Errorf("peak memory %d over the bound %d", st.PeakMemoryBytes, st.MemoryLimit)
	}
}

// TestReadAtStartReadsAheadAtOnce: on connections capped at 50 MB/s, once
// the rate is measured, a cold stream that starts at offset 0 opens its
// read-ahead with its first read, in parallel pieces, while one starting
// elsewhere with 1 MiB reads ramps up over three reads whose fetches run
// one at a time. The first byte costs the same (one 1 MiB request); the
// first 64 MiB must come sooner.
func TestReadAtStartReadsAheadAtOnce(t *testing.T) {
	const size = 256 << 20
	measure := func(start int64) (first, all time.Duration) {
		src := newVirtualSource(size, DefaultBlockSize)
		src.latency, src.connRate = 4*time.Millisecond, 50e6
		c := newCache(t, src, Options{})
		p := make([]byte, 1<<20)
		// Another reader came first: a request that ran alone measured
		// the rate, as any mount's first reads do.
		readChecked(t, c, p, size-1<<20)
		t0 := time.Now()
		for off := start; off < start+64<<20; off += int64(len(p)) {
			readChecked(t, c, p, off)
			if off == start {
				first = time.Since(t0)
			}
		}
		all = time.Since(t0)
		// Its read-ahead must not run on into the other measurement.
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
		return first, all
	}
	eagerFirst, eagerAll := measure(0)
	rampFirst, rampAll := measure(64 << 20)
	t.Logf("from offset 0: first MiB %v, 64 MiB %v; from 64 MiB (ramp): first MiB %v, 64 MiB %v",
		eagerFirst.Round(time.Millisecond), eagerAll.Round(time.Millisecond), rampFirst.Round(time.Millisecond), rampAll.Round(time.Millisecond))
	if eagerAll >= rampAll {
		t.Errorf("64 MiB from offset 0 took %v, not less than the %v of a stream that ramps up", eagerAll, rampAll)
	}
	if eagerFirst > rampFirst+50*time.Millisecond {
		t.Errorf("the first MiB from offset 0 took %v, the ramp's %v: opening read-ahead delayed it", eagerFirst, rampFirst)
	}
}
