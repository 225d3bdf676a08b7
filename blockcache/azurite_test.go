package blockcache

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob"
	azblobblob "github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"

	"github.com/blobseal/blobseal/blob"
	"github.com/blobseal/blobseal/internal/testenv"
)

// azuriteSource is a minimal ranged-GET blob.Source over azblob for the
// Azurite benchmark (package blob's real source is written elsewhere).
type azuriteSource struct {
	client          *azblob.Client
	container, name string
	size            int64
}

var _ blob.Source = (*azuriteSource)(nil)

func (s *azuriteSource) Size() int64    { return s.size }
func (s *azuriteSource) String() string { return "azurite:" + s.container + "/" + s.name }

func (s *azuriteSource) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	n := min(int64(len(p)), s.size-off)
	if n <= 0 {
		return 0, io.EOF
	}
	resp, err := s.client.DownloadStream(ctx, s.container, s.name, &azblob.DownloadStreamOptions{
		Range: azblobblob.HTTPRange{Offset: off, Count: n},
	})
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	got, err := io.ReadFull(resp.Body, p[:n])
	if err != nil {
		return got, err
	}
	if n < int64(len(p)) {
		return got, io.EOF
	}
	return got, nil
}

// patternReader streams the virtual pattern for the upload.
type patternReader struct{ off, size int64 }

func (r *patternReader) Read(p []byte) (int, error) {
	if r.off >= r.size {
		return 0, io.EOF
	}
	p = p[:min(int64(len(p)), r.size-r.off)]
	pattern(p, r.off)
	r.off += int64(len(p))
	return len(p), nil
}

// azuriteBlobSize is BLOCKCACHE_AZURITE_MIB MiB (default 1024).
func azuriteBlobSize(b *testing.B) int64 {
	size := int64(1024) << 20
	if v := os.Getenv("BLOCKCACHE_AZURITE_MIB"); v != "" {
		mib, err := strconv.Atoi(v)
		if err != nil || mib <= 0 {
			b.Fatalf("BLOCKCACHE_AZURITE_MIB=%q: want a positive number of MiB", v)
		}
		size = int64(mib) << 20
	}
	return size
}

// azuriteBlob starts Azurite and uploads a block blob of size pattern bytes.
func azuriteBlob(b testing.TB, size int64) *azuriteSource {
	b.Helper()
	az := testenv.StartAzurite(b)
	client, err := azblob.NewClientFromConnectionString(az.ConnectionString(), nil)
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	if _, err := client.CreateContainer(ctx, "bench", nil); err != nil {
		b.Fatal(err)
	}
	if _, err := client.UploadStream(ctx, "bench", "image", &patternReader{size: size},
		&azblob.UploadStreamOptions{BlockSize: 16 << 20, Concurrency: 4}); err != nil {
		b.Fatal(err)
	}
	return &azuriteSource{client: client, container: "bench", name: "image", size: size}
}

// BenchmarkAzuriteRandom4K: 16 goroutines read random 4 KiB sectors of the
// blob through the cache (default options); reports p50/p99 and IOPS.
func BenchmarkAzuriteRandom4K(b *testing.B) {
	size := azuriteBlobSize(b)
	src := azuriteBlob(b, size)
	c, err := New(src, Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	b.ResetTimer()
	randomReads(b, c, size, 16)
}

// BenchmarkAzuriteSequential compares a sequential 128 KiB reader through the
// cache with raw SDK ranged downloads (4 and 16 MiB ranges, 1/2/4/16 in
// flight) of the same block blob in a real Azurite. The blob size is
// BLOCKCACHE_AZURITE_MIB (default 1024).
func BenchmarkAzuriteSequential(b *testing.B) {
	size := azuriteBlobSize(b)
	src := azuriteBlob(b, size)
	ctx := context.Background()
	for _, rangeSize := range []int64{4 << 20, 16 << 20} {
		for _, inFlight := range []int{1, 2, 4, 16} {
			b.Run(fmt.Sprintf("raw-%dMiBx%d", rangeSize>>20, inFlight), func(b *testing.B) {
				b.SetBytes(size)
				for b.Loop() {
					var next atomic.Int64
					var wg sync.WaitGroup
					for range inFlight {
						wg.Add(1)
						go func() {
							defer wg.Done()
							buf := make([]byte, rangeSize)
							for {
								off := next.Add(rangeSize) - rangeSize
								if off >= size {
									return
								}
								if _, err := src.ReadAt(ctx, buf, off); err != nil && err != io.EOF {
									b.Error(err)
									return
								}
							}
						}()
					}
					wg.Wait()
				}
			})
		}
	}
	for _, cfg := range []struct {
		name string
		o    Options
	}{{"cache", Options{}}, {"cache-32MiBx128MiB", Options{MaxFetchSize: 32 << 20, MaxReadAhead: 128 << 20}}} {
		benchAzuriteCache(b, src, size, cfg.name, cfg.o)
	}
}

func benchAzuriteCache(b *testing.B, src blob.Source, size int64, name string, o Options) {
	b.Run(name, func(b *testing.B) {
		b.SetBytes(size)
		var st Stats
		for b.Loop() {
			c, err := New(src, o)
			if err != nil {
				b.Fatal(err)
			}
			// Bytes are not compared here (the tests do that): the CPU it
			// costs would be taken from Azurite on the same cores.
			p := make([]byte, 128<<10)
			for off := int64(0); off < size; off += int64(len(p)) {
				if _, err := c.ReadAt(p, off); err != nil && err != io.EOF {
					b.Fatal(err)
				}
			}
			st = c.Stats()
			c.Close()
		}
		b.ReportMetric(float64(st.Requests), "requests")
	})

}

// TestAzuriteBlockBlob reads a block blob in a real Azurite through the
// cache from sequential and random readers and checks every byte.
func TestAzuriteBlockBlob(t *testing.T) {
	checkNoLeak(t)
	const size = 24<<20 + 4096*3 + 100 // odd tail
	src := azuriteBlob(t, size)
	c := newCache(t, src, Options{MemoryBytes: 8 << 20, MaxFetchSize: 2 << 20})
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := make([]byte, 128<<10)
			want := make([]byte, len(p))
			for i := range 48 {
				off := int64(g)*(6<<20) + int64(i)*int64(len(p))
				if g == 3 && i%2 == 1 { // this one jumps around
					off = int64(i) * 511 * 1023
				}
				n, err := c.ReadAt(p, off)
				if err != nil && !(err == io.EOF && off+int64(len(p)) > size) {
					t.Errorf("ReadAt(%d): %v", off, err)
					return
				}
				pattern(want[:n], off)
				if !bytes.Equal(p[:n], want[:n]) {
					t.Errorf("wrong bytes at %d", off)
					return
				}
			}
		}()
	}
	wg.Wait()
	tail := make([]byte, 1000)
	if n, err := c.ReadAt(tail, size-100); n != 100 || err != io.EOF {
		t.Errorf("read across the end: %d, %v; want 100, EOF", n, err)
	}
	if st := c.Stats(); st.PeakMemoryBytes > st.MemoryLimit || st.Requests == 0 {
		t.Errorf("stats %+v", st)
	}
}
