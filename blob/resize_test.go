package blob

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/lease"
)

// TestPageWriterGrow grows a leased page blob on Azurite: storage reports
// the new size, the old bytes are intact, the new pages read as zeros and
// can be written, and a fresh open sees it all.
func TestPageWriterGrow(t *testing.T) {
	s := newStore(t)
	const oldSize, newSize = 1 << 20, 3<<20 + 512
	orig := randomBytes(7, oldSize)
	s.putPage("img", "g.img", orig)
	src, w := openWriter(t, s, s.url("img", "g.img"), LeaseOptions{})

	// Without the lease, storage refuses to resize: the lease is in force.
	if _, err := s.pageClient("g.img").Resize(testCtx(t), 4<<20, nil); err == nil {
		t.Fatal("storage resized a leased blob without the lease id")
	}
	if err := w.Grow(testCtx(t), newSize); err != nil {
		t.Fatal(err)
	}
	if src.Size() != newSize || w.Size() != newSize {
		t.Fatalf("sizes after Grow: source %d, writer %d; want %d", src.Size(), w.Size(), newSize)
	}
	props, err := s.pageClient("g.img").GetProperties(testCtx(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	if *props.ContentLength != newSize {
		t.Fatalf("storage reports %d bytes, want %d", *props.ContentLength, newSize)
	}
	tail := randomBytes(8, 4096)
	if _, err := w.WriteAt(testCtx(t), tail, newSize-4096); err != nil {
		t.Fatalf("write into the grown region: %v", err)
	}
	if err := w.Close(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	fresh, err := Open(testCtx(t), s.url("img", "g.img"), s.opts())
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, newSize)
	if _, err := fresh.ReadAt(testCtx(t), got, 0); err != nil {
		t.Fatal(err)
	}
	want := append(append(append([]byte(nil), orig...), make([]byte, newSize-oldSize-4096)...), tail...)
	if !bytes.Equal(got, want) {
		t.Fatal("after Grow the blob does not hold the old bytes, zeros, then the new write")
	}
}

// TestPageWriterGrowRefuses: bad sizes are refused before any request, a
// lost lease and a foreign change are reported as such.
func TestPageWriterGrowRefuses(t *testing.T) {
	s := newStore(t)
	s.putPage("img", "r.img", randomBytes(1, 1<<20))
	_, w := openWriter(t, s, s.url("img", "r.img"), LeaseOptions{})
	for _, c := range []struct {
		size int64
		want string
	}{
		{1<<20 + 100, "not a multiple of the 512-byte page size"},
		{512, "shrinking drops data"},
		{MaxPageBlobSize + 512, "over the page blob limit"},
	} {
		if err := w.Grow(testCtx(t), c.size); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Grow(%d): %v, want an error saying %q", c.size, err, c.want)
		}
	}
	lc, err := lease.NewBlobClient(s.pageClient("r.img"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := lc.BreakLease(testCtx(t), &lease.BlobBreakOptions{BreakPeriod: ptr(int32(0))}); err != nil {
		t.Fatal(err)
	}
	if err := w.Grow(testCtx(t), 2<<20); !errors.Is(err, ErrLeaseLost) {
		t.Fatalf("Grow on a broken lease: %v, want ErrLeaseLost", err)
	}
	props, err := s.pageClient("r.img").GetProperties(testCtx(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	if *props.ContentLength != 1<<20 {
		t.Fatalf("a refused Grow resized the blob to %d", *props.ContentLength)
	}

	// The writer's last-seen ETag no longer matching the blob (what a
	// foreign change would leave): storage refuses on If-Match, and the
	// writer reports ErrChanged rather than resizing over it.
	s.putPage("img", "c.img", randomBytes(2, 1<<20))
	_, w2 := openWriter(t, s, s.url("img", "c.img"), LeaseOptions{})
	w2.mu.Lock()
	w2.etag = `"0x1234"` // as if someone else had written since
	w2.mu.Unlock()
	if err := w2.Grow(testCtx(t), 2<<20); !errors.Is(err, ErrChanged) {
		t.Fatalf("Grow over a changed ETag: %v, want ErrChanged", err)
	}
}
