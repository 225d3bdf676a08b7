package crypto

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/rand"
	"encoding/json"
	"errors"
	"io"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/blobseal/blobseal/crypto/luks"
	xxts "golang.org/x/crypto/xts"
)

// memDev is an in-memory device that counts reads.
type memDev struct {
	mu    sync.Mutex
	data  []byte
	reads int
}

func (m *memDev) ReadAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	m.reads++
	m.mu.Unlock()
	if off >= int64(len(m.data)) {
		return 0, io.EOF
	}
	n := copy(p, m.data[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (m *memDev) WriteAt(p []byte, off int64) (int, error) {
	copy(m.data[off:], p)
	return len(p), nil
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

func TestPlainVolumeMatchesReference(t *testing.T) {
	for _, c := range []struct {
		ss      int
		keyLen  int
		offset  int64
		skip    int64
		largeIV bool
	}{
		{4096, 64, 0, 0, false}, {512, 32, 0, 0, false}, {4096, 64, 8192, 16, false}, {4096, 64, 0, 8, true},
	} {
		key := randomBytes(c.keyLen)
		pt := randomBytes(64 * 4096)
		ct := make([]byte, int(c.offset)+len(pt))
		ref, _ := xxts.NewCipher(aes.NewCipher, key)
		for off := 0; off < len(pt); off += c.ss {
			iv := uint64(off/512) + uint64(c.skip)
			if c.largeIV {
				iv = (uint64(off/512) + uint64(c.skip)) / uint64(c.ss/512)
			}
			ref.Encrypt(ct[int(c.offset)+off:int(c.offset)+off+c.ss], pt[off:off+c.ss], iv)
		}
		dev := &memDev{data: ct}
		vol, err := OpenPlain(dev, int64(len(ct)), key, PlainOptions{SectorSize: c.ss, Offset: c.offset, Skip: c.skip, IVLargeSectors: c.largeIV})
		if err != nil {
			t.Fatal(err)
		}
		if vol.Size() != int64(len(pt)) {
			t.Fatalf("size %d", vol.Size())
		}
		for i := range 200 {
			off := mrand.Int64N(int64(len(pt)))
			n := mrand.Int64N(3*int64(c.ss)) + 1
			if i == 0 {
				off, n = 0, int64(len(pt))
			}
			p := make([]byte, n)
			got, err := vol.ReadAt(p, off)
			want := min(n, int64(len(pt))-off)
			if int64(got) != want || (want < n && err != io.EOF) || (want == n && err != nil) {
				t.Fatalf("ReadAt(%d,%d) = %d,%v", off, n, got, err)
			}
			if !bytes.Equal(p[:got], pt[off:off+want]) {
				t.Fatalf("%+v: ReadAt(%d,%d) wrong bytes", c, off, n)
			}
		}
		// One backing read per request, even for a large unaligned read.
		dev.reads = 0
		vol.ReadAt(make([]byte, 100000), 777)
		if dev.reads != 1 {
			t.Fatalf("%d backing reads for one request", dev.reads)
		}
		// WriteAt round-trips, including partial sectors, and stays compatible.
		w := randomBytes(10000)
		if _, err := vol.WriteAt(w, 3000); err != nil {
			t.Fatal(err)
		}
		copy(pt[3000:], w)
		all := make([]byte, len(pt))
		vol.ReadAt(all, 0)
		if !bytes.Equal(all, pt) {
			t.Fatalf("%+v: WriteAt corrupted neighbours", c)
		}
		vol.Close()
	}
}

func TestPlainRejectsBadKeys(t *testing.T) {
	dev := &memDev{data: make([]byte, 1<<20)}
	_, err := OpenPlain(dev, 1<<20, []byte("short passphrase\n"), PlainOptions{})
	if err == nil || !strings.Contains(err.Error(), "32 or 64 bytes") {
		t.Fatalf("got %v", err)
	}
}

func TestVolumeStringHasNoKey(t *testing.T) {
	key := bytes.Repeat([]byte{0xAB}, 64)
	vol, err := OpenPlain(&memDev{data: make([]byte, 1<<20)}, 1<<20, key, PlainOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{vol.String(), strings.ReplaceAll(strings.ToLower(fmtAll(vol)), " ", "")} {
		if strings.Contains(strings.ToLower(s), "abab") {
			t.Fatalf("key material printed: %s", s)
		}
	}
}

func fmtAll(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

func TestTruncatedImage(t *testing.T) {
	key := randomBytes(64)
	dev := &memDev{data: make([]byte, 64*4096)}
	vol, err := OpenPlain(dev, 64*4096, key, PlainOptions{})
	if err != nil {
		t.Fatal(err)
	}
	dev.data = dev.data[:10*4096] // the blob shrank under us
	_, err = vol.ReadAt(make([]byte, 4096), 20*4096)
	if err == nil || !strings.Contains(err.Error(), "truncated") {
		t.Fatalf("got %v", err)
	}
}

// createImageFile encrypts pt into a new image file in a temporary
// directory and returns the open file and its bytes.
func createImageFile(t *testing.T, pt, pass []byte, opts FormatOptions) (*os.File, []byte) {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "img"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if _, err := CreateImage(context.Background(), f, bytes.NewReader(pt), int64(len(pt)), pass, opts); err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	return f, raw
}

// TestSparseEndToEnd creates a sparse image: holes are never stored, read
// as zeros, and can be written into; an image not marked sparse reads its
// zero sectors as dm-crypt does (noise) unless ZeroSectors is set.
func TestSparseEndToEnd(t *testing.T) {
	const size = 8 << 20
	pt := make([]byte, size)
	copy(pt[0:], randomBytes(100_000))          // data at the start
	copy(pt[5<<20:], randomBytes(4096))         // an island
	copy(pt[size-70_000:], randomBytes(70_000)) // data at the end
	pass := []byte("passphrase bytes")
	var progressCalls int
	f, err := os.Create(filepath.Join(t.TempDir(), "img"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	res, err := CreateImage(context.Background(), f, bytes.NewReader(pt), int64(len(pt)), pass, FormatOptions{
		Progress: func(done, total int64) { progressCalls++ },
	})
	if err != nil {
		t.Fatal(err)
	}
	if progressCalls == 0 {
		t.Error("no progress reported")
	}
	if res.HoleBytes < size-400<<10 {
		t.Fatalf("only %d hole bytes", res.HoleBytes)
	}
	raw, _ := os.ReadFile(f.Name())
	dev := &memDev{data: raw}
	vol, err := Open(dev, int64(len(raw)), pass, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !vol.Info().ZeroSectors {
		t.Fatal("a sparse image is not read as sparse")
	}
	// The ciphertext of holes is never written: the file is zero there.
	off := vol.Info().DataOffset
	if !isZero(raw[off+(1<<20) : off+(4<<20)]) {
		t.Fatal("hole region was written")
	}
	for _, h := range res.Holes {
		if !isZero(raw[h.Off:h.End()]) {
			t.Fatalf("reported hole [%d,+%d) holds data", h.Off, h.Len)
		}
	}
	got := make([]byte, size)
	if _, err := vol.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, pt) {
		t.Fatal("plaintext differs")
	}
	// Writing into a hole: the rest of its sector stays zeros.
	if _, err := vol.WriteAt([]byte{1, 2, 3}, 3<<20+100); err != nil {
		t.Fatalf("write into hole: %v", err)
	}
	sector := make([]byte, 4096)
	if _, err := vol.ReadAt(sector, 3<<20); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 4096)
	copy(want[100:], []byte{1, 2, 3})
	if !bytes.Equal(sector, want) {
		t.Fatal("a write into a hole does not read back")
	}
	vol.Close()

	// The same ciphertext without the sparse marker, as cryptsetup would
	// see it: zero sectors decrypt to noise, unless a verifier vouches.
	plain := &memDev{data: append([]byte(nil), raw...)}
	key := dumpKeyViaOpen(t, raw, pass)
	g, err := luks.Format(&memWriter{plain}, pass, luks.FormatOptions{VolumeKey: key})
	if err != nil {
		t.Fatal(err)
	}
	g.Wipe()
	for _, zs := range []bool{false, true} {
		vol, err := Open(plain, int64(len(raw)), pass, OpenOptions{ZeroSectors: zs})
		if err != nil {
			t.Fatal(err)
		}
		hole := make([]byte, 4096)
		if _, err := vol.ReadAt(hole, 2<<20); err != nil {
			t.Fatal(err)
		}
		if isZero(hole) != zs {
			t.Fatalf("ZeroSectors %v: hole reads as zeros: %v", zs, isZero(hole))
		}
		vol.Close()
	}
}

// memWriter gives a memDev the io.WriterAt that luks.Format wants.
type memWriter struct{ d *memDev }

func (w *memWriter) WriteAt(p []byte, off int64) (int, error) { return w.d.WriteAt(p, off) }
func (w *memWriter) ReadAt(p []byte, off int64) (int, error)  { return w.d.ReadAt(p, off) }

// dumpKeyViaOpen recovers the volume key through the luks package, as an
// attacker with the passphrase could; used only to rewrite a header.
func dumpKeyViaOpen(t *testing.T, raw []byte, pass []byte) []byte {
	t.Helper()
	dev := &memDev{data: raw}
	h, err := luks.ReadHeader(dev, int64(len(raw)))
	if err != nil {
		t.Fatal(err)
	}
	u, err := h.Unlock(dev, pass, luks.Policy{})
	if err != nil {
		t.Fatal(err)
	}
	return append([]byte(nil), u.VolumeKey...)
}

// lendingDev lends its bytes in chunks like blockcache.Cache.ReadFunc, cut
// at multiples of cut, or anywhere when odd is set (which a volume must
// survive by copying).
type lendingDev struct {
	memDev
	cut   int
	odd   bool
	lends int
}

func (d *lendingDev) Size() int64 { return int64(len(d.data)) }

func (d *lendingDev) ReadFunc(ctx context.Context, off, n int64, fn func([]byte) error) error {
	d.lends++
	if err := ctx.Err(); err != nil {
		return err
	}
	for pos := off; pos < off+n; {
		end := min((pos/int64(d.cut)+1)*int64(d.cut), off+n)
		if d.odd && end-pos > 100 {
			end -= 77
		}
		// A copy, so a volume that wrote into a lent chunk would corrupt
		// nothing and fail the comparison instead.
		if err := fn(bytes.Clone(d.data[pos:end])); err != nil {
			return err
		}
		pos = end
	}
	return nil
}

// TestVolumeDecryptsLentChunks: over a device that lends its bytes the
// volume reads exactly what it reads over a plain io.ReaderAt, for chunks
// of whole sectors and for oddly cut ones.
func TestVolumeDecryptsLentChunks(t *testing.T) {
	const size = 4 << 20
	pt := randomBytes(size)
	clear(pt[1<<20 : 2<<20]) // a hole
	pass := []byte("lent chunks")
	_, raw := createImageFile(t, pt, pass, FormatOptions{})
	for _, dev := range []*lendingDev{{memDev: memDev{data: raw}, cut: 64 << 10}, {memDev: memDev{data: raw}, cut: 4096, odd: true}} {
		vol, err := Open(dev, int64(len(raw)), pass, OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		dev.lends = 0
		for i := range 200 {
			off := int64(i*7919*13) % size
			n := min(int64(1+i*3331%(1<<20)), size-off)
			got := make([]byte, n)
			if _, err := vol.ReadAt(got, off); err != nil {
				t.Fatalf("ReadAt(%d, %d): %v", off, n, err)
			}
			if !bytes.Equal(got, pt[off:off+n]) {
				t.Fatalf("cut %d odd %v: ReadAt(%d, %d) differs from the plaintext", dev.cut, dev.odd, off, n)
			}
		}
		if dev.lends == 0 {
			t.Errorf("cut %d: the volume never borrowed chunks", dev.cut)
		}
	}
}

// TestReadAtContextReachesTheDevice: the reader's context is the one the
// device sees, so a cancelled FUSE read stops waiting for storage.
func TestReadAtContextReachesTheDevice(t *testing.T) {
	pt := randomBytes(1 << 20)
	pass := []byte("context")
	_, raw := createImageFile(t, pt, pass, FormatOptions{})
	dev := &lendingDev{memDev: memDev{data: raw}, cut: 64 << 10}
	vol, err := Open(dev, int64(len(raw)), pass, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 8192)
	if _, err := vol.ReadAtContext(t.Context(), got, 4096); err != nil || !bytes.Equal(got, pt[4096:4096+8192]) {
		t.Fatalf("ReadAtContext: %v (or wrong bytes)", err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := vol.ReadAtContext(ctx, got, 4096); !errors.Is(err, context.Canceled) {
		t.Fatalf("ReadAtContext with a cancelled context: err = %v, want context.Canceled", err)
	}
}
