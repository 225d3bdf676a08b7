package blockcache

import (
	"fmt"
	"log/slog"
	"time"
)

// Defaults, chosen for Azure Blob Storage behind a FUSE mount.
const (
	// DefaultBlockSize is the cache granule. Per-request latency dominates
	// Azure reads up to a few hundred KiB, so a random 4 KiB read costs about
	// the same as a 64 KiB one; 64 KiB is also the largest block at which a
	// standard page blob (~60 MiB/s, 500 requests/s) stays request-bound
	// rather than bandwidth-bound for random reads (60 MiB/s / 64 KiB ≈ 960/s).
	// Sequential throughput does not depend on it: adjacent missing blocks are
	// coalesced into GETs of up to MaxFetchSize.
	DefaultBlockSize = 64 << 10
	// DefaultMemoryBytes bounds all cached and in-flight block memory.
	DefaultMemoryBytes = 256 << 20
	// DefaultMaxFetches bounds parallel requests to the source. Read-ahead
	// uses three quarters of them (18), the rest stay free for demand reads:
	// storage that caps each connection (Azure: tens of MB/s) needs a
	// sequential stream to keep at least 16 requests in flight.
	DefaultMaxFetches = 24
	// DefaultSlowRequestRate is the per-request throughput under which
	// fetches are cut smaller so more of them run in parallel (see Options).
	// Loopback Azurite answers a lone GET at several hundred MB/s and keeps
	// 16 MiB fetches; a connection capped at 50 MB/s gets 8 MiB ones.
	DefaultSlowRequestRate = 100e6
	// DefaultMaxFetchSize is the largest single ranged GET. Large ranges
	// matter because Azurite (and Azure) pay per request, but one sequential
	// stream also needs several requests in flight: 16 MiB fetches keep
	// eight of them within the default read-ahead window, where 32 MiB kept
	// four. Through a mount, with 2 ms of latency each way, that read 9 %
	// faster (427 against 390 MB/s, medians of 5 alternating cold reads) and
	// no slower without latency (6 of 8 alternating pairs faster); real
	// Azure, whose per-connection throughput is limited, gains more from
	// parallel streams than Azurite does (docs/PERFORMANCE.md).
	DefaultMaxFetchSize = 16 << 20
	// DefaultMaxReadAhead is the largest read-ahead window of one stream:
	// eight fetches in flight. Several streams share the memory bound (see
	// observe), and no stream reads ahead more than half of it.
	DefaultMaxReadAhead = 128 << 20
	// DefaultReadDeadline is how long a read waits for its fetches, retries
	// by the source included, before it returns an error (which the mount
	// reports as EIO). A fetch is bounded by about the same time (FetchTimeout's
	// default), so one number configures how long storage may stall reads.
	DefaultReadDeadline = 2 * time.Minute
	// DefaultDiskBytes bounds the disk tier when DiskDir is set without a size.
	DefaultDiskBytes = 1 << 30

	// minBlockSize is the alignment of BlockSize: a page, and the largest
	// encryption sector size, so a sector never straddles two blocks.
	minBlockSize = 4096
)

// Options configures a Cache. The zero value of every field selects its
// default; negative values are rejected.
type Options struct {
	// BlockSize is the cache granule in bytes, a multiple of 4096.
	BlockSize int64
	// MemoryBytes is the global bound on block memory, cached and in flight.
	MemoryBytes int64
	// MaxFetches bounds parallel requests to the source.
	MaxFetches int
	// SlowRequestRate is a per-request throughput in bytes per second: while
	// recent GETs of 1 MiB or more that ran nearly alone were slower than
	// this (a connection capped in throughput), fetches (demand and
	// read-ahead) are cut at multiples of MaxFetchSize/slowSplit instead of
	// MaxFetchSize, so the same read-ahead window keeps slowSplit times as
	// many requests in flight. Negative values never cut smaller.
	SlowRequestRate float64
	// MaxFetchSize is the largest single ranged read, rounded down to a
	// multiple of BlockSize and capped at a quarter of MemoryBytes.
	MaxFetchSize int64
	// MaxReadAhead is the largest read-ahead window of one sequential stream.
	// Set it to -1 to disable read-ahead.
	MaxReadAhead int64
	// FetchTimeout bounds one fetch from the source, its retries included
	// (default: 15/16 of ReadDeadline).
	FetchTimeout time.Duration
	// ReadDeadline bounds one read, however long its fetches retry; after
	// it the read fails. The cache stays usable and later reads fetch
	// again. The mount's --read-timeout and the sidecar's read_timeout set it.
	ReadDeadline time.Duration
	// DiskDir enables the disk tier: ciphertext blocks under this directory,
	// reused across restarts while the source's Version is unchanged.
	DiskDir string
	// DiskBytes bounds the disk tier (default 1 GiB when DiskDir is set).
	DiskBytes int64
	// Verifier, when set, checks every fetched block before readers see it
	// (integrity protection); see Verifier.
	Verifier Verifier
	// Logger receives diagnostics; nil discards them.
	Logger *slog.Logger
}

// normalize validates o and fills in defaults.
func (o Options) normalize() (Options, error) {
	if o.BlockSize < 0 || o.MemoryBytes < 0 || o.MaxFetches < 0 || o.MaxFetchSize < 0 ||
		o.MaxReadAhead < -1 || o.FetchTimeout < 0 || o.ReadDeadline < 0 || o.DiskBytes < 0 {
		return o, fmt.Errorf("blockcache: options must not be negative (got %+v)", o.redacted())
	}
	if o.BlockSize == 0 {
		o.BlockSize = DefaultBlockSize
	}
	if o.BlockSize%minBlockSize != 0 {
		return o, fmt.Errorf("blockcache: BlockSize %d is not a multiple of %d", o.BlockSize, minBlockSize)
	}
	if o.BlockSize > 1<<30 {
		return o, fmt.Errorf("blockcache: BlockSize %d is larger than 1 GiB", o.BlockSize)
	}
	if o.MemoryBytes == 0 {
		o.MemoryBytes = DefaultMemoryBytes
	}
	if o.MemoryBytes < 2*o.BlockSize {
		return o, fmt.Errorf("blockcache: MemoryBytes %d must hold at least two blocks of %d bytes", o.MemoryBytes, o.BlockSize)
	}
	if o.MaxFetches == 0 {
		o.MaxFetches = DefaultMaxFetches
	}
	if o.MaxFetchSize == 0 {
		o.MaxFetchSize = DefaultMaxFetchSize
	}
	if o.SlowRequestRate == 0 {
		o.SlowRequestRate = DefaultSlowRequestRate
	}
	// A fetch must fit in memory several times over, or readers of different
	// streams would wait on each other for memory.
	if limit := o.MemoryBytes / 4; o.MaxFetchSize > limit {
		o.MaxFetchSize = limit
	}
	o.MaxFetchSize -= o.MaxFetchSize % o.BlockSize
	if o.MaxFetchSize < o.BlockSize {
		o.MaxFetchSize = o.BlockSize
	}
	if o.MaxReadAhead == 0 {
		o.MaxReadAhead = DefaultMaxReadAhead
	}
	if o.MaxReadAhead < 0 {
		o.MaxReadAhead = 0
	}
	if o.ReadDeadline == 0 {
		o.ReadDeadline = DefaultReadDeadline
	}
	if o.FetchTimeout == 0 {
		// A little shorter than the read deadline: a reader that waited for
		// a fetch from its start gets the fetch's error, which names the
		// last cause, rather than a bare deadline.
		o.FetchTimeout = o.ReadDeadline - o.ReadDeadline/16
	}
	if o.DiskDir != "" && o.DiskBytes == 0 {
		o.DiskBytes = DefaultDiskBytes
	}
	if o.DiskDir == "" && o.DiskBytes != 0 {
		return o, fmt.Errorf("blockcache: DiskBytes is set but DiskDir is empty; set DiskDir to enable the disk tier")
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return o, nil
}

// redacted drops the logger and verifier, which would print as pointer soup.
func (o Options) redacted() Options {
	o.Logger = nil
	o.Verifier = nil
	return o
}
