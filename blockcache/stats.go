package blockcache

import (
	"sync/atomic"
	"time"
)

// Stats is a snapshot of the cache's counters. Block counts are in blocks of
// Options.BlockSize; byte counts in bytes.
type Stats struct {
	Hits        uint64 // blocks a read found already cached
	PendingHits uint64 // blocks a read found in flight (read-ahead or another reader) and waited for
	Misses      uint64 // blocks a read had to fetch itself
	ReadAhead   uint64 // blocks fetched by read-ahead

	Requests     uint64 // ranged reads sent to the source
	BytesFetched uint64 // bytes received from the source
	FetchErrors  uint64 // fetches that failed (after the source's own retries)
	Abandoned    uint64 // demand fetches cancelled because every reader waiting for them gave up
	InFlight     int64  // fetches currently running or queued for a request slot
	ZeroFilled   uint64 // bytes served as zeros from unwritten ranges, with no request

	Evictions       uint64 // extents dropped from memory to make room
	MemoryBytes     int64  // block memory held now, cached and in flight
	PeakMemoryBytes int64  // highest MemoryBytes so far
	MemoryLimit     int64  // the configured bound
	MappedBytes     uint64 // block memory taken fresh from the kernel so far; evicted mappings are reused

	DiskHits      uint64 // blocks served from the disk tier
	DiskWrites    uint64 // blocks written to the disk tier
	DiskCorrupt   uint64 // disk blocks that failed verification and were refetched
	DiskEvictions uint64 // disk blocks deleted to respect DiskBytes
	DiskBytes     int64  // bytes held by the disk tier now

	FetchLatency Histogram // latency of each request to the source

	RejectedBytes   uint64 // bytes the Verifier rejected when they were fetched
	IntegrityErrors uint64 // reads refused because they touched rejected bytes
}

const numLatencyBounds = 13

// latencyBounds returns the upper bounds of the histogram buckets.
func latencyBounds() [numLatencyBounds]time.Duration {
	return [numLatencyBounds]time.Duration{
		time.Millisecond, 2 * time.Millisecond, 5 * time.Millisecond,
		10 * time.Millisecond, 20 * time.Millisecond, 50 * time.Millisecond,
		100 * time.Millisecond, 200 * time.Millisecond, 500 * time.Millisecond,
		time.Second, 2 * time.Second, 5 * time.Second, 10 * time.Second,
	}
}

// Histogram is a cumulative-free latency histogram: Counts[i] counts
// observations ≤ Bounds[i] and > Bounds[i-1]; the last count is everything
// above the last bound. It maps directly onto a Prometheus histogram.
type Histogram struct {
	Bounds []time.Duration
	Counts []uint64 // len(Bounds)+1
	Count  uint64
	Sum    time.Duration
}

// counters are updated without the cache lock.
type counters struct {
	hits, pendingHits, misses, readAhead         atomic.Uint64
	requests, bytesFetched, fetchErrors          atomic.Uint64
	abandoned                                    atomic.Uint64
	inFlight, diskBytes                          atomic.Int64
	zeroFilled, evictions, mappedBytes           atomic.Uint64
	diskHits, diskWrites, diskCorrupt, diskEvict atomic.Uint64
	rejectedBytes, integrityErrors               atomic.Uint64
	latCounts                                    [numLatencyBounds + 1]atomic.Uint64
	latCount                                     atomic.Uint64
	latSumNanos                                  atomic.Int64
}

func (c *counters) observeLatency(d time.Duration) {
	bounds := latencyBounds()
	i := 0
	for i < len(bounds) && d > bounds[i] {
		i++
	}
	c.latCounts[i].Add(1)
	c.latCount.Add(1)
	c.latSumNanos.Add(int64(d))
}

func (c *counters) histogram() Histogram {
	bounds := latencyBounds()
	h := Histogram{
		Bounds: bounds[:],
		Counts: make([]uint64, len(c.latCounts)),
		Count:  c.latCount.Load(),
		Sum:    time.Duration(c.latSumNanos.Load()),
	}
	for i := range c.latCounts {
		h.Counts[i] = c.latCounts[i].Load()
	}
	return h
}

// Quantile estimates the q-quantile (0<q≤1) as the upper bound of the bucket
// holding it; above the last bound it returns the last bound.
func (h Histogram) Quantile(q float64) time.Duration {
	if h.Count == 0 || len(h.Bounds) == 0 {
		return 0
	}
	rank := uint64(q*float64(h.Count) + 0.5)
	var seen uint64
	for i, n := range h.Counts {
		seen += n
		if seen >= rank && i < len(h.Bounds) {
			return h.Bounds[i]
		}
	}
	return h.Bounds[len(h.Bounds)-1]
}
