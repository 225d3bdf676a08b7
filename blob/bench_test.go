package blob

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// BenchmarkDownload measures the plain parallel ranged download that the
// mount is compared with: a 64 MiB block blob read by RawDownload through
// Azurite with several range sizes, 16 requests in flight.
func BenchmarkDownload(b *testing.B) {
	s := newStore(b)
	const size = 64 << 20
	img := sparseImage(21, size)
	path := filepath.Join(b.TempDir(), "bench.img")
	if err := os.WriteFile(path, img, 0o600); err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	loc := s.url("img", "bench.img")
	if _, err := Upload(ctx, path, loc, UploadOptions{Options: s.opts(), Type: "block", BlockSize: 16 << 20}); err != nil {
		b.Fatal(err)
	}
	src, err := Open(ctx, loc, s.opts())
	if err != nil {
		b.Fatal(err)
	}
	for _, rs := range []int64{1 << 20, 4 << 20, 16 << 20} {
		b.Run(fmt.Sprintf("range=%dMiB/inflight=16", rs>>20), func(b *testing.B) {
			b.SetBytes(size)
			b.ReportAllocs()
			for i := 0; i < b.N; i++ {
				res, err := RawDownload(ctx, src, rs, 16)
				if err != nil {
					b.Fatal(err)
				}
				if res.Bytes != size {
					b.Fatalf("downloaded %d bytes, want %d", res.Bytes, size)
				}
			}
		})
	}
}
