package hsm

import (
	"crypto/rand"
	"crypto/rsa"
	"testing"
)

func BenchmarkUnwrapKeyHSM(b *testing.B) {
	wrapping, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		b.Fatal(err)
	}
	material := make([]byte, 32)
	ct, err := WrapKeyHSM(nil, material, &wrapping.PublicKey, AlgRSAAESKeyWrap256)
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if _, err := UnwrapKeyHSM(ct, wrapping, AlgRSAAESKeyWrap256); err != nil {
			b.Fatal(err)
		}
	}
}
