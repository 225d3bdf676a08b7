package verity

import "encoding/binary"

// pairHasher computes the digests of two equal-sized blocks with the same
// salt at once (SHA-256 only, on CPUs with the SHA extensions): verifying
// a fetch hashes thousands of blocks, and two independent streams keep the
// SHA unit busy where one leaves it waiting (bench: BenchmarkHashPair).
type pairHasher struct {
	salt []byte
	// head and tail hold the message's first and last 64-byte chunks
	// (salt and block start; block end and padding) for each stream.
	head [2][64]byte
	tail [2][128]byte
}

func newPairHasher(p Params) *pairHasher {
	return &pairHasher{salt: p.Salt}
}

// usePairs reports whether pair hashing applies to these parameters.
func (p Params) usePairs() bool {
	return haveSHAx2 && p.Algorithm == "sha256" && len(p.Salt) < 64
}

var sha256IV = [8]uint32{0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19}

// pair writes SHA-256(salt ‖ a) to da and SHA-256(salt ‖ b) to db; a and b
// have the same length, at least 64 bytes.
func (ph *pairHasher) pair(a, b, da, db []byte) {
	s := len(ph.salt)
	n := len(a)
	var st [16]uint32
	copy(st[:8], sha256IV[:])
	copy(st[8:], sha256IV[:])
	// Chunk 0: the salt and the start of the block.
	first := 64 - s
	copy(ph.head[0][:], ph.salt)
	copy(ph.head[0][s:], a[:first])
	copy(ph.head[1][:], ph.salt)
	copy(ph.head[1][s:], b[:first])
	blocksx2(&st, &ph.head[0][0], &ph.head[1][0], 1)
	// Whole chunks straight from the blocks.
	mid := (n - first) / 64
	if mid > 0 {
		blocksx2(&st, &a[first], &b[first], mid)
	}
	// The rest, the 0x80 marker, zeros and the bit length.
	rest := n - first - 64*mid
	tailLen := 64
	if rest+9 > 64 {
		tailLen = 128
	}
	bitLen := uint64(s+n) * 8
	for i, blk := range [2][]byte{a, b} {
		t := ph.tail[i][:tailLen]
		clear(t)
		copy(t, blk[first+64*mid:])
		t[rest] = 0x80
		binary.BigEndian.PutUint64(t[tailLen-8:], bitLen)
	}
	blocksx2(&st, &ph.tail[0][0], &ph.tail[1][0], tailLen/64)
	for i := range 8 {
		binary.BigEndian.PutUint32(da[4*i:], st[i])
		binary.BigEndian.PutUint32(db[4*i:], st[8+i])
	}
}
