package sidecar

import (
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/blobseal/blobseal/blob"
)

// Metrics is the sidecar's Prometheus registry. Counters that live in other
// packages (cache, volume) are read at scrape time, so the hot paths pay
// nothing for them.
type Metrics struct {
	registry   *prometheus.Registry
	keyRelease *prometheus.HistogramVec
	fuseOps    *prometheus.HistogramVec
	errors     *prometheus.CounterVec
	// Read-write mounts.
	leaseLosses   *prometheus.CounterVec
	flushFailures *prometheus.CounterVec
}

func newMetrics(s *Sidecar) *Metrics {
	m := &Metrics{
		registry: prometheus.NewRegistry(),
		keyRelease: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "blobseal_key_release_duration_seconds",
			Help:    "Time to obtain a filesystem key (attestation, token, release, unwrap).",
			Buckets: prometheus.ExponentialBuckets(0.01, 2, 12),
		}, []string{"fs"}),
		fuseOps: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "blobseal_fuse_operation_duration_seconds",
			Help:    "Latency of FUSE operations answered by the mounts.",
			Buckets: prometheus.ExponentialBuckets(0.00005, 4, 10),
		}, []string{"op"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "blobseal_errors_total",
			Help: "Errors by kind: key_release, open, mount, publish, io.",
		}, []string{"kind"}),
		leaseLosses: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "blobseal_lease_losses_total",
			Help: "Write leases lost (broken by another party or lapsed): the mount turned read-only.",
		}, []string{"fs"}),
		flushFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "blobseal_flush_failures_total",
			Help: "fsync calls on read-write mounts that failed (storage did not acknowledge within flush_timeout, or the lease was lost); blobseal_writeback_flush_failures_total counts background flushes too.",
		}, []string{"fs"}),
	}
	for _, kind := range []string{"key_release", "open", "mount", "publish", "io"} {
		m.errors.WithLabelValues(kind)
	}
	for _, f := range s.cfg.Filesystems {
		if f.ReadWrite {
			m.leaseLosses.WithLabelValues(f.Name)
			m.flushFailures.WithLabelValues(f.Name)
		}
	}
	m.registry.MustRegister(m.keyRelease, m.fuseOps, m.errors, m.leaseLosses, m.flushFailures,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		&stateCollector{s: s})
	return m
}

// observeFUSE is handed to every mount.
func (m *Metrics) observeFUSE(op string, d time.Duration, errno syscall.Errno) {
	m.fuseOps.WithLabelValues(op).Observe(d.Seconds())
	if errno == syscall.EIO {
		m.errors.WithLabelValues("io").Inc()
	}
}

// observer is observeFUSE for filesystem fs, which also counts its failed
// fsyncs: the flushes an application waited for and did not get.
func (m *Metrics) observer(fs string) func(op string, d time.Duration, errno syscall.Errno) {
	return func(op string, d time.Duration, errno syscall.Errno) {
		m.observeFUSE(op, d, errno)
		if op == "fsync" && errno != 0 {
			m.flushFailures.WithLabelValues(fs).Inc()
		}
	}
}

// retryCounter is a source that counts the failed requests it retried
// (blob.RetrySource).
type retryCounter interface{ Retries() int64 }

var _ retryCounter = (*blob.RetrySource)(nil)

// sourceUnwrapper is a source wrapping another (restic's Unwrap idiom), so
// a counter further down the chain is found without knowing the wrappers.
type sourceUnwrapper interface{ Unwrap() blob.Source }

// storageRetries returns the retry count of the first retryCounter in src's
// wrapping chain; false when there is none (a local file).
func storageRetries(src blob.Source) (int64, bool) {
	for src != nil {
		if rc, ok := src.(retryCounter); ok {
			return rc.Retries(), true
		}
		u, ok := src.(sourceUnwrapper)
		if !ok {
			break
		}
		src = u.Unwrap()
	}
	return 0, false
}

// stateCollector exports per-filesystem readiness, cache and volume counters.
type stateCollector struct{ s *Sidecar }

var (
	descReady        = prometheus.NewDesc("blobseal_filesystem_ready", "1 when the filesystem is mounted and published.", []string{"fs"}, nil)
	descHits         = prometheus.NewDesc("blobseal_cache_hits_total", "Cache blocks found in memory (including in-flight fetches).", []string{"fs"}, nil)
	descMisses       = prometheus.NewDesc("blobseal_cache_misses_total", "Cache blocks a read had to fetch.", []string{"fs"}, nil)
	descBytesFetched = prometheus.NewDesc("blobseal_fetched_bytes_total", "Bytes downloaded from storage.", []string{"fs"}, nil)
	descRequests     = prometheus.NewDesc("blobseal_fetch_requests_total", "Ranged requests sent to storage.", []string{"fs"}, nil)
	descFetchErrors  = prometheus.NewDesc("blobseal_fetch_errors_total", "Fetches from storage that failed after the source's own retries; the reads waiting for them got EIO.", []string{"fs"}, nil)
	descAbandoned    = prometheus.NewDesc("blobseal_fetches_abandoned_total", "Demand fetches cancelled because every read waiting for them gave up (read timeout, interrupt).", []string{"fs"}, nil)
	descRetries      = prometheus.NewDesc("blobseal_storage_retries_total", "Failed storage requests the source retried (blob URLs).", []string{"fs"}, nil)
	descInFlight     = prometheus.NewDesc("blobseal_fetches_in_flight", "Storage requests running now.", []string{"fs"}, nil)
	descEvictions    = prometheus.NewDesc("blobseal_cache_evictions_total", "Cache extents evicted.", []string{"fs"}, nil)
	descMemory       = prometheus.NewDesc("blobseal_cache_memory_bytes", "Cache memory held now.", []string{"fs"}, nil)
	descZero         = prometheus.NewDesc("blobseal_zero_filled_bytes_total", "Bytes served from unwritten ranges with no request.", []string{"fs"}, nil)
	descFetchLatency = prometheus.NewDesc("blobseal_fetch_duration_seconds", "Latency of storage requests.", []string{"fs"}, nil)
	descDecrypted    = prometheus.NewDesc("blobseal_decrypted_bytes_total", "Bytes decrypted.", []string{"fs"}, nil)
	descDecryptSecs  = prometheus.NewDesc("blobseal_decrypt_seconds_total", "CPU-bound time spent decrypting (decrypt throughput = bytes / seconds).", []string{"fs"}, nil)
	descIntegrity    = prometheus.NewDesc("blobseal_filesystem_integrity", "1 when every block is verified against a pinned verity root hash.", []string{"fs"}, nil)
	descVerified     = prometheus.NewDesc("blobseal_verified_blocks_total", "Data blocks verified against the verity tree (zero blocks included).", []string{"fs"}, nil)
	descMismatches   = prometheus.NewDesc("blobseal_integrity_failures_total", "Blocks that did not match the verity tree, by kind (data or tree).", []string{"fs", "kind"}, nil)
	descRefused      = prometheus.NewDesc("blobseal_integrity_read_errors_total", "Reads refused (EIO) because they touched blocks that failed verification.", []string{"fs"}, nil)
	descDirty        = prometheus.NewDesc("blobseal_dirty_bytes", "Written bytes of read-write mounts not yet acknowledged by storage (bounded by dirty_memory).", []string{"fs"}, nil)
	descUploaded     = prometheus.NewDesc("blobseal_uploaded_bytes_total", "Bytes of read-write mounts uploaded to storage.", []string{"fs"}, nil)
	descWBFlushes    = prometheus.NewDesc("blobseal_writeback_flushes_total", "Flushes of read-write mounts that uploaded something (fsyncs and background flushes).", []string{"fs"}, nil)
	descWBFailures   = prometheus.NewDesc("blobseal_writeback_flush_failures_total", "Flushes of read-write mounts that storage did not acknowledge (timeout, lost lease), background ones included; the data stays dirty for the next flush.", []string{"fs"}, nil)
	descSKRRequests  = prometheus.NewDesc("blobseal_skr_requests_total", "Requests to the SKR-compatible API, by endpoint.", []string{"endpoint"}, nil)
	descSKRErrors    = prometheus.NewDesc("blobseal_skr_errors_total", "SKR API responses with status 400 or above, by endpoint.", []string{"endpoint"}, nil)
	descSKRSeconds   = prometheus.NewDesc("blobseal_skr_request_seconds_total", "Time spent answering SKR API requests, by endpoint.", []string{"endpoint"}, nil)
)

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descReady, descHits, descMisses, descBytesFetched, descRequests, descFetchErrors, descAbandoned, descRetries,
		descInFlight, descEvictions, descMemory, descZero, descFetchLatency, descDecrypted, descDecryptSecs,
		descIntegrity, descVerified, descMismatches, descRefused, descDirty, descUploaded, descWBFlushes, descWBFailures,
		descSKRRequests, descSKRErrors, descSKRSeconds} {
		ch <- d
	}
}

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	counter := func(d *prometheus.Desc, v float64, fs string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, fs)
	}
	gauge := func(d *prometheus.Desc, v float64, fs string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, fs)
	}
	if m := c.s.skrMetrics(); m != nil {
		for ep, st := range m.Snapshot() {
			ch <- prometheus.MustNewConstMetric(descSKRRequests, prometheus.CounterValue, float64(st.Requests), ep)
			ch <- prometheus.MustNewConstMetric(descSKRErrors, prometheus.CounterValue, float64(st.Errors), ep)
			ch <- prometheus.MustNewConstMetric(descSKRSeconds, prometheus.CounterValue, st.Total.Seconds(), ep)
		}
	}
	for _, st := range c.s.snapshot() {
		ready := 0.0
		if st.Ready {
			ready = 1
		}
		gauge(descReady, ready, st.Name)
		if st.rw != nil {
			if ws, ok := st.rw.WriteBackStats(); ok {
				gauge(descDirty, float64(ws.DirtyBytes), st.Name)
				counter(descUploaded, float64(ws.UploadedBytes), st.Name)
				counter(descWBFlushes, float64(ws.Flushes), st.Name)
				counter(descWBFailures, float64(ws.FlushFailures), st.Name)
			}
		}
		if st.img == nil {
			continue
		}
		verified := 0.0
		if t := st.img.Tree; t != nil {
			verified = 1
			ts := t.Stats()
			counter(descVerified, float64(ts.BlocksVerified+ts.ZeroBlocks), st.Name)
			ch <- prometheus.MustNewConstMetric(descMismatches, prometheus.CounterValue, float64(ts.DataMismatches), st.Name, "data")
			ch <- prometheus.MustNewConstMetric(descMismatches, prometheus.CounterValue, float64(ts.NodeMismatches), st.Name, "tree")
		}
		gauge(descIntegrity, verified, st.Name)
		vs := st.img.Volume.Stats()
		counter(descDecrypted, float64(vs.BytesDecrypted), st.Name)
		counter(descDecryptSecs, vs.DecryptTime.Seconds(), st.Name)
		if n, ok := storageRetries(st.img.Source); ok {
			counter(descRetries, float64(n), st.Name)
		}
		if st.img.Cache == nil {
			continue
		}
		cs := st.img.Cache.Stats()
		counter(descHits, float64(cs.Hits+cs.PendingHits), st.Name)
		counter(descMisses, float64(cs.Misses), st.Name)
		counter(descBytesFetched, float64(cs.BytesFetched), st.Name)
		counter(descRequests, float64(cs.Requests), st.Name)
		counter(descFetchErrors, float64(cs.FetchErrors), st.Name)
		counter(descAbandoned, float64(cs.Abandoned), st.Name)
		gauge(descInFlight, float64(cs.InFlight), st.Name)
		counter(descEvictions, float64(cs.Evictions), st.Name)
		gauge(descMemory, float64(cs.MemoryBytes), st.Name)
		counter(descZero, float64(cs.ZeroFilled), st.Name)
		counter(descRefused, float64(cs.IntegrityErrors), st.Name)
		h := cs.FetchLatency
		buckets := make(map[float64]uint64, len(h.Bounds))
		var cum uint64
		for i, b := range h.Bounds {
			if i < len(h.Counts) {
				cum += h.Counts[i]
			}
			buckets[b.Seconds()] = cum
		}
		ch <- prometheus.MustNewConstHistogram(descFetchLatency, h.Count, h.Sum.Seconds(), buckets, st.Name)
	}
}
