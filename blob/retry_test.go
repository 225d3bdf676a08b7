package blob

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	azruntime "github.com/Azure/azure-sdk-for-go/sdk/azcore/runtime"
)

// statusServer speaks the Blob service's read protocol for one block blob
// (HEAD for properties, ranged GET for data) and answers the first `fail`
// GETs with `status` (and its headers) instead. It counts every GET.
type statusServer struct {
	data    []byte
	status  int
	headers map[string]string
	fail    int64

	gets     atomic.Int64
	mu       sync.Mutex
	gotAfter []time.Duration // time between consecutive GETs
	last     time.Time
}

func (s *statusServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h := w.Header()
	h.Set("ETag", `"0x8DCAFE"`)
	h.Set("x-ms-blob-type", "BlockBlob")
	h.Set("x-ms-version", "2025-01-05")
	if r.Method == http.MethodHead {
		h.Set("Content-Length", strconv.Itoa(len(s.data)))
		w.WriteHeader(http.StatusOK)
		return
	}
	n := s.gets.Add(1)
	s.mu.Lock()
	if !s.last.IsZero() {
		s.gotAfter = append(s.gotAfter, time.Since(s.last))
	}
	s.last = time.Now()
	s.mu.Unlock()
	if n <= s.fail {
		h.Set("x-ms-error-code", "ServerBusy")
		for k, v := range s.headers {
			h.Set(k, v)
		}
		h.Set("Content-Type", "application/xml")
		w.WriteHeader(s.status)
		fmt.Fprintf(w, `<?xml version="1.0" encoding="utf-8"?><Error><Code>Simulated</Code><Message>simulated %d</Message></Error>`, s.status)
		return
	}
	var lo, hi int
	rng := r.Header.Get("x-ms-range")
	if rng == "" {
		rng = r.Header.Get("Range")
	}
	if _, err := fmt.Sscanf(rng, "bytes=%d-%d", &lo, &hi); err != nil || hi >= len(s.data) || lo > hi {
		http.Error(w, "bad range "+rng, http.StatusRequestedRangeNotSatisfiable)
		return
	}
	h.Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", lo, hi, len(s.data)))
	h.Set("Content-Length", strconv.Itoa(hi-lo+1))
	w.WriteHeader(http.StatusPartialContent)
	_, _ = w.Write(s.data[lo : hi+1])
}

func (s *statusServer) gaps() []time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]time.Duration(nil), s.gotAfter...)
}

// TestRetrySourceStatusCodes: through a real HTTP server and the Azure SDK,
// transient answers are retried with backoff (honouring Retry-After) and
// answers that will not change are returned after one request.
func TestRetrySourceStatusCodes(t *testing.T) {
	data := bytes.Repeat([]byte("blobseal"), 64<<10/8)
	for _, c := range []struct {
		status    int
		headers   map[string]string
		wantGets  int64 // GET requests for one read
		wantErr   string
		minGapFor time.Duration // the wait before the first retry at least
	}{
		{status: 500, wantGets: 3},
		{status: 503, wantGets: 3},
		{status: 429, headers: map[string]string{"Retry-After": "1"}, wantGets: 3, minGapFor: 900 * time.Millisecond},
		{status: 503, headers: map[string]string{"x-ms-retry-after-ms": "300"}, wantGets: 3, minGapFor: 250 * time.Millisecond},
		{status: 403, headers: map[string]string{"x-ms-error-code": "AuthorizationFailure"}, wantGets: 1, wantErr: "access denied"},
		{status: 404, headers: map[string]string{"x-ms-error-code": "BlobNotFound"}, wantGets: 1, wantErr: "blob not found"},
		{status: 416, headers: map[string]string{"x-ms-error-code": "InvalidRange"}, wantGets: 1, wantErr: "range outside the blob"},
	} {
		t.Run(fmt.Sprint(c.status, c.headers), func(t *testing.T) {
			srv := &statusServer{data: data, status: c.status, headers: c.headers, fail: 2}
			hs := httptest.NewServer(srv)
			t.Cleanup(hs.Close)
			loc := hs.URL + "/devstoreaccount1/c/b.img"
			// MaxRetries is large: only the status code decides whether
			// the read retries; RetryDelay is short so backoff is quick.
			src, err := Open(testCtx(t), loc, Options{MaxRetries: 10, RetryDelay: 10 * time.Millisecond, MaxRetryDelay: 40 * time.Millisecond})
			if err != nil {
				t.Fatal(err)
			}
			p := make([]byte, 4096)
			_, err = src.ReadAt(testCtx(t), p, 8192)
			if got := srv.gets.Load(); got != c.wantGets {
				t.Errorf("%d GET requests, want %d", got, c.wantGets)
			}
			if c.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), c.wantErr) {
					t.Fatalf("err = %v, want one mentioning %q", err, c.wantErr)
				}
				if r := src.(*RetrySource).Retries(); r != 0 {
					t.Errorf("%d retries of a final answer", r)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(p, data[8192:8192+4096]) {
				t.Fatal("wrong bytes after retries")
			}
			if r := src.(*RetrySource).Retries(); r != 2 {
				t.Errorf("%d retries recorded, want 2", r)
			}
			if g := srv.gaps(); c.minGapFor > 0 && (len(g) == 0 || g[0] < c.minGapFor) {
				t.Errorf("retried after %v; the server asked for %v", g, c.minGapFor)
			}
		})
	}

	t.Run("open retries a throttled properties request", func(t *testing.T) {
		srv := &statusServer{data: data}
		var heads atomic.Int64
		hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodHead && heads.Add(1) <= 2 {
				w.Header().Set("x-ms-error-code", "ServerBusy")
				w.WriteHeader(http.StatusServiceUnavailable)
				return
			}
			srv.ServeHTTP(w, r)
		}))
		t.Cleanup(hs.Close)
		src, err := Open(testCtx(t), hs.URL+"/devstoreaccount1/c/b.img", Options{RetryDelay: 5 * time.Millisecond})
		if err != nil {
			t.Fatalf("open through two 503s: %v", err)
		}
		if src.Size() != int64(len(data)) || heads.Load() != 3 {
			t.Errorf("size %d after %d HEAD requests; want %d after 3", src.Size(), heads.Load(), len(data))
		}
	})

	t.Run("persistent 503 gives up after MaxRetries", func(t *testing.T) {
		srv := &statusServer{data: data, status: 503, fail: 1 << 30}
		hs := httptest.NewServer(srv)
		t.Cleanup(hs.Close)
		src, err := Open(testCtx(t), hs.URL+"/devstoreaccount1/c/b.img", Options{MaxRetries: 3, RetryDelay: 5 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		_, err = src.ReadAt(testCtx(t), make([]byte, 10), 0)
		if err == nil || !strings.Contains(err.Error(), "gave up after 4 attempts") || !strings.Contains(err.Error(), "503") {
			t.Fatalf("err = %v", err)
		}
		if got := srv.gets.Load(); got != 4 {
			t.Errorf("%d GET requests, want 4 (one try and 3 retries: no SDK retries inside)", got)
		}
	})

	t.Run("the context ends the backoff", func(t *testing.T) {
		srv := &statusServer{data: data, status: 429, headers: map[string]string{"Retry-After": "30"}, fail: 1 << 30}
		hs := httptest.NewServer(srv)
		t.Cleanup(hs.Close)
		src, err := Open(testCtx(t), hs.URL+"/devstoreaccount1/c/b.img", Options{})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(testCtx(t), 300*time.Millisecond)
		defer cancel()
		start := time.Now()
		_, err = src.ReadAt(ctx, make([]byte, 10), 0)
		if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "429") {
			t.Fatalf("err = %v, want the deadline and the last answer", err)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("gave up after %v; the deadline was 300ms", d)
		}
	})
}

func TestRetryAfter(t *testing.T) {
	for _, c := range []struct {
		h    http.Header
		want time.Duration
	}{
		{http.Header{"Retry-After": {"2"}}, 2 * time.Second},
		{http.Header{"X-Ms-Retry-After-Ms": {"150"}}, 150 * time.Millisecond},
		{http.Header{"Retry-After": {"86400"}}, maxRetryAfter},
		{http.Header{"Retry-After": {"9223372036854775807"}}, maxRetryAfter},
		{http.Header{"X-Ms-Retry-After-Ms": {"9223372036854775807"}}, maxRetryAfter},
		{http.Header{"Retry-After": {"-5"}}, 0},
		{http.Header{"Retry-After": {"soon"}}, 0},
		{http.Header{}, 0},
	} {
		err := responseError(503, c.h)
		if got := retryAfter(err); got != c.want {
			t.Errorf("retryAfter(%v) = %v, want %v", c.h, got, c.want)
		}
	}
	if got := retryAfter(errors.New("plain")); got != 0 {
		t.Errorf("retryAfter(plain error) = %v", got)
	}
}

// responseError builds the error azcore returns for an answer with status
// and headers.
func responseError(status int, h http.Header) error {
	req, _ := http.NewRequest(http.MethodGet, "http://127.0.0.1/devstoreaccount1/c/b.img", nil)
	return azruntime.NewResponseError(&http.Response{StatusCode: status, Header: h, Request: req, Body: http.NoBody})
}
