package blob

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"
)

// DownloadResult is the outcome of RawDownload.
type DownloadResult struct {
	Bytes    int64
	Requests int64
	Elapsed  time.Duration
}

// MBps is the throughput in MB/s (10^6 bytes per second).
func (r DownloadResult) MBps() float64 {
	if r.Elapsed <= 0 {
		return 0
	}
	return float64(r.Bytes) / 1e6 / r.Elapsed.Seconds()
}

// RawDownload reads the whole source with inFlight parallel ranged reads of
// rangeSize bytes and discards the data: the plain download baseline that the
// cached, decrypting mount is compared with. Page blob holes are skipped by
// ReadAt as usual.
func RawDownload(ctx context.Context, src Source, rangeSize int64, inFlight int) (DownloadResult, error) {
	if rangeSize <= 0 || inFlight <= 0 {
		return DownloadResult{}, fmt.Errorf("raw download: rangeSize %d and inFlight %d must be positive", rangeSize, inFlight)
	}
	size := src.Size()
	var jobs []int64
	for off := int64(0); off < size; off += rangeSize {
		jobs = append(jobs, off)
	}
	bufs := make([][]byte, inFlight)
	var total, requests atomic.Int64
	start := time.Now()
	err := parallel(ctx, inFlight, jobs, func(ctx context.Context, w int, off int64) error {
		if bufs[w] == nil {
			bufs[w] = make([]byte, rangeSize)
		}
		n := min(rangeSize, size-off)
		m, err := src.ReadAt(ctx, bufs[w][:n], off)
		if err != nil {
			return err
		}
		total.Add(int64(m))
		requests.Add(1)
		return nil
	})
	res := DownloadResult{Bytes: total.Load(), Requests: requests.Load(), Elapsed: time.Since(start)}
	return res, err
}
