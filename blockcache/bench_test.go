package blockcache

import (
	"bufio"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The benchmarks use a virtual 1 GiB source with a cost model shaped like
// Azurite: one server that serializes requests and pays per request and per
// byte (benchServerCost), plus network latency paid in parallel.
const benchSize = 1 << 30

func benchServerCost(n int) time.Duration {
	return 3*time.Millisecond + time.Duration(n)*time.Second/(1<<30) // 3 ms + 1 GiB/s
}

func newBenchSource() *testSource {
	s := newVirtualSource(benchSize, 64<<10)
	s.latency = time.Millisecond
	s.serverCost = benchServerCost
	return s
}

// BenchmarkSequential compares one sequential reader (128 KiB reads, as FUSE
// issues them) through the cache with the raw source read in large ranges
// with a fixed number in flight, the best a client can do without a cache.
func BenchmarkSequential(b *testing.B) {
	for _, raw := range []struct {
		rangeSize int64
		inFlight  int
	}{{4 << 20, 4}, {4 << 20, 16}, {16 << 20, 1}, {16 << 20, 2}, {16 << 20, 4}, {16 << 20, 16}} {
		b.Run(fmt.Sprintf("raw-%dMiBx%d", raw.rangeSize>>20, raw.inFlight), func(b *testing.B) {
			src := newBenchSource()
			b.SetBytes(benchSize)
			for b.Loop() {
				rawDownload(b, src, raw.rangeSize, raw.inFlight)
			}
		})
	}
	b.Run("cache", func(b *testing.B) {
		b.SetBytes(benchSize)
		var reqs uint64
		for b.Loop() {
			src := newBenchSource()
			c, err := New(src, Options{})
			if err != nil {
				b.Fatal(err)
			}
			p := make([]byte, 128<<10)
			for off := int64(0); off < benchSize; off += int64(len(p)) {
				if _, err := c.ReadAt(p, off); err != nil {
					b.Fatal(err)
				}
			}
			reqs = c.Stats().Requests
			c.Close()
		}
		b.ReportMetric(float64(reqs), "requests")
	})
}

func rawDownload(b *testing.B, src *testSource, rangeSize int64, inFlight int) {
	var next atomic.Int64
	var wg sync.WaitGroup
	for range inFlight {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, rangeSize)
			for {
				off := next.Add(rangeSize) - rangeSize
				if off >= benchSize {
					return
				}
				if _, err := src.ReadAt(context.Background(), buf, off); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
}

// BenchmarkRandom4K: 16 goroutines read random 4 KiB-aligned sectors of the
// 1 GiB source; reports p50/p99 latency and IOPS.
func BenchmarkRandom4K(b *testing.B) {
	src := newBenchSource()
	c, err := New(src, Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	b.ResetTimer()
	randomReads(b, c, benchSize, 16)
}

// randomReads runs b.N random 4 KiB-aligned reads of c from `readers`
// goroutines and reports latency percentiles, IOPS and the hit ratio.
func randomReads(b *testing.B, c *Cache, size int64, readers int) {
	var next atomic.Int64
	lat := make([][]time.Duration, readers)
	start := time.Now()
	var wg sync.WaitGroup
	for g := range readers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(g), 1))
			p := make([]byte, 4096)
			for next.Add(1) <= int64(b.N) {
				off := r.Int64N(size/4096) * 4096
				t0 := time.Now()
				if _, err := c.ReadAt(p, off); err != nil {
					b.Error(err)
					return
				}
				lat[g] = append(lat[g], time.Since(t0))
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	all := slices.Concat(lat...)
	slices.Sort(all)
	if len(all) > 0 {
		b.ReportMetric(float64(all[len(all)/2].Microseconds()), "p50-µs")
		b.ReportMetric(float64(all[len(all)*99/100].Microseconds()), "p99-µs")
		b.ReportMetric(float64(len(all))/elapsed.Seconds(), "IOPS")
	}
	b.ReportMetric(float64(c.Stats().Hits)/float64(max(len(all), 1)), "hit-ratio")
}

// BenchmarkParallel16: 16 sequential readers, each over its own 64 MiB of the
// source, with a 64 MiB cache bound. Reports throughput, the accounted peak
// and the process RSS growth over the bound.
func BenchmarkParallel16(b *testing.B) {
	const bound = 64 << 20
	const part = benchSize / 16
	b.SetBytes(benchSize)
	var peak int64
	var rssOver int64
	var amplification float64
	for b.Loop() {
		src := newBenchSource()
		c, err := New(src, Options{MemoryBytes: bound})
		if err != nil {
			b.Fatal(err)
		}
		base := rssBytes()
		stop := make(chan struct{})
		var maxRSS atomic.Int64
		go func() {
			t := time.NewTicker(5 * time.Millisecond)
			defer t.Stop()
			for {
				select {
				case <-stop:
					return
				case <-t.C:
					if r := rssBytes(); r > maxRSS.Load() {
						maxRSS.Store(r)
					}
				}
			}
		}()
		var wg sync.WaitGroup
		for g := range 16 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				p := make([]byte, 128<<10)
				for off := int64(g) * part; off < int64(g+1)*part; off += int64(len(p)) {
					if _, err := c.ReadAt(p, off); err != nil {
						b.Error(err)
						return
					}
				}
			}()
		}
		wg.Wait()
		close(stop)
		peak = c.Stats().PeakMemoryBytes
		amplification = float64(c.Stats().BytesFetched) / benchSize
		rssOver = maxRSS.Load() - base - bound
		c.Close()
	}
	b.ReportMetric(float64(peak)/(1<<20), "peak-MiB")
	b.ReportMetric(float64(rssOver)/(1<<20), "rss-over-bound-MiB")
	b.ReportMetric(amplification, "fetched/read")
}

// rssBytes reads the resident set size of this process.
func rssBytes() int64 {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb << 10
		}
	}
	return 0
}
