package xts

import "encoding/binary"

// This file holds the AES key schedule (shared by every implementation) and
// the portable table-driven block cipher (FIPS-197). The tables are derived
// at start-up from the field arithmetic instead of being pasted in, and are
// never written afterwards.

// aesTables are the S-boxes and the round lookup tables of FIPS-197 §5 in the
// usual 32-bit "T-table" form: te[0][x] is the MixColumns column produced by
// S-box output S(x) in row 0; te[1..3] are its byte rotations. td likewise
// for the inverse cipher.
type aesTables struct {
	sbox, invSbox [256]byte
	te, td        [4][256]uint32
}

var tables = newAESTables()

// gmul multiplies in GF(2^8) modulo x^8+x^4+x^3+x+1.
func gmul(a, b byte) byte {
	var p byte
	for b != 0 {
		if b&1 != 0 {
			p ^= a
		}
		hi := a & 0x80
		a <<= 1
		if hi != 0 {
			a ^= 0x1b
		}
		b >>= 1
	}
	return p
}

func newAESTables() *aesTables {
	t := new(aesTables)
	// Multiplicative inverse by brute force (runs once, 64K multiplies),
	// then the affine transform of FIPS-197 §5.1.1.
	for x := 0; x < 256; x++ {
		var inv byte
		if x != 0 {
			for y := 1; y < 256; y++ {
				if gmul(byte(x), byte(y)) == 1 {
					inv = byte(y)
					break
				}
			}
		}
		s := inv ^ rotl8(inv, 1) ^ rotl8(inv, 2) ^ rotl8(inv, 3) ^ rotl8(inv, 4) ^ 0x63
		t.sbox[x] = s
		t.invSbox[s] = byte(x)
	}
	for x := 0; x < 256; x++ {
		s := t.sbox[x]
		e := uint32(gmul(s, 2))<<24 | uint32(s)<<16 | uint32(s)<<8 | uint32(gmul(s, 3))
		is := t.invSbox[x]
		d := uint32(gmul(is, 14))<<24 | uint32(gmul(is, 9))<<16 | uint32(gmul(is, 13))<<8 | uint32(gmul(is, 11))
		for i := 0; i < 4; i++ {
			t.te[i][x] = e>>(8*i) | e<<(32-8*i)
			t.td[i][x] = d>>(8*i) | d<<(32-8*i)
		}
	}
	return t
}

func rotl8(b byte, n uint) byte { return b<<n | b>>(8-n) }

func subWord(w uint32) uint32 {
	s := &tables.sbox
	return uint32(s[w>>24])<<24 | uint32(s[w>>16&0xff])<<16 | uint32(s[w>>8&0xff])<<8 | uint32(s[w&0xff])
}

// expandKey writes the FIPS-197 §5.2 encryption round keys of a 16- or
// 32-byte key into rk as bytes.
func expandKey(rk, key []byte) {
	nk := len(key) / 4
	total := 4 * (nk + 7) // 4 words per round key, Nr+1 = Nk+7 round keys
	var w [60]uint32
	for i := 0; i < nk; i++ {
		w[i] = binary.BigEndian.Uint32(key[4*i:])
	}
	rcon := uint32(1)
	for i := nk; i < total; i++ {
		t := w[i-1]
		switch {
		case i%nk == 0:
			t = subWord(t<<8|t>>24) ^ rcon<<24
			rcon = uint32(gmul(byte(rcon), 2))
		case nk > 6 && i%nk == 4:
			t = subWord(t)
		}
		w[i] = w[i-nk] ^ t
	}
	for i := 0; i < total; i++ {
		binary.BigEndian.PutUint32(rk[4*i:], w[i])
	}
	clear(w[:])
}

// invertKeySchedule builds the round keys of the equivalent inverse cipher
// (FIPS-197 §5.3.5): the encryption keys in reverse order with InvMixColumns
// applied to all but the first and last, which is what AESDEC expects.
func invertKeySchedule(dec, enc []byte, rounds int) {
	copy(dec[0:16], enc[16*rounds:16*rounds+16])
	copy(dec[16*rounds:16*rounds+16], enc[0:16])
	for r := 1; r < rounds; r++ {
		src := enc[16*(rounds-r):]
		dst := dec[16*r:]
		for col := 0; col < 4; col++ {
			b0, b1, b2, b3 := src[4*col], src[4*col+1], src[4*col+2], src[4*col+3]
			dst[4*col] = gmul(b0, 14) ^ gmul(b1, 11) ^ gmul(b2, 13) ^ gmul(b3, 9)
			dst[4*col+1] = gmul(b0, 9) ^ gmul(b1, 14) ^ gmul(b2, 11) ^ gmul(b3, 13)
			dst[4*col+2] = gmul(b0, 13) ^ gmul(b1, 9) ^ gmul(b2, 14) ^ gmul(b3, 11)
			dst[4*col+3] = gmul(b0, 11) ^ gmul(b1, 13) ^ gmul(b2, 9) ^ gmul(b3, 14)
		}
	}
}

// widen stores every 16-byte round key of rk twice in a row into dst.
func widen(dst, rk []byte) {
	for r := 0; r < len(rk)/16; r++ {
		copy(dst[32*r:], rk[16*r:16*r+16])
		copy(dst[32*r+16:], rk[16*r:16*r+16])
	}
}

func rkWord(rk []byte, i int) uint32 { return binary.BigEndian.Uint32(rk[4*i:]) }

// encryptBlockGeneric encrypts one 16-byte block with encryption round keys.
func encryptBlockGeneric(rounds int, rk, dst, src []byte) {
	te := &tables.te
	s0 := binary.BigEndian.Uint32(src[0:]) ^ rkWord(rk, 0)
	s1 := binary.BigEndian.Uint32(src[4:]) ^ rkWord(rk, 1)
	s2 := binary.BigEndian.Uint32(src[8:]) ^ rkWord(rk, 2)
	s3 := binary.BigEndian.Uint32(src[12:]) ^ rkWord(rk, 3)
	for r := 1; r < rounds; r++ {
		t0 := te[0][s0>>24] ^ te[1][s1>>16&0xff] ^ te[2][s2>>8&0xff] ^ te[3][s3&0xff] ^ rkWord(rk, 4*r)
		t1 := te[0][s1>>24] ^ te[1][s2>>16&0xff] ^ te[2][s3>>8&0xff] ^ te[3][s0&0xff] ^ rkWord(rk, 4*r+1)
		t2 := te[0][s2>>24] ^ te[1][s3>>16&0xff] ^ te[2][s0>>8&0xff] ^ te[3][s1&0xff] ^ rkWord(rk, 4*r+2)
		t3 := te[0][s3>>24] ^ te[1][s0>>16&0xff] ^ te[2][s1>>8&0xff] ^ te[3][s2&0xff] ^ rkWord(rk, 4*r+3)
		s0, s1, s2, s3 = t0, t1, t2, t3
	}
	sb := &tables.sbox
	last := func(a, b, c, d uint32) uint32 {
		return uint32(sb[a>>24])<<24 | uint32(sb[b>>16&0xff])<<16 | uint32(sb[c>>8&0xff])<<8 | uint32(sb[d&0xff])
	}
	k := 4 * rounds
	binary.BigEndian.PutUint32(dst[0:], last(s0, s1, s2, s3)^rkWord(rk, k))
	binary.BigEndian.PutUint32(dst[4:], last(s1, s2, s3, s0)^rkWord(rk, k+1))
	binary.BigEndian.PutUint32(dst[8:], last(s2, s3, s0, s1)^rkWord(rk, k+2))
	binary.BigEndian.PutUint32(dst[12:], last(s3, s0, s1, s2)^rkWord(rk, k+3))
}

// decryptBlockGeneric decrypts one block with equivalent-inverse round keys.
func decryptBlockGeneric(rounds int, rk, dst, src []byte) {
	td := &tables.td
	s0 := binary.BigEndian.Uint32(src[0:]) ^ rkWord(rk, 0)
	s1 := binary.BigEndian.Uint32(src[4:]) ^ rkWord(rk, 1)
	s2 := binary.BigEndian.Uint32(src[8:]) ^ rkWord(rk, 2)
	s3 := binary.BigEndian.Uint32(src[12:]) ^ rkWord(rk, 3)
	for r := 1; r < rounds; r++ {
		t0 := td[0][s0>>24] ^ td[1][s3>>16&0xff] ^ td[2][s2>>8&0xff] ^ td[3][s1&0xff] ^ rkWord(rk, 4*r)
		t1 := td[0][s1>>24] ^ td[1][s0>>16&0xff] ^ td[2][s3>>8&0xff] ^ td[3][s2&0xff] ^ rkWord(rk, 4*r+1)
		t2 := td[0][s2>>24] ^ td[1][s1>>16&0xff] ^ td[2][s0>>8&0xff] ^ td[3][s3&0xff] ^ rkWord(rk, 4*r+2)
		t3 := td[0][s3>>24] ^ td[1][s2>>16&0xff] ^ td[2][s1>>8&0xff] ^ td[3][s0&0xff] ^ rkWord(rk, 4*r+3)
		s0, s1, s2, s3 = t0, t1, t2, t3
	}
	isb := &tables.invSbox
	last := func(a, b, c, d uint32) uint32 {
		return uint32(isb[a>>24])<<24 | uint32(isb[b>>16&0xff])<<16 | uint32(isb[c>>8&0xff])<<8 | uint32(isb[d&0xff])
	}
	k := 4 * rounds
	binary.BigEndian.PutUint32(dst[0:], last(s0, s3, s2, s1)^rkWord(rk, k))
	binary.BigEndian.PutUint32(dst[4:], last(s1, s0, s3, s2)^rkWord(rk, k+1))
	binary.BigEndian.PutUint32(dst[8:], last(s2, s1, s0, s3)^rkWord(rk, k+2))
	binary.BigEndian.PutUint32(dst[12:], last(s3, s2, s1, s0)^rkWord(rk, k+3))
}

// xtsGeneric runs XTS over len(src)/16 blocks and leaves tweak at the value
// for the block after the last. The tweak is kept as two little-endian
// 64-bit halves; multiplying by α is a 128-bit left shift with the carry
// folded back as x^7+x^2+x+1 (0x87).
func xtsGeneric(rounds int, rk []byte, decrypt bool, dst, src []byte, tweak *[16]byte) {
	lo := binary.LittleEndian.Uint64(tweak[0:])
	hi := binary.LittleEndian.Uint64(tweak[8:])
	var blk [16]byte
	for off := 0; off+16 <= len(src); off += 16 {
		binary.LittleEndian.PutUint64(blk[0:], binary.LittleEndian.Uint64(src[off:])^lo)
		binary.LittleEndian.PutUint64(blk[8:], binary.LittleEndian.Uint64(src[off+8:])^hi)
		if decrypt {
			decryptBlockGeneric(rounds, rk, blk[:], blk[:])
		} else {
			encryptBlockGeneric(rounds, rk, blk[:], blk[:])
		}
		binary.LittleEndian.PutUint64(dst[off:], binary.LittleEndian.Uint64(blk[0:])^lo)
		binary.LittleEndian.PutUint64(dst[off+8:], binary.LittleEndian.Uint64(blk[8:])^hi)
		carry := hi >> 63
		hi = hi<<1 | lo>>63
		lo = lo<<1 ^ carry*0x87
	}
	binary.LittleEndian.PutUint64(tweak[0:], lo)
	binary.LittleEndian.PutUint64(tweak[8:], hi)
	clear(blk[:])
}
