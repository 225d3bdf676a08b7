package verity

import (
	"context"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/blobseal/blobseal/internal/testenv"
)

// memSource is an in-memory blob.Source that counts what is read and can
// be told to fail.
type memSource struct {
	mu       sync.Mutex
	data     []byte
	requests atomic.Int64
	bytes    atomic.Int64
	fail     atomic.Bool
	delay    time.Duration
}

func (m *memSource) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	if m.delay > 0 {
		select {
		case <-time.After(m.delay):
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
	if m.fail.Load() {
		return 0, fmt.Errorf("injected storage fault")
	}
	m.requests.Add(1)
	m.mu.Lock()
	defer m.mu.Unlock()
	if off >= int64(len(m.data)) {
		return 0, io.EOF
	}
	n := copy(p, m.data[off:])
	m.bytes.Add(int64(n))
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (m *memSource) Size() int64    { return int64(len(m.data)) }
func (m *memSource) String() string { return "memory image" }

func (m *memSource) flip(off int64) {
	m.mu.Lock()
	m.data[off] ^= 0x40
	m.mu.Unlock()
}

// memWriter is an io.WriterAt over a growing byte slice.
type memWriter struct{ b []byte }

func (w *memWriter) WriteAt(p []byte, off int64) (int, error) {
	if end := off + int64(len(p)); end > int64(len(w.b)) {
		w.b = append(w.b, make([]byte, end-int64(len(w.b)))...)
	}
	return copy(w.b[off:], p), nil
}

// randomData returns blocks of 4096 bytes, random except the blocks listed
// in zero (which stay zero).
func randomData(seed uint64, blocks int64, zero func(b int64) bool) []byte {
	r := rand.New(rand.NewPCG(seed, 7))
	d := make([]byte, blocks*4096)
	for b := range blocks {
		if zero != nil && zero(b) {
			continue
		}
		for i := b * 4096; i < (b+1)*4096; i += 8 {
			v := r.Uint64()
			for k := range 8 {
				d[i+int64(k)] = byte(v >> (8 * k))
			}
		}
	}
	return d
}

// buildImage appends a tree (ours) to data and returns the image and what
// Build reported.
func buildImage(t testing.TB, data []byte, salt []byte) ([]byte, *Built) {
	t.Helper()
	w := &memWriter{b: append([]byte(nil), data...)}
	built, err := Build(context.Background(), readerAt(data), w, int64(len(data)), BuildOptions{
		Params: Params{DataBlocks: int64(len(data)) / 4096, Salt: salt},
	})
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	return w.b, built
}

type readerAt []byte

func (r readerAt) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(len(r)) {
		return 0, io.EOF
	}
	n := copy(p, r[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

var rootLine = regexp.MustCompile(`(?m)^Root hash:\s+([0-9a-f]+)$`)

// veritysetup runs the real veritysetup and returns its output.
func veritysetup(t testing.TB, args ...string) (string, error) {
	t.Helper()
	bin := testenv.RequireTools(t, "veritysetup")[0]
	out, err := exec.Command(bin, args...).CombinedOutput()
	return string(out), err
}

// veritysetupFormat formats a tree onto path at its end with veritysetup
// and returns the root hash it printed.
func veritysetupFormat(t testing.TB, path string, dataBlocks int64, extra ...string) []byte {
	t.Helper()
	args := append([]string{"format", path, path, fmt.Sprintf("--hash-offset=%d", dataBlocks*4096),
		fmt.Sprintf("--data-blocks=%d", dataBlocks)}, extra...)
	out, err := veritysetup(t, args...)
	if err != nil {
		t.Fatalf("veritysetup format: %v\n%s", err, out)
	}
	m := rootLine.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("veritysetup printed no root hash:\n%s", out)
	}
	root, err := hex.DecodeString(m[1])
	if err != nil {
		t.Fatal(err)
	}
	return root
}

func writeTemp(t testing.TB, data []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "image")
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}
