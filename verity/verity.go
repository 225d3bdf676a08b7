// Package verity builds, parses and checks dm-verity hash trees (format
// version 1, the one `veritysetup format` writes and the kernel's dm-verity
// reads): a superblock, then the hash levels from the top down, each hash
// the digest of the salt followed by one block.
//
// blobseal puts the tree over the whole image as stored (LUKS2 header,
// keyslots and every encrypted sector) and appends it to the same file or
// blob, so one upload carries both and one root hash, pinned in the
// attested configuration, authenticates every byte a mount reads. Tree is
// the runtime side: it reads the superblock and the tree through a bounded,
// single-flight node cache, checks every node against its parent up to the
// root, and verifies data blocks for the block cache before any reader sees
// them. Build writes a tree; Locate finds one appended to an image.
package verity

import (
	"crypto/sha256"
	"crypto/sha512"
	"errors"
	"fmt"
	"hash"
	"math/bits"
)

// Errors, usable with errors.Is; returned errors wrap them with details.
var (
	// ErrNoSuperblock: no dm-verity superblock where the tree should start.
	ErrNoSuperblock = errors.New("no dm-verity superblock")
	// ErrBadSuperblock: a superblock that is malformed or outside the limits.
	ErrBadSuperblock = errors.New("invalid dm-verity superblock")
	// ErrRootMismatch: the tree's top does not hash to the pinned root.
	ErrRootMismatch = errors.New("the hash tree does not match the pinned root hash")
	// ErrMismatch: a data block or a tree node does not match its hash.
	ErrMismatch = errors.New("block does not match its hash in the verity tree")
	// ErrTruncated: the image ends before its tree does.
	ErrTruncated = errors.New("the image ends before its hash tree")
)

// Defaults of the trees Build writes: veritysetup's defaults.
const (
	DefaultBlockSize = 4096
	DefaultAlgorithm = "sha256"
	DefaultSaltSize  = 32
	// SuperblockSize is the on-disk size of the superblock.
	SuperblockSize = 512
	// MaxSaltSize is the room the superblock has for the salt.
	MaxSaltSize = 256
	// maxLevels bounds the tree height, as cryptsetup's VERITY_MAX_LEVELS.
	maxLevels = 63
)

// Params describe a tree: everything the superblock holds.
type Params struct {
	HashType      int    // 1: salt prepended, digests padded to a power of two (the only type supported)
	Algorithm     string // "sha256" or "sha512"
	DataBlockSize int    // 512..4096, a power of two
	HashBlockSize int    // 512..4096, a power of two
	DataBlocks    int64  // blocks covered, from offset 0
	Salt          []byte // at most 256 bytes
	UUID          [16]byte
}

// DataSize is the number of bytes the tree covers.
func (p Params) DataSize() int64 { return p.DataBlocks * int64(p.DataBlockSize) }

// newHash returns the hash of the algorithm; validate first.
func (p Params) newHash() hash.Hash {
	if p.Algorithm == "sha512" {
		return sha512.New()
	}
	return sha256.New()
}

func digestSize(alg string) int {
	switch alg {
	case "sha256":
		return sha256.Size
	case "sha512":
		return sha512.Size
	}
	return 0
}

// validate checks the parameters against what this package (and the
// kernel) supports, with limits that keep every computation small.
func (p Params) validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s", ErrBadSuperblock, fmt.Sprintf(format, args...))
	}
	switch {
	case p.HashType == 0:
		return bad("hash type 0 (the Chrome OS format) is not supported; format the tree with veritysetup's default --format=1")
	case p.HashType != 1:
		return bad("hash type %d is unknown (only 1 is defined)", p.HashType)
	case digestSize(p.Algorithm) == 0:
		return bad("hash algorithm %q is not supported (use sha256 or sha512)", p.Algorithm)
	case !validBlockSize(p.DataBlockSize):
		return bad("data block size %d must be a power of two from 512 to 4096", p.DataBlockSize)
	case !validBlockSize(p.HashBlockSize):
		return bad("hash block size %d must be a power of two from 512 to 4096", p.HashBlockSize)
	case p.DataBlocks <= 0:
		return bad("it covers %d data blocks", p.DataBlocks)
	case p.DataBlocks > (1<<62)/int64(p.DataBlockSize):
		return bad("%d data blocks of %d bytes is more than any image can hold", p.DataBlocks, p.DataBlockSize)
	case len(p.Salt) > MaxSaltSize:
		return bad("salt of %d bytes (at most %d)", len(p.Salt), MaxSaltSize)
	}
	if p.HashBlockSize < 2*digestStride(p.Algorithm) {
		return bad("a %d-byte hash block cannot hold two %s digests", p.HashBlockSize, p.Algorithm)
	}
	return nil
}

func validBlockSize(n int) bool { return n >= 512 && n <= 4096 && n&(n-1) == 0 }

// digestStride is the room one digest takes in a hash block: its size
// rounded up to a power of two (hash type 1).
func digestStride(alg string) int {
	d := digestSize(alg)
	if d == 0 {
		return 0
	}
	return 1 << bits.Len(uint(d-1))
}

// geometry places the levels of a tree in the image.
type geometry struct {
	digest   int     // digest size
	stride   int     // digest stride in a hash block
	perBlock int64   // digests per hash block (a power of two)
	shift    uint    // log2(perBlock)
	hbs      int64   // hash block size
	dbs      int64   // data block size
	start    []int64 // start[i]: index (in hash blocks from offset 0 of the image) of level i's first block; level 0 is the bottom
	count    []int64 // count[i]: blocks in level i
	first    int64   // hash block index of the first tree block (the top level)
	end      int64   // hash block index after the last tree block
}

// levels returns the number of tree levels.
func (g *geometry) levels() int { return len(g.start) }

// newGeometry lays the tree out as cryptsetup does: the hash area begins in
// the first hash block after the superblock at hashOffset; levels follow
// top first; level i holds ceil(DataBlocks / perBlock^(i+1)) blocks.
// A tree over a single data block has no levels (the root is its digest).
func newGeometry(p Params, hashOffset int64) (*geometry, error) {
	if err := p.validate(); err != nil {
		return nil, err
	}
	if hashOffset < 0 || hashOffset%512 != 0 {
		return nil, fmt.Errorf("hash offset %d must be a non-negative multiple of 512", hashOffset)
	}
	g := &geometry{
		digest: digestSize(p.Algorithm),
		stride: digestStride(p.Algorithm),
		hbs:    int64(p.HashBlockSize),
		dbs:    int64(p.DataBlockSize),
	}
	g.perBlock = int64(1) << (bits.Len64(uint64(g.hbs/int64(g.stride))) - 1)
	g.shift = uint(bits.TrailingZeros64(uint64(g.perBlock)))
	n := 0
	for uint(n)*g.shift < 64 && uint64(p.DataBlocks-1)>>(uint(n)*g.shift) != 0 {
		n++
	}
	if n > maxLevels {
		return nil, fmt.Errorf("%w: %d levels", ErrBadSuperblock, n)
	}
	g.start = make([]int64, n)
	g.count = make([]int64, n)
	if hashOffset > (1<<62)-g.hbs {
		return nil, fmt.Errorf("%w: hash offset %d is too large", ErrBadSuperblock, hashOffset)
	}
	g.first = (hashOffset + SuperblockSize + g.hbs - 1) / g.hbs
	pos := g.first
	for i := n - 1; i >= 0; i-- {
		s := uint((i + 1)) * g.shift
		var c int64
		if s >= 63 {
			c = 1
		} else {
			c = int64((uint64(p.DataBlocks) + (uint64(1) << s) - 1) >> s)
		}
		g.start[i], g.count[i] = pos, c
		pos += c
		if pos > (1<<62)/g.hbs {
			return nil, fmt.Errorf("%w: the tree would end past any image size", ErrBadSuperblock)
		}
	}
	g.end = pos
	return g, nil
}

// treeEnd is the byte offset just after the tree.
func (g *geometry) treeEnd() int64 { return g.end * g.hbs }

// TreeSize is the number of bytes a tree with these parameters takes at
// hashOffset, from hashOffset to its end (superblock included).
func TreeSize(p Params, hashOffset int64) (int64, error) {
	g, err := newGeometry(p, hashOffset)
	if err != nil {
		return 0, err
	}
	return g.treeEnd() - hashOffset, nil
}

// hashBlock computes the digest of one block as the tree stores it: the
// salt, then the block (hash type 1). h is reset first; sum is reused.
func hashBlock(h hash.Hash, salt, block, sum []byte) []byte {
	h.Reset()
	h.Write(salt)
	h.Write(block)
	return h.Sum(sum[:0])
}
