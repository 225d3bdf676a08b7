package fs_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/blobseal/blobseal/blob"
	"github.com/blobseal/blobseal/blockcache"
	"github.com/blobseal/blobseal/fs"
	"github.com/blobseal/blobseal/fs/ext4"
	"github.com/blobseal/blobseal/internal/testenv"
)

// slowSource delays every read of a real file source: until gate is closed
// (when set), and by delay. It counts the reads of each offset, so a test
// can see that concurrent readers of one block share one fetch.
type slowSource struct {
	blob.Source
	delay time.Duration
	gate  chan struct{} // nil: no gate
	armed atomic.Bool   // the gate holds reads only once armed

	mu    sync.Mutex
	reads map[int64]int
}

func (s *slowSource) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	s.mu.Lock()
	s.reads[off]++
	s.mu.Unlock()
	if s.gate != nil && s.armed.Load() {
		select {
		case <-s.gate:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
	t := time.NewTimer(s.delay)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
		return 0, ctx.Err()
	}
	return s.Source.ReadAt(ctx, p, off)
}

// readCounts returns how often each offset was read.
func (s *slowSource) readCounts() map[int64]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return maps.Clone(s.reads)
}

// cachedTree builds the read path the mount uses (source → block cache →
// ext4; decryption adds nothing interrupt-related) over a plaintext image
// of files, with src's reads slowed down.
func cachedTree(t *testing.T, files map[string][]byte, src *slowSource, opts blockcache.Options) *ext4.FS {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "src")
	for name, data := range files {
		mustWrite(t, filepath.Join(dir, name), data, 0o644)
	}
	img := makeImage(t, dir)
	file, err := blob.Open(t.Context(), img, blob.Options{})
	if err != nil {
		t.Fatal(err)
	}
	src.Source = file
	src.reads = map[int64]int{}
	cache, err := blockcache.New(src, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cache.Close() })
	fsys, err := ext4.Open(cache, cache.Size())
	if err != nil {
		t.Fatal(err)
	}
	return fsys
}

// startPython runs script with args and returns the process and a reader of
// its output lines; the process is killed when the test ends.
func startPython(t *testing.T, script string, args ...string) (*exec.Cmd, *bufio.Scanner) {
	t.Helper()
	testenv.RequireTools(t, "python3")
	cmd := exec.Command("python3", append([]string{"-c", script}, args...)...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = testWriter{t}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	return cmd, bufio.NewScanner(out)
}

// TestInterruptedReadEndsPromptly: a reader hit by SIGINT while its block
// is being fetched gets EINTR within the interrupt grace (not after the
// read deadline), while another reader of the same block keeps waiting for
// the same, single fetch and gets the right bytes.
func TestInterruptedReadEndsPromptly(t *testing.T) {
	data := randomBytes(t, 4<<20)
	src := &slowSource{gate: make(chan struct{})}
	fsys := cachedTree(t, map[string][]byte{"model.bin": data}, src, blockcache.Options{MaxReadAhead: -1})
	var eintr atomic.Int64
	observe := func(op string, _ time.Duration, errno syscall.Errno) {
		if op == "read" && errno == syscall.EINTR {
			eintr.Add(1)
		}
	}
	mnt, _ := mountTreeWith(t, fsys, nil, fs.Options{DirectIO: fs.DirectIOOn, Observe: observe})
	path := filepath.Join(mnt, "model.bin")
	// Everything but the file's data is fetched by now (the lookup, the
	// inode); from here on fetches wait for the gate.
	if _, err := os.Stat(path); err != nil {
		t.Fatal(err)
	}
	src.armed.Store(true)

	// Python turns SIGINT into KeyboardInterrupt, so pread fails instead of
	// being restarted, as an application's Ctrl-C would.
	const script = "import os, sys, time\n" +
		"fd = os.open(sys.argv[1], os.O_RDONLY)\n" +
		"print('ready', flush=True)\n" +
		"try:\n" +
		"    os.pread(fd, 1 << 20, 1 << 20)\n" +
		"    print('completed', flush=True)\n" +
		"except KeyboardInterrupt:\n" +
		"    print('interrupted', flush=True)\n"
	cmd, lines := startPython(t, script, path)
	if !lines.Scan() || lines.Text() != "ready" {
		t.Fatalf("reader did not start: %q", lines.Text())
	}

	// The second reader, in this process, reads the same range.
	other := make(chan error, 1)
	go func() {
		f, err := os.Open(path)
		if err != nil {
			other <- err
			return
		}
		defer f.Close()
		got := make([]byte, 1<<20)
		if _, err := f.ReadAt(got, 1<<20); err != nil {
			other <- err
			return
		}
		if !bytes.Equal(got, data[1<<20:2<<20]) {
			other <- fmt.Errorf("the waiting reader got wrong bytes")
			return
		}
		other <- nil
	}()

	time.Sleep(300 * time.Millisecond) // both reads now wait for the gated fetch
	sent := time.Now()
	if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	if !lines.Scan() {
		t.Fatal("the interrupted reader printed nothing")
	}
	took := time.Since(sent)
	if lines.Text() != "interrupted" {
		t.Fatalf("reader: %q, want interrupted", lines.Text())
	}
	if took > fs.DefaultInterruptGrace+time.Second {
		t.Errorf("the interrupted read took %v to end; want about the %v grace", took, fs.DefaultInterruptGrace)
	}
	if took < fs.DefaultInterruptGrace/2 {
		t.Errorf("the interrupted read ended after %v, before the %v grace", took, fs.DefaultInterruptGrace)
	}
	t.Logf("interrupted read ended %v after SIGINT", took.Round(time.Millisecond))
	if eintr.Load() == 0 {
		t.Error("no read was answered EINTR")
	}

	select {
	case err := <-other:
		t.Fatalf("the other reader finished while the fetch was held: %v", err)
	case <-time.After(200 * time.Millisecond):
	}
	close(src.gate)
	select {
	case err := <-other:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the other reader never finished")
	}
	// The data block of the file lies somewhere in the image; every block
	// of the 1 MiB range was fetched exactly once, shared by both readers.
	for off, n := range src.readCounts() {
		if n > 1 {
			t.Errorf("offset %d was fetched %d times; readers of one block should share one fetch", off, n)
		}
	}
}

// TestMmapReadSurvivesSignals: a process that maps a file and touches its
// pages in shuffled order while it receives a stream of handled signals
// reads every byte right. The kernel interrupts the FUSE read behind a page
// fault for each of those signals, and an EINTR answered there becomes
// SIGBUS for the process; the interrupt grace lets a fetch that lands
// meanwhile answer the read. (On Linux 6.18 the fault is retried after an
// EINTR and the reader survives even without the grace: 727 interrupted
// reads with a 1 ns grace; the test guards the behaviour either way.)
func TestMmapReadSurvivesSignals(t *testing.T) {
	data := randomBytes(t, 8<<20)
	src := &slowSource{delay: 30 * time.Millisecond}
	fsys := cachedTree(t, map[string][]byte{"weights.bin": data}, src, blockcache.Options{MaxReadAhead: -1})
	var eintr atomic.Int64
	observe := func(op string, _ time.Duration, errno syscall.Errno) {
		if op == "read" && errno == syscall.EINTR {
			eintr.Add(1)
		}
	}
	mnt, _ := mountTreeWith(t, fsys, nil, fs.Options{Observe: observe})
	path := filepath.Join(mnt, "weights.bin")

	const script = "import hashlib, mmap, os, random, signal, sys\n" +
		"signal.signal(signal.SIGUSR1, lambda s, f: None)\n" +
		"f = open(sys.argv[1], 'rb')\n" +
		"m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n" +
		"m.madvise(mmap.MADV_RANDOM)\n" +
		"print('ready', flush=True)\n" +
		"pages = list(range(0, len(m), 4096))\n" +
		"random.shuffle(pages)\n" +
		"for p in pages: m[p]\n" +
		"print(hashlib.sha256(m).hexdigest(), flush=True)\n"
	cmd, lines := startPython(t, script, path)
	if !lines.Scan() || lines.Text() != "ready" {
		t.Fatalf("reader did not start: %q", lines.Text())
	}
	stop := make(chan struct{})
	var signals atomic.Int64
	go func() {
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				if cmd.Process.Signal(syscall.SIGUSR1) == nil {
					signals.Add(1)
				}
			}
		}
	}()
	got := ""
	if lines.Scan() {
		got = strings.TrimSpace(lines.Text())
	}
	close(stop)
	err := cmd.Wait()
	if err != nil {
		t.Fatalf("the mapping reader died after %d signals: %v", signals.Load(), err)
	}
	sum := sha256.Sum256(data)
	if got != hex.EncodeToString(sum[:]) {
		t.Fatalf("mapped file reads differently (sha256 %q)", got)
	}
	t.Logf("read 8 MiB through mmap in shuffled order under %d signals, %d reads interrupted", signals.Load(), eintr.Load())
}
