package blob

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/streaming"
	azblobblob "github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/bloberror"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/pageblob"
)

// DefaultMaxPutsInFlight bounds the Put Page requests one batch has in
// flight.
const DefaultMaxPutsInFlight = 8

// PageWrite is one page-aligned write: Data at Off.
type PageWrite struct {
	Off  int64
	Data []byte
}

func (w PageWrite) end() int64 { return w.Off + int64(len(w.Data)) }

// WriterOptions configures a PageWriter.
type WriterOptions struct {
	Lease LeaseOptions
	// MaxInFlight bounds parallel Put Page requests (default
	// DefaultMaxPutsInFlight).
	MaxInFlight int
}

// PageWriter writes a page blob as its single writer: it holds a renewed
// lease, sends every write with the lease id, and guards each batch with
// an If-Match on the ETag it last saw, so a change by anyone else is
// detected (ErrChanged) and never overwritten. Retries go through the one
// retry policy (retry): a retried Put Page sends the same bytes under the
// same conditions. Reads through the Source it was made from see its
// writes (its written ranges grow, and its reads stop pinning the old ETag).
type PageWriter struct {
	p     *pageSource
	o     Options
	lease *Lease
	sem   chan struct{} // Put Page requests in flight
	batch chan struct{} // one token: batches never overlap (their If-Match chain)

	mu       sync.Mutex
	etag     azcore.ETag // as of the end of the last batch
	stale    bool        // a batch failed part way: refresh etag first
	conflict error       // a foreign change was seen, or Close: every write fails

	retries atomic.Int64
	puts    atomic.Int64
	clears  atomic.Int64
	resent  atomic.Int64 // If-Match writes sent again after an ambiguous 412
}

var _ WriterAt = (*PageWriter)(nil)

// NewPageWriter takes the write lease of the page blob src reads (a Source
// from Open) and returns its writer. The lease is taken only if the blob
// still has the ETag src opened, so a writer never starts from stale reads.
// A blob leased by someone else is refused with ErrLeased.
func NewPageWriter(ctx context.Context, src Source, o WriterOptions) (*PageWriter, error) {
	var p *pageSource
	opts := Options{}.withDefaults()
	switch s := src.(type) {
	case *retryPageSource:
		p, _ = s.src.(*pageSource)
		opts = s.o
	case *pageSource:
		p = s
		opts = s.c.opts
	}
	if p == nil {
		return nil, fmt.Errorf("write %s: %w: only page blobs can be written in place", src, ErrUnsupported)
	}
	if o.MaxInFlight <= 0 {
		o.MaxInFlight = DefaultMaxPutsInFlight
	}
	p.mu.Lock()
	opened := p.etag
	p.mu.Unlock()
	l, err := acquireLease(ctx, p.c, o.Lease, opened)
	if err != nil {
		return nil, err
	}
	w := &PageWriter{p: p, o: opts, lease: l, sem: make(chan struct{}, o.MaxInFlight), batch: make(chan struct{}, 1), etag: opened}
	p.mu.Lock()
	p.modified = true // reads are guarded by the lease from now on
	p.mu.Unlock()
	return w, nil
}

// Lease returns the writer's lease (its Lost channel reports a loss).
func (w *PageWriter) Lease() *Lease { return w.lease }

// Size returns the blob size.
func (w *PageWriter) Size() int64 { return w.p.size }

// Retries, Puts and Clears count retried tries, Put Page and Clear Page
// requests that succeeded (tests, metrics).
func (w *PageWriter) Retries() int64 { return w.retries.Load() }
func (w *PageWriter) Puts() int64    { return w.puts.Load() }
func (w *PageWriter) Clears() int64  { return w.clears.Load() }

// Close releases the lease; later writes fail.
func (w *PageWriter) Close(ctx context.Context) error {
	w.mu.Lock()
	if w.conflict == nil {
		w.conflict = fmt.Errorf("write %s: the writer is closed", w.p.String())
	}
	w.mu.Unlock()
	return w.lease.Release(ctx)
}

// WriteAt writes one aligned range (see WritePages).
func (w *PageWriter) WriteAt(ctx context.Context, p []byte, off int64) (int, error) {
	if err := w.WritePages(ctx, []PageWrite{{Off: off, Data: p}}); err != nil {
		return 0, err
	}
	return len(p), nil
}

// planPuts validates writes (512-aligned, inside size, not overlapping)
// and coalesces adjacent ones into runs of at most MaxPutPages bytes, each
// a list of the writes' slices. It does not copy data.
func planPuts(writes []PageWrite, size int64) ([][]PageWrite, error) {
	ws := slices.Clone(writes)
	ws = slices.DeleteFunc(ws, func(w PageWrite) bool { return len(w.Data) == 0 })
	for _, x := range ws {
		if x.Off < 0 || x.Off%PageSize != 0 || len(x.Data)%PageSize != 0 {
			return nil, fmt.Errorf("page write at %d of %d bytes: offset and length must be multiples of %d", x.Off, len(x.Data), PageSize)
		}
		if x.end() > size || x.end() < x.Off {
			return nil, fmt.Errorf("page write at %d of %d bytes ends past the blob size %d", x.Off, len(x.Data), size)
		}
	}
	slices.SortFunc(ws, func(a, b PageWrite) int { return cmpInt64(a.Off, b.Off) })
	var runs [][]PageWrite
	var cur []PageWrite
	var curLen int64
	for _, x := range ws {
		if len(cur) > 0 && x.Off < cur[len(cur)-1].end() {
			return nil, fmt.Errorf("page writes at %d and %d overlap", cur[len(cur)-1].Off, x.Off)
		}
		for len(x.Data) > 0 {
			if len(cur) == 0 || x.Off != cur[len(cur)-1].end() || curLen == MaxPutPages {
				if len(cur) > 0 {
					runs = append(runs, cur)
				}
				cur, curLen = nil, 0
			}
			n := min(int64(len(x.Data)), MaxPutPages-curLen)
			cur = append(cur, PageWrite{Off: x.Off, Data: x.Data[:n]})
			curLen += n
			x = PageWrite{Off: x.Off + n, Data: x.Data[n:]}
		}
	}
	if len(cur) > 0 {
		runs = append(runs, cur)
	}
	return runs, nil
}

// splitBatchAbove is the batch size above which its first and last
// requests are single pages (guardPieces).
const splitBatchAbove = 1 << 20

func batchBytes(runs [][]PageWrite) int64 {
	var n int64
	for _, run := range runs {
		for _, x := range run {
			n += int64(len(x.Data))
		}
	}
	return n
}

// guardPieces splits runs into the first page of the first run, the last
// page of the last run (as a one-run slice) and the runs between, without
// copying bytes.
func guardPieces(runs [][]PageWrite) (head []PageWrite, middle, tail [][]PageWrite) {
	rest := slices.Clone(runs)
	first := slices.Clone(rest[0])
	head = []PageWrite{{Off: first[0].Off, Data: first[0].Data[:PageSize]}}
	if first[0] = (PageWrite{Off: first[0].Off + PageSize, Data: first[0].Data[PageSize:]}); len(first[0].Data) == 0 {
		first = first[1:]
	}
	rest[0] = first
	lastRun := slices.Clone(rest[len(rest)-1])
	x := lastRun[len(lastRun)-1]
	if end := len(x.Data); end > 0 {
		tail = [][]PageWrite{{{Off: x.Off + int64(end-PageSize), Data: x.Data[end-PageSize:]}}}
		if lastRun[len(lastRun)-1].Data = x.Data[:end-PageSize]; len(x.Data) == PageSize {
			lastRun = lastRun[:len(lastRun)-1]
		}
		rest[len(rest)-1] = lastRun
	}
	middle = slices.DeleteFunc(rest, func(r []PageWrite) bool { return len(r) == 0 })
	return head, middle, tail
}

func cmpInt64(a, b int64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// WritePages writes a batch: adjacent writes coalesced into Put Page
// calls of at most 4 MiB (Clear Page for all-zero runs), up to
// MaxInFlight at a time. It returns nil only when storage acknowledged
// every byte. The first call of the batch carries If-Match on the ETag
// of the end of the previous batch; the lease, which every call carries,
// keeps anyone else out for the rest. A failed batch may have landed in
// part; writing it again is safe. Concurrent calls run one after another.
func (w *PageWriter) WritePages(ctx context.Context, writes []PageWrite) error {
	runs, err := planPuts(writes, w.p.size)
	if err != nil {
		return fmt.Errorf("write %s: %w", w.p.String(), err)
	}
	if len(runs) == 0 {
		return nil
	}
	if err := w.usable(); err != nil {
		return err
	}
	select {
	case w.batch <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("write %s: waiting for the batch in progress: %w", w.p.String(), ctx.Err())
	}
	defer func() { <-w.batch }()
	etag, err := w.batchETag(ctx, true) // stale until the batch has landed
	if err != nil {
		return err
	}
	// The first request carries If-Match; the middle ones go in parallel;
	// the last one goes alone, after them, so its answer carries the
	// blob's ETag for the next batch (no extra request: one round trip for
	// a single-run batch such as a journal commit block). In a large batch
	// the first and last requests are one page each, so that the two
	// serialized round trips are short.
	head, middle, tail := runs[0], runs[1:], [][]PageWrite(nil)
	if len(runs) > 1 && batchBytes(runs) > splitBatchAbove {
		head, middle, tail = guardPieces(runs)
	} else if len(middle) > 0 {
		middle, tail = middle[:len(middle)-1], middle[len(middle)-1:]
	}
	last, err := w.putRun(ctx, head, &etag)
	if err != nil {
		return err
	}
	if err := w.putParallel(ctx, middle); err != nil {
		return err
	}
	if len(tail) > 0 {
		if last, err = w.putRun(ctx, tail[0], nil); err != nil {
			return err
		}
	}
	if last == "" { // storage left it out: ask
		if err := w.refreshETag(ctx); err != nil {
			return err
		}
		w.mu.Lock()
		last = w.etag
		w.mu.Unlock()
	}
	w.setETag(last)
	return nil
}

// setETag records the blob's ETag after this writer's own complete batch.
func (w *PageWriter) setETag(etag azcore.ETag) {
	w.mu.Lock()
	w.etag = etag
	w.stale = false
	w.mu.Unlock()
	w.p.mu.Lock()
	w.p.etag = etag
	w.p.mu.Unlock()
}

// Err returns nil while the writer can write, and otherwise why not (lease
// lost, blob changed by someone else, closed).
func (w *PageWriter) Err() error { return w.usable() }

// usable fails once the lease is lost or a foreign change was seen.
func (w *PageWriter) usable() error {
	if err := w.lease.Err(); err != nil {
		return err
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.conflict
}

func (w *PageWriter) putParallel(ctx context.Context, runs [][]PageWrite) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		wg       sync.WaitGroup
		once     sync.Once
		firstErr error
	)
	for _, run := range runs {
		acquired := false
		select {
		case w.sem <- struct{}{}:
			acquired = true
		case <-ctx.Done():
		}
		if !acquired {
			break
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-w.sem }()
			if _, err := w.putRun(ctx, run, nil); err != nil {
				once.Do(func() { firstErr = err; cancel() })
			}
		}()
	}
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("write %s: %w", w.p.String(), err)
	}
	return nil
}

// putRun sends one coalesced run, retried through the retry policy with
// the same bytes and conditions. With ifMatch, a 412 on a retry may be
// this writer's own earlier try having landed: the ETag is then re-read
// under the lease (nobody else can have written) and the same bytes are
// sent once more under it; a 412 on the first try is a foreign change.
func (w *PageWriter) putRun(ctx context.Context, run []PageWrite, ifMatch *azcore.ETag) (azcore.ETag, error) {
	if err := w.usable(); err != nil {
		return "", err
	}
	off := run[0].Off
	var n int64
	zero := true
	for _, x := range run {
		n += int64(len(x.Data))
		zero = zero && allZero(x.Data)
	}
	body := make([][]byte, len(run)) // sent as one body without copying
	for i, x := range run {
		body[i] = x.Data
	}
	what := fmt.Sprintf("write %d bytes at %d to %s", n, off, w.p.String())
	for round := 0; ; round++ {
		var cond *azcore.ETag
		if ifMatch != nil {
			e := *ifMatch
			cond = &e
		}
		tries := 0
		var etag azcore.ETag
		err := retry(ctx, w.o, &w.retries, what, func(ctx context.Context) (bool, error) {
			tries++
			var err error
			etag, err = w.putOnce(ctx, body, off, zero, cond)
			return false, err
		})
		if err == nil {
			w.p.mu.Lock()
			if !zero {
				w.p.ranges = insertRange(w.p.ranges, Range{Off: off, Len: n})
			}
			w.p.mu.Unlock()
			return etag, nil
		}
		if isLeaseLoss(err) {
			return "", w.lease.markLost(leaseCause(err))
		}
		if bloberror.HasCode(err, bloberror.ConditionNotMet) || isStatus(err, http.StatusPreconditionFailed) {
			if ifMatch != nil && tries > 1 && round == 0 {
				if rerr := w.refreshETag(ctx); rerr != nil {
					return "", rerr
				}
				w.mu.Lock()
				*ifMatch = w.etag
				w.mu.Unlock()
				w.resent.Add(1)
				continue
			}
			seen := "its lease"
			if cond != nil {
				seen = "ETag " + string(*cond)
			}
			w.mu.Lock()
			w.conflict = fmt.Errorf("%s: %w: someone else changed it since this writer last saw %s; nothing was overwritten: reopen it", what, ErrChanged, seen)
			err = w.conflict
			w.mu.Unlock()
			return "", err
		}
		return "", err // retry's and describe's texts name the write and the blob
	}
}

// putOnce is one Put Page (or Clear Page) try under the lease; it returns
// the blob's ETag after it ("" if storage left it out).
func (w *PageWriter) putOnce(ctx context.Context, body [][]byte, off int64, zero bool, ifMatch *azcore.ETag) (azcore.ETag, error) {
	ctx = w.p.tryContext(ctx)
	ac := leaseConditions(w.lease.ID(), ifMatch)
	br := newSlicesReader(body)
	r := azblobblob.HTTPRange{Offset: off, Count: br.Size()}
	var etag *azcore.ETag
	if zero {
		resp, err := w.p.c.page.ClearPages(ctx, r, &pageblob.ClearPagesOptions{AccessConditions: ac})
		if err != nil {
			return "", describeAttempt(err, w.p.c.loc, "write pages to")
		}
		w.clears.Add(1)
		etag = resp.ETag
	} else {
		resp, err := w.p.c.page.UploadPages(ctx, streaming.NopCloser(br), r, &pageblob.UploadPagesOptions{AccessConditions: ac})
		if err != nil {
			return "", describeAttempt(err, w.p.c.loc, "write pages to")
		}
		w.puts.Add(1)
		etag = resp.ETag
	}
	if etag == nil {
		return "", nil
	}
	return *etag, nil
}

// refreshETag reads the blob's current ETag under the lease: with the lease
// held nobody else can have written, so it is this writer's own.
// batchETag returns the ETag the caller's batch is conditioned on (it
// holds w.batch), read from storage first when the last batch did not
// land; staleUntilLanded marks it stale until the caller's batch lands.
func (w *PageWriter) batchETag(ctx context.Context, staleUntilLanded bool) (azcore.ETag, error) {
	w.mu.Lock()
	stale := w.stale
	w.stale = w.stale || staleUntilLanded
	w.mu.Unlock()
	if stale {
		if err := w.refreshETag(ctx); err != nil {
			return "", err
		}
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.etag, nil
}

func (w *PageWriter) refreshETag(ctx context.Context) error {
	var etag azcore.ETag
	err := retry(ctx, w.o, &w.retries, "read the ETag of "+w.p.String(), func(ctx context.Context) (bool, error) {
		props, err := w.p.c.blob.GetProperties(w.p.tryContext(ctx), &azblobblob.GetPropertiesOptions{
			AccessConditions: leaseConditions(w.lease.ID(), nil)})
		if err != nil {
			return false, describeAttempt(err, w.p.c.loc, "read the properties of")
		}
		if props.ETag == nil {
			return false, errors.New("storage omitted the ETag")
		}
		etag = *props.ETag
		return false, nil
	})
	if err != nil {
		if isLeaseLoss(err) {
			return w.lease.markLost(leaseCause(err))
		}
		return err
	}
	w.mu.Lock()
	w.etag = etag
	w.mu.Unlock()
	w.p.mu.Lock()
	w.p.etag = etag
	w.p.mu.Unlock()
	return nil
}

func isStatus(err error, code int) bool {
	var re *azcore.ResponseError
	return errors.As(err, &re) && re.StatusCode == code
}

// slicesReader reads several byte slices as one stream, and seeks (the SDK
// rewinds a body to retry it), so that a run of adjacent writes goes out
// as one Put Page without being copied into one buffer.
type slicesReader struct {
	parts [][]byte
	size  int64
	pos   int64
}

var _ io.ReadSeeker = (*slicesReader)(nil)

func newSlicesReader(parts [][]byte) *slicesReader {
	r := &slicesReader{parts: parts}
	for _, p := range parts {
		r.size += int64(len(p))
	}
	return r
}

// Size returns the total length.
func (r *slicesReader) Size() int64 { return r.size }

func (r *slicesReader) Read(p []byte) (int, error) {
	if r.pos >= r.size {
		return 0, io.EOF
	}
	n, base := 0, int64(0)
	for _, part := range r.parts {
		end := base + int64(len(part))
		if r.pos < end && n < len(p) {
			c := copy(p[n:], part[r.pos-base:])
			n += c
			r.pos += int64(c)
		}
		base = end
	}
	return n, nil
}

func (r *slicesReader) Seek(offset int64, whence int) (int64, error) {
	switch whence {
	case io.SeekStart:
	case io.SeekCurrent:
		offset += r.pos
	case io.SeekEnd:
		offset += r.size
	default:
		return 0, fmt.Errorf("slicesReader: bad whence %d", whence)
	}
	if offset < 0 {
		return 0, fmt.Errorf("slicesReader: seek to %d", offset)
	}
	r.pos = offset
	return offset, nil
}
