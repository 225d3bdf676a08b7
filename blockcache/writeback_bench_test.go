package blockcache

import (
	"bytes"
	"context"
	"math/rand/v2"
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

// BenchmarkRandomReadWriteFlush is a database-like mix against Azurite:
// each op writes 4 KiB at a random page of the warmed first half, flushes
// every 8 writes (a commit), and reads back 4 KiB that an earlier op wrote.
// It reports the storage reads per op: before issue 14 every flush dropped
// what it uploaded, and the reads fetched it again.
func BenchmarkRandomReadWriteFlush(b *testing.B) {
	s := newPageBlobStore(b)
	const size = 16 << 20
	s.create("rw.img", size)
	src, err := blob.Open(wbCtx(b), s.url("rw.img"), s.blobOpts())
	if err != nil {
		b.Fatal(err)
	}
	pw, err := blob.NewPageWriter(wbCtx(b), src, blob.WriterOptions{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = pw.Close(context.Background()) })
	c, err := New(src, Options{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = c.Close() })
	wb, err := NewWriteBack(c, pw, WriteBackOptions{FlushInterval: -1})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = wb.Close(context.Background()) })
	ctx := wbCtx(b)
	buf := make([]byte, size/2)
	if _, err := wb.ReadAtContext(ctx, buf, 0); err != nil { // warm
		b.Fatal(err)
	}
	r := rand.New(rand.NewPCG(1, 2))
	page, p := make([]byte, 4096), make([]byte, 4096)
	var written []int64
	before := c.Stats().Requests
	b.ResetTimer()
	for i := range b.N {
		off := r.Int64N(size/2/4096) * 4096
		page[0] = byte(i)
		if _, err := wb.WriteAtContext(ctx, page, off); err != nil {
			b.Fatal(err)
		}
		written = append(written, off)
		if i%8 == 7 {
			if err := wb.Flush(ctx); err != nil {
				b.Fatal(err)
			}
		}
		if _, err := wb.ReadAtContext(ctx, p, written[r.IntN(len(written))]); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(c.Stats().Requests-before)/float64(b.N), "reads/op")
}
