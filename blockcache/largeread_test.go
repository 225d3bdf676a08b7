package blockcache

import (
	"bytes"
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
