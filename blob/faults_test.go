package blob

import (
	"bytes"
	"context"
	"errors"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/Shopify/toxiproxy/v2/collectors"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
)

// startProxy puts an in-process toxiproxy in front of Azurite.
func startProxy(t *testing.T, s *store) *toxiproxy.Proxy {
	t.Helper()
	srv := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(prometheus.NewRegistry()), zerolog.Nop())
	srv.Metrics.ProxyMetrics = collectors.NewProxyMetricCollectors()
	p := toxiproxy.NewProxy(srv, "azurite", "127.0.0.1:0", "127.0.0.1:"+strconv.Itoa(s.az.Port))
	if err := p.Start(); err != nil {
		t.Fatalf("start toxiproxy: %v", err)
	}
	t.Cleanup(p.Stop)
	return p
}

func addToxic(t *testing.T, p *toxiproxy.Proxy, js string) string {
	t.Helper()
	w, err := p.Toxics.AddToxicJson(strings.NewReader(js))
	if err != nil {
		t.Fatalf("add toxic %s: %v", js, err)
	}
	return w.Name
}

func proxiedURL(p *toxiproxy.Proxy, s *store, name string) string {
	return "http://" + p.Listen + "/devstoreaccount1/img/" + name
}

// readAllParallel reads the source in chunk-sized pieces with 8 goroutines
// and compares each piece with want.
func readAllParallel(ctx context.Context, src Source, want []byte, chunk int) error {
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for off := g * chunk; off < len(want); off += 8 * chunk {
				n := min(chunk, len(want)-off)
				p := make([]byte, n)
				if _, err := src.ReadAt(ctx, p, int64(off)); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(p, want[off:off+n]) {
					errs <- errors.New("bytes differ from the reference after faults")
					return
				}
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	return <-errs
}

// TestFaultInjection drives reads through connection resets, truncated
// bodies, stalls, latency, slow closes and a throttled link. Reads must
// return the right bytes, or fail clearly once the deadline passes.
func TestFaultInjection(t *testing.T) {
	s := newStore(t)
	want := sparseImage(9, 2<<20)
	s.putBlock("img", "f.img", want)
	s.putPage("img", "p.img", want)

	open := func(t *testing.T, p *toxiproxy.Proxy, name string, timeout time.Duration) Source {
		t.Helper()
		o := s.opts()
		o.RequestTimeout, o.MaxRetries = timeout, 20
		src, err := Open(testCtx(t), proxiedURL(p, s, name), o)
		if err != nil {
			t.Fatal(err)
		}
		return src
	}
	retries := func(src Source) int64 {
		return src.(interface{ Retries() int64 }).Retries()
	}

	recovering := []struct {
		name      string
		toxic     string
		chunk     int
		timeout   time.Duration
		wantRetry bool
	}{
		{"reset_peer for 300ms", `{"type":"reset_peer","attributes":{"timeout":5}}`, 256 << 10, 5 * time.Second, true},
		{"reset_peer on half the connections", `{"type":"reset_peer","attributes":{"timeout":5},"toxicity":0.5}`, 256 << 10, 5 * time.Second, false},
		{"limit_data truncates bodies", `{"type":"limit_data","attributes":{"bytes":150000}}`, 512 << 10, 5 * time.Second, true},
		{"latency", `{"type":"latency","attributes":{"latency":40,"jitter":20}}`, 256 << 10, 5 * time.Second, false},
		{"slow_close", `{"type":"slow_close","attributes":{"delay":300}}`, 256 << 10, 5 * time.Second, false},
		{"bandwidth below the request timeout", `{"type":"bandwidth","attributes":{"rate":2000}}`, 1 << 20, 300 * time.Millisecond, true},
	}
	for _, blobName := range []string{"f.img", "p.img"} {
		for _, c := range recovering {
			t.Run(blobName+"/"+c.name, func(t *testing.T) {
				p := startProxy(t, s)
				src := open(t, p, blobName, c.timeout)
				name := addToxic(t, p, c.toxic)
				if strings.HasSuffix(c.name, "for 300ms") {
					time.AfterFunc(300*time.Millisecond, func() { _ = p.Toxics.RemoveToxic(context.Background(), name) })
				}
				if err := readAllParallel(testCtx(t), src, want, c.chunk); err != nil {
					t.Fatal(err)
				}
				if c.wantRetry && retries(src) == 0 {
					t.Fatal("no retries: the fault was not exercised")
				}
				t.Logf("retries: %d", retries(src))
			})
		}
	}

	t.Run("stall then recover", func(t *testing.T) {
		p := startProxy(t, s)
		src := open(t, p, "f.img", 400*time.Millisecond)
		name := addToxic(t, p, `{"type":"timeout","attributes":{"timeout":0}}`)
		go func() {
			time.Sleep(1200 * time.Millisecond)
			_ = p.Toxics.RemoveToxic(context.Background(), name)
		}()
		start := time.Now()
		if err := readAllParallel(testCtx(t), src, want, 256<<10); err != nil {
			t.Fatal(err)
		}
		if time.Since(start) < time.Second || retries(src) == 0 {
			t.Fatalf("read finished in %s with %d retries: the stall was not exercised", time.Since(start), retries(src))
		}
	})

	t.Run("stall past the deadline fails clearly", func(t *testing.T) {
		p := startProxy(t, s)
		src := open(t, p, "f.img", 300*time.Millisecond)
		addToxic(t, p, `{"type":"timeout","attributes":{"timeout":0}}`)
		ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
		defer cancel()
		start := time.Now()
		_, err := src.ReadAt(ctx, make([]byte, 64<<10), 0)
		if err == nil || !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "gave up after") {
			t.Fatalf("stalled read: err = %v", err)
		}
		if d := time.Since(start); d > 2500*time.Millisecond {
			t.Fatalf("stalled read returned after %s; deadline was 1.5s", d)
		}
		t.Logf("error: %v", err)
	})

	t.Run("persistent truncation exhausts retries", func(t *testing.T) {
		p := startProxy(t, s)
		o := s.opts()
		o.MaxRetries = 3
		src, err := Open(testCtx(t), proxiedURL(p, s, "f.img"), o)
		if err != nil {
			t.Fatal(err)
		}
		// Each connection dies before the response headers complete: no progress.
		addToxic(t, p, `{"type":"limit_data","attributes":{"bytes":10}}`)
		_, err = src.ReadAt(testCtx(t), make([]byte, 4096), 0)
		if err == nil || !strings.Contains(err.Error(), "gave up after 4 attempts") {
			t.Fatalf("err = %v", err)
		}
		t.Logf("error: %v", err)
	})
}

// TestUploadThroughFaults uploads through resets and latency: azcore's
// retries must still converge to a verified blob.
func TestUploadThroughFaults(t *testing.T) {
	s := newStore(t)
	p := startProxy(t, s)
	img := sparseImage(41, 3<<20)
	path := t.TempDir() + "/f.img"
	writeSparse(t, path, img)
	addToxic(t, p, `{"type":"latency","attributes":{"latency":20}}`)
	for _, typ := range []string{"page", "block"} {
		// Every connection is reset for the first 400ms of each upload.
		name := addToxic(t, p, `{"type":"reset_peer","attributes":{"timeout":10},"stream":"upstream"}`)
		time.AfterFunc(400*time.Millisecond, func() { _ = p.Toxics.RemoveToxic(context.Background(), name) })
		o := s.opts()
		o.MaxRetries = 20
		hc, counter := newCountingClient()
		o.HTTPClient = hc
		res, err := Upload(testCtx(t), path, proxiedURL(p, s, "up-"+typ), UploadOptions{Options: o, Type: typ, BlockSize: 1 << 20, Concurrency: 4})
		if err != nil {
			t.Fatalf("%s upload through faults: %v", typ, err)
		}
		// Verify directly, without the proxy.
		if err := Verify(testCtx(t), path, s.url("img", "up-"+typ), s.opts()); err != nil {
			t.Fatal(err)
		}
		// Properties + (page: create) + the data requests + final properties.
		minimal := res.Requests + 2
		if typ == "page" {
			minimal++
		}
		t.Logf("%s: %+v; %d HTTP requests for %d minimal", typ, res, counter.all.Load(), minimal)
		if counter.all.Load() <= minimal {
			t.Fatalf("%d HTTP requests, no more than the %d needed: no fault was retried", counter.all.Load(), minimal)
		}
	}
}
