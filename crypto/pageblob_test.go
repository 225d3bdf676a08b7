package crypto

import (
	"bytes"
	"context"
	"crypto/aes"
	"errors"
	mrand "math/rand/v2"
	"sync"
	"testing"
	"time"

	xxts "golang.org/x/crypto/xts"

	"github.com/blobseal/blobseal/blob"
	"github.com/blobseal/blobseal/blockcache"
	"github.com/blobseal/blobseal/internal/testenv"
)

// TestWriteThroughPageBlob writes plaintext through Volume → WriteBack →
// PageWriter into a sparse LUKS2 image on an Azurite page blob: into data,
// into never-written holes, and across partial sectors. A fresh cold open
// reads the writes back, and an independent decryption of the downloaded
// blob (x/crypto XTS with the volume key) agrees sector by sector.
func TestWriteThroughPageBlob(t *testing.T) {
	az := testenv.StartAzurite(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const size = 8 << 20
	model := make([]byte, size)
	copy(model, randomBytes(1<<20))           // data, then a hole
	copy(model[6<<20:], randomBytes(512<<10)) // an island
	pass := []byte("passphrase bytes")
	f, _ := createImageFile(t, model, pass, FormatOptions{Iterations: 1000})
	url := az.Endpoint() + "/img/w.img"
	bo := blob.Options{ConnectionString: az.ConnectionString(), RetryDelay: 20 * time.Millisecond}
	if _, err := blob.Upload(ctx, f.Name(), url, blob.UploadOptions{Options: bo, Type: "page", CreateContainer: true}); err != nil {
		t.Fatal(err)
	}

	openCache := func() (*blockcache.Cache, blob.Source) {
		src, err := blob.Open(ctx, url, bo)
		if err != nil {
			t.Fatal(err)
		}
		c, err := blockcache.New(src, blockcache.Options{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		return c, src
	}
	c, src := openCache()
	pw, err := blob.NewPageWriter(ctx, src, blob.WriterOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer pw.Close(context.Background())
	wb, err := blockcache.NewWriteBack(c, pw, blockcache.WriteBackOptions{FlushInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	vol, err := OpenContext(ctx, wb, src.Size(), pass, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !vol.Info().ZeroSectors {
		t.Fatal("the sparse image is not read as sparse")
	}
	writes := []struct {
		off int64
		n   int
	}{
		{100, 5000},              // partial sectors in data
		{3 << 20, 64 << 10},      // whole sectors in a never-written hole
		{5<<20 + 4000, 300},      // a partial sector in a hole
		{6<<20 - 8192, 16 << 10}, // across the island's edge
		{size - 4096, 4096},      // the last sector
	}
	for _, x := range writes {
		p := randomBytes(x.n)
		if _, err := vol.WriteAtContext(ctx, p, x.off); err != nil {
			t.Fatalf("write at %d: %v", x.off, err)
		}
		copy(model[x.off:], p)
	}
	got := make([]byte, size)
	if _, err := vol.ReadAtContext(ctx, got, 0); err != nil || !bytes.Equal(got, model) {
		t.Fatalf("reads before the flush differ from the writes (err %v)", err)
	}
	if err := wb.Close(ctx); err != nil {
		t.Fatal(err)
	}

	// A fresh, cold open reads the writes.
	c2, src2 := openCache()
	vol2, err := OpenContext(ctx, c2, src2.Size(), pass, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	clear(got)
	if _, err := vol2.ReadAtContext(ctx, got, 0); err != nil || !bytes.Equal(got, model) {
		t.Fatalf("a cold open reads other plaintext than was written (err %v)", err)
	}

	// Independently: download the raw blob and decrypt it with x/crypto.
	raw := make([]byte, src2.Size())
	if _, err := src2.ReadAt(ctx, raw, 0); err != nil {
		t.Fatal(err)
	}
	key := dumpKeyViaOpen(t, raw, pass)
	ref, err := xxts.NewCipher(aes.NewCipher, key)
	if err != nil {
		t.Fatal(err)
	}
	info := vol2.Info()
	ss := info.SectorSize
	sector := make([]byte, ss)
	written := 0
	for off := 0; off < size; off += ss {
		ct := raw[info.DataOffset+int64(off) : info.DataOffset+int64(off+ss)]
		if isZero(ct) {
			if !isZero(model[off : off+ss]) {
				t.Fatalf("sector at %d was never stored but should hold data", off)
			}
			continue
		}
		written++
		ref.Decrypt(sector, ct, uint64(off/512))
		if !bytes.Equal(sector, model[off:off+ss]) {
			t.Fatalf("x/crypto XTS decrypts the sector at plaintext offset %d to other bytes", off)
		}
	}
	if written < (1<<20+512<<10+64<<10)/ss {
		t.Fatalf("only %d sectors stored", written)
	}
}

// TestConcurrentVolumeWrites runs writers (partial sectors included) and
// readers through one Volume over a WriteBack with a small dirty bound and
// a 10ms background flush (run with -race): each writer reads its write
// back at once, and after Close a cold open reads the model.
func TestConcurrentVolumeWrites(t *testing.T) {
	az := testenv.StartAzurite(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const size = 4 << 20
	model := make([]byte, size)
	copy(model, randomBytes(size/2))
	pass := []byte("passphrase bytes")
	f, _ := createImageFile(t, model, pass, FormatOptions{Iterations: 1000})
	url := az.Endpoint() + "/img/c.img"
	bo := blob.Options{ConnectionString: az.ConnectionString(), RetryDelay: 20 * time.Millisecond}
	if _, err := blob.Upload(ctx, f.Name(), url, blob.UploadOptions{Options: bo, Type: "page", CreateContainer: true}); err != nil {
		t.Fatal(err)
	}
	src, err := blob.Open(ctx, url, bo)
	if err != nil {
		t.Fatal(err)
	}
	c, err := blockcache.New(src, blockcache.Options{BlockSize: 16 << 10, MemoryBytes: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	pw, err := blob.NewPageWriter(ctx, src, blob.WriterOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer pw.Close(context.Background())
	wb, err := blockcache.NewWriteBack(c, pw, blockcache.WriteBackOptions{DirtyBytes: 128 << 10, FlushInterval: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	vol, err := OpenContext(ctx, wb, src.Size(), pass, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	const writers, region = 4, size / 4
	var mu sync.Mutex // guards model
	var wg sync.WaitGroup
	errs := make(chan error, writers+2)
	for g := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := mrand.New(mrand.NewPCG(uint64(g), 9))
			for range 30 {
				n := 1 + r.IntN(20000)
				off := int64(g*region + r.IntN(region-n))
				p := randomBytes(n)
				if _, err := vol.WriteAtContext(ctx, p, off); err != nil {
					errs <- err
					return
				}
				mu.Lock()
				copy(model[off:], p)
				mu.Unlock()
				got := make([]byte, n)
				if _, err := vol.ReadAtContext(ctx, got, off); err != nil || !bytes.Equal(got, p) {
					errs <- errors.New("a read after a write through the volume did not return it")
					return
				}
			}
		}()
	}
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 128<<10)
			for i := range 32 {
				if _, err := vol.ReadAtContext(ctx, buf, int64(i)*(128<<10)); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if err := wb.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if st := wb.Stats(); st.PeakDirtyBytes > 128<<10 || st.Flushes < 2 {
		t.Fatalf("write-back stats %+v: want the dirty bound kept and several flushes", st)
	}
	src2, err := blob.Open(ctx, url, bo)
	if err != nil {
		t.Fatal(err)
	}
	c2, err := blockcache.New(src2, blockcache.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	vol2, err := OpenContext(ctx, c2, src2.Size(), pass, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, size)
	if _, err := vol2.ReadAtContext(ctx, got, 0); err != nil || !bytes.Equal(got, model) {
		t.Fatalf("a cold open after concurrent writes reads other plaintext (err %v)", err)
	}
}
