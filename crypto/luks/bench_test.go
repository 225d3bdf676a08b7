package luks

import "testing"

// BenchmarkReadHeader measures parsing and checksumming both header copies.
func BenchmarkReadHeader(b *testing.B) {
	img, _ := formatMem(b, FormatOptions{})
	b.ResetTimer()
	for b.Loop() {
		if _, err := ReadHeader(img, int64(len(img.b))); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkUnlock shows the start-up cost of each keyslot KDF: blobseal's
// default (pbkdf2-sha256, 1000 iterations) against argon2id.
func BenchmarkUnlock(b *testing.B) {
	for _, bc := range []struct {
		name string
		opts FormatOptions
	}{
		{"pbkdf2-sha256-1000", FormatOptions{}},
		{"argon2id-t4-64MiB-4threads", FormatOptions{PBKDF: "argon2id"}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			img, _ := formatMem(b, bc.opts)
			h, err := ReadHeader(img, int64(len(img.b)))
			if err != nil {
				b.Fatal(err)
			}
			b.ResetTimer()
			for b.Loop() {
				u, err := h.Unlock(img, testPassphrase, Policy{})
				if err != nil {
					b.Fatal(err)
				}
				u.Wipe()
			}
		})
	}
}
