package blob

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// conformance checks the Source contract against a reference copy of the
// bytes. Every implementation runs it.
func conformance(t *testing.T, src Source, want []byte) {
	ctx := testCtx(t)
	size := int64(len(want))
	if src.Size() != size {
		t.Fatalf("Size() = %d, want %d", src.Size(), size)
	}
	if s := src.String(); s == "" || strings.Contains(s, "sig=") || strings.Contains(s, "AccountKey") {
		t.Fatalf("String() = %q: empty or leaks a credential", s)
	}

	t.Run("whole", func(t *testing.T) {
		got := make([]byte, size)
		n, err := src.ReadAt(ctx, got, 0)
		if err != nil || int64(n) != size {
			t.Fatalf("ReadAt(all) = %d, %v", n, err)
		}
		if !bytes.Equal(got, want) {
			t.Fatal("whole read differs from the reference")
		}
	})

	t.Run("past end", func(t *testing.T) {
		p := make([]byte, 3*PageSize)
		for i := range p {
			p[i] = 0xAA
		}
		off := size - PageSize - 7
		n, err := src.ReadAt(ctx, p, off)
		if n != PageSize+7 || !errors.Is(err, io.EOF) {
			t.Fatalf("ReadAt across end = %d, %v; want %d, io.EOF", n, err, PageSize+7)
		}
		if !bytes.Equal(p[:n], want[off:]) {
			t.Fatal("bytes before the end differ")
		}
		n, err = src.ReadAt(ctx, p, size)
		if n != 0 || !errors.Is(err, io.EOF) {
			t.Fatalf("ReadAt at Size = %d, %v; want 0, io.EOF", n, err)
		}
		n, err = src.ReadAt(ctx, p[:0], 0)
		if n != 0 || err != nil {
			t.Fatalf("empty ReadAt = %d, %v", n, err)
		}
	})

	t.Run("negative offset", func(t *testing.T) {
		if _, err := src.ReadAt(ctx, make([]byte, 10), -1); err == nil || !strings.Contains(err.Error(), "negative offset") {
			t.Fatalf("negative offset: err = %v", err)
		}
	})

	t.Run("cancelled", func(t *testing.T) {
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		if _, err := src.ReadAt(cctx, make([]byte, 4096), 4096); err == nil {
			t.Fatal("ReadAt with a cancelled context succeeded")
		}
	})

	t.Run("version", func(t *testing.T) {
		v, ok := src.(Versioned)
		if ok && v.Version() == "" {
			t.Fatal("Version() is empty")
		}
	})

	t.Run("ranges", func(t *testing.T) {
		rl, ok := src.(RangeLister)
		if !ok {
			t.Skip("no RangeLister")
		}
		rs, err := rl.WrittenRanges(ctx)
		if err != nil {
			t.Fatal(err)
		}
		pos := int64(0)
		for i, r := range rs {
			if r.Len <= 0 || r.Off < pos || (i > 0 && r.Off == pos) || r.End() > size {
				t.Fatalf("ranges not sorted, merged and inside the blob: %v", rs)
			}
			if !allZero(want[pos:r.Off]) {
				t.Fatalf("bytes [%d,%d) outside written ranges are not zero", pos, r.Off)
			}
			pos = r.End()
		}
		if !allZero(want[pos:]) {
			t.Fatalf("bytes after the last range are not zero")
		}
	})

	t.Run("64 goroutines random ranges", func(t *testing.T) {
		var wg sync.WaitGroup
		errs := make(chan error, 64)
		for g := 0; g < 64; g++ {
			wg.Add(1)
			go func(g int) {
				defer wg.Done()
				r := rand.New(rand.NewPCG(uint64(g), 7))
				for i := 0; i < 12; i++ {
					off := r.Int64N(size)
					n := 1 + r.Int64N(min(size-off, 300<<10))
					p := make([]byte, n)
					m, err := src.ReadAt(ctx, p, off)
					if err != nil || int64(m) != n {
						errs <- err
						return
					}
					if !bytes.Equal(p, want[off:off+n]) {
						errs <- errors.New("random range differs from the reference")
						return
					}
				}
			}(g)
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
	})
}

func TestConformanceFile(t *testing.T) {
	want := sparseImage(1, 3<<20)
	path := filepath.Join(t.TempDir(), "img")
	writeSparse(t, path, want)
	src, err := Open(testCtx(t), path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	conformance(t, src, want)
	// The holes written as holes must show up as holes.
	rs, _ := src.(RangeLister).WrittenRanges(testCtx(t))
	var covered int64
	for _, r := range rs {
		covered += r.Len
	}
	if covered >= int64(len(want)) {
		t.Fatalf("sparse file reports %d of %d bytes written: holes not detected", covered, len(want))
	}
}

func TestConformanceAzure(t *testing.T) {
	s := newStore(t)
	want := sparseImage(2, 3<<20+5*PageSize)
	s.putPage("img", "page.img", want)
	s.putBlock("img", "block.img", want)
	for _, name := range []string{"page.img", "block.img"} {
		t.Run(name, func(t *testing.T) {
			src, err := Open(testCtx(t), s.url("img", name), s.opts())
			if err != nil {
				t.Fatal(err)
			}
			conformance(t, src, want)
		})
	}
	t.Run("sas", func(t *testing.T) {
		src, err := Open(testCtx(t), s.sas("img", "block.img", readPerm(), farFuture()), Options{})
		if err != nil {
			t.Fatal(err)
		}
		conformance(t, src, want)
	})
}

// writeSparse writes data leaving all-zero 4 KiB blocks as holes.
func writeSparse(t testing.TB, path string, data []byte) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(int64(len(data))); err != nil {
		t.Fatal(err)
	}
	for off := 0; off < len(data); off += 4096 {
		end := min(off+4096, len(data))
		if allZero(data[off:end]) {
			continue
		}
		if _, err := f.WriteAt(data[off:end], int64(off)); err != nil {
			t.Fatal(err)
		}
	}
}

func TestFileWriteAt(t *testing.T) {
	path := filepath.Join(t.TempDir(), "rw.img")
	if err := os.WriteFile(path, make([]byte, 8192), 0o600); err != nil {
		t.Fatal(err)
	}
	ro, err := Open(testCtx(t), path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ro.(WriterAt).WriteAt(testCtx(t), []byte("x"), 0); err == nil || !strings.Contains(err.Error(), "read-only") {
		t.Fatalf("write to a read-only file source: %v", err)
	}
	rw, err := Open(testCtx(t), "file://"+path, Options{Writable: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := rw.(WriterAt).WriteAt(testCtx(t), []byte("hello"), 4096); err != nil {
		t.Fatal(err)
	}
	if _, err := rw.(WriterAt).WriteAt(testCtx(t), []byte("hello"), 8190); err == nil {
		t.Fatal("write past the end succeeded")
	}
	got := make([]byte, 5)
	if _, err := ro.ReadAt(testCtx(t), got, 4096); err != nil || string(got) != "hello" {
		t.Fatalf("read back %q, %v", got, err)
	}
	if _, err := Open(testCtx(t), filepath.Join(t.TempDir(), "none"), Options{}); err == nil || !strings.Contains(err.Error(), "does not exist") {
		t.Fatalf("missing file: %v", err)
	}
}
