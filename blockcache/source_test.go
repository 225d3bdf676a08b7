package blockcache

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/blobseal/blobseal/blob"
)

// testSource is an in-memory blob.Source for tests: a test double for the
// storage contract that records every request, counts concurrent requests per
// block, and can add latency, a serialized per-request cost (like Azurite's
// single process) or failures.
type testSource struct {
	size    int64
	data    []byte // nil for a virtual source whose bytes come from pattern
	name    string
	latency time.Duration // slept per request, in parallel
	// connRate, when set, caps each request at this many bytes per second,
	// like a connection to Azure (or toxiproxy's bandwidth toxic): requests
	// in parallel each get the full rate.
	connRate float64

	// serverCost, when set, is charged per request while holding serverMu, so
	// requests compete for one "server" that pays per request and per byte.
	serverCost func(n int) time.Duration
	serverMu   sync.Mutex

	failing atomic.Bool

	mu          sync.Mutex
	reqs        []blob.Range
	active      map[int64]int // requests in progress per block
	blockSize   int64
	maxPerBlock int
	inFlight    int
	maxInFlight int
}

var (
	_ blob.Source      = (*testSource)(nil)
	_ blob.RangeLister = sparseSource{}
	_ blob.Versioned   = versionedSource{}
)

func newTestSource(data []byte, blockSize int64) *testSource {
	return &testSource{size: int64(len(data)), data: data, name: "test-source", active: map[int64]int{}, blockSize: blockSize}
}

// newVirtualSource returns a source of size bytes of pattern data without
// holding them in memory.
func newVirtualSource(size, blockSize int64) *testSource {
	return &testSource{size: size, name: "virtual-source", active: map[int64]int{}, blockSize: blockSize}
}

func randomBytes(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := 0; i+8 <= n; i += 8 {
		v := r.Uint64()
		for j := range 8 {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	for i := n &^ 7; i < n; i++ {
		b[i] = byte(r.Uint32())
	}
	return b
}

// patternPeriod is prime so no block size aligns with it.
const patternPeriod = 1<<20 + 7

// patternTable holds two periods so any period-long slice can be copied at once.
var patternTable = func() []byte {
	b := randomBytes(42, patternPeriod)
	return append(b, b...)
}()

// pattern fills p with the virtual source's bytes at off.
func pattern(p []byte, off int64) {
	for len(p) > 0 {
		start := off % patternPeriod
		n := copy(p, patternTable[start:start+patternPeriod])
		p = p[n:]
		off += int64(n)
	}
}

// readChecked reads len(p) bytes at off through c and fails the test unless
// they are the virtual source's pattern.
func readChecked(t testing.TB, c *Cache, p []byte, off int64) {
	t.Helper()
	if _, err := c.ReadAt(p, off); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, len(p))
	pattern(want, off)
	if !bytes.Equal(p, want) {
		t.Fatalf("wrong bytes at %d", off)
	}
}

func (s *testSource) Size() int64    { return s.size }
func (s *testSource) String() string { return s.name }

func (s *testSource) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, errors.New("negative offset")
	}
	if off >= s.size {
		return 0, io.EOF
	}
	want := p
	if int64(len(p)) > s.size-off {
		want = p[:s.size-off]
	}
	first, last := off/s.blockSize, (off+int64(len(want))-1)/s.blockSize
	s.mu.Lock()
	s.reqs = append(s.reqs, blob.Range{Off: off, Len: int64(len(want))})
	s.inFlight++
	s.maxInFlight = max(s.maxInFlight, s.inFlight)
	for b := first; b <= last; b++ {
		s.active[b]++
		s.maxPerBlock = max(s.maxPerBlock, s.active[b])
	}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.inFlight--
		for b := first; b <= last; b++ {
			s.active[b]--
		}
		s.mu.Unlock()
	}()
	delay := s.latency
	if s.connRate > 0 {
		delay += time.Duration(float64(len(want)) / s.connRate * float64(time.Second))
	}
	if delay > 0 {
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return 0, ctx.Err()
		}
	}
	if s.serverCost != nil {
		s.serverMu.Lock()
		time.Sleep(s.serverCost(len(want)))
		s.serverMu.Unlock()
	}
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	if s.failing.Load() {
		return 0, fmt.Errorf("simulated storage outage: %w", syscall.ECONNRESET)
	}
	if s.data != nil {
		copy(want, s.data[off:])
	} else {
		pattern(want, off)
	}
	if len(want) < len(p) {
		return len(want), io.EOF
	}
	return len(p), nil
}

func (s *testSource) requests() []blob.Range {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.reqs)
}

// peaks returns the most concurrent requests seen for one block and overall.
func (s *testSource) peaks() (perBlock, inFlight int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.maxPerBlock, s.maxInFlight
}

func (s *testSource) resetRequests() {
	s.mu.Lock()
	s.reqs = nil
	s.mu.Unlock()
}

// sparseSource is a testSource whose bytes outside ranges are zero and which
// lists its written ranges like a page blob.
type sparseSource struct {
	*testSource
	ranges []blob.Range
}

func newSparseSource(size, blockSize int64, ranges []blob.Range) sparseSource {
	data := make([]byte, size)
	for i, r := range ranges {
		copy(data[r.Off:r.End()], randomBytes(uint64(i+1), int(r.Len)))
	}
	return sparseSource{newTestSource(data, blockSize), ranges}
}

func (s sparseSource) WrittenRanges(ctx context.Context) ([]blob.Range, error) {
	return slices.Clone(s.ranges), ctx.Err()
}

// versionedSource adds an ETag.
type versionedSource struct {
	*testSource
	version string
}

func (s versionedSource) Version() string { return s.version }

// newCache creates a cache closed at the end of the test.
func newCache(t testing.TB, src blob.Source, o Options) *Cache {
	t.Helper()
	c, err := New(src, o)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// checkNoLeak fails if goroutines started during the test outlive it.
func checkNoLeak(t *testing.T) {
	t.Helper()
	before := runtime.NumGoroutine()
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for runtime.NumGoroutine() > before {
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<20)
				n := runtime.Stack(buf, true)
				t.Errorf("goroutines leaked: %d before, %d after\n%s", before, runtime.NumGoroutine(), buf[:n])
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
}

// readExpect reads [off, off+n) through c and compares with ref, including
// io.ReaderAt's EOF rules.
func readExpect(c *Cache, ref []byte, off int64, n int) error {
	p := make([]byte, n)
	got, err := c.ReadAt(p, off)
	size := int64(len(ref))
	wantN := 0
	if off < size {
		wantN = int(min(int64(n), size-off))
	}
	wantEOF := off+int64(n) > size && n > 0
	if got != wantN {
		return fmt.Errorf("ReadAt(%d, off %d) = %d bytes, want %d (err %v)", n, off, got, wantN, err)
	}
	if wantEOF && !errors.Is(err, io.EOF) || !wantEOF && err != nil {
		return fmt.Errorf("ReadAt(%d, off %d) err = %v, want EOF=%v", n, off, err, wantEOF)
	}
	if wantN > 0 && !bytes.Equal(p[:wantN], ref[off:off+int64(wantN)]) {
		i := 0
		for p[i] == ref[off+int64(i)] {
			i++
		}
		return fmt.Errorf("ReadAt(%d, off %d): wrong bytes from offset %d", n, off, off+int64(i))
	}
	return nil
}
