package blockcache

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/blobseal/blobseal/blob"
)

// digestVerifier is a Verifier over 4096-byte blocks whose expected digests
// were taken from the true content; it counts what it was asked.
type digestVerifier struct {
	want [][32]byte
	zero [32]byte

	mu       sync.Mutex
	verified map[int64]int // block → times verified
	zeroAsks int
}

func newDigestVerifier(data []byte) *digestVerifier {
	v := &digestVerifier{verified: map[int64]int{}, zero: sha256.Sum256(make([]byte, 4096))}
	for off := 0; off < len(data); off += 4096 {
		v.want = append(v.want, sha256.Sum256(data[off:off+4096]))
	}
	return v
}

func (v *digestVerifier) BlockSize() int64 { return 4096 }

func (v *digestVerifier) Verify(ctx context.Context, off int64, data []byte) ([]blob.Range, error) {
	var bad []blob.Range
	v.mu.Lock()
	defer v.mu.Unlock()
	for i := 0; i < len(data); i += 4096 {
		b := (off + int64(i)) / 4096
		v.verified[b]++
		if sha256.Sum256(data[i:i+4096]) != v.want[b] {
			bad = append(bad, blob.Range{Off: b * 4096, Len: 4096})
		}
	}
	return bad, nil
}

func (v *digestVerifier) Zeros(ctx context.Context, off, end int64) ([]blob.Range, error) {
	v.mu.Lock()
	v.zeroAsks++
	v.mu.Unlock()
	var out []blob.Range
	for b := off / 4096; b < end/4096; b++ {
		if v.want[b] != v.zero {
			continue
		}
		if k := len(out) - 1; k >= 0 && out[k].End() == b*4096 {
			out[k].Len += 4096
			continue
		}
		out = append(out, blob.Range{Off: b * 4096, Len: 4096})
	}
	return out, nil
}

func (v *digestVerifier) times(b int64) int {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.verified[b]
}

// A tampered block fails exactly the reads that touch it, at once and
// without retries; its neighbours in the same fetch read fine; every block
// is verified once per fetch, not once per read.
func TestVerifierRejectsTamperedBlocks(t *testing.T) {
	checkNoLeak(t)
	data := randomBytes(1, 4<<20)
	v := newDigestVerifier(data)
	served := bytes.Clone(data)
	served[1<<20+5000] ^= 1 // block 257 (offset 1 MiB + 4096..8191)
	src := newTestSource(served, 64<<10)
	c := newCache(t, src, Options{Verifier: v, ReadDeadline: time.Minute})

	// The whole file sequentially: everything before the bad block arrives.
	buf := make([]byte, len(data))
	start := time.Now()
	n, err := c.ReadAt(buf, 0)
	if !errors.Is(err, ErrIntegrity) {
		t.Fatalf("read over a tampered block: %v", err)
	}
	if time.Since(start) > 10*time.Second {
		t.Fatalf("a rejected block was retried for %v", time.Since(start))
	}
	if n != 1<<20+4096 || !bytes.Equal(buf[:n], data[:n]) {
		t.Fatalf("read %d bytes before the bad block, want %d intact", n, 1<<20+4096)
	}
	// Neighbours in the same 64 KiB cache block and fetch are fine.
	for _, off := range []int64{1 << 20, 1<<20 + 8192, 1<<20 + 60<<10, 3 << 20} {
		if err := readExpect(c, data, off, 4096); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.ReadAt(make([]byte, 10), 1<<20+4096+100); !errors.Is(err, ErrIntegrity) {
		t.Fatalf("second read of the bad block: %v", err)
	}
	st := c.Stats()
	if st.RejectedBytes == 0 || st.IntegrityErrors < 2 {
		t.Fatalf("stats: %+v", st)
	}
	// Re-reading everything good costs no verification.
	for b := int64(0); b < 4<<20/4096; b++ {
		if got := v.times(b); got != 1 {
			t.Fatalf("block %d verified %d times", b, got)
		}
	}
	// ReadFunc (the lending path the volume uses) is verified the same way.
	err = c.ReadFunc(t.Context(), 1<<20, 64<<10, func(b []byte) error { return nil })
	if !errors.Is(err, ErrIntegrity) {
		t.Fatalf("ReadFunc over the bad block: %v", err)
	}
}

// Bytes a page blob lists as unwritten are verified like fetched bytes:
// storage cannot hide data by declaring it unwritten.
func TestVerifierChecksUnwrittenRanges(t *testing.T) {
	checkNoLeak(t)
	const size = 1 << 20
	ranges := []blob.Range{{Off: 0, Len: 128 << 10}, {Off: 512 << 10, Len: 64 << 10}}
	sp := newSparseSource(size, 64<<10, ranges)
	v := newDigestVerifier(sp.data)
	// Storage lies: it claims the second range was never written.
	liar := sparseSource{sp.testSource, ranges[:1]}
	c := newCache(t, liar, Options{Verifier: v})
	if err := readExpect(c, sp.data, 0, 64<<10); err != nil {
		t.Fatal(err)
	}
	if err := readExpect(c, sp.data, 256<<10, 4096); err != nil { // a real hole
		t.Fatal(err)
	}
	if _, err := c.ReadAt(make([]byte, 4096), 512<<10); !errors.Is(err, ErrIntegrity) {
		t.Fatalf("read of data storage listed as unwritten: %v", err)
	}
}

// With a verifier, large fetches leave out what it vouches is zeros.
func TestVerifierZerosAreNotFetched(t *testing.T) {
	const size = 32 << 20
	data := make([]byte, size)
	copy(data, randomBytes(2, 1<<20))
	copy(data[20<<20:], randomBytes(3, 1<<20))
	v := newDigestVerifier(data)
	src := newTestSource(data, 64<<10)
	c := newCache(t, src, Options{Verifier: v})
	buf := make([]byte, 1<<20)
	for off := int64(0); off < size; off += 1 << 20 {
		if err := readExpect(c, data, off, len(buf)); err != nil {
			t.Fatal(err)
		}
	}
	if got := c.Stats().BytesFetched; got > 4<<20 {
		t.Fatalf("fetched %d bytes of an image holding 2 MiB", got)
	}
	if v.zeroAsks == 0 {
		t.Fatal("the verifier was never asked for zeros")
	}
}

// A disk-tier block that fails verification (local damage) is dropped and
// fetched again from the source, which is correct; the read succeeds.
func TestVerifierRefetchesDamagedDiskBlocks(t *testing.T) {
	dir := t.TempDir()
	data := randomBytes(4, 1<<20)
	v := newDigestVerifier(data)
	o := Options{BlockSize: 64 << 10, MemoryBytes: 16 << 20, DiskDir: dir, DiskBytes: 64 << 20, Verifier: v}
	src := versionedSource{newTestSource(data, 64<<10), "etag-1"}
	c, err := New(src, o)
	if err != nil {
		t.Fatal(err)
	}
	if err := readExpect(c, data, 0, len(data)); err != nil {
		t.Fatal(err)
	}
	c.Close()
	// Damage a stored block's payload and its checksum alike, so only the
	// verifier can tell.
	damaged := 0
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil || fi.IsDir() || damaged > 0 || fi.Size() < 64<<10 {
			return nil
		}
		b, _ := os.ReadFile(p)
		for i := len(b) - 64<<10; i < len(b); i++ {
			b[i] = 0xee
		}
		os.WriteFile(p, b, 0o600)
		damaged++
		return nil
	})
	if damaged == 0 {
		t.Fatal("no disk block found to damage")
	}
	c2, err := New(src, o)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if err := readExpect(c2, data, 0, len(data)); err != nil {
		t.Fatalf("after disk damage: %v", err)
	}
	if st := c2.Stats(); st.IntegrityErrors != 0 {
		t.Fatalf("stats %+v", st)
	}
}

func TestVerifierBlockSizeMustDivide(t *testing.T) {
	v := newDigestVerifier(make([]byte, 8192))
	if _, err := New(newTestSource(make([]byte, 8192), 4096), Options{BlockSize: 4096, Verifier: badSizeVerifier{v}}); err == nil {
		t.Fatal("a 4096-byte cache block accepted a 8192-byte verifier")
	}
}

type badSizeVerifier struct{ *digestVerifier }

func (badSizeVerifier) BlockSize() int64 { return 8192 }
