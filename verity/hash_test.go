package verity

import (
	"bytes"
	"crypto/sha256"
	"math/rand/v2"
	"testing"
)

// The paired SHA-256 equals crypto/sha256 for every salt length it takes
// and for block sizes around the padding boundaries.
func TestPairHasherMatchesSHA256(t *testing.T) {
	if !haveSHAx2 {
		t.Skip("no SHA extensions on this CPU: the paired hasher is not used")
	}
	r := rand.New(rand.NewPCG(1, 2))
	for _, size := range []int{64, 512, 1024, 4096} {
		for s := 0; s < 64; s++ {
			salt := make([]byte, s)
			for i := range salt {
				salt[i] = byte(r.Uint32())
			}
			a, b := make([]byte, size), make([]byte, size)
			for i := range a {
				a[i], b[i] = byte(r.Uint32()), byte(r.Uint32())
			}
			ph := newPairHasher(Params{Algorithm: "sha256", Salt: salt})
			da, db := make([]byte, 32), make([]byte, 32)
			ph.pair(a, b, da, db)
			wa := sha256.Sum256(append(append([]byte(nil), salt...), a...))
			wb := sha256.Sum256(append(append([]byte(nil), salt...), b...))
			if !bytes.Equal(da, wa[:]) || !bytes.Equal(db, wb[:]) {
				t.Fatalf("size %d salt %d: paired digests differ from crypto/sha256", size, s)
			}
		}
	}
}

func BenchmarkHashPair(b *testing.B) {
	if !haveSHAx2 {
		b.Skip("no SHA extensions")
	}
	ph := newPairHasher(Params{Algorithm: "sha256", Salt: make([]byte, 32)})
	x, y := make([]byte, 4096), make([]byte, 4096)
	da, db := make([]byte, 32), make([]byte, 32)
	b.SetBytes(2 * 4096)
	for b.Loop() {
		ph.pair(x, y, da, db)
	}
}

func BenchmarkHashSingle(b *testing.B) {
	blk, salt := make([]byte, 4096), make([]byte, 32)
	h := sha256.New()
	var sum []byte
	b.SetBytes(4096)
	for b.Loop() {
		sum = hashBlock(h, salt, blk, sum)
	}
}
