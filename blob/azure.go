package blob

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/streaming"
	azblobblob "github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
)

// Page blob limits from the Blob service.
const (
	PageSize    = 512
	MaxPutPages = 4 << 20
	// minHole is the shortest hole inside a read that is worth a separate
	// request pair rather than fetching its zeros.
	minHole = 256 << 10
)

// azureBase is what page and block blob sources share.
type azureBase struct {
	c    *clients
	size int64
	kind string // "page" or "block" (append blobs read as block)

	mu       sync.Mutex
	etag     azcore.ETag
	modified bool // written through this Source: reads stop pinning the ETag
}

// blockSource reads a block (or append) blob.
type blockSource struct{ *azureBase }

// pageSource reads and writes a page blob and knows its written ranges.
type pageSource struct {
	*azureBase
	ranges []Range // guarded by mu; replaced, never mutated in place
}

var (
	_ Source      = blockSource{}
	_ Versioned   = blockSource{}
	_ Source      = (*pageSource)(nil)
	_ Versioned   = (*pageSource)(nil)
	_ RangeLister = (*pageSource)(nil)
	_ WriterAt    = (*pageSource)(nil)
	_ io.Closer   = blockSource{}
	_ io.Closer   = (*pageSource)(nil)
	_ io.Closer   = (*fileSource)(nil)
)

func openAzure(ctx context.Context, c *clients) (Source, error) {
	props, err := c.blob.GetProperties(ctx, nil)
	if err != nil {
		return nil, describeAttempt(err, c.loc, "open")
	}
	if props.ContentLength == nil || props.BlobType == nil || props.ETag == nil {
		return nil, fmt.Errorf("open %s: the storage service omitted size, type or ETag", c.loc.redacted())
	}
	base := &azureBase{c: c, size: *props.ContentLength, etag: *props.ETag}
	switch *props.BlobType {
	case azblobblob.BlobTypePageBlob:
		base.kind = "page"
		p := &pageSource{azureBase: base}
		if err := p.loadRanges(ctx); err != nil {
			return nil, err
		}
		return p, nil
	case azblobblob.BlobTypeBlockBlob, azblobblob.BlobTypeAppendBlob:
		base.kind = "block"
		return blockSource{base}, nil
	default:
		return nil, fmt.Errorf("open %s: %w: blob type %q", c.loc.redacted(), ErrUnsupported, *props.BlobType)
	}
}

// listPageRanges returns the merged written ranges of a page blob and the
// ETag they belong to.
func listPageRanges(ctx context.Context, c *clients) ([]Range, azcore.ETag, error) {
	var rs []Range
	var etag azcore.ETag
	pager := c.page.NewGetPageRangesPager(nil)
	for pager.More() {
		page, err := pager.NextPage(ctx)
		if err != nil {
			return nil, "", describeAttempt(err, c.loc, "list page ranges of")
		}
		if page.ETag != nil {
			etag = *page.ETag
		}
		for _, pr := range page.PageRange {
			if pr == nil || pr.Start == nil || pr.End == nil || *pr.End < *pr.Start {
				return nil, "", fmt.Errorf("list page ranges of %s: malformed range in the response", c.loc.redacted())
			}
			rs = append(rs, Range{Off: *pr.Start, Len: *pr.End - *pr.Start + 1})
		}
	}
	return MergeRanges(rs), etag, nil
}

func (p *pageSource) loadRanges(ctx context.Context) error {
	for attempt := 0; ; attempt++ {
		rs, etag, err := listPageRanges(ctx, p.c)
		if err != nil {
			return err
		}
		p.mu.Lock()
		same := etag == "" || etag == p.etag
		if same {
			p.ranges = rs
		}
		p.mu.Unlock()
		if same {
			return nil
		}
		if attempt == 2 {
			return fmt.Errorf("open %s: %w: it is being written while opened; retry when the upload is done", p.c.loc.redacted(), ErrChanged)
		}
		props, err := p.c.blob.GetProperties(ctx, nil)
		if err != nil {
			return describeAttempt(err, p.c.loc, "open")
		}
		if props.ETag == nil || props.ContentLength == nil {
			return fmt.Errorf("open %s: the storage service omitted size or ETag", p.c.loc.redacted())
		}
		p.mu.Lock()
		p.etag, p.size = *props.ETag, *props.ContentLength
		p.mu.Unlock()
	}
}

func (b *azureBase) Size() int64 { return b.size }

// Close drops idle connections of the transport Open created. Reads after
// Close still work (they dial again).
func (b *azureBase) Close() error {
	b.c.closeIdle()
	return nil
}

func (c *clients) closeIdle() {
	if c.ownedHTTP != nil {
		c.ownedHTTP.CloseIdleConnections()
	}
}

func (b *azureBase) String() string { return b.kind + " blob " + b.c.loc.redacted() }

// Version returns the blob's ETag as of Open (or the last write through this Source).
func (b *azureBase) Version() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return string(b.etag)
}

// clamp validates a read and returns how many bytes lie inside the blob.
func clamp(ctx context.Context, p []byte, off, size int64, name string) (int64, error) {
	if err := ctx.Err(); err != nil {
		return 0, fmt.Errorf("read %s: %w", name, err)
	}
	if off < 0 {
		return 0, fmt.Errorf("read %s: negative offset %d", name, off)
	}
	if off >= size {
		return 0, nil
	}
	return min(int64(len(p)), size-off), nil
}

func (b blockSource) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	n, err := clamp(ctx, p, off, b.size, b.String())
	if err != nil {
		return 0, err
	}
	if n > 0 {
		if got, err := b.fetch(ctx, p[:n], off); err != nil {
			return got, err
		}
	}
	if n < int64(len(p)) {
		return int(n), io.EOF
	}
	return int(n), nil
}

func (p *pageSource) ReadAt(ctx context.Context, buf []byte, off int64) (int, error) {
	n, err := clamp(ctx, buf, off, p.size, p.String())
	if err != nil {
		return 0, err
	}
	if n > 0 {
		p.mu.Lock()
		ranges := p.ranges
		p.mu.Unlock()
		segs := planRead(ranges, off, n, minHole)
		for _, s := range segs {
			if !s.data {
				clear(buf[s.off-off : s.off-off+s.len])
			}
		}
		if got, err := p.fetchSegments(ctx, buf, off, segs); err != nil {
			return got, err
		}
	}
	if n < int64(len(buf)) {
		return int(n), io.EOF
	}
	return int(n), nil
}

// segmentFanout bounds the parallel requests one fragmented read makes.
const segmentFanout = 4

// fetchSegments fetches the data segments of one read, several at a time:
// a fragmented image would otherwise pay one round trip per segment. On
// error it returns how many leading bytes of buf are complete (holes and
// whole or partly fetched segments up to the first incomplete one), so a
// retry can resume there.
func (p *pageSource) fetchSegments(ctx context.Context, buf []byte, off int64, segs []segment) (int, error) {
	var data []int // indexes of segs that hold data
	for i, s := range segs {
		if s.data {
			data = append(data, i)
		}
	}
	got := make([]int, len(segs))
	for i, s := range segs {
		if !s.data {
			got[i] = int(s.len)
		}
	}
	if len(segs) == 0 {
		return 0, nil
	}
	var err error
	if len(data) == 1 { // the common case: no goroutine
		s := segs[data[0]]
		got[data[0]], err = p.fetch(ctx, buf[s.off-off:s.off-off+s.len], s.off)
	} else {
		err = p.fetchParallel(ctx, buf, off, segs, data, got)
	}
	if err == nil {
		return int(segs[len(segs)-1].off + segs[len(segs)-1].len - off), nil
	}
	prefix := 0
	for i, s := range segs {
		prefix = int(s.off-off) + got[i]
		if int64(got[i]) < s.len {
			break
		}
	}
	return prefix, err
}

// fetchParallel fetches segs[data...] with up to segmentFanout requests at
// a time, recording in got how many bytes of each arrived.
func (p *pageSource) fetchParallel(ctx context.Context, buf []byte, off int64, segs []segment, data, got []int) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		wg       sync.WaitGroup
		next     atomic.Int64
		once     sync.Once
		firstErr error
	)
	for w := 0; w < min(segmentFanout, len(data)); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				k := int(next.Add(1) - 1)
				if k >= len(data) || ctx.Err() != nil {
					return
				}
				i := data[k]
				s := segs[i]
				n, err := p.fetch(ctx, buf[s.off-off:s.off-off+s.len], s.off)
				got[i] = n
				if err != nil {
					once.Do(func() { firstErr = err; cancel() })
					return
				}
			}
		}()
	}
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	return ctx.Err()
}

// WrittenRanges returns the page blob's written ranges, merged.
func (p *pageSource) WrittenRanges(context.Context) ([]Range, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slicesClone(p.ranges), nil
}

func slicesClone(rs []Range) []Range { return append([]Range(nil), rs...) }

// WriteAt writes 512-byte aligned data with Put Page calls of at most 4 MiB.
func (p *pageSource) WriteAt(ctx context.Context, data []byte, off int64) (int, error) {
	if off < 0 || off%PageSize != 0 || len(data)%PageSize != 0 {
		return 0, fmt.Errorf("write %s: offset %d and length %d must be multiples of %d", p.String(), off, len(data), PageSize)
	}
	if off+int64(len(data)) > p.size {
		return 0, fmt.Errorf("write %s: range ends at %d, past the blob size %d", p.String(), off+int64(len(data)), p.size)
	}
	p.mu.Lock()
	p.modified = true
	p.mu.Unlock()
	done := 0
	for done < len(data) {
		n := min(len(data)-done, MaxPutPages)
		etag, err := putPages(ctx, p.c, data[done:done+n], off+int64(done))
		if err != nil {
			return done, err
		}
		p.mu.Lock()
		p.ranges = insertRange(p.ranges, Range{Off: off + int64(done), Len: int64(n)})
		if etag != "" {
			p.etag = etag
		}
		p.mu.Unlock()
		done += n
	}
	return done, nil
}

func putPages(ctx context.Context, c *clients, data []byte, off int64) (azcore.ETag, error) {
	resp, err := c.page.UploadPages(policy.WithRetryOptions(ctx, policy.RetryOptions{MaxRetries: -1, TryTimeout: c.opts.RequestTimeout}), streaming.NopCloser(bytes.NewReader(data)),
		azblobblob.HTTPRange{Offset: off, Count: int64(len(data))}, nil)
	if err != nil {
		return "", describeAttempt(err, c.loc, "write pages to")
	}
	if resp.ETag != nil {
		return *resp.ETag, nil
	}
	return "", nil
}

func clearPages(ctx context.Context, c *clients, r Range) error {
	_, err := c.page.ClearPages(ctx, azblobblob.HTTPRange{Offset: r.Off, Count: r.Len}, nil)
	return describe(err, c.loc, "clear pages of")
}

// tryContext makes azcore send exactly one try, bounded by the request
// timeout (body included): RetrySource is the only retry policy.
func (b *azureBase) tryContext(ctx context.Context) context.Context {
	return policy.WithRetryOptions(ctx, policy.RetryOptions{MaxRetries: -1, TryTimeout: b.c.opts.RequestTimeout})
}

// fetch fills p with the bytes at off in one try. It returns how many
// leading bytes of p were filled, even on error, so a retry can resume.
func (b *azureBase) fetch(ctx context.Context, p []byte, off int64) (int, error) {
	n, err := b.fetchOnce(ctx, p, off)
	if err != nil {
		return n, describeAttempt(err, b.c.loc, "read")
	}
	return n, nil
}

// fetchOnce issues one ranged GET and streams the body straight into p.
// It returns how many bytes of p were filled, even on error.
func (b *azureBase) fetchOnce(ctx context.Context, p []byte, off int64) (int, error) {
	opts := &azblobblob.DownloadStreamOptions{Range: azblobblob.HTTPRange{Offset: off, Count: int64(len(p))}}
	b.mu.Lock()
	if !b.modified {
		etag := b.etag
		opts.AccessConditions = &azblobblob.AccessConditions{ModifiedAccessConditions: &azblobblob.ModifiedAccessConditions{IfMatch: &etag}}
	}
	b.mu.Unlock()
	resp, err := b.c.blob.DownloadStream(b.tryContext(ctx), opts)
	if err != nil {
		return 0, err
	}
	body := resp.Body
	if body == nil {
		return 0, fmt.Errorf("%w: empty response", errShortBody)
	}
	defer body.Close()
	if resp.ContentLength != nil && *resp.ContentLength != int64(len(p)) {
		// A server that ignores the range would send the whole blob.
		if *resp.ContentLength < int64(len(p)) {
			return 0, fmt.Errorf("%w: server announced %d bytes for a %d-byte range", errShortBody, *resp.ContentLength, len(p))
		}
		return 0, fmt.Errorf("server announced %d bytes for a %d-byte range at %d", *resp.ContentLength, len(p), off)
	}
	if resp.ContentRange != nil && !strings.HasPrefix(*resp.ContentRange, "bytes "+strconv.FormatInt(off, 10)+"-") {
		return 0, fmt.Errorf("server answered range %q for a request at %d", *resp.ContentRange, off)
	}
	n, err := io.ReadFull(body, p)
	if err != nil {
		return n, fmt.Errorf("%w: got %d of %d bytes: %w", errShortBody, n, len(p), err)
	}
	// Read to EOF so the connection goes back to the pool, and make sure
	// the server did not send more than it announced.
	var extra [1]byte
	if m, _ := body.Read(extra[:]); m > 0 {
		return n, errors.New("server sent more bytes than the requested range")
	}
	return n, nil
}
