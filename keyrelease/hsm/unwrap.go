package hsm

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"errors"
	"fmt"
	"hash"
	"io"
)

// Wrapping algorithms of Key Vault's release operation ("enc").
const (
	AlgCKMRSAAESKeyWrap = "CKM_RSA_AES_KEY_WRAP" // RSA-OAEP-SHA1 + RFC 5649
	AlgRSAAESKeyWrap256 = "RSA_AES_KEY_WRAP_256" // RSA-OAEP-SHA256 + RFC 5649
	AlgRSAAESKeyWrap384 = "RSA_AES_KEY_WRAP_384" // RSA-OAEP-SHA384 + RFC 5649
)

// Algorithms lists the supported wrapping algorithms.
func Algorithms() []string {
	return []string{AlgCKMRSAAESKeyWrap, AlgRSAAESKeyWrap256, AlgRSAAESKeyWrap384}
}

// ErrUnknownAlgorithm is returned for a wrap algorithm outside Algorithms.
var ErrUnknownAlgorithm = errors.New("unknown key wrap algorithm")

// CheckAlgorithm reports whether alg ("" means CKM_RSA_AES_KEY_WRAP) is a
// supported wrapping algorithm.
func CheckAlgorithm(alg string) error {
	if alg == "" {
		return nil
	}
	_, err := oaepHash(alg)
	return err
}

func oaepHash(alg string) (func() hash.Hash, error) {
	switch alg {
	case AlgCKMRSAAESKeyWrap:
		return sha1.New, nil
	case AlgRSAAESKeyWrap256:
		return sha256.New, nil
	case AlgRSAAESKeyWrap384:
		return sha512.New384, nil
	}
	return nil, fmt.Errorf("%w %q (use one of %v)", ErrUnknownAlgorithm, alg, Algorithms())
}

// UnwrapKeyHSM decrypts a key_hsm ciphertext: the first modulus-size bytes
// are RSA-OAEP (hash chosen by alg) of an ephemeral AES-256 key; the rest is
// the key material wrapped with it by RFC 5649.
func UnwrapKeyHSM(ciphertext []byte, wrapping *rsa.PrivateKey, alg string) ([]byte, error) {
	h, err := oaepHash(alg)
	if err != nil {
		return nil, err
	}
	if wrapping == nil {
		return nil, errors.New("unwrap: no wrapping key")
	}
	k := wrapping.Size()
	if len(ciphertext) < k+16 {
		return nil, fmt.Errorf("unwrap: ciphertext is %d bytes, want at least %d (RSA-%d block plus wrapped key)", len(ciphertext), k+16, k*8)
	}
	kek, err := rsa.DecryptOAEP(h(), nil, wrapping, ciphertext[:k], nil)
	if err != nil {
		return nil, fmt.Errorf("unwrap: RSA-OAEP decryption with %s failed (was the key wrapped to this VM's runtime key?)", alg)
	}
	defer wipe(kek)
	if len(kek) != 32 {
		return nil, fmt.Errorf("unwrap: transport key is %d bytes, want 32 (AES-256)", len(kek))
	}
	return UnwrapPad(kek, ciphertext[k:])
}

// WrapKeyHSM is the service side of UnwrapKeyHSM: it wraps material to pub.
// rnd may be nil for crypto/rand.
func WrapKeyHSM(rnd io.Reader, material []byte, pub *rsa.PublicKey, alg string) ([]byte, error) {
	h, err := oaepHash(alg)
	if err != nil {
		return nil, err
	}
	if rnd == nil {
		rnd = rand.Reader
	}
	kek := make([]byte, 32)
	defer wipe(kek)
	if _, err := io.ReadFull(rnd, kek); err != nil {
		return nil, fmt.Errorf("wrap: random transport key: %w", err)
	}
	head, err := rsa.EncryptOAEP(h(), rnd, pub, kek, nil)
	if err != nil {
		return nil, fmt.Errorf("wrap: RSA-OAEP: %w", err)
	}
	body, err := WrapPad(kek, material)
	if err != nil {
		return nil, err
	}
	return append(head, body...), nil
}
