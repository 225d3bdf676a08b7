package blob

import (
	"context"
	"fmt"
	"net/http"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	azblobblob "github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/bloberror"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/pageblob"
)

// MaxPageBlobSize is the Blob service's limit on a page blob's size.
const MaxPageBlobSize = 8 << 40

// Grow enlarges the page blob to newSize bytes (a multiple of PageSize)
// with Set Blob Properties (x-ms-blob-content-length), under the writer's
// lease and If-Match on the ETag it last saw, so a change by anyone else
// is refused (ErrChanged) rather than resized over. The new pages read as
// zeros (they are unwritten). Shrinking is refused: it would drop data.
// Afterwards the writer and the Source it was made from report the new
// size; nothing may read or write through them while Grow runs.
func (w *PageWriter) Grow(ctx context.Context, newSize int64) error {
	name := w.p.String()
	switch {
	case newSize%PageSize != 0:
		return fmt.Errorf("resize %s: %d bytes is not a multiple of the %d-byte page size", name, newSize, PageSize)
	case newSize < w.p.size:
		return fmt.Errorf("resize %s: %d bytes is smaller than its %d bytes; page blobs are only grown here (shrinking drops data)", name, newSize, w.p.size)
	case newSize > MaxPageBlobSize:
		return fmt.Errorf("resize %s: %d bytes is over the page blob limit of %d bytes", name, newSize, int64(MaxPageBlobSize))
	case newSize == w.p.size:
		return nil
	}
	if err := w.usable(); err != nil {
		return err
	}
	select {
	case w.batch <- struct{}{}: // not alongside a batch of writes
	case <-ctx.Done():
		return fmt.Errorf("resize %s: waiting for the batch in progress: %w", name, ctx.Err())
	}
	defer func() { <-w.batch }()
	etag, err := w.batchETag(ctx, false)
	if err != nil {
		return err
	}
	what := fmt.Sprintf("resize %s to %d bytes", name, newSize)
	tries := 0
	var newETag azcore.ETag
	err = retry(ctx, w.o, &w.retries, what, func(ctx context.Context) (bool, error) {
		tries++
		resp, err := w.p.c.page.Resize(w.p.tryContext(ctx), newSize, &pageblob.ResizeOptions{
			AccessConditions: leaseConditions(w.lease.ID(), &etag)})
		if err != nil {
			return false, describeAttempt(err, w.p.c.loc, "resize")
		}
		if resp.ETag != nil {
			newETag = *resp.ETag
		}
		return false, nil
	})
	if err != nil {
		if isLeaseLoss(err) {
			return w.lease.markLost(leaseCause(err))
		}
		if !bloberror.HasCode(err, bloberror.ConditionNotMet) && !isStatus(err, http.StatusPreconditionFailed) {
			return err
		}
		// A 412 after a retry may be our own first try having landed:
		// under the lease nobody else can have changed the blob, so its
		// size tells.
		size, etag, perr := w.leasedProperties(ctx)
		if perr != nil {
			return perr
		}
		if tries == 1 || size != newSize {
			w.mu.Lock()
			w.conflict = fmt.Errorf("%s: %w: someone else changed it since this writer last saw it; nothing was changed: reopen it", what, ErrChanged)
			err = w.conflict
			w.mu.Unlock()
			return err
		}
		newETag = etag
	}
	if newETag == "" {
		if _, newETag, err = w.leasedProperties(ctx); err != nil {
			return err
		}
	}
	w.mu.Lock()
	w.etag = newETag
	w.mu.Unlock()
	w.p.mu.Lock()
	w.p.etag, w.p.size = newETag, newSize
	w.p.mu.Unlock()
	return nil
}

// leasedProperties reads the blob's size and ETag under the lease.
func (w *PageWriter) leasedProperties(ctx context.Context) (int64, azcore.ETag, error) {
	var size int64
	var etag azcore.ETag
	err := retry(ctx, w.o, &w.retries, "read the properties of "+w.p.String(), func(ctx context.Context) (bool, error) {
		props, err := w.p.c.blob.GetProperties(w.p.tryContext(ctx), &azblobblob.GetPropertiesOptions{
			AccessConditions: leaseConditions(w.lease.ID(), nil)})
		if err != nil {
			return false, describeAttempt(err, w.p.c.loc, "read the properties of")
		}
		if props.ETag == nil || props.ContentLength == nil {
			return false, fmt.Errorf("read the properties of %s: storage omitted the size or ETag", w.p.c.loc.redacted())
		}
		size, etag = *props.ContentLength, *props.ETag
		return false, nil
	})
	if err != nil && isLeaseLoss(err) {
		return 0, "", w.lease.markLost(leaseCause(err))
	}
	return size, etag, err
}
