package blob

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/streaming"
	azblobblob "github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/bloberror"
)

// UploadOptions configure Upload.
type UploadOptions struct {
	Options
	// Type is "page" (default; sparse, writable) or "block" (read-only images, faster reads).
	Type string
	// Concurrency is the number of requests in flight (default 8).
	Concurrency int
	// Progress, when set, is called from one goroutine about every 200ms and
	// once at the end with the image bytes processed so far.
	Progress func(done, total int64)
	// Verify reads the blob back after the upload and compares it with the image.
	Verify bool
	// CreateContainer creates the container when it does not exist.
	CreateContainer bool
	// BlockSize is the staged block size for block blobs (default 8 MiB;
	// raised automatically to stay within 50,000 blocks).
	BlockSize int64
}

// UploadResult reports what an upload did.
type UploadResult struct {
	Type     string
	Size     int64 // image and blob size
	Uploaded int64 // payload bytes sent
	Cleared  int64 // bytes of stale page ranges cleared (page blobs)
	Requests int64 // Put Page / Clear Pages / Stage Block calls
	Verified bool
	ETag     string
	Elapsed  time.Duration
}

const (
	maxBlocks        = 50000
	defaultBlockSize = 8 << 20
	maxBlockSize     = 4000 << 20
)

// Upload copies a local image to a page or block blob. Page blobs receive
// only the non-zero 512-byte runs (up to 4 MiB per Put Page) and have pages
// that are written in the blob but zero in the image cleared, so a re-run
// converges to the image. Block blobs are staged in parallel blocks and
// committed at once. The container must exist.
func Upload(ctx context.Context, image, loc string, opts UploadOptions) (UploadResult, error) {
	start := time.Now()
	res := UploadResult{Type: opts.Type}
	if res.Type == "" {
		res.Type = "page"
	}
	if res.Type != "page" && res.Type != "block" {
		return res, fmt.Errorf("upload type %q: want page or block", opts.Type)
	}
	if opts.Concurrency <= 0 {
		opts.Concurrency = 8
	}
	if opts.Concurrency > 256 {
		return res, fmt.Errorf("concurrency %d is too high (at most 256)", opts.Concurrency)
	}
	l, err := parseLocation(loc)
	if err != nil {
		return res, err
	}
	if l.isFile() {
		return res, fmt.Errorf("upload destination %q is not a blob URL: want %s", loc, urlForm)
	}
	img, err := openFile(image, false)
	if err != nil {
		return res, err
	}
	defer img.Close()
	res.Size = img.size
	o := opts.Options.withDefaults()
	c, err := newClients(l, o, true)
	if err != nil {
		return res, err
	}
	defer c.closeIdle()
	if opts.CreateContainer {
		if err := ensureContainer(ctx, c); err != nil {
			return res, err
		}
	}
	prog := startProgress(opts.Progress, img.size)
	if res.Type == "page" {
		err = uploadPages(ctx, c, img, opts.Concurrency, prog, &res)
	} else {
		err = uploadBlocks(ctx, c, img, opts, prog, &res)
	}
	prog.stop()
	if err != nil {
		return res, err
	}
	if opts.Verify {
		if err := Verify(ctx, image, loc, opts.Options); err != nil {
			return res, err
		}
		res.Verified = true
	}
	res.Elapsed = time.Since(start)
	return res, nil
}

// progress polls an atomic counter so workers never wait on the callback.
type progress struct {
	done  atomic.Int64
	total int64
	fn    func(done, total int64)
	quit  chan struct{}
	wg    sync.WaitGroup
}

func startProgress(fn func(done, total int64), total int64) *progress {
	p := &progress{fn: fn, total: total, quit: make(chan struct{})}
	if fn == nil {
		return p
	}
	fn(0, total) // synchronously, so the consumer's clock starts now
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		t := time.NewTicker(200 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-p.quit:
				fn(p.done.Load(), total)
				return
			case <-t.C:
				fn(p.done.Load(), total)
			}
		}
	}()
	return p
}

func (p *progress) add(n int64) { p.done.Add(n) }

func (p *progress) stop() {
	close(p.quit)
	p.wg.Wait()
}

// parallel runs fn over jobs with the given number of workers and returns
// the first error; the others stop at their next job.
func parallel(ctx context.Context, workers int, jobs []int64, fn func(ctx context.Context, worker int, job int64) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		next     atomic.Int64
		wg       sync.WaitGroup
		once     sync.Once
		firstErr error
	)
	workers = max(1, min(workers, len(jobs)))
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for {
				i := next.Add(1) - 1
				if i >= int64(len(jobs)) || ctx.Err() != nil {
					return
				}
				if err := fn(ctx, w, jobs[i]); err != nil {
					once.Do(func() { firstErr = err; cancel() })
					return
				}
			}
		}(w)
	}
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	return ctx.Err()
}

// chunkJobs returns the offsets of chunk-sized pieces of [0,size) that
// intersect any of the merged ranges.
func chunkJobs(ranges []Range, size, chunk int64) []int64 {
	var jobs []int64
	last := int64(-1)
	for _, r := range ranges {
		for c := r.Off / chunk * chunk; c < r.End() && c < size; c += chunk {
			if c > last {
				jobs = append(jobs, c)
				last = c
			}
		}
	}
	return jobs
}

// pageRuns splits buf (at base, 512-aligned) into non-zero and zero runs of
// whole pages.
func pageRuns(buf []byte, base int64) (data, zero []Range) {
	for i := 0; i < len(buf); i += PageSize {
		end := min(i+PageSize, len(buf))
		r := Range{Off: base + int64(i), Len: int64(end - i)}
		dst := &zero
		if !allZero(buf[i:end]) {
			dst = &data
		}
		if n := len(*dst); n > 0 && (*dst)[n-1].End() == r.Off {
			(*dst)[n-1].Len += r.Len
		} else {
			*dst = append(*dst, r)
		}
	}
	return data, zero
}

func allZero(p []byte) bool {
	var acc uint64
	i := 0
	for ; i+8 <= len(p); i += 8 {
		acc |= binary.LittleEndian.Uint64(p[i:])
	}
	for ; i < len(p); i++ {
		acc |= uint64(p[i])
	}
	return acc == 0
}

// intersect returns the parts of rs (merged, sorted) inside r.
func intersect(rs []Range, r Range) []Range {
	var out []Range
	for _, x := range rs {
		s, e := max(x.Off, r.Off), min(x.End(), r.End())
		if s < e {
			out = append(out, Range{Off: s, Len: e - s})
		}
	}
	return out
}

func uploadPages(ctx context.Context, c *clients, img *fileSource, workers int, prog *progress, res *UploadResult) error {
	if img.size%PageSize != 0 {
		return fmt.Errorf("image %s is %d bytes, not a multiple of %d: page blobs hold whole pages; pad it (truncate -s %d %s) or use --type block",
			img.path, img.size, PageSize, (img.size+PageSize-1)/PageSize*PageSize, img.path)
	}
	var existing []Range
	props, err := c.blob.GetProperties(ctx, nil)
	switch {
	case isBareNotFound(err):
		if _, err := c.page.Create(ctx, img.size, nil); err != nil {
			return describe(err, c.loc, "create page blob")
		}
	case err != nil:
		return describe(err, c.loc, "upload to")
	case props.BlobType == nil || *props.BlobType != azblobblob.BlobTypePageBlob:
		return fmt.Errorf("upload to %s: %w: it exists as a %v; delete it first or use --type block", c.loc.redacted(), ErrUnsupported, deref(props.BlobType))
	default:
		if props.ContentLength == nil || *props.ContentLength != img.size {
			if _, err := c.page.Resize(ctx, img.size, nil); err != nil {
				return describe(err, c.loc, "resize page blob")
			}
		}
		existing, _, err = listPageRanges(ctx, c)
		if err != nil {
			return err
		}
	}
	extents, err := dataExtents(ctx, img.f, img.size)
	if err != nil {
		return fmt.Errorf("scan image %s: %w", img.path, err)
	}
	// Count holes that need no work as done right away.
	work := MergeRanges(append(slicesClone(extents), existing...))
	jobs := chunkJobs(work, img.size, MaxPutPages)
	skipped := img.size
	for _, off := range jobs {
		skipped -= min(MaxPutPages, img.size-off)
	}
	prog.add(skipped)
	bufs := make([][]byte, workers)
	var uploaded, cleared, requests atomic.Int64
	err = parallel(ctx, workers, jobs, func(ctx context.Context, w int, off int64) error {
		n := min(MaxPutPages, img.size-off)
		defer prog.add(n)
		chunk := Range{Off: off, Len: n}
		if bufs[w] == nil {
			bufs[w] = make([]byte, MaxPutPages)
		}
		buf := bufs[w][:n]
		var data, zero []Range
		if len(intersect(extents, chunk)) == 0 {
			zero = []Range{chunk}
		} else {
			if _, err := img.ReadAt(ctx, buf, off); err != nil {
				return fmt.Errorf("read image: %w", err)
			}
			data, zero = pageRuns(buf, off)
		}
		for _, r := range data {
			if _, err := putPages(ctx, c, buf[r.Off-off:r.End()-off], r.Off); err != nil {
				return err
			}
			uploaded.Add(r.Len)
			requests.Add(1)
		}
		for _, z := range zero {
			for _, stale := range intersect(existing, z) {
				if err := clearPages(ctx, c, stale); err != nil {
					return err
				}
				cleared.Add(stale.Len)
				requests.Add(1)
			}
		}
		return nil
	})
	res.Uploaded, res.Cleared, res.Requests = uploaded.Load(), cleared.Load(), requests.Load()
	if err != nil {
		return err
	}
	return finalETag(ctx, c, res)
}

// isBareNotFound reports a 404 without an error code (HEAD responses).
func isBareNotFound(err error) bool {
	var re *azcore.ResponseError
	return errors.As(err, &re) && re.StatusCode == http.StatusNotFound && (re.ErrorCode == "" || re.ErrorCode == string(bloberror.BlobNotFound))
}

func deref[T any](p *T) any {
	if p == nil {
		return "unknown type"
	}
	return *p
}

func finalETag(ctx context.Context, c *clients, res *UploadResult) error {
	props, err := c.blob.GetProperties(ctx, nil)
	if err != nil {
		return describe(err, c.loc, "read back properties of")
	}
	if props.ETag != nil {
		res.ETag = string(*props.ETag)
	}
	return nil
}

// blockID is fixed-width, as the service requires for one blob.
func blockID(i int64) string {
	return base64.StdEncoding.EncodeToString(fmt.Appendf(nil, "blobseal-%010d", i))
}

func uploadBlocks(ctx context.Context, c *clients, img *fileSource, opts UploadOptions, prog *progress, res *UploadResult) error {
	bs := opts.BlockSize
	if bs <= 0 {
		bs = defaultBlockSize
	}
	if need := (img.size + maxBlocks - 1) / maxBlocks; need > bs {
		bs = (need + 1<<20 - 1) >> 20 << 20
	}
	if bs > maxBlockSize {
		return fmt.Errorf("image %s is too large for a block blob (%d bytes)", img.path, img.size)
	}
	props, err := c.blob.GetProperties(ctx, nil)
	switch {
	case err == nil:
		if props.BlobType != nil && *props.BlobType != azblobblob.BlobTypeBlockBlob {
			return fmt.Errorf("upload to %s: %w: it exists as a %v; delete it first or use --type page", c.loc.redacted(), ErrUnsupported, *props.BlobType)
		}
	case isBareNotFound(err):
	default:
		return describe(err, c.loc, "upload to")
	}
	nblocks := (img.size + bs - 1) / bs
	jobs := make([]int64, nblocks)
	ids := make([]string, nblocks)
	for i := range jobs {
		jobs[i] = int64(i)
		ids[i] = blockID(int64(i))
	}
	bufs := make([][]byte, opts.Concurrency)
	var uploaded, requests atomic.Int64
	err = parallel(ctx, opts.Concurrency, jobs, func(ctx context.Context, w int, i int64) error {
		off := i * bs
		n := min(bs, img.size-off)
		if bufs[w] == nil {
			bufs[w] = make([]byte, bs)
		}
		buf := bufs[w][:n]
		if _, err := img.ReadAt(ctx, buf, off); err != nil {
			return fmt.Errorf("read image: %w", err)
		}
		if _, err := c.block.StageBlock(ctx, ids[i], streaming.NopCloser(bytes.NewReader(buf)), nil); err != nil {
			return describe(err, c.loc, "stage block of")
		}
		uploaded.Add(n)
		requests.Add(1)
		prog.add(n)
		return nil
	})
	res.Uploaded, res.Requests = uploaded.Load(), requests.Load()
	if err != nil {
		return err
	}
	if _, err := c.block.CommitBlockList(ctx, ids, nil); err != nil {
		return describe(err, c.loc, "commit block list of")
	}
	res.Requests++
	return finalETag(ctx, c, res)
}

// verifyChunk is the comparison unit of Verify.
const verifyChunk = 8 << 20

// Verify compares the blob at loc with the local image and reports the first
// differing byte. Page blob holes are compared without downloading them.
func Verify(ctx context.Context, image, loc string, opts Options) error {
	img, err := openFile(image, false)
	if err != nil {
		return err
	}
	defer img.Close()
	src, err := Open(ctx, loc, opts)
	if err != nil {
		return fmt.Errorf("verify: %w", err)
	}
	defer src.(io.Closer).Close()
	if src.Size() != img.size {
		return fmt.Errorf("verify %s: blob is %d bytes but the image is %d", src, src.Size(), img.size)
	}
	return compareSources(ctx, img, src, 4)
}

// compareSources compares two equally sized sources chunk by chunk in
// parallel and returns an error naming the first differing offset.
func compareSources(ctx context.Context, want, got Source, workers int) error {
	size := want.Size()
	var jobs []int64
	for off := int64(0); off < size; off += verifyChunk {
		jobs = append(jobs, off)
	}
	type buf struct{ a, b []byte }
	bufs := make([]buf, workers)
	var mu sync.Mutex
	first := int64(-1)
	err := parallel(ctx, workers, jobs, func(ctx context.Context, w int, off int64) error {
		n := min(verifyChunk, size-off)
		if bufs[w].a == nil {
			bufs[w] = buf{make([]byte, verifyChunk), make([]byte, verifyChunk)}
		}
		a, b := bufs[w].a[:n], bufs[w].b[:n]
		if _, err := want.ReadAt(ctx, a, off); err != nil {
			return fmt.Errorf("verify: %w", err)
		}
		if _, err := got.ReadAt(ctx, b, off); err != nil {
			return fmt.Errorf("verify: %w", err)
		}
		if bytes.Equal(a, b) {
			return nil
		}
		i := 0
		for a[i] == b[i] {
			i++
		}
		mu.Lock()
		if first < 0 || off+int64(i) < first {
			first = off + int64(i)
		}
		mu.Unlock()
		return nil
	})
	if err != nil {
		return err
	}
	if first >= 0 {
		return fmt.Errorf("verify %s: differs from %s at byte %d (page %d); upload again", got, want, first, first/PageSize)
	}
	return nil
}

// ensureContainer creates the destination container if it is missing.
func ensureContainer(ctx context.Context, c *clients) error {
	_, err := c.cont.Create(ctx, nil)
	if err == nil || bloberror.HasCode(err, bloberror.ContainerAlreadyExists) {
		return nil
	}
	return describe(err, c.loc, "create the container of")
}
