package verity

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"runtime"
	"sort"

	"github.com/blobseal/blobseal/blob"
)

// BuildOptions configure Build. Zero fields take veritysetup's defaults.
type BuildOptions struct {
	// Params: DataBlocks is required; Algorithm (sha256), block sizes
	// (4096) and HashType (1) default; a nil Salt becomes 32 random bytes
	// and a zero UUID a random one.
	Params Params
	// Zeros are byte ranges of the data known to be all zeros (the holes
	// of a sparse file): they are not read.
	Zeros []blob.Range
	// Concurrency is the number of hashing workers (default GOMAXPROCS).
	Concurrency int
	// Progress, when set, is called with the data bytes hashed so far.
	Progress func(done, total int64)
}

// Built describes a tree Build wrote.
type Built struct {
	Params     Params
	HashOffset int64  // where the superblock is
	Root       []byte // the root hash
	TreeBytes  int64  // bytes from HashOffset to the end of the tree
}

// RootHex is the root hash in hex, as veritysetup prints it.
func (b *Built) RootHex() string { return hex.EncodeToString(b.Root) }

// buildChunkBlocks is how many data blocks one hashing job covers.
const buildChunkBlocks = 1024

// Build hashes the first DataBlocks blocks of data and writes the
// superblock and the tree to out at hashOffset, which must not overlap the
// data. out may be the same file as data (veritysetup --hash-offset).
func Build(ctx context.Context, data io.ReaderAt, out io.WriterAt, hashOffset int64, o BuildOptions) (*Built, error) {
	p, err := o.Params.withDefaults()
	if err != nil {
		return nil, err
	}
	g, err := newGeometry(p, hashOffset)
	if err != nil {
		return nil, err
	}
	if hashOffset < p.DataSize() {
		return nil, fmt.Errorf("verity: hash offset %d lies inside the %d bytes of data the tree covers", hashOffset, p.DataSize())
	}
	sb, err := p.MarshalSuperblock()
	if err != nil {
		return nil, err
	}
	head := make([]byte, g.first*g.hbs-hashOffset)
	copy(head, sb)
	if _, err := out.WriteAt(head, hashOffset); err != nil {
		return nil, fmt.Errorf("verity: write superblock: %w", err)
	}
	lw := &levelWriter{g: g, salt: p.Salt, h: p.newHash(), out: out}
	for range g.levels() {
		lw.buf = append(lw.buf, make([]byte, g.hbs))
	}
	lw.fill = make([]int64, g.levels())
	lw.written = make([]int64, g.levels())
	if err := hashData(ctx, data, p, g, o, lw.add0); err != nil {
		return nil, err
	}
	root, err := lw.finish()
	if err != nil {
		return nil, err
	}
	return &Built{Params: p, HashOffset: hashOffset, Root: root, TreeBytes: g.treeEnd() - hashOffset}, nil
}

func (p Params) withDefaults() (Params, error) {
	if p.HashType == 0 {
		p.HashType = 1
	}
	if p.Algorithm == "" {
		p.Algorithm = DefaultAlgorithm
	}
	if p.DataBlockSize == 0 {
		p.DataBlockSize = DefaultBlockSize
	}
	if p.HashBlockSize == 0 {
		p.HashBlockSize = DefaultBlockSize
	}
	if p.Salt == nil {
		p.Salt = make([]byte, DefaultSaltSize)
		if _, err := rand.Read(p.Salt); err != nil {
			return p, err
		}
	}
	if p.UUID == ([16]byte{}) {
		if _, err := rand.Read(p.UUID[:]); err != nil {
			return p, err
		}
		p.UUID[6] = p.UUID[6]&0x0f | 0x40 // version 4
		p.UUID[8] = p.UUID[8]&0x3f | 0x80 // RFC 4122 variant
	}
	return p, p.validate()
}

// hashData computes the digest of every data block on parallel workers and
// hands them to emit in order, chunk by chunk.
func hashData(ctx context.Context, data io.ReaderAt, p Params, g *geometry, o BuildOptions, emit func(digests []byte) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	workers := o.Concurrency
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	zeros := blob.MergeRanges(append([]blob.Range(nil), o.Zeros...))
	sort.Slice(zeros, func(i, j int) bool { return zeros[i].Off < zeros[j].Off })
	zt := newZeroTree(p, g)
	type result struct {
		digests []byte
		err     error
	}
	chunks := (p.DataBlocks + buildChunkBlocks - 1) / buildChunkBlocks
	queue := make(chan chan result, 2*workers)
	sem := make(chan struct{}, workers)
	go func() {
		defer close(queue)
		for c := int64(0); c < chunks; c++ {
			fut := make(chan result, 1)
			select {
			case queue <- fut:
			case <-ctx.Done():
				return
			}
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				fut <- result{err: ctx.Err()}
				return
			}
			go func(c int64) {
				defer func() { <-sem }()
				d, err := hashChunk(data, p, g, zt, zeros, c)
				fut <- result{d, err}
			}(c)
		}
	}()
	var done int64
	for fut := range queue {
		r := <-fut
		if r.err == nil {
			r.err = emit(r.digests)
		}
		if r.err != nil {
			cancel()
			for f := range queue { // let the producer finish
				<-f
			}
			return r.err
		}
		done += int64(len(r.digests)/g.digest) * g.dbs
		if o.Progress != nil {
			o.Progress(done, p.DataSize())
		}
	}
	return ctx.Err()
}

// hashChunk returns the digests of chunk c's data blocks.
func hashChunk(data io.ReaderAt, p Params, g *geometry, zt *zeroTree, zeros []blob.Range, c int64) ([]byte, error) {
	first := c * buildChunkBlocks
	n := min(int64(buildChunkBlocks), p.DataBlocks-first)
	off, size := first*g.dbs, n*g.dbs
	buf := make([]byte, size)
	// Read only what is not known to be zero.
	pos := off
	i := sort.Search(len(zeros), func(i int) bool { return zeros[i].End() > off })
	for pos < off+size {
		next := off + size
		if i < len(zeros) && zeros[i].Off <= pos {
			pos = min(zeros[i].End(), off+size)
			i++
			continue
		}
		if i < len(zeros) && zeros[i].Off < next {
			next = zeros[i].Off
		}
		if err := readFull(data, buf[pos-off:next-off], pos); err != nil {
			return nil, err
		}
		pos = next
	}
	h := p.newHash()
	var ph *pairHasher
	if p.usePairs() {
		ph = newPairHasher(p)
	}
	out := make([]byte, n*int64(g.digest))
	block := func(b int64) []byte { return buf[b*g.dbs : (b+1)*g.dbs] }
	digest := func(b int64) []byte { return out[b*int64(g.digest) : (b+1)*int64(g.digest)] }
	var sum []byte
	pending := int64(-1) // a block waiting for a partner to hash with
	for b := int64(0); b < n; b++ {
		switch {
		case isZero(block(b)):
			copy(digest(b), zt.data)
		case ph == nil:
			sum = hashBlock(h, p.Salt, block(b), sum)
			copy(digest(b), sum)
		case pending < 0:
			pending = b
		default:
			ph.pair(block(pending), block(b), digest(pending), digest(b))
			pending = -1
		}
	}
	if pending >= 0 {
		sum = hashBlock(h, p.Salt, block(pending), sum)
		copy(digest(pending), sum)
	}
	return out, nil
}

func readFull(r io.ReaderAt, p []byte, off int64) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		return fmt.Errorf("verity: data ends at offset %d, before the %d bytes the tree must cover", off+int64(n), off+int64(len(p)))
	}
	return fmt.Errorf("verity: read data at %d: %w", off, err)
}

// levelWriter assembles hash blocks level by level as digests arrive and
// writes each one at its place as soon as it is full.
type levelWriter struct {
	g       *geometry
	salt    []byte
	h       hash.Hash
	out     io.WriterAt
	buf     [][]byte // the block being filled, per level
	fill    []int64  // digests in it
	written []int64  // blocks written per level
	root    []byte
	sum     []byte
}

func (w *levelWriter) add0(digests []byte) error {
	for d := 0; d < len(digests); d += w.g.digest {
		if err := w.add(0, digests[d:d+w.g.digest]); err != nil {
			return err
		}
	}
	return nil
}

func (w *levelWriter) add(level int, digest []byte) error {
	if level == w.g.levels() {
		if w.root != nil {
			return errors.New("verity: internal error: two roots")
		}
		w.root = bytes.Clone(digest)
		return nil
	}
	copy(w.buf[level][w.fill[level]*int64(w.g.stride):], digest)
	w.fill[level]++
	if w.fill[level] == w.g.perBlock {
		return w.flush(level)
	}
	return nil
}

func (w *levelWriter) flush(level int) error {
	if w.written[level] >= w.g.count[level] {
		return fmt.Errorf("verity: internal error: level %d overflows its %d blocks", level, w.g.count[level])
	}
	block := w.buf[level]
	at := (w.g.start[level] + w.written[level]) * w.g.hbs
	if _, err := w.out.WriteAt(block, at); err != nil {
		return fmt.Errorf("verity: write hash block at %d: %w", at, err)
	}
	w.written[level]++
	w.sum = hashBlock(w.h, w.salt, block, w.sum)
	clear(block)
	w.fill[level] = 0
	return w.add(level+1, w.sum)
}

// finish flushes the partial last block of every level, bottom up, and
// returns the root.
func (w *levelWriter) finish() ([]byte, error) {
	for level := range w.g.levels() {
		if w.fill[level] > 0 {
			if err := w.flush(level); err != nil {
				return nil, err
			}
		}
		if w.written[level] != w.g.count[level] {
			return nil, fmt.Errorf("verity: internal error: level %d has %d of %d blocks", level, w.written[level], w.g.count[level])
		}
	}
	if w.root == nil {
		return nil, errors.New("verity: internal error: no root")
	}
	return w.root, nil
}
