package blob

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
)

// RetrySource is the read path's one retry policy, as a decorator around a
// Source (restic's backend-retry idiom): the source underneath makes one
// try per call (no SDK retries), and nothing above it retries again (the
// block cache fails a read when its fetch fails). Transient failures
// (5xx, 408, 429 with its Retry-After, resets, truncated bodies, request
// timeouts) are retried with exponential backoff and jitter; a try that
// made progress resets the count, and the read resumes where it stopped.
// Answers that will not change (403, 404, 412, 416) are returned at once.
// The caller's context always wins.
type RetrySource struct {
	src     Source
	o       Options
	retries atomic.Int64
}

// retryPageSource is a RetrySource over a source that also lists its
// written ranges and can be written (page blobs): the wrapper keeps those
// capabilities, and retries writes (Put Page is idempotent) too.
type retryPageSource struct {
	*RetrySource
	rl RangeLister
	w  WriterAt
}

var (
	_ Source      = (*RetrySource)(nil)
	_ Versioned   = (*RetrySource)(nil)
	_ io.Closer   = (*RetrySource)(nil)
	_ RangeLister = (*retryPageSource)(nil)
	_ WriterAt    = (*retryPageSource)(nil)
)

// NewRetrySource wraps src with the retry policy of o (MaxRetries,
// RetryDelay, MaxRetryDelay; zero values select the defaults). The result
// keeps src's RangeLister and WriterAt capabilities when it has both.
func NewRetrySource(src Source, o Options) Source {
	r := &RetrySource{src: src, o: o.withDefaults()}
	rl, listed := src.(RangeLister)
	w, writable := src.(WriterAt)
	if listed && writable {
		return &retryPageSource{RetrySource: r, rl: rl, w: w}
	}
	return r
}

// Size returns the size of the source.
func (r *RetrySource) Size() int64 { return r.src.Size() }

// String names the source.
func (r *RetrySource) String() string { return r.src.String() }

// Version returns the source's version, or "" when it has none.
func (r *RetrySource) Version() string {
	if v, ok := r.src.(Versioned); ok {
		return v.Version()
	}
	return ""
}

// Close closes the source when it is an io.Closer.
func (r *RetrySource) Close() error {
	if c, ok := r.src.(io.Closer); ok {
		return c.Close()
	}
	return nil
}

// Retries returns how many failed tries were retried (tests, metrics).
func (r *RetrySource) Retries() int64 { return r.retries.Load() }

// ReadAt reads like the source, retrying transient failures and resuming
// after partial reads.
func (r *RetrySource) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	done := 0
	var eof bool
	err := retry(ctx, r.o, &r.retries, fmt.Sprintf("read %s at %d", r.src, off), func(ctx context.Context) (bool, error) {
		n, err := r.src.ReadAt(ctx, p[done:], off+int64(done))
		done += max(n, 0)
		// The contract's end of the source is a bare io.EOF; a wrapped one
		// is a connection that ended early, which is worth retrying.
		if err == io.EOF { //nolint:errorlint // see above
			eof, err = true, nil
		}
		return n > 0, err
	})
	if err == nil && eof {
		err = io.EOF
	}
	return done, err
}

// WrittenRanges returns the source's written ranges.
func (r *retryPageSource) WrittenRanges(ctx context.Context) ([]Range, error) {
	var rs []Range
	err := retry(ctx, r.o, &r.retries, "list the written ranges of "+r.src.String(), func(ctx context.Context) (bool, error) {
		var err error
		rs, err = r.rl.WrittenRanges(ctx)
		return false, err
	})
	return rs, err
}

// WriteAt writes like the source, retrying transient failures and
// resuming after the part already written.
func (r *retryPageSource) WriteAt(ctx context.Context, p []byte, off int64) (int, error) {
	done := 0
	err := retry(ctx, r.o, &r.retries, fmt.Sprintf("write %s at %d", r.src, off), func(ctx context.Context) (bool, error) {
		n, err := r.w.WriteAt(ctx, p[done:], off+int64(done))
		done += max(n, 0)
		return n > 0, err
	})
	return done, err
}

// maxRetryAfter caps how long a Retry-After answer can make a try wait:
// longer than any read should, and the context's deadline cuts it anyway.
const maxRetryAfter = time.Minute

// retry runs try until it succeeds, fails for good, fails MaxRetries times
// in a row without progress, or ctx ends; each retried failure is counted
// in retries. what names the operation in the final error.
func retry(ctx context.Context, o Options, retries *atomic.Int64, what string, try func(context.Context) (progress bool, err error)) error {
	start := time.Now()
	failures, attempts := 0, 0
	for {
		attempts++
		progress, err := try(ctx)
		if err == nil {
			return nil
		}
		if ctxErr := ctx.Err(); ctxErr != nil {
			return fmt.Errorf("%s: gave up after %d attempts in %s: %w (last error: %w)", what, attempts, time.Since(start).Round(time.Millisecond), ctxErr, err)
		}
		if !retryable(err) {
			return err
		}
		if progress {
			failures = 0 // the connection works: keep going
		}
		failures++
		if failures > o.MaxRetries {
			return fmt.Errorf("%s: gave up after %d attempts in %s: %w", what, attempts, time.Since(start).Round(time.Millisecond), err)
		}
		retries.Add(1)
		t := time.NewTimer(max(o.backoff(failures), retryAfter(err)))
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("%s: gave up after %d attempts in %s: %w (last error: %w)", what, attempts, time.Since(start).Round(time.Millisecond), ctx.Err(), err)
		case <-t.C:
		}
	}
}

// retryAfter returns the wait a throttling answer (429, 503) asks for:
// x-ms-retry-after-ms or Retry-After (seconds or an HTTP date); 0 when
// there is none.
func retryAfter(err error) time.Duration {
	var re *azcore.ResponseError
	if !errors.As(err, &re) || re.RawResponse == nil {
		return 0
	}
	h := re.RawResponse.Header
	var d time.Duration
	// Counts are capped before they are scaled, so a huge one cannot
	// overflow into a short wait.
	if ms, err := strconv.ParseInt(h.Get("x-ms-retry-after-ms"), 10, 64); err == nil && ms > 0 {
		d = time.Duration(min(ms, maxRetryAfter.Milliseconds())) * time.Millisecond
	} else if v := h.Get("Retry-After"); v != "" {
		if s, err := strconv.ParseInt(v, 10, 64); err == nil && s > 0 {
			d = time.Duration(min(s, int64(maxRetryAfter/time.Second))) * time.Second
		} else if t, err := http.ParseTime(v); err == nil {
			d = time.Until(t)
		}
	}
	return min(max(d, 0), maxRetryAfter)
}
