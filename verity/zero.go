package verity

import (
	"bytes"
	"encoding/binary"
)

// zeroTree knows what the tree holds over data that is all zeros, so that
// zero blocks and whole zero subtrees are recognised from their parent's
// digest and served without being fetched: a sparse image costs only what
// it holds.
type zeroTree struct {
	data []byte // digest of a zero data block
	// Per level: the content and digest of a node whose whole subtree is
	// zeros, for a full node and for the level's last (possibly partial) one.
	full, last               [][]byte // contents (hash blocks)
	fullDigest, lastDigest   [][]byte
	fullChildren, lastChildN []int64
}

func newZeroTree(p Params, g *geometry) *zeroTree {
	h := p.newHash()
	z := &zeroTree{data: hashBlock(h, p.Salt, make([]byte, g.dbs), nil)}
	n := g.levels()
	z.full, z.last = make([][]byte, n), make([][]byte, n)
	z.fullDigest, z.lastDigest = make([][]byte, n), make([][]byte, n)
	for i := range n {
		fullChild, lastChild, children := z.data, z.data, p.DataBlocks
		if i > 0 {
			fullChild, lastChild, children = z.fullDigest[i-1], z.lastDigest[i-1], g.count[i-1]
		}
		full := make([]byte, g.hbs)
		for k := int64(0); k < g.perBlock; k++ {
			copy(full[k*int64(g.stride):], fullChild)
		}
		last := make([]byte, g.hbs)
		k := children - (g.count[i]-1)*g.perBlock // children of the last node, 1..perBlock
		for c := int64(0); c < k-1; c++ {
			copy(last[c*int64(g.stride):], fullChild)
		}
		copy(last[(k-1)*int64(g.stride):], lastChild)
		z.full[i], z.last[i] = full, last
		z.fullDigest[i] = hashBlock(h, p.Salt, full, nil)
		z.lastDigest[i] = hashBlock(h, p.Salt, last, nil)
	}
	return z
}

// node returns the content a zero subtree's node (level, index within the
// level) has, and its digest.
func (z *zeroTree) node(g *geometry, level int, index int64) (content, digest []byte) {
	if index == g.count[level]-1 {
		return z.last[level], z.lastDigest[level]
	}
	return z.full[level], z.fullDigest[level]
}

// isZero reports whether p holds only zero bytes.
func isZero(p []byte) bool {
	for len(p) >= 8 {
		if binary.LittleEndian.Uint64(p) != 0 {
			return false
		}
		p = p[8:]
	}
	return len(bytes.Trim(p, "\x00")) == 0
}
