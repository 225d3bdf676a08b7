package blockcache

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/Shopify/toxiproxy/v2/collectors"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/streaming"
	azblobblob "github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/container"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/lease"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/pageblob"

	"github.com/blobseal/blobseal/blob"
	"github.com/blobseal/blobseal/internal/testenv"
)

// pageBlobStore is Azurite with a container "img" of page blobs.
type pageBlobStore struct {
	t  testing.TB
	az *testenv.Azurite
}

func newPageBlobStore(t testing.TB) *pageBlobStore {
	t.Helper()
	az := testenv.StartAzurite(t)
	cc, err := container.NewClientFromConnectionString(az.ConnectionString(), "img", nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cc.Create(wbCtx(t), nil); err != nil {
		t.Fatal(err)
	}
	return &pageBlobStore{t: t, az: az}
}

func wbCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// create makes a page blob of size bytes whose first half holds random
// data (written with the SDK) and whose second half was never written.
func (s *pageBlobStore) create(name string, size int) []byte {
	s.t.Helper()
	pb, err := pageblob.NewClientFromConnectionString(s.az.ConnectionString(), "img", name, nil)
	if err != nil {
		s.t.Fatal(err)
	}
	if _, err := pb.Create(wbCtx(s.t), int64(size), nil); err != nil {
		s.t.Fatal(err)
	}
	data := make([]byte, size)
	r := rand.New(rand.NewPCG(uint64(size), 1))
	for i := range size / 2 {
		data[i] = byte(r.Uint32())
	}
	for off := 0; off < size/2; off += 4 << 20 {
		end := min(off+4<<20, size/2)
		if _, err := pb.UploadPages(wbCtx(s.t), streaming.NopCloser(bytes.NewReader(data[off:end])),
			azblobblob.HTTPRange{Offset: int64(off), Count: int64(end - off)}, nil); err != nil {
			s.t.Fatal(err)
		}
	}
	return data
}

func (s *pageBlobStore) url(name string) string { return s.az.Endpoint() + "/img/" + name }

func (s *pageBlobStore) blobOpts() blob.Options {
	return blob.Options{ConnectionString: s.az.ConnectionString(), RetryDelay: 20 * time.Millisecond, MaxRetryDelay: 200 * time.Millisecond, MaxRetries: 1000, RequestTimeout: 2 * time.Second}
}

// readFresh downloads the whole blob through a new, cold open.
func (s *pageBlobStore) readFresh(name string, size int) []byte {
	s.t.Helper()
	src, err := blob.Open(wbCtx(s.t), s.url(name), s.blobOpts())
	if err != nil {
		s.t.Fatal(err)
	}
	got := make([]byte, size)
	if _, err := src.ReadAt(wbCtx(s.t), got, 0); err != nil {
		s.t.Fatal(err)
	}
	return got
}

// countingStore counts what reaches the PageWriter and can hold it back
// (gate) to stand for slow storage.
type countingStore struct {
	next  PageStore
	gate  chan struct{} // nil: open
	bytes atomic.Int64
	calls atomic.Int64
}

func (c *countingStore) WritePages(ctx context.Context, ws []blob.PageWrite) error {
	if c.gate != nil {
		select {
		case <-c.gate:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	c.calls.Add(1)
	for _, x := range ws {
		c.bytes.Add(int64(len(x.Data)))
	}
	return c.next.WritePages(ctx, ws)
}

type writable struct {
	src   blob.Source
	pw    *blob.PageWriter
	cache *Cache
	wb    *WriteBack
	store *countingStore
}

func openWritable(t *testing.T, url string, bo blob.Options, co Options, wo WriteBackOptions, gate chan struct{}) *writable {
	t.Helper()
	src, err := blob.Open(wbCtx(t), url, bo)
	if err != nil {
		t.Fatal(err)
	}
	pw, err := blob.NewPageWriter(wbCtx(t), src, blob.WriterOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pw.Close(context.Background()) })
	c, err := New(src, co)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	store := &countingStore{next: pw, gate: gate}
	wb, err := NewWriteBack(c, store, wo)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = wb.Close(context.Background()) })
	return &writable{src: src, pw: pw, cache: c, wb: wb, store: store}
}

func randomPattern(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 7))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// TestWriteBackReadsWritesAndUploadsOnlyDirty: writes into cached data
// and into never-written pages, aligned and not, read back at once; storage
// is untouched until Flush, which uploads exactly the dirty pages.
func TestWriteBackReadsWritesAndUploadsOnlyDirty(t *testing.T) {
	s := newPageBlobStore(t)
	const size = 8 << 20
	model := s.create("a.img", size)
	orig := bytes.Clone(model)
	w := openWritable(t, s.url("a.img"), s.blobOpts(), Options{}, WriteBackOptions{FlushInterval: -1}, nil)

	got := make([]byte, size)
	if _, err := w.wb.ReadAt(got, 0); err != nil || !bytes.Equal(got, model) { // warm the cache
		t.Fatalf("first read: %v", err)
	}
	writes := []struct {
		off int64
		n   int
	}{{4096, 8192}, {1<<20 + 100, 1000}, {6 << 20, 64 << 10}, {7<<20 + 511, 2}, {size - 512, 512}}
	wantPages := map[int64]bool{}
	for i, x := range writes {
		p := randomPattern(uint64(i), x.n)
		if n, err := w.wb.WriteAt(p, x.off); err != nil || n != x.n {
			t.Fatalf("write %d: n=%d err=%v", i, n, err)
		}
		copy(model[x.off:], p)
		for pg := x.off / 512; pg <= (x.off+int64(x.n)-1)/512; pg++ {
			wantPages[pg] = true
		}
	}
	if _, err := w.wb.ReadAt(got, 0); err != nil || !bytes.Equal(got, model) {
		t.Fatalf("reads do not see the writes before a flush (err %v)", err)
	}
	if !bytes.Equal(s.readFresh("a.img", size), orig) {
		t.Fatal("storage changed before Flush")
	}
	if st := w.wb.Stats(); st.DirtyBytes == 0 {
		t.Fatal("no dirty bytes after writes")
	}
	if err := w.wb.Flush(wbCtx(t)); err != nil {
		t.Fatal(err)
	}
	if up := w.store.bytes.Load(); up != int64(len(wantPages))*512 {
		t.Fatalf("uploaded %d bytes; the dirty pages are %d bytes", up, len(wantPages)*512)
	}
	if st := w.wb.Stats(); st.DirtyBytes != 0 || st.Flushes != 1 {
		t.Fatalf("after Flush: %+v", st)
	}
	if !bytes.Equal(s.readFresh("a.img", size), model) {
		t.Fatal("a fresh open reads other bytes than were written and flushed")
	}
	clear(got)
	if _, err := w.wb.ReadAt(got, 0); err != nil || !bytes.Equal(got, model) {
		t.Fatalf("reads after the flush (refetched) differ (err %v)", err)
	}
	if err := w.wb.Flush(wbCtx(t)); err != nil || w.store.calls.Load() != 1 {
		t.Fatalf("a flush with nothing dirty: err %v, %d uploads", err, w.store.calls.Load())
	}
}

// TestWriteBackBackPressure: with storage held back, a writer blocks at
// the dirty bound instead of growing memory, and goes on once storage
// answers.
func TestWriteBackBackPressure(t *testing.T) {
	s := newPageBlobStore(t)
	const size = 4 << 20
	model := s.create("b.img", size)
	gate := make(chan struct{})
	const limit = 4 * DefaultBlockSize
	w := openWritable(t, s.url("b.img"), s.blobOpts(), Options{}, WriteBackOptions{DirtyBytes: limit, FlushInterval: -1}, gate)
	p := randomPattern(9, 2<<20)
	copy(model[1<<20:], p)
	done := make(chan error, 1)
	go func() {
		_, err := w.wb.WriteAt(p, 1<<20)
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("a 2 MiB write over a %d-byte dirty bound finished while storage was held back (err %v)", limit, err)
	case <-time.After(300 * time.Millisecond):
	}
	if st := w.wb.Stats(); st.PeakDirtyBytes > limit {
		t.Fatalf("dirty memory grew to %d past the bound %d", st.PeakDirtyBytes, limit)
	}
	close(gate)
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the writer did not resume after storage answered")
	}
	if err := w.wb.Flush(wbCtx(t)); err != nil {
		t.Fatal(err)
	}
	if st := w.wb.Stats(); st.PeakDirtyBytes > limit || st.Flushes < 2 {
		t.Fatalf("stats %+v: want peak ≤ %d and several flushes", st, limit)
	}
	if !bytes.Equal(s.readFresh("b.img", size), model) {
		t.Fatal("a fresh open reads other bytes than were written")
	}
}

func startWBProxy(t *testing.T, port int) *toxiproxy.Proxy {
	t.Helper()
	srv := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(prometheus.NewRegistry()), zerolog.Nop())
	srv.Metrics.ProxyMetrics = collectors.NewProxyMetricCollectors()
	p := toxiproxy.NewProxy(srv, "azurite", "127.0.0.1:0", "127.0.0.1:"+strconv.Itoa(port))
	if err := p.Start(); err != nil {
		t.Fatalf("start toxiproxy: %v", err)
	}
	t.Cleanup(p.Stop)
	return p
}

// TestWriteBackStorageOutage: while storage is down, Flush fails after its
// deadline, the dirty bytes stay and read back, and a later Flush uploads
// them; resets during an upload lose nothing.
func TestWriteBackStorageOutage(t *testing.T) {
	s := newPageBlobStore(t)
	const size = 8 << 20
	model := s.create("c.img", size)
	p := startWBProxy(t, s.az.Port)
	url := "http://" + p.Listen + "/devstoreaccount1/img/c.img"
	w := openWritable(t, url, s.blobOpts(), Options{}, WriteBackOptions{FlushInterval: -1, FlushTimeout: 1500 * time.Millisecond}, nil)
	got := make([]byte, size)
	if _, err := w.wb.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	data := randomPattern(3, 3<<20)
	copy(model[2<<20:], data)
	if _, err := w.wb.WriteAt(data, 2<<20); err != nil {
		t.Fatal(err)
	}

	down, err := p.Toxics.AddToxicJson(strings.NewReader(`{"type":"timeout","attributes":{"timeout":0}}`))
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	err = w.wb.Flush(wbCtx(t))
	if err == nil || !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "kept for the next flush") {
		t.Fatalf("flush while storage is down: err = %v", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("flush took %s with a 1.5s timeout", d)
	}
	t.Logf("flush while down: %v", err)
	if st := w.wb.Stats(); st.DirtyBytes == 0 || st.FlushFailures != 1 {
		t.Fatalf("after the failed flush: %d dirty bytes (want them kept), %d flush failures (want 1)", st.DirtyBytes, st.FlushFailures)
	}
	clear(got)
	if _, err := w.wb.ReadAt(got, 0); err != nil || !bytes.Equal(got, model) {
		t.Fatalf("reads during the outage (cached and dirty): err %v, equal %v", err, bytes.Equal(got, model))
	}
	if err := p.Toxics.RemoveToxic(context.Background(), down.Name); err != nil {
		t.Fatal(err)
	}

	// Back, but every connection is reset for the first 300ms of the flush.
	reset, err := p.Toxics.AddToxicJson(strings.NewReader(`{"type":"reset_peer","attributes":{"timeout":5},"stream":"upstream"}`))
	if err != nil {
		t.Fatal(err)
	}
	time.AfterFunc(300*time.Millisecond, func() { _ = p.Toxics.RemoveToxic(context.Background(), reset.Name) })
	more := randomPattern(4, 1<<20)
	copy(model[6<<20:], more)
	if _, err := w.wb.WriteAt(more, 6<<20); err != nil {
		t.Fatal(err)
	}
	// Flushes are retried, as the background flush would, until one lands.
	deadline := time.Now().Add(30 * time.Second)
	for err := w.wb.Flush(wbCtx(t)); err != nil; err = w.wb.Flush(wbCtx(t)) {
		if time.Now().After(deadline) {
			t.Fatalf("flush after storage came back: %v", err)
		}
		t.Logf("flush during resets: %v", err)
	}
	if w.pw.Retries() == 0 {
		t.Fatal("no retried writes: the faults were not exercised")
	}
	if !bytes.Equal(s.readFresh("c.img", size), model) {
		t.Fatal("after the outage a fresh open reads other bytes than were written")
	}
}

// TestWriteBackConcurrent runs writers and readers against a background
// flush every 10ms (run with -race): every reader sees whole writes, and
// Close leaves storage equal to the model.
func TestWriteBackConcurrent(t *testing.T) {
	s := newPageBlobStore(t)
	const size = 8 << 20
	model := s.create("d.img", size)
	w := openWritable(t, s.url("d.img"), s.blobOpts(), Options{MemoryBytes: 1 << 20, BlockSize: 16 << 10},
		WriteBackOptions{DirtyBytes: 256 << 10, FlushInterval: 10 * time.Millisecond}, nil)
	var mu sync.Mutex // guards model
	var wg sync.WaitGroup
	const writers, region = 4, size / 4
	errs := make(chan error, 16)
	for g := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(g), 3))
			for i := range 40 {
				n := 512 * (1 + r.IntN(64))
				off := int64(g*region + 512*r.IntN((region-n)/512))
				p := bytes.Repeat([]byte{byte(g*40 + i + 1)}, n)
				if _, err := w.wb.WriteAt(p, off); err != nil {
					errs <- err
					return
				}
				mu.Lock()
				copy(model[off:], p)
				mu.Unlock()
				// Read it back at once: the write is visible, whole.
				got := make([]byte, n)
				if _, err := w.wb.ReadAt(got, off); err != nil || !bytes.Equal(got, p) {
					errs <- errors.New("a read after a write did not return it")
					return
				}
			}
		}()
	}
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 256<<10)
			for i := range 30 {
				if _, err := w.wb.ReadAt(buf, int64(i%30)*(256<<10)); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if err := w.wb.Close(wbCtx(t)); err != nil {
		t.Fatal(err)
	}
	if _, err := w.wb.WriteAt(make([]byte, 512), 0); err == nil {
		t.Fatal("a write after Close succeeded")
	}
	if !bytes.Equal(s.readFresh("d.img", size), model) {
		t.Fatal("after Close a fresh open reads other bytes than were written")
	}
	if st := w.wb.Stats(); st.PeakDirtyBytes > 256<<10 || st.Flushes == 0 {
		t.Fatalf("stats %+v", st)
	}
}

// Err forwards the PageWriter's state, so WriteBack sees a lost lease.
func (c *countingStore) Err() error { return c.next.(interface{ Err() error }).Err() }

// TestWriteBackLeaseLost breaks the writer's lease from outside: the
// flush fails with ErrLeaseLost and keeps the bytes (they read back), and
// every later write fails at once instead of collecting bytes.
func TestWriteBackLeaseLost(t *testing.T) {
	s := newPageBlobStore(t)
	const size = 2 << 20
	model := s.create("e.img", size)
	w := openWritable(t, s.url("e.img"), s.blobOpts(), Options{}, WriteBackOptions{FlushInterval: -1, FlushTimeout: 10 * time.Second}, nil)
	p := randomPattern(11, 8192)
	copy(model[4096:], p)
	if _, err := w.wb.WriteAt(p, 4096); err != nil {
		t.Fatal(err)
	}
	pb, err := pageblob.NewClientFromConnectionString(s.az.ConnectionString(), "img", "e.img", nil)
	if err != nil {
		t.Fatal(err)
	}
	lc, err := lease.NewBlobClient(pb, nil)
	if err != nil {
		t.Fatal(err)
	}
	zero := int32(0)
	if _, err := lc.BreakLease(wbCtx(t), &lease.BlobBreakOptions{BreakPeriod: &zero}); err != nil {
		t.Fatal(err)
	}
	if err := w.wb.Flush(wbCtx(t)); !errors.Is(err, blob.ErrLeaseLost) {
		t.Fatalf("flush after the lease was broken: err = %v; want ErrLeaseLost", err)
	}
	if st := w.wb.Stats(); st.DirtyBytes == 0 {
		t.Fatal("the bytes that could not be uploaded were dropped")
	}
	got := make([]byte, size)
	if _, err := w.wb.ReadAt(got, 0); err != nil || !bytes.Equal(got, model) {
		t.Fatalf("reads after the loss: err %v", err)
	}
	if _, err := w.wb.WriteAt(p, 1<<20); !errors.Is(err, blob.ErrLeaseLost) {
		t.Fatalf("write after the loss: err = %v; want ErrLeaseLost", err)
	}
	if err := w.wb.Flush(wbCtx(t)); !errors.Is(err, blob.ErrLeaseLost) {
		t.Fatalf("second flush: err = %v", err)
	}
}

// TestWriteBackTimedFlush: without any Flush call, the background flush
// uploads a write within a few of its intervals.
func TestWriteBackTimedFlush(t *testing.T) {
	s := newPageBlobStore(t)
	const size = 1 << 20
	model := s.create("t.img", size)
	w := openWritable(t, s.url("t.img"), s.blobOpts(), Options{}, WriteBackOptions{FlushInterval: 100 * time.Millisecond}, nil)
	p := randomPattern(12, 4096)
	copy(model[8192:], p)
	if _, err := w.wb.WriteAt(p, 8192); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for w.wb.Stats().DirtyBytes != 0 {
		if time.Now().After(deadline) {
			t.Fatal("the background flush did not upload the write within 10s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !bytes.Equal(s.readFresh("t.img", size), model) {
		t.Fatal("after the background flush a fresh open reads other bytes")
	}
}

// TestWriteBackBackPressureOutage: during an outage a writer blocked on a
// full dirty bound fails with EIO after FlushTimeout (not after the
// outage), keeping what it wrote before; a cancelled context ends the wait
// at once; once storage is back writes resume and everything lands.
func TestWriteBackBackPressureOutage(t *testing.T) {
	s := newPageBlobStore(t)
	const size = 4 << 20
	model := s.create("o.img", size)
	p := startWBProxy(t, s.az.Port)
	url := "http://" + p.Listen + "/devstoreaccount1/img/o.img"
	const limit = 4 * DefaultBlockSize
	const flushTimeout = time.Second
	w := openWritable(t, url, s.blobOpts(), Options{}, WriteBackOptions{DirtyBytes: limit, FlushInterval: -1, FlushTimeout: flushTimeout}, nil)
	got := make([]byte, size)
	if _, err := w.wb.ReadAt(got, 0); err != nil { // cached: reads go on during the outage
		t.Fatal(err)
	}

	down, err := p.Toxics.AddToxicJson(strings.NewReader(`{"type":"timeout","attributes":{"timeout":0}}`))
	if err != nil {
		t.Fatal(err)
	}
	data := randomPattern(21, 1<<20) // four times the bound
	start := time.Now()
	n, err := w.wb.WriteAt(data, 1<<20)
	took := time.Since(start)
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("write over a full dirty bound during an outage: n=%d err=%v; want EIO", n, err)
	}
	if took < flushTimeout || took > flushTimeout+3*time.Second {
		t.Fatalf("the blocked write failed after %s; want the flush timeout %s (+3s slack)", took, flushTimeout)
	}
	if n != limit {
		t.Fatalf("the failed write reports %d bytes accepted; the bound holds %d", n, limit)
	}
	t.Logf("blocked write failed after %s: %v", took, err)
	copy(model[1<<20:], data[:n])
	if _, err := w.wb.ReadAt(got, 0); err != nil || !bytes.Equal(got, model) {
		t.Fatalf("the accepted bytes do not read back during the outage (err %v)", err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel) // a FUSE interrupt
	start = time.Now()
	if _, err := w.wb.WriteAtContext(ctx, data[n:], 1<<20+int64(n)); !errors.Is(err, context.Canceled) {
		t.Fatalf("write with a cancelled context: %v; want context.Canceled", err)
	}
	if d := time.Since(start); d > flushTimeout/2 {
		t.Fatalf("the interrupted write returned after %s", d)
	}

	if err := p.Toxics.RemoveToxic(context.Background(), down.Name); err != nil {
		t.Fatal(err)
	}
	// A write may still meet the tail of the outage (connections the proxy
	// held, a flush timing out); retried from what was accepted, as an
	// application retries a short write, it completes.
	deadline := time.Now().Add(30 * time.Second)
	for done := n; done < len(data); {
		m, err := w.wb.WriteAt(data[done:], 1<<20+int64(done))
		done += m
		if err != nil {
			if time.Now().After(deadline) {
				t.Fatalf("writes did not resume within 30s after storage came back: %v", err)
			}
			t.Logf("write right after the outage: %v", err)
		}
	}
	copy(model[1<<20:], data)
	if err := w.wb.Flush(wbCtx(t)); err != nil {
		t.Fatal(err)
	}
	if st := w.wb.Stats(); st.PeakDirtyBytes > limit {
		t.Fatalf("dirty memory reached %d past the bound %d", st.PeakDirtyBytes, limit)
	}
	if !bytes.Equal(s.readFresh("o.img", size), model) {
		t.Fatal("after the outage a fresh open reads other bytes than were written")
	}
}

// TestWriteBackFlushKeepsWrittenBlocks: after a flush the cache serves the
// uploaded blocks without a request whenever their bytes are known (whole
// block written, rest cached, or rest a hole), fetches only a block it
// could not know, and serves what storage holds (checked by a fresh open).
func TestWriteBackFlushKeepsWrittenBlocks(t *testing.T) {
	s := newPageBlobStore(t)
	const size = 8 << 20
	const bs = DefaultBlockSize
	model := s.create("k.img", size)
	// A small read-ahead window leaves the second half of the written
	// range uncached after the warm-up.
	w := openWritable(t, s.url("k.img"), s.blobOpts(), Options{MaxReadAhead: 512 << 10}, WriteBackOptions{FlushInterval: -1}, nil)

	// Warm [0, 2 MiB) with a sequential read: read-ahead brings it in
	// extents of many blocks, so replaced blocks sit inside older extents.
	warm := make([]byte, 2<<20)
	for off := 0; off < len(warm); off += 128 << 10 {
		if _, err := w.wb.ReadAt(warm[off:off+128<<10], int64(off)); err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(warm, model[:len(warm)]) {
		t.Fatal("warm-up read differs from the blob")
	}
	w.cache.mu.Lock()
	multi, uncached := w.cache.blocks[5].nblocks > 1, w.cache.blocks[(7<<19)/bs] == nil
	w.cache.mu.Unlock()
	if !multi || !uncached {
		t.Fatalf("warm-up: block 5 in a larger extent %v, block at 3.5 MiB uncached %v; the test needs both", multi, uncached)
	}
	writes := []struct {
		off int64
		n   int
	}{
		{5*bs + 4096, 4096},        // inside a cached block of a larger extent
		{9 * bs, 2 * bs},           // whole blocks, cached
		{3<<20 + 512, 1024},        // a block never read: must be fetched again
		{40 * bs, bs},              // a whole block never read
		{size/2 + 3*bs + 512, 512}, // a hole: the rest is zeros
	}
	for i, x := range writes {
		p := randomPattern(uint64(100+i), x.n)
		if _, err := w.wb.WriteAt(p, x.off); err != nil {
			t.Fatal(err)
		}
		copy(model[x.off:], p)
	}
	if err := w.wb.Flush(wbCtx(t)); err != nil {
		t.Fatal(err)
	}
	if st := w.wb.Stats(); st.DirtyBytes != 0 {
		t.Fatalf("dirty bytes left after Flush: %+v", st)
	}
	readBlocks := func(from, to int64) []byte {
		t.Helper()
		got := make([]byte, to-from)
		if _, err := w.wb.ReadAt(got, from); err != nil {
			t.Fatal(err)
		}
		return got
	}
	fresh := s.readFresh("k.img", size)
	if !bytes.Equal(fresh, model) {
		t.Fatal("storage does not hold what was written and flushed")
	}
	known := []struct{ from, to int64 }{
		{0, 2 << 20}, // the warmed range, across the replaced blocks
		{40 * bs, 41 * bs},
		{size/2 + 3*bs, size/2 + 4*bs},
	}
	before := w.cache.Stats().Requests
	for _, r := range known {
		if got := readBlocks(r.from, r.to); !bytes.Equal(got, fresh[r.from:r.to]) {
			t.Fatalf("[%d, %d) after the flush differs from storage", r.from, r.to)
		}
	}
	if n := w.cache.Stats().Requests - before; n != 0 {
		t.Fatalf("reading written blocks whose bytes were known made %d requests; want 0", n)
	}
	// The partially written block that was never cached cannot be known
	// without storage: it is fetched, and holds storage's bytes.
	b := int64(7<<19) / bs * bs
	if got := readBlocks(b, b+bs); !bytes.Equal(got, fresh[b:b+bs]) {
		t.Fatal("the refetched block differs from storage")
	}
	if n := w.cache.Stats().Requests - before; n != 1 {
		t.Fatalf("reading a partially written, uncached block made %d requests; want 1", n)
	}
}
