package blockcache

import (
	"context"
	"errors"

	"github.com/blobseal/blobseal/blob"
)

// Verifier checks what the cache brings into memory before any reader sees
// it (package verity's Tree is one). With a verifier, every block is
// verified once per fetch, whether it came from the source, from the disk
// tier or was filled with zeros because the source listed it as unwritten
// (storage's word about what is unwritten is not trusted either); nothing
// is served around it.
type Verifier interface {
	// Verify checks data, the source's bytes at off; off and len(data) are
	// multiples of the verifier's block size (BlockSize must be a multiple
	// of it). It returns the ranges that failed, which readers get
	// ErrIntegrity for, or an error when verification could not be done
	// (its metadata could not be read), after which the fetch is retried.
	Verify(ctx context.Context, off int64, data []byte) (bad []blob.Range, err error)
	// Zeros returns parts of [off, end) whose verified content is zeros,
	// so they need not be fetched.
	Zeros(ctx context.Context, off, end int64) ([]blob.Range, error)
}

// Prefetcher is an optional Verifier capability: start loading what
// Verify will need for [off, end), so it overlaps the fetch.
type Prefetcher interface {
	Prefetch(off, end int64)
}

// ErrIntegrity is wrapped by the error of a read that touches bytes the
// Verifier rejected. It is final: the read is not retried.
var ErrIntegrity = errors.New("data failed integrity verification")

// zeroSkipMin is the smallest extent for which the cache asks the verifier
// which parts are zeros before fetching: for a single block, waiting for
// the answer would cost a round trip, while fetching it costs little.
const zeroSkipMin = 1 << 20

// zeroGapMin is the smallest verified-zero run a fetch leaves out: a
// shorter one costs less to download than the extra request.
const zeroGapMin = 256 << 10

// badIn returns the first rejected range of e that intersects [off, end).
func (e *extent) badIn(off, end int64) (blob.Range, bool) {
	for _, r := range e.bad {
		if r.Off < end && off < r.End() {
			return r, true
		}
	}
	return blob.Range{}, false
}
