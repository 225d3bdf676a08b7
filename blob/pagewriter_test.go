package blob

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/streaming"
	azblobblob "github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/lease"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/pageblob"
)

func randomBytes(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed+1))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func (s *store) pageClient(name string) *pageblob.Client {
	s.t.Helper()
	pb, err := pageblob.NewClientFromConnectionString(s.az.ConnectionString(), "img", name, nil)
	if err != nil {
		s.t.Fatal(err)
	}
	return pb
}

func openWriter(t *testing.T, s *store, url string, lo LeaseOptions) (Source, *PageWriter) {
	t.Helper()
	o := s.opts()
	o.MaxRetries = 20
	src, err := Open(testCtx(t), url, o)
	if err != nil {
		t.Fatal(err)
	}
	w, err := NewPageWriter(testCtx(t), src, WriterOptions{Lease: lo})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = w.Close(context.Background()) })
	return src, w
}

// TestPageWriterWritesBatches writes a batch of adjacent, separate and
// large writes, into data and into never-written pages, and reads it back
// through the same Source and through a fresh open.
func TestPageWriterWritesBatches(t *testing.T) {
	s := newStore(t)
	const size = 16 << 20
	want := sparseImage(3, size)
	s.putPage("img", "w.img", want)
	src, w := openWriter(t, s, s.url("img", "w.img"), LeaseOptions{})

	var writes []PageWrite
	// 16 adjacent 64 KiB writes: one Put Page.
	for i := 0; i < 16; i++ {
		writes = append(writes, PageWrite{Off: 1<<20 + int64(i)<<16, Data: randomBytes(uint64(i), 64<<10)})
	}
	// A lone page and a 9 MiB run (three puts of at most 4 MiB).
	writes = append(writes, PageWrite{Off: 3 << 20, Data: randomBytes(100, 512)})
	writes = append(writes, PageWrite{Off: 4 << 20, Data: randomBytes(101, 9<<20)})
	// An all-zero run: Clear Page.
	writes = append(writes, PageWrite{Off: 14 << 20, Data: make([]byte, 1<<20)})
	for _, x := range writes {
		copy(want[x.Off:], x.Data)
	}
	if err := w.WritePages(testCtx(t), writes); err != nil {
		t.Fatal(err)
	}
	// The batch is large, so its first page (of the 1 MiB put) and its last
	// (of the clear) go alone, the guard and the ETag-carrying request.
	if w.Puts() != 1+1+3+1 || w.Clears() != 1+1 {
		t.Fatalf("%d puts and %d clears; want 6 and 2 (adjacent writes coalesced, runs cut at 4 MiB, first and last page alone)", w.Puts(), w.Clears())
	}
	got := make([]byte, size)
	if _, err := src.ReadAt(testCtx(t), got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("the writer's own source reads other bytes than were written")
	}
	fresh, err := Open(testCtx(t), s.url("img", "w.img"), s.opts())
	if err != nil {
		t.Fatal(err)
	}
	clear(got)
	if _, err := fresh.ReadAt(testCtx(t), got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("a fresh open reads other bytes than were written")
	}
	if err := w.WritePages(testCtx(t), []PageWrite{{Off: 100, Data: make([]byte, 512)}}); err == nil || !strings.Contains(err.Error(), "multiples of 512") {
		t.Fatalf("unaligned write: err = %v", err)
	}
	if err := w.WritePages(testCtx(t), []PageWrite{{Off: 0, Data: make([]byte, 1024)}, {Off: 512, Data: make([]byte, 512)}}); err == nil || !strings.Contains(err.Error(), "overlap") {
		t.Fatalf("overlapping writes: err = %v", err)
	}
}

// TestSecondWriterRefused: the lease keeps a second writer out, with an
// error naming the lease; after the first closes, the second gets in.
func TestSecondWriterRefused(t *testing.T) {
	s := newStore(t)
	s.putPage("img", "l.img", randomBytes(1, 1<<20))
	_, w1 := openWriter(t, s, s.url("img", "l.img"), LeaseOptions{})
	src2, err := Open(testCtx(t), s.url("img", "l.img"), s.opts())
	if err != nil {
		t.Fatal(err)
	}
	_, err = NewPageWriter(testCtx(t), src2, WriterOptions{})
	if !errors.Is(err, ErrLeased) || !strings.Contains(err.Error(), "lease state leased") || !strings.Contains(err.Error(), "duration fixed") {
		t.Fatalf("second writer: err = %v; want ErrLeased naming the lease state and duration", err)
	}
	t.Logf("second writer: %v", err)
	if err := w1.Close(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	if _, err := w1.WriteAt(testCtx(t), make([]byte, 512), 0); err == nil {
		t.Fatal("a closed writer wrote")
	}
	w2, err := NewPageWriter(testCtx(t), src2, WriterOptions{})
	if err != nil {
		t.Fatalf("after the first writer closed: %v", err)
	}
	if _, err := w2.WriteAt(testCtx(t), randomBytes(2, 4096), 4096); err != nil {
		t.Fatal(err)
	}
	if err := w2.Close(testCtx(t)); err != nil {
		t.Fatal(err)
	}
}

// TestLeaseBrokenFromOutside breaks the writer's lease with the SDK: the
// renewal notices, the loss is reported, and every later write fails.
func TestLeaseBrokenFromOutside(t *testing.T) {
	s := newStore(t)
	s.putPage("img", "b.img", randomBytes(1, 1<<20))
	reported := make(chan error, 1)
	_, w := openWriter(t, s, s.url("img", "b.img"), LeaseOptions{Duration: 15 * time.Second, RenewEvery: 200 * time.Millisecond,
		OnLost: func(err error) { reported <- err }})
	if _, err := w.WriteAt(testCtx(t), randomBytes(2, 4096), 0); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond) // a few renewals succeed
	if err := w.Lease().Err(); err != nil {
		t.Fatalf("lease lost while renewing normally: %v", err)
	}
	lc, err := lease.NewBlobClient(s.pageClient("b.img"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := lc.BreakLease(testCtx(t), &lease.BlobBreakOptions{BreakPeriod: ptr(int32(0))}); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-reported:
		if !errors.Is(err, ErrLeaseLost) {
			t.Fatalf("reported %v; want ErrLeaseLost", err)
		}
		t.Logf("reported: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("the broken lease was not noticed")
	}
	<-w.Lease().Lost()
	if _, err := w.WriteAt(testCtx(t), randomBytes(3, 4096), 0); !errors.Is(err, ErrLeaseLost) {
		t.Fatalf("write after the loss: err = %v; want ErrLeaseLost", err)
	}
}

// TestWriteAfterBreakFailsAtOnce: a write that finds the lease gone (before
// any renewal ran) fails with ErrLeaseLost and never lands.
func TestWriteAfterBreakFailsAtOnce(t *testing.T) {
	s := newStore(t)
	orig := randomBytes(1, 1<<20)
	s.putPage("img", "c.img", orig)
	_, w := openWriter(t, s, s.url("img", "c.img"), LeaseOptions{})
	lc, err := lease.NewBlobClient(s.pageClient("c.img"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := lc.BreakLease(testCtx(t), &lease.BlobBreakOptions{BreakPeriod: ptr(int32(0))}); err != nil {
		t.Fatal(err)
	}
	if _, err := w.WriteAt(testCtx(t), randomBytes(2, 4096), 0); !errors.Is(err, ErrLeaseLost) {
		t.Fatalf("write on a broken lease: err = %v; want ErrLeaseLost", err)
	}
	select {
	case <-w.Lease().Lost():
	default:
		t.Fatal("the loss a write saw was not reported on Lost")
	}
	got := make([]byte, 4096)
	fresh, err := Open(testCtx(t), s.url("img", "c.img"), s.opts())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := fresh.ReadAt(testCtx(t), got, 0); err != nil || !bytes.Equal(got, orig[:4096]) {
		t.Fatalf("the refused write changed the blob (err %v)", err)
	}
}

// TestWriterRefusesChangedBlob: a blob changed by someone else after it was
// opened is not leased for writing: its ETag condition fails (ErrChanged).
func TestWriterRefusesChangedBlob(t *testing.T) {
	s := newStore(t)
	s.putPage("img", "e.img", randomBytes(1, 1<<20))
	src, err := Open(testCtx(t), s.url("img", "e.img"), s.opts())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.pageClient("e.img").UploadPages(testCtx(t), streaming.NopCloser(bytes.NewReader(make([]byte, 512))),
		azblobblob.HTTPRange{Offset: 0, Count: 512}, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := NewPageWriter(testCtx(t), src, WriterOptions{}); !errors.Is(err, ErrChanged) {
		t.Fatalf("writer over a changed blob: err = %v; want ErrChanged", err)
	}
}

// TestPageWritesThroughFaults writes through connection resets: the
// retried puts land exactly the bytes written.
func TestPageWritesThroughFaults(t *testing.T) {
	s := newStore(t)
	const size = 8 << 20
	s.putPage("img", "f.img", make([]byte, size))
	p := startProxy(t, s)
	_, w := openWriter(t, s, proxiedURL(p, s, "f.img"), LeaseOptions{})
	want := randomBytes(7, size)
	name := addToxic(t, p, `{"type":"reset_peer","attributes":{"timeout":5},"stream":"upstream"}`)
	time.AfterFunc(300*time.Millisecond, func() { _ = p.Toxics.RemoveToxic(context.Background(), name) })
	var writes []PageWrite
	for off := 0; off < size; off += 1 << 20 {
		writes = append(writes, PageWrite{Off: int64(off), Data: want[off : off+1<<20]})
	}
	// Separate batches so that some start while connections are reset.
	for i, x := range writes {
		if err := w.WritePages(testCtx(t), []PageWrite{x}); err != nil {
			t.Fatalf("batch %d: %v", i, err)
		}
	}
	if w.Retries() == 0 {
		t.Fatal("no retries: the resets were not exercised")
	}
	t.Logf("retries: %d", w.Retries())
	fresh, err := Open(testCtx(t), s.url("img", "f.img"), s.opts())
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, size)
	if _, err := fresh.ReadAt(testCtx(t), got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("after faults the blob differs from what was written (err %v)", err)
	}
}

// TestAmbiguousWriteIsResent cuts the responses of Put Page calls that
// storage carried out: the retry's If-Match then fails on the writer's own
// new ETag. Under the lease that is not a foreign change: the ETag is read
// again and the same bytes sent once more.
func TestAmbiguousWriteIsResent(t *testing.T) {
	s := newStore(t)
	const size = 1 << 20
	s.putPage("img", "g.img", make([]byte, size))
	p := startProxy(t, s)
	_, w := openWriter(t, s, proxiedURL(p, s, "g.img"), LeaseOptions{})
	want := randomBytes(8, 64<<10)
	// Responses die after 10 bytes; requests pass whole and are carried out.
	name := addToxic(t, p, `{"type":"limit_data","attributes":{"bytes":10},"stream":"downstream"}`)
	time.AfterFunc(300*time.Millisecond, func() { _ = p.Toxics.RemoveToxic(context.Background(), name) })
	if err := w.WritePages(testCtx(t), []PageWrite{{Off: 128 << 10, Data: want}}); err != nil {
		t.Fatalf("write with lost responses: %v", err)
	}
	if w.resent.Load() == 0 {
		t.Fatalf("no ambiguous 412 was resolved (%d retries): the fault was not exercised", w.Retries())
	}
	t.Logf("retries %d, resent %d", w.Retries(), w.resent.Load())
	fresh, err := Open(testCtx(t), s.url("img", "g.img"), s.opts())
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(want))
	if _, err := fresh.ReadAt(testCtx(t), got, 128<<10); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("the resent write did not land (err %v)", err)
	}
	if err := w.Err(); err != nil {
		t.Fatalf("the writer gave up after an ambiguous write: %v", err)
	}
}

// TestLeaseOutlivesItsDuration: renewal at a third of the 15s lease keeps
// it past its duration; the writer still writes and others stay out.
func TestLeaseOutlivesItsDuration(t *testing.T) {
	s := newStore(t)
	s.putPage("img", "r.img", randomBytes(1, 1<<20))
	_, w := openWriter(t, s, s.url("img", "r.img"), LeaseOptions{Duration: 15 * time.Second})
	time.Sleep(17 * time.Second)
	if err := w.Lease().Err(); err != nil {
		t.Fatalf("lease lost despite renewals: %v", err)
	}
	if _, err := w.WriteAt(testCtx(t), randomBytes(2, 4096), 0); err != nil {
		t.Fatalf("write after the lease's duration: %v", err)
	}
	src2, err := Open(testCtx(t), s.url("img", "r.img"), s.opts())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := NewPageWriter(testCtx(t), src2, WriterOptions{}); !errors.Is(err, ErrLeased) {
		t.Fatalf("second writer after 17s: err = %v; want ErrLeased", err)
	}
}

// TestBatchETagFromLastPut: after batches of one, two and many runs the
// ETag the writer keeps (taken from the answer to the batch's last Put
// Page) is storage's, so each next batch's If-Match holds.
func TestBatchETagFromLastPut(t *testing.T) {
	s := newStore(t)
	model := randomBytes(1, 8<<20)
	s.putPage("img", "e.img", model)
	_, w := openWriter(t, s, s.url("img", "e.img"), LeaseOptions{})
	for i, c := range []struct{ runs, size int }{{1, 8192}, {2, 8192}, {5, 8192}, {1, 8192}, {3, 1 << 20}, {2, 3 << 20}, {1, 4 << 20}} {
		var batch []PageWrite
		for r := range c.runs {
			x := PageWrite{Off: int64(r * (c.size + 512<<10)), Data: randomBytes(uint64(10*i+r), c.size)}
			copy(model[x.Off:], x.Data)
			batch = append(batch, x)
		}
		runs := c.runs
		if err := w.WritePages(testCtx(t), batch); err != nil {
			t.Fatalf("batch %d (%d runs): %v", i, runs, err)
		}
		props, err := s.pageClient("e.img").GetProperties(testCtx(t), nil)
		if err != nil {
			t.Fatal(err)
		}
		w.mu.Lock()
		kept, stale := w.etag, w.stale
		w.mu.Unlock()
		if stale || props.ETag == nil || kept != *props.ETag {
			t.Fatalf("after batch %d (%d runs) the writer keeps ETag %s (stale %v); storage's is %v", i, runs, kept, stale, props.ETag)
		}
	}
	fresh, err := Open(testCtx(t), s.url("img", "e.img"), s.opts())
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(model))
	if _, err := fresh.ReadAt(testCtx(t), got, 0); err != nil || !bytes.Equal(got, model) {
		t.Fatalf("a fresh read after the batches differs from what was written (err %v)", err)
	}
}

// TestSlicesReader: the body of a coalesced run reads, in any buffer size
// and after a rewind (the SDK's retry), exactly as the concatenation.
func TestSlicesReader(t *testing.T) {
	parts := [][]byte{randomBytes(1, 512), nil, randomBytes(2, 64<<10), randomBytes(3, 1536), {}, randomBytes(4, 4096)}
	want := bytes.Join(parts, nil)
	for _, bufSize := range []int{1, 100, 512, 4096, 1 << 20} {
		r := newSlicesReader(parts)
		if r.Size() != int64(len(want)) {
			t.Fatalf("Size %d, want %d", r.Size(), len(want))
		}
		for pass := 0; pass < 2; pass++ { // the second after a rewind
			var got []byte
			buf := make([]byte, bufSize)
			for {
				n, err := r.Read(buf)
				got = append(got, buf[:n]...)
				if err == io.EOF {
					break
				}
				if err != nil || n == 0 {
					t.Fatalf("buffer %d: Read = %d, %v", bufSize, n, err)
				}
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("buffer %d, pass %d: read %d bytes differing from the %d of the parts", bufSize, pass, len(got), len(want))
			}
			if _, err := r.Seek(0, io.SeekStart); err != nil {
				t.Fatal(err)
			}
		}
	}
	r := newSlicesReader(parts)
	if pos, err := r.Seek(-100, io.SeekEnd); err != nil || pos != int64(len(want)-100) {
		t.Fatalf("Seek from the end: %d, %v", pos, err)
	}
	tail, _ := io.ReadAll(r)
	if !bytes.Equal(tail, want[len(want)-100:]) {
		t.Fatal("the last 100 bytes after a seek differ")
	}
	if _, err := r.Seek(-1, io.SeekStart); err == nil {
		t.Fatal("a seek before the start was accepted")
	}
}
