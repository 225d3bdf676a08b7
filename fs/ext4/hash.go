package ext4

import "math/bits"

// Directory index (htree) hash versions as stored in dx_root.
const (
	hashLegacy          = 0
	hashHalfMD4         = 1
	hashTea             = 2
	hashLegacyUnsigned  = 3
	hashHalfMD4Unsigned = 4
	hashTeaUnsigned     = 5
	htreeEOF32          = 0x7fffffff
)

// dirHash computes the htree hash of name as ext4 does. ok is false for an
// unknown hash version (callers then scan the directory linearly).
func dirHash(name []byte, version uint8, seed [4]uint32) (hash uint32, ok bool) {
	buf := seed
	var in [8]uint32
	switch version {
	case hashLegacy, hashLegacyUnsigned:
		hash = legacyHash(name, version == hashLegacy)
	case hashHalfMD4, hashHalfMD4Unsigned:
		signed := version == hashHalfMD4
		p := name
		for {
			packName(p, in[:8], signed)
			halfMD4(&buf, &in)
			if len(p) <= 32 {
				break
			}
			p = p[32:]
		}
		hash = buf[1]
	case hashTea, hashTeaUnsigned:
		signed := version == hashTea
		p := name
		for {
			packName(p, in[:4], signed)
			tea(&buf, &in)
			if len(p) <= 16 {
				break
			}
			p = p[16:]
		}
		hash = buf[0]
	default:
		return 0, false
	}
	hash &^= 1
	if hash == htreeEOF32<<1 {
		hash = (htreeEOF32 - 1) << 1
	}
	return hash, true
}

// legacyHash is ext3's original "dx_hack_hash".
func legacyHash(name []byte, signed bool) uint32 {
	h0, h1 := uint32(0x12a3fe2d), uint32(0x37abe8f9)
	for _, b := range name {
		c := uint32(b)
		if signed {
			c = uint32(int32(int8(b)))
		}
		h := h1 + (h0 ^ c*7152373)
		if h&0x80000000 != 0 {
			h -= 0x7fffffff
		}
		h1, h0 = h0, h
	}
	return h0 << 1
}

// packName fills out with the next chunk of the name, four characters per
// word, padded with a length-derived pattern, as ext4's str2hashbuf does.
func packName(msg []byte, out []uint32, signed bool) {
	n := len(msg)
	pad := uint32(n) | uint32(n)<<8
	pad |= pad << 16
	val := pad
	if n > 4*len(out) {
		n = 4 * len(out)
	}
	k := 0
	for i := 0; i < n; i++ {
		c := uint32(msg[i])
		if signed {
			c = uint32(int32(int8(msg[i])))
		}
		val = c + val<<8
		if i%4 == 3 {
			out[k] = val
			k++
			val = pad
		}
	}
	if k < len(out) {
		out[k] = val
		k++
	}
	for ; k < len(out); k++ {
		out[k] = pad
	}
}

// halfMD4 is the reduced MD4 transform of the htree half_md4 hash.
func halfMD4(buf *[4]uint32, in *[8]uint32) {
	const k2, k3 = 0x5A827999, 0x6ED9EBA1
	a, b, c, d := buf[0], buf[1], buf[2], buf[3]
	f := func(x, y, z uint32) uint32 { return z ^ (x & (y ^ z)) }
	g := func(x, y, z uint32) uint32 { return (x & y) + ((x ^ y) & z) }
	h := func(x, y, z uint32) uint32 { return x ^ y ^ z }
	r := bits.RotateLeft32

	a = r(a+f(b, c, d)+in[0], 3)
	d = r(d+f(a, b, c)+in[1], 7)
	c = r(c+f(d, a, b)+in[2], 11)
	b = r(b+f(c, d, a)+in[3], 19)
	a = r(a+f(b, c, d)+in[4], 3)
	d = r(d+f(a, b, c)+in[5], 7)
	c = r(c+f(d, a, b)+in[6], 11)
	b = r(b+f(c, d, a)+in[7], 19)

	a = r(a+g(b, c, d)+in[1]+k2, 3)
	d = r(d+g(a, b, c)+in[3]+k2, 5)
	c = r(c+g(d, a, b)+in[5]+k2, 9)
	b = r(b+g(c, d, a)+in[7]+k2, 13)
	a = r(a+g(b, c, d)+in[0]+k2, 3)
	d = r(d+g(a, b, c)+in[2]+k2, 5)
	c = r(c+g(d, a, b)+in[4]+k2, 9)
	b = r(b+g(c, d, a)+in[6]+k2, 13)

	a = r(a+h(b, c, d)+in[3]+k3, 3)
	d = r(d+h(a, b, c)+in[7]+k3, 9)
	c = r(c+h(d, a, b)+in[2]+k3, 11)
	b = r(b+h(c, d, a)+in[6]+k3, 15)
	a = r(a+h(b, c, d)+in[1]+k3, 3)
	d = r(d+h(a, b, c)+in[5]+k3, 9)
	c = r(c+h(d, a, b)+in[0]+k3, 11)
	b = r(b+h(c, d, a)+in[4]+k3, 15)

	buf[0] += a
	buf[1] += b
	buf[2] += c
	buf[3] += d
}

// tea is 16 rounds of the TEA block cipher used as the htree "tea" hash.
func tea(buf *[4]uint32, in *[8]uint32) {
	const delta = 0x9E3779B9
	var sum uint32
	b0, b1 := buf[0], buf[1]
	a, b, c, d := in[0], in[1], in[2], in[3]
	for n := 0; n < 16; n++ {
		sum += delta
		b0 += ((b1 << 4) + a) ^ (b1 + sum) ^ ((b1 >> 5) + b)
		b1 += ((b0 << 4) + c) ^ (b0 + sum) ^ ((b0 >> 5) + d)
	}
	buf[0] += b0
	buf[1] += b1
}
