package blockcache

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"sync"
	"testing"
	"time"
)

// TestConcurrentPiecesOfLargeReadsReadAhead: a direct-I/O pread of 1–64 MiB
// (safetensors loaders read tensors that way) reaches the cache as 1 MiB
// FUSE reads that the kernel sends all at once and the server answers
// concurrently, so they arrive slightly out of order. They are one
// sequential stream all the same and must be served by read-ahead in
// MaxFetchSize requests, not one request per piece (the lost session
// measured 1104 requests per GiB before, 80 after).
func TestConcurrentPiecesOfLargeReadsReadAhead(t *testing.T) {
	checkNoLeak(t)
	const (
		bs    = 64 << 10
		piece = 1 << 20
		total = 256 << 20
	)
	src := newVirtualSource(total, bs)
	src.latency = 2 * time.Millisecond
	c := newCache(t, src, Options{BlockSize: bs})
	rng := rand.New(rand.NewPCG(16, 1))
	// Preads of 1, 4, 16 and 64 MiB one after the other, each split into
	// pieces that 16 server threads take in order and finish in any order.
	sizes := []int64{1 << 20, 4 << 20, 16 << 20, 64 << 20}
	var off int64
	for i := 0; off < total; i++ {
		n := min(sizes[i%len(sizes)], total-off)
		var wg sync.WaitGroup
		pieces := make(chan int64, n/piece)
		for p := off; p < off+n; p += piece {
			pieces <- p
		}
		close(pieces)
		for range 16 {
			wg.Add(1)
			go func(jitter time.Duration) {
				defer wg.Done()
				buf, want := make([]byte, piece), make([]byte, piece)
				for p := range pieces {
					time.Sleep(jitter) // server threads are scheduled unevenly
					if _, err := c.ReadAt(buf, p); err != nil {
						t.Error(err)
						return
					}
					pattern(want, p)
					if !bytes.Equal(buf, want) {
						t.Errorf("wrong bytes at %d", p)
						return
					}
				}
			}(time.Duration(rng.IntN(300)) * time.Microsecond)
		}
		wg.Wait()
		off += n
	}
	reqs := len(src.requests())
	perGiB := float64(reqs) * float64(1<<30) / total
	minimal := float64(1<<30) / float64(DefaultMaxFetchSize)
	t.Logf("%d requests for %d MiB: %.0f per GiB (minimal %.0f)", reqs, total>>20, perGiB, minimal)
	if perGiB > 2*minimal {
		t.Errorf("%.0f requests per GiB, more than twice the %.0f of whole %d MiB fetches: the pieces were not recognised as one stream", perGiB, minimal, DefaultMaxFetchSize>>20)
	}
}

// TestAbandonedFetchIsCancelled: when every reader waiting for a demand
// fetch gives up (an interrupted FUSE read), the fetch is cancelled and its
// request slot freed; while one reader still waits, the fetch goes on for
// it, once, whoever else leaves.
func TestAbandonedFetchIsCancelled(t *testing.T) {
	checkNoLeak(t)
	src := newVirtualSource(16<<20, 64<<10)
	src.latency = 5 * time.Second
	c := newCache(t, src, Options{BlockSize: 64 << 10, MaxReadAhead: -1})
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	if _, err := c.ReadAtContext(ctx, make([]byte, 4096), 0); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want the reader's deadline", err)
	}
	deadline := time.Now().Add(2 * time.Second)
	for c.Stats().InFlight > 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if st := c.Stats(); st.InFlight != 0 || st.Abandoned != 1 || st.FetchErrors != 0 {
		t.Fatalf("after the only reader left: %d fetches in flight, %d abandoned, %d errors; want 0, 1, 0", st.InFlight, st.Abandoned, st.FetchErrors)
	}

	src.latency = 300 * time.Millisecond
	src.resetRequests()
	stay := make(chan error, 1)
	go func() {
		p := make([]byte, 4096)
		if _, err := c.ReadAt(p, 1<<20); err != nil {
			stay <- err
			return
		}
		want := make([]byte, len(p))
		pattern(want, 1<<20)
		if !bytes.Equal(p, want) {
			stay <- errors.New("the staying reader got wrong bytes")
			return
		}
		stay <- nil
	}()
	for c.Stats().InFlight == 0 {
		time.Sleep(time.Millisecond)
	}
	ctx2, cancel2 := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel2()
	if _, err := c.ReadAtContext(ctx2, make([]byte, 4096), 1<<20); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("leaving reader: err = %v", err)
	}
	if err := <-stay; err != nil {
		t.Fatal(err)
	}
	if st := c.Stats(); st.Abandoned != 1 || len(src.requests()) != 1 {
		t.Errorf("%d fetches abandoned in all, %d requests for the shared block; want 1 and 1", st.Abandoned, len(src.requests()))
	}
}

// TestScatteredLargeReadsDoNotReadAhead: an mmap reader faulting pages in
// a shuffled order makes the kernel read 1 MiB around each fault. Such
// reads are large enough for the out-of-order tolerance of
// TestConcurrentPiecesOfLargeReadsReadAhead and always land within its
// reach of some stream, but they are random: they must fetch what they
// read and nothing ahead of it. Before the density rule, a 1 GiB file read
// this way fetched 6.9 GB (docs/PERFORMANCE.md, issue 16).
func TestScatteredLargeReadsDoNotReadAhead(t *testing.T) {
	checkNoLeak(t)
	const (
		bs    = 64 << 10
		piece = 1 << 20
		total = 512 << 20
	)
	src := newVirtualSource(total, bs)
	c := newCache(t, src, Options{BlockSize: bs, MemoryBytes: 64 << 20})
	rng := rand.New(rand.NewPCG(7, 16))
	buf, want := make([]byte, piece), make([]byte, piece)
	const reads = 400
	for range reads {
		// Read-around windows start on any page.
		off := rng.Int64N((total-piece)/4096) * 4096
		if _, err := c.ReadAt(buf, off); err != nil {
			t.Fatal(err)
		}
		pattern(want, off)
		if !bytes.Equal(buf, want) {
			t.Fatalf("wrong bytes at %d", off)
		}
	}
	st := c.Stats()
	// Each read needs at most 17 blocks (an unaligned MiB); overlaps with
	// earlier reads need fewer.
	limit := uint64(reads * (piece/bs + 1) * bs)
	t.Logf("%d reads of 1 MiB: %d MiB fetched, %d blocks read ahead", reads, st.BytesFetched>>20, st.ReadAhead)
	if st.BytesFetched > limit || st.ReadAhead > 0 {
		t.Errorf("%d bytes fetched (at most %d wanted), %d blocks read ahead (want 0): scattered reads were taken for a stream", st.BytesFetched, limit, st.ReadAhead)
	}
}

// TestScatteredReadsReuseMemory: an mmap reader's 1 MiB read-around
// windows start on any page, so their extents are 16 or 17 blocks and often
// do not match an evicted one's size; their mappings are resized and reused rather than unmapped
// and mapped anew with the kernel zeroing every page again. The bytes
// stay right through the reuse.
func TestScatteredReadsReuseMemory(t *testing.T) {
	checkNoLeak(t)
	const (
		bs    = 64 << 10
		bound = 16 << 20
		total = 256 << 20
	)
	src := newVirtualSource(total, bs)
	c := newCache(t, src, Options{BlockSize: bs, MemoryBytes: bound})
	rng := rand.New(rand.NewPCG(3, 5))
	for range 300 {
		const n = 1 << 20
		off := rng.Int64N((total-n)/4096) * 4096
		readChecked(t, c, make([]byte, n), off)
	}
	st := c.Stats()
	t.Logf("%d MiB fetched, %d MiB mapped, %d evictions", st.BytesFetched>>20, st.MappedBytes>>20, st.Evictions)
	if st.Evictions == 0 {
		t.Fatal("nothing was evicted: the reads did not exceed the bound")
	}
	// Reusing only mappings of equal size mapped 58 % of what was fetched
	// (174 of 301 MiB); resizing brings it to 28 %. The rest: a 17-block
	// extent evicts two of 16 blocks and reuses one, so the next fetch
	// finds room without evicting and has nothing to reuse.
	if st.MappedBytes*100 > st.BytesFetched*40 {
		t.Errorf("mapped %d bytes of fresh memory for %d fetched (bound %d): evicted mappings of other sizes were not reused", st.MappedBytes, st.BytesFetched, bound)
	}
	if st.PeakMemoryBytes > st.MemoryLimit {
		t.Errorf("peak memory %d over the bound %d", st.PeakMemoryBytes, st.MemoryLimit)
	}
}
