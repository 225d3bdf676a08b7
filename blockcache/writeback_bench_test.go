package blockcache

import (
	"bytes"
	"context"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/streaming"
	azblobblob "github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/pageblob"

	"github.com/blobseal/blobseal/blob"
)

// BenchmarkSequentialWrite writes BLOCKCACHE_WRITE_MIB MiB (default 256)
// sequentially in 1 MiB calls through WriteBack over a leased PageWriter,
// with a final Flush, and uploads the same bytes with raw parallel Put Page
// calls (4 MiB each, 8 in flight, the SDK directly) to Azurite; it reports
// MB/s of both and their ratio (goal ≥ 0.8).
func BenchmarkSequentialWrite(b *testing.B) {
	size := int64(256) << 20
	if v := os.Getenv("BLOCKCACHE_WRITE_MIB"); v != "" {
		mib, err := strconv.Atoi(v)
		if err != nil || mib <= 0 {
			b.Fatalf("BLOCKCACHE_WRITE_MIB=%q: want a positive number of MiB", v)
		}
		size = int64(mib) << 20
	}
	az := newPageBlobStore(b)
	data := randomPattern(5, int(size))
	ctx := context.Background()

	var rawSecs, wbSecs float64
	for i := 0; i < b.N; i++ {
		pbRaw := az.createEmpty(b, "raw.img", size)
		start := time.Now()
		var wg sync.WaitGroup
		sem := make(chan struct{}, blob.DefaultMaxPutsInFlight)
		errs := make(chan error, 1)
		for off := int64(0); off < size; off += blob.MaxPutPages {
			sem <- struct{}{}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				end := min(off+blob.MaxPutPages, size)
				if _, err := pbRaw.UploadPages(ctx, streaming.NopCloser(bytes.NewReader(data[off:end])), azblobblob.HTTPRange{Offset: off, Count: end - off}, nil); err != nil {
					select {
					case errs <- err:
					default:
					}
				}
			}()
		}
		wg.Wait()
		rawSecs += time.Since(start).Seconds()
		select {
		case err := <-errs:
			b.Fatal(err)
		default:
		}

		az.createEmpty(b, "wb.img", size)
		src, err := blob.Open(ctx, az.url("wb.img"), az.blobOpts())
		if err != nil {
			b.Fatal(err)
		}
		pw, err := blob.NewPageWriter(ctx, src, blob.WriterOptions{})
		if err != nil {
			b.Fatal(err)
		}
		c, err := New(src, Options{})
		if err != nil {
			b.Fatal(err)
		}
		wb, err := NewWriteBack(c, pw, WriteBackOptions{})
		if err != nil {
			b.Fatal(err)
		}
		start = time.Now()
		for off := int64(0); off < size; off += 1 << 20 {
			if _, err := wb.WriteAt(data[off:off+1<<20], off); err != nil {
				b.Fatal(err)
			}
		}
		if err := wb.Flush(ctx); err != nil {
			b.Fatal(err)
		}
		wbSecs += time.Since(start).Seconds()
		_ = wb.Close(ctx)
		_ = c.Close()
		_ = pw.Close(ctx)
	}
	mb := float64(size) / 1e6 * float64(b.N)
	b.ReportMetric(mb/rawSecs, "raw-MB/s")
	b.ReportMetric(mb/wbSecs, "writeback-MB/s")
	b.ReportMetric(rawSecs/wbSecs, "ratio")
	b.Logf("%d MiB: raw parallel Put Page %.0f MB/s, write-back with final Flush %.0f MB/s, ratio %.2f", size>>20, mb/rawSecs, mb/wbSecs, rawSecs/wbSecs)
}

// createEmpty creates a never-written page blob.
func (s *pageBlobStore) createEmpty(b *testing.B, name string, size int64) *pageblob.Client {
	b.Helper()
	pb, err := pageblob.NewClientFromConnectionString(s.az.ConnectionString(), "img", name, nil)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := pb.Create(context.Background(), size, nil); err != nil {
		b.Fatal(err)
	}
	return pb
}
