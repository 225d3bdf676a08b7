package verity

import (
	"bytes"
	"container/list"
	"context"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/blobseal/blobseal/blob"
)

// Options configure a Tree. Zero fields take the defaults.
type Options struct {
	// HashOffset is where the superblock is. A negative value finds it
	// with Locate: the tree appended directly after the data, the layout
	// blobseal and `veritysetup format --hash-offset=<data size>` write.
	HashOffset int64
	// CacheBytes bounds the verified tree nodes kept in memory (default
	// 16 MiB: every level-0 node of a 2 GiB image).
	CacheBytes int64
	// MaxFetches bounds parallel node reads (default 8).
	MaxFetches int
	// GroupNodes is how many bottom-level nodes one read fetches at least,
	// aligned (default 32: 128 KiB of nodes covering 16 MiB of data); a
	// request for several nodes (a sequential reader) fetches eight times
	// as many as it needs.
	GroupNodes int
	// HeadBytes is read at Open beginning with the superblock: the upper
	// levels (and as much of the bottom one) come in the same request
	// (default 256 KiB).
	HeadBytes int64
	// FetchTimeout bounds one node read (default 1 minute).
	FetchTimeout time.Duration
	// Logger receives mismatch reports (each block once); nil discards.
	Logger *slog.Logger
}

func (o Options) withDefaults() Options {
	if o.CacheBytes <= 0 {
		o.CacheBytes = 16 << 20
	}
	if o.MaxFetches <= 0 {
		o.MaxFetches = 8
	}
	if o.GroupNodes <= 0 {
		o.GroupNodes = 32
	}
	if o.HeadBytes <= 0 {
		o.HeadBytes = 256 << 10
	}
	if o.FetchTimeout <= 0 {
		o.FetchTimeout = time.Minute
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return o
}

// MismatchError reports a block whose content does not match the tree.
// It wraps ErrMismatch.
type MismatchError struct {
	// Level is -1 for a data block, else the tree level of a hash block
	// (0 is the bottom level).
	Level int
	// Block is the data block number, or the hash block's index in its level.
	Block int64
	// Offset is the block's byte offset in the image.
	Offset int64
}

func (e *MismatchError) Error() string {
	if e.Level < 0 {
		return fmt.Sprintf("data block %d (image offset %d) does not match its hash in the verity tree: storage returned modified data", e.Block, e.Offset)
	}
	return fmt.Sprintf("hash tree block %d of level %d (image offset %d) does not match its parent: the tree was modified", e.Block, e.Level, e.Offset)
}

func (e *MismatchError) Unwrap() error { return ErrMismatch }

// Stats are a tree's counters.
type Stats struct {
	BlocksVerified   uint64 // data blocks hashed and matched
	ZeroBlocks       uint64 // data blocks recognised as zeros by their digest
	DataMismatches   uint64 // data blocks that failed
	NodeMismatches   uint64 // tree nodes that failed
	NodesFetched     uint64 // tree nodes read from storage
	NodesSynthesized uint64 // zero-subtree nodes derived without a read
	NodeRequests     uint64
	NodeBytes        uint64 // bytes read for the superblock and tree nodes
}

// Tree verifies data against a dm-verity tree whose root is pinned. It is
// safe for concurrent use.
type Tree struct {
	src        blob.Source
	p          Params
	g          *geometry
	zt         *zeroTree
	root       []byte
	hashOffset int64
	o          Options
	log        *slog.Logger

	ctx     context.Context // parent of node reads; cancelled by Close
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	sem     chan struct{}
	hashers sync.Pool // hash.Hash
	pairs   sync.Pool // *pairHasher

	mu    sync.Mutex
	nodes map[int64]*node // by absolute hash block index
	lru   list.List       // of *node, front most recent; only finished nodes
	bytes int64
	// logged remembers which blocks were reported, so each is logged once.
	logged map[[2]int64]bool

	st struct {
		verified, zero, dataBad, nodeBad, fetched, synth, requests, bytes atomic.Uint64
	}
}

// node is one hash block, pending until done is closed.
type node struct {
	abs   int64
	done  chan struct{}
	data  []byte // verified content (shared, read-only)
	err   error  // a *MismatchError is permanent; anything else is not cached
	elem  *list.Element
	mem   int64
	level int
}

// Open reads the superblock at opts.HashOffset (or the one Locate finds),
// checks the tree's top against root and returns the tree. Errors name the
// check that failed: no superblock, a malformed one, a truncated tree, or a
// root mismatch (the image is not the one the configuration pins).
func Open(ctx context.Context, src blob.Source, root []byte, opts Options) (*Tree, error) {
	o := opts.withDefaults()
	size := src.Size()
	hashOffset := o.HashOffset
	if hashOffset < 0 {
		off, ok := Locate(size)
		if !ok {
			return nil, fmt.Errorf("verity: %s (%d bytes) does not end with a tree in blobseal's layout (%d-byte blocks, %s, tree right after the data): %w; give its hash offset (--verity-hash-offset), or add a tree with `blobseal image verity`",
				src, size, DefaultBlockSize, DefaultAlgorithm, ErrNoSuperblock)
		}
		hashOffset = off
	}
	if hashOffset < 0 || hashOffset+SuperblockSize > size {
		return nil, fmt.Errorf("verity: hash offset %d is outside %s (%d bytes): %w", hashOffset, src, size, ErrNoSuperblock)
	}
	if len(root) == 0 || len(root) > 64 {
		return nil, fmt.Errorf("verity: a root hash of %d bytes is not a digest", len(root))
	}
	t := &Tree{src: src, root: bytes.Clone(root), hashOffset: hashOffset, o: o, log: o.Logger,
		sem: make(chan struct{}, o.MaxFetches), nodes: make(map[int64]*node), logged: make(map[[2]int64]bool)}
	t.ctx, t.cancel = context.WithCancel(context.Background())
	head := make([]byte, min(o.HeadBytes, size-hashOffset))
	if err := t.read(ctx, head, hashOffset); err != nil {
		t.Close()
		return nil, fmt.Errorf("verity: read superblock at %d of %s: %w", hashOffset, src, err)
	}
	p, err := ParseSuperblock(head)
	if err != nil {
		t.Close()
		if o.HashOffset < 0 {
			return nil, fmt.Errorf("verity: where a tree appended to %s would begin (offset %d): %w; give its hash offset (--verity-hash-offset), or add a tree with `blobseal image verity`", src, hashOffset, err)
		}
		return nil, fmt.Errorf("verity: at offset %d of %s, the configured hash offset: %w (check verity_hash_offset / --verity-hash-offset against what `blobseal image create` printed)", hashOffset, src, err)
	}
	if o.HashOffset < 0 && (p.DataBlockSize != DefaultBlockSize || p.HashBlockSize != DefaultBlockSize || p.Algorithm != DefaultAlgorithm) {
		// The offset was inferred from the size for blobseal's layout; a
		// superblock for other block sizes is not where it was looked for.
		t.Close()
		return nil, fmt.Errorf("verity: %w: the superblock found at %d of %s is for %d/%d-byte blocks and %s, not blobseal's layout; give the hash offset explicitly (--verity-hash-offset)",
			ErrBadSuperblock, hashOffset, src, p.DataBlockSize, p.HashBlockSize, p.Algorithm)
	}
	if err := t.init(p); err != nil {
		t.Close()
		return nil, err
	}
	if err := t.checkRoot(ctx, head); err != nil {
		t.Close()
		return nil, err
	}
	return t, nil
}

func (t *Tree) init(p Params) error {
	g, err := newGeometry(p, t.hashOffset)
	if err != nil {
		return fmt.Errorf("verity: %s: %w", t.src, err)
	}
	if len(t.root) != g.digest {
		return fmt.Errorf("verity: the pinned root hash has %d bytes but the tree uses %s (%d-byte digests): %w", len(t.root), p.Algorithm, g.digest, ErrRootMismatch)
	}
	// The tree must cover everything before it, and only that: a superblock
	// that claims fewer or more blocks would let storage present tree nodes
	// as data (a Merkle tree cannot tell its levels apart), and a gap would
	// be bytes no hash vouches for.
	if p.DataSize() != t.hashOffset {
		return fmt.Errorf("verity: %w: it covers %d blocks of %d bytes (%d bytes) but sits at offset %d; blobseal needs the tree directly after the data it covers, the whole image before it (veritysetup format --hash-offset=N --data-blocks=N/%d)",
			ErrBadSuperblock, p.DataBlocks, p.DataBlockSize, p.DataSize(), t.hashOffset, p.DataBlockSize)
	}
	if g.treeEnd() > t.src.Size() {
		return fmt.Errorf("verity: %s has %d bytes but its tree ends at %d (truncated upload or copy?): %w", t.src, t.src.Size(), g.treeEnd(), ErrTruncated)
	}
	t.p, t.g, t.zt = p, g, newZeroTree(p, g)
	t.hashers.New = func() any { return p.newHash() }
	t.pairs.New = func() any { return newPairHasher(p) }
	return nil
}

// checkRoot verifies the top of the tree against the root and keeps every
// node of head (bytes from the hash offset) that verifies, top down.
func (t *Tree) checkRoot(ctx context.Context, head []byte) error {
	g := t.g
	if g.levels() == 0 {
		// One data block: the root is its digest.
		block := make([]byte, g.dbs)
		if err := t.read(ctx, block, 0); err != nil {
			return fmt.Errorf("verity: read data block 0: %w", err)
		}
		if !t.matches(block, t.root) {
			return t.rootMismatch()
		}
		return nil
	}
	top := t.headBlock(head, g.start[g.levels()-1])
	if top == nil {
		top = make([]byte, g.hbs)
		if err := t.read(ctx, top, g.start[g.levels()-1]*g.hbs); err != nil {
			return fmt.Errorf("verity: read the top of the tree: %w", err)
		}
	}
	if !t.matches(top, t.root) {
		return t.rootMismatch()
	}
	t.store(&node{abs: g.start[g.levels()-1], level: g.levels() - 1, done: closed(), data: top}, g.hbs)
	// The rest of head: levels are stored top down, so each node's parent
	// is stored (and now verified) before it.
	for level := g.levels() - 2; level >= 0; level-- {
		for j := range g.count[level] {
			abs := g.start[level] + j
			b := t.headBlock(head, abs)
			if b == nil {
				return nil
			}
			want, ok := t.parentDigestCached(level, j)
			if !ok || !t.matches(b, want) {
				return nil // left to the lazy path, which reports it properly
			}
			t.store(&node{abs: abs, level: level, done: closed(), data: b}, g.hbs)
		}
	}
	return nil
}

func (t *Tree) rootMismatch() error {
	return fmt.Errorf("verity: %s: %w (the image is not the one the configuration pins: it was replaced, rolled back to an older version, or its tree was modified); check verity_root_hash against what `blobseal image create` printed for this image",
		t.src, ErrRootMismatch)
}

// headBlock returns hash block abs if head (read at the hash offset) holds
// all of it.
func (t *Tree) headBlock(head []byte, abs int64) []byte {
	lo := abs*t.g.hbs - t.hashOffset
	if lo < 0 || lo+t.g.hbs > int64(len(head)) {
		return nil
	}
	return head[lo : lo+t.g.hbs : lo+t.g.hbs]
}

// parentDigestCached returns the digest of node j of level from its
// parent, if the parent is cached and verified.
func (t *Tree) parentDigestCached(level int, j int64) ([]byte, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	p := t.nodes[t.g.start[level+1]+j>>t.g.shift]
	if p == nil || p.data == nil {
		return nil, false
	}
	return t.slot(p.data, j), true
}

// slot returns the digest of child j (index within its level) in its
// parent's content.
func (t *Tree) slot(parent []byte, j int64) []byte {
	at := (j & (t.g.perBlock - 1)) * int64(t.g.stride)
	return parent[at : at+int64(t.g.digest)]
}

func closed() chan struct{} {
	c := make(chan struct{})
	close(c)
	return c
}

// Params returns the superblock's parameters.
func (t *Tree) Params() Params { return t.p }

// HashOffset returns where the superblock is.
func (t *Tree) HashOffset() int64 { return t.hashOffset }

// DataSize is the number of bytes from offset 0 the tree covers; nothing
// beyond it is verified, so readers must be confined to it.
func (t *Tree) DataSize() int64 { return t.p.DataSize() }

// BlockSize is the data block size, the granularity of verification.
func (t *Tree) BlockSize() int64 { return t.g.dbs }

// Root returns the pinned root hash.
func (t *Tree) Root() []byte { return bytes.Clone(t.root) }

// Stats returns the counters.
func (t *Tree) Stats() Stats {
	return Stats{
		BlocksVerified: t.st.verified.Load(), ZeroBlocks: t.st.zero.Load(),
		DataMismatches: t.st.dataBad.Load(), NodeMismatches: t.st.nodeBad.Load(),
		NodesFetched: t.st.fetched.Load(), NodesSynthesized: t.st.synth.Load(),
		NodeRequests: t.st.requests.Load(), NodeBytes: t.st.bytes.Load(),
	}
}

// Close stops node reads and waits for them.
func (t *Tree) Close() error {
	t.cancel()
	t.wg.Wait()
	return nil
}

func (t *Tree) String() string {
	return fmt.Sprintf("verity(%s, root %s)", t.src, hex.EncodeToString(t.root))
}

func (t *Tree) matches(block, want []byte) bool {
	h := t.hashers.Get().(hash.Hash)
	var buf [64]byte
	sum := hashBlock(h, t.p.Salt, block, buf[:0])
	t.hashers.Put(h)
	return subtle.ConstantTimeCompare(sum, want) == 1
}

// read fills p from the source; tree reads count in the statistics.
func (t *Tree) read(ctx context.Context, p []byte, off int64) error {
	t.st.requests.Add(1)
	n, err := t.src.ReadAt(ctx, p, off)
	t.st.bytes.Add(uint64(max(n, 0)))
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		return fmt.Errorf("short read of %d bytes at %d: %w", len(p), off, ErrTruncated)
	}
	return err
}

// store publishes a finished node into the cache (the caller has not
// registered it, or registered and now finishes it).
func (t *Tree) store(n *node, mem int64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.nodes[n.abs] = n
	t.addLocked(n, mem)
}

func (t *Tree) addLocked(n *node, mem int64) {
	n.mem = mem
	n.elem = t.lru.PushFront(n)
	t.bytes += mem
	for el := t.lru.Back(); t.bytes > t.o.CacheBytes && el != nil && el != n.elem; {
		old := el.Value.(*node)
		el = el.Prev()
		t.lru.Remove(old.elem)
		old.elem = nil
		delete(t.nodes, old.abs)
		t.bytes -= old.mem
	}
}
