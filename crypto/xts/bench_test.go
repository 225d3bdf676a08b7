package xts

import (
	"crypto/aes"
	"testing"

	xxts "golang.org/x/crypto/xts"
)

// benchSectors is how many 4 KiB sectors each benchmark iteration handles:
// one, the size of a typical FUSE read.
const benchSectors = 1

func BenchmarkDecrypt4K(b *testing.B) { benchImpls(b, true, 4096, benchSectors) }
func BenchmarkEncrypt4K(b *testing.B) { benchImpls(b, false, 4096, benchSectors) }

// BenchmarkDecrypt512 decrypts 4 KiB as eight 512-byte sectors (cryptsetup's
// sector size when the device does not report 4K), where the per-sector
// tweak set-up weighs more.
func BenchmarkDecrypt512(b *testing.B) { benchImpls(b, true, 512, 8) }

// BenchmarkDecrypt8M measures an 8 MiB run (2048 sectors) serially and with
// DecryptParallel. The buffer is larger than a core's L2 so that the
// parallel run is not penalised for moving a cache-resident buffer between
// cores, which a fresh download would not be.
func BenchmarkDecrypt8M(b *testing.B) {
	key := benchKey()
	c, err := New(key, 4096)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 8<<20)
	b.Run("serial", func(b *testing.B) {
		b.SetBytes(int64(len(buf)))
		for b.Loop() {
			if err := c.Decrypt(buf, buf, 8, 8); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("parallel", func(b *testing.B) {
		b.SetBytes(int64(len(buf)))
		for b.Loop() {
			if err := c.DecryptParallel(buf, buf, 8, 8); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func benchKey() []byte {
	key := make([]byte, 64)
	for i := range key {
		key[i] = byte(i*7 + 1)
	}
	return key
}

func benchImpls(b *testing.B, decrypt bool, sectorSize, sectors int) {
	key := benchKey()
	buf := make([]byte, sectors*sectorSize)
	for _, im := range []impl{implVAES, implVAESYMM, implAESNI, implGeneric} {
		b.Run(im.String(), func(b *testing.B) {
			if !im.available() {
				b.Skipf("%v not available on this CPU/build", im)
			}
			c, err := newWithImpl(key, sectorSize, im)
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			b.SetBytes(int64(len(buf)))
			for b.Loop() {
				var err error
				if decrypt {
					err = c.Decrypt(buf, buf, 8, 8)
				} else {
					err = c.Encrypt(buf, buf, 8, 8)
				}
				if err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	b.Run("xcrypto", func(b *testing.B) {
		ref, err := xxts.NewCipher(aes.NewCipher, key)
		if err != nil {
			b.Fatal(err)
		}
		b.SetBytes(int64(len(buf)))
		for b.Loop() {
			for off := 0; off < len(buf); off += sectorSize {
				if decrypt {
					ref.Decrypt(buf[off:off+sectorSize], buf[off:off+sectorSize], uint64(off/512))
				} else {
					ref.Encrypt(buf[off:off+sectorSize], buf[off:off+sectorSize], uint64(off/512))
				}
			}
		}
	})
}
