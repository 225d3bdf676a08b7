package hsm

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
)

// aivPrefix is the RFC 5649 alternative initial value's constant half.
var aivPrefix = [4]byte{0xA6, 0x59, 0x59, 0xA6}

// maxWrapInput bounds what we wrap or unwrap: keys, not bulk data.
const maxWrapInput = 1 << 20

// WrapPad wraps key with kek by AES key wrap with padding (RFC 5649).
func WrapPad(kek, key []byte) ([]byte, error) {
	block, err := aes.NewCipher(kek)
	if err != nil {
		return nil, fmt.Errorf("key wrap: %w", err)
	}
	if len(key) == 0 || len(key) > maxWrapInput {
		return nil, fmt.Errorf("key wrap: key length %d out of range", len(key))
	}
	var aiv [8]byte
	copy(aiv[:4], aivPrefix[:])
	binary.BigEndian.PutUint32(aiv[4:], uint32(len(key)))
	n := (len(key) + 7) / 8
	padded := make([]byte, n*8)
	copy(padded, key)
	defer wipe(padded)
	if n == 1 {
		out := make([]byte, 16)
		copy(out, aiv[:])
		copy(out[8:], padded)
		block.Encrypt(out, out)
		return out, nil
	}
	return wrap3394(block, aiv, padded), nil
}

// UnwrapPad reverses WrapPad, checking the integrity value and padding.
func UnwrapPad(kek, wrapped []byte) ([]byte, error) {
	block, err := aes.NewCipher(kek)
	if err != nil {
		return nil, fmt.Errorf("key unwrap: %w", err)
	}
	if len(wrapped) < 16 || len(wrapped)%8 != 0 || len(wrapped) > maxWrapInput+8 {
		return nil, fmt.Errorf("key unwrap: wrapped length %d is not a multiple of 8 of at least 16", len(wrapped))
	}
	var aiv [8]byte
	var plain []byte
	if len(wrapped) == 16 {
		buf := make([]byte, 16)
		block.Decrypt(buf, wrapped)
		copy(aiv[:], buf[:8])
		plain = buf[8:]
	} else {
		aiv, plain = unwrap3394(block, wrapped)
	}
	mli := int(binary.BigEndian.Uint32(aiv[4:]))
	n := len(plain)
	ok := subtle.ConstantTimeCompare(aiv[:4], aivPrefix[:]) == 1 && mli > n-8 && mli <= n
	if ok {
		for _, b := range plain[mli:] {
			ok = ok && b == 0
		}
	}
	if !ok {
		wipe(plain)
		return nil, errors.New("key unwrap: integrity check failed (wrong wrapping key or corrupted ciphertext)")
	}
	return plain[:mli], nil
}

// wrap3394 is the RFC 3394 wrapping process with a given initial value.
func wrap3394(block cipher.Block, iv [8]byte, p []byte) []byte {
	n := len(p) / 8
	out := make([]byte, 8+len(p))
	copy(out[8:], p)
	a := iv
	var buf [16]byte
	for j := 0; j < 6; j++ {
		for i := 1; i <= n; i++ {
			copy(buf[:8], a[:])
			copy(buf[8:], out[i*8:i*8+8])
			block.Encrypt(buf[:], buf[:])
			t := uint64(n*j + i)
			binary.BigEndian.PutUint64(a[:], binary.BigEndian.Uint64(buf[:8])^t)
			copy(out[i*8:], buf[8:])
		}
	}
	copy(out[:8], a[:])
	wipe(buf[:])
	return out
}

// unwrap3394 is the RFC 3394 unwrapping process; it returns the recovered
// initial value for the caller to check.
func unwrap3394(block cipher.Block, c []byte) ([8]byte, []byte) {
	n := len(c)/8 - 1
	var a [8]byte
	copy(a[:], c[:8])
	r := make([]byte, n*8)
	copy(r, c[8:])
	var buf [16]byte
	for j := 5; j >= 0; j-- {
		for i := n; i >= 1; i-- {
			t := uint64(n*j + i)
			binary.BigEndian.PutUint64(buf[:8], binary.BigEndian.Uint64(a[:])^t)
			copy(buf[8:], r[(i-1)*8:i*8])
			block.Decrypt(buf[:], buf[:])
			copy(a[:], buf[:8])
			copy(r[(i-1)*8:], buf[8:])
		}
	}
	wipe(buf[:])
	return a, r
}

func wipe(b []byte) {
	for i := range b {
		b[i] = 0
	}
}
