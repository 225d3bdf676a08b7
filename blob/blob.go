// Package blob reads (and, for page blobs, writes) the bytes of an image kept
// in Azure Blob Storage or in a local file, behind one small contract.
//
// Contract of every Source:
//   - ReadAt fills all of p from offset off or returns an error; a read that
//     extends past Size returns the bytes up to Size and io.EOF, like io.ReaderAt.
//   - ReadAt is safe for concurrent use and honours ctx (cancellation and
//     deadline). A failed ReadAt may have filled a prefix of p and says how
//     much (n), so a retry can resume there.
//   - Retries are one decorator, RetrySource, which Open puts around every
//     Azure source; the sources beneath make one try per call.
//   - Size is fixed for the life of the Source.
//   - String names the source for logs and never contains a credential
//     (no SAS query, no key).
//
// Optional capabilities are separate interfaces, discovered by type assertion.
//
// Open returns a Source for an Azure page blob (RangeLister, WriterAt,
// Versioned), block blob (Versioned) or local file (RangeLister, WriterAt
// when Options.Writable, Versioned); all of them are io.Closers. Upload and
// Verify copy an image to a blob and check it; RawDownload is the plain
// parallel download used as the performance baseline.
package blob

import (
	"context"
	"io"
)

// Source is a read-only, fixed-size byte source.
type Source interface {
	ReadAt(ctx context.Context, p []byte, off int64) (int, error)
	Size() int64
	String() string
}

// Range is a byte range [Off, Off+Len).
type Range struct {
	Off, Len int64
}

// End returns the first offset after the range.
func (r Range) End() int64 { return r.Off + r.Len }

// RangeLister is implemented by sources that know which ranges hold data
// (page blobs, sparse files). Bytes outside the returned ranges read as zeros
// and need not be fetched. Ranges are sorted, merged and non-overlapping.
type RangeLister interface {
	WrittenRanges(ctx context.Context) ([]Range, error)
}

// Versioned is implemented by sources with a version tag (the blob ETag) that
// changes whenever the content changes; caches key persisted data on it.
type Versioned interface {
	Version() string
}

// WriterAt is implemented by writable sources (page blobs, local files).
// Offsets and lengths must be multiples of 512 for page blobs.
type WriterAt interface {
	WriteAt(ctx context.Context, p []byte, off int64) (int, error)
}

// ReaderAt adapts a Source to io.ReaderAt using a fixed context. It also has
// ReadAtContext, through which a caller with its own context (the
// decrypting volume serving a FUSE read) reads with that one instead.
func ReaderAt(ctx context.Context, s Source) io.ReaderAt {
	return readerAt{ctx: ctx, s: s}
}

type readerAt struct {
	ctx context.Context
	s   Source
}

func (r readerAt) ReadAt(p []byte, off int64) (int, error) { return r.s.ReadAt(r.ctx, p, off) }

func (r readerAt) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	return r.s.ReadAt(ctx, p, off)
}
