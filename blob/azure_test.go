package blob

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/pageblob"
)

// TestPageRangesAndHoles checks that Get Page Ranges results are merged and
// that holes are served locally without a request.
func TestPageRangesAndHoles(t *testing.T) {
	s := newStore(t)
	const mib = 1 << 20
	img := make([]byte, 6*mib)
	fill := func(off, n int, seed byte) {
		for i := off; i < off+n; i++ {
			img[i] = byte(i) ^ seed
		}
	}
	fill(0, mib, 1)          // data
	fill(3*mib, mib, 2)      // data after a 2 MiB hole
	fill(4*mib+8192, mib, 3) // data after an 8 KiB hole (fetched with the data)
	s.putPage("img", "sparse.img", img)

	// Azurite really returns the adjacent Put Page ranges unmerged.
	pb, err := pageblob.NewClientFromConnectionString(s.az.ConnectionString(), "img", "sparse.img", nil)
	if err != nil {
		t.Fatal(err)
	}
	raw := 0
	for pager := pb.NewGetPageRangesPager(nil); pager.More(); {
		page, err := pager.NextPage(testCtx(t))
		if err != nil {
			t.Fatal(err)
		}
		raw += len(page.PageRange)
	}
	if raw <= 3 {
		t.Fatalf("Azurite returned %d page ranges; the test needs unmerged ones", raw)
	}

	hc, counter := newCountingClient()
	o := s.opts()
	o.HTTPClient = hc
	src, err := Open(testCtx(t), s.url("img", "sparse.img"), o)
	if err != nil {
		t.Fatal(err)
	}
	rs, err := src.(RangeLister).WrittenRanges(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	want := []Range{{0, mib}, {3 * mib, mib}, {4*mib + 8192, mib}}
	if len(rs) != len(want) {
		t.Fatalf("WrittenRanges = %v, want %v (merged from %d raw ranges)", rs, want, raw)
	}
	for i := range rs {
		if rs[i] != want[i] {
			t.Fatalf("WrittenRanges = %v, want %v", rs, want)
		}
	}

	read := func(off, n int) int64 {
		t.Helper()
		before := counter.gets.Load()
		p := bytes.Repeat([]byte{0xEE}, n)
		if _, err := src.ReadAt(testCtx(t), p, int64(off)); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(p, img[off:off+n]) {
			t.Fatalf("read [%d,+%d) differs", off, n)
		}
		return counter.gets.Load() - before
	}
	if n := read(mib+100, 2*mib-100); n != 0 {
		t.Errorf("reading a hole made %d GET requests, want 0", n)
	}
	if n := read(0, 4*mib); n != 2 {
		t.Errorf("reading data+hole+data made %d GETs, want 2 (one per written run)", n)
	}
	if n := read(3*mib, 2*mib+8192); n != 1 {
		t.Errorf("reading across an 8 KiB hole made %d GETs, want 1 (short holes are fetched)", n)
	}
}

func TestPageBlobWriteAt(t *testing.T) {
	s := newStore(t)
	img := make([]byte, 1<<20)
	copy(img, bytes.Repeat([]byte("abc"), 1000))
	s.putPage("img", "rw.img", img)
	src, err := Open(testCtx(t), s.url("img", "rw.img"), s.opts())
	if err != nil {
		t.Fatal(err)
	}
	w := src.(WriterAt)
	if _, err := w.WriteAt(testCtx(t), make([]byte, 100), 512); err == nil || !strings.Contains(err.Error(), "multiples of 512") {
		t.Fatalf("unaligned write: err = %v", err)
	}
	if _, err := w.WriteAt(testCtx(t), make([]byte, 1024), 1<<20); err == nil {
		t.Fatal("write past the end succeeded")
	}
	before := src.(Versioned).Version()
	data := bytes.Repeat([]byte{7}, 5<<20/4) // crosses no limit but is many pages
	data = data[:len(data)/PageSize*PageSize]
	data = data[:min(len(data), 600<<10)]
	off := int64(256 << 10)
	if _, err := w.WriteAt(testCtx(t), data, off); err != nil {
		t.Fatal(err)
	}
	copy(img[off:], data)
	if src.(Versioned).Version() == before {
		t.Error("Version did not change after a write")
	}
	got := make([]byte, len(img))
	if _, err := src.ReadAt(testCtx(t), got, 0); err != nil || !bytes.Equal(got, img) {
		t.Fatalf("read after write: %v, equal=%v", err, bytes.Equal(got, img))
	}
	rs, _ := src.(RangeLister).WrittenRanges(testCtx(t))
	found := false
	for _, r := range rs {
		found = found || (r.Off <= off && r.End() >= off+int64(len(data)))
	}
	if !found {
		t.Fatalf("WrittenRanges %v does not cover the write at %d", rs, off)
	}
	// A fresh Open sees the same bytes.
	src2, err := Open(testCtx(t), s.url("img", "rw.img"), s.opts())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := src2.ReadAt(testCtx(t), got, 0); err != nil || !bytes.Equal(got, img) {
		t.Fatalf("reopen after write: %v", err)
	}
}

// TestAzuriteRestart stops the storage server while 16 readers run and
// starts it again: every read must finish with the right bytes.
func TestAzuriteRestart(t *testing.T) {
	s := newStore(t)
	want := sparseImage(5, 2<<20)
	s.putBlock("img", "b.img", want)
	o := s.opts()
	o.MaxRetries, o.RetryDelay, o.MaxRetryDelay, o.RequestTimeout = 30, 50*time.Millisecond, 400*time.Millisecond, 5*time.Second
	src, err := Open(testCtx(t), s.url("img", "b.img"), o)
	if err != nil {
		t.Fatal(err)
	}
	ctx := testCtx(t)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	var reads [16]int
	for g := 0; g < 16; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			p := make([]byte, 128<<10)
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				off := int64((g*7 + i*13) % 15 * (128 << 10))
				if _, err := src.ReadAt(ctx, p, off); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(p, want[off:off+int64(len(p))]) {
					errs <- errors.New("wrong bytes after restart")
					return
				}
				reads[g]++
			}
		}(g)
	}
	// Azurite saves its metadata every 5 s and Stop kills it; let it save.
	time.Sleep(5500 * time.Millisecond)
	s.az.Stop()
	time.Sleep(1500 * time.Millisecond)
	if err := s.az.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(700 * time.Millisecond)
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if r := src.(*RetrySource).Retries(); r == 0 {
		t.Fatal("no retries recorded: the outage did not hit the readers")
	}
	t.Logf("retries during the outage: %d", src.(*RetrySource).Retries())

	// With the server down and a deadline, reads fail clearly in time.
	s.az.Stop()
	dctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	start := time.Now()
	_, err = src.ReadAt(dctx, make([]byte, 4096), 0)
	if err == nil || !strings.Contains(err.Error(), "gave up") || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("read with server down: %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("read gave up after %s, deadline was 1s", d)
	}
	t.Logf("server down: %v", err)
}
