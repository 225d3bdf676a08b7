package fs_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	bfs "github.com/blobseal/blobseal/fs"
	"github.com/blobseal/blobseal/fs/ext4"
	"github.com/blobseal/blobseal/internal/testenv"
)

// freeInodes is the mount's free inode count, as statfs(2) shows it.
func freeInodes(t *testing.T, dir string) uint64 {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ffree
}

// TestCreationsRacingRemovals: creations through the mount (open O_CREAT
// then write, fstat and close; mkdir; symlink; mknod; link) race a
// remover of the same names. A creation never fails with ENOENT or EIO
// because the remover won (the new inode is held from the change that
// made it), the open file stays usable, every inode is freed once the
// kernel forgets it (no leak: each creation's hold ends at FORGET), and
// e2fsck finds the image clean. The kernel locks the directory around
// both a create and an unlink in it, so here the remover comes between
// the creation and the next use rather than inside the create request;
// ext4's TestWriterCreateHeldRace races the two inside the engine.
func TestCreationsRacingRemovals(t *testing.T) {
	img := makeWritableImage(t, "")
	m := mountWritable(t, img)
	if err := os.WriteFile(m.p("target"), []byte("link target"), 0o644); err != nil {
		t.Fatal(err)
	}
	free0 := freeInodes(t, m.dir)

	const rounds = 300
	names := make(chan string, rounds*5)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // the remover: each name goes the moment it exists
		defer wg.Done()
		for name := range names {
			remove := syscall.Unlink
			if strings.HasPrefix(name, "d") {
				remove = syscall.Rmdir
			}
			for deadline := time.Now().Add(10 * time.Second); ; {
				err := remove(m.p(name))
				if err == nil {
					break
				}
				if err != syscall.ENOENT || time.Now().After(deadline) {
					t.Errorf("remove %s: %v", name, err)
					break
				}
			}
		}
	}()
	payload := bytes.Repeat([]byte("held"), 1024)
	for i := range rounds {
		f := fmt.Sprintf("f%d", i)
		names <- f
		h, err := os.OpenFile(m.p(f), os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o644)
		if err != nil {
			t.Fatalf("create %s racing its unlink: %v", f, err)
		}
		if _, err := h.Write(payload); err != nil {
			t.Fatalf("write %s: %v", f, err)
		}
		if st, err := h.Stat(); err != nil || st.Size() != int64(len(payload)) {
			t.Fatalf("fstat %s: %v, %v", f, st, err)
		}
		if err := h.Close(); err != nil {
			t.Fatalf("close %s: %v", f, err)
		}
		for _, mk := range []struct {
			name string
			op   func(string) error
		}{
			{"d", func(p string) error { return os.Mkdir(p, 0o755) }},
			{"s", func(p string) error { return os.Symlink("target", p) }},
			{"n", func(p string) error { return syscall.Mknod(p, syscall.S_IFIFO|0o644, 0) }},
			{"l", func(p string) error { return os.Link(m.p("target"), p) }},
		} {
			name := mk.name + strconv.Itoa(i)
			names <- name
			if err := mk.op(m.p(name)); err != nil {
				t.Fatalf("create %s racing its removal: %v", name, err)
			}
		}
	}
	close(names)
	wg.Wait()

	// The kernel forgets a removed inode soon after the last reference
	// goes (FORGET is asynchronous); then its hold ends and it is freed.
	deadline := time.Now().Add(10 * time.Second)
	for freeInodes(t, m.dir) != free0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if got := freeInodes(t, m.dir); got != free0 {
		t.Errorf("%d inodes free after every creation was removed, want %d: held inodes leaked", got, free0)
	}
	if st, err := os.Stat(m.p("target")); err != nil || st.Sys().(*syscall.Stat_t).Nlink != 1 {
		t.Errorf("target after its links were removed: %v, %v", st, err)
	}
	m.unmount(t)
	e2fsckClean(t, img)
}

// stallingDevice is an image file whose data writes wait while stalled:
// storage that stops answering, which nothing real here produces on
// demand.
type stallingDevice struct {
	*os.File
	stalled atomic.Bool
	resume  chan struct{}
	waiting atomic.Int32
}

var _ ext4.Device = (*stallingDevice)(nil)

func (d *stallingDevice) WriteAt(p []byte, off int64) (int, error) {
	if d.stalled.Load() {
		d.waiting.Add(1)
		<-d.resume
	}
	return d.File.WriteAt(p, off)
}

// startPythonFed is startPython with a pipe to the script's stdin.
func startPythonFed(t *testing.T, script string, args ...string) (*exec.Cmd, io.Writer, *bufio.Scanner) {
	t.Helper()
	testenv.RequireTools(t, "python3")
	cmd := exec.Command("python3", append([]string{"-c", script}, args...)...)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
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
	return cmd, stdin, bufio.NewScanner(out)
}

// TestInterruptedWriteEndsPromptly: a writer waiting for room in the
// dirty-data cache while storage stalls gets EINTR as soon as a signal
// interrupts it, and so does an fsync waiting for the stalled flush; what
// the writer was told was written is all there once storage comes back,
// and nothing else.
func TestInterruptedWriteEndsPromptly(t *testing.T) {
	testenv.RequireFUSE(t)
	img := makeWritableImage(t, "")
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() }) // after the unmount (cleanups run last first)
	dev := &stallingDevice{File: f, resume: make(chan struct{})}
	var resumeOnce sync.Once
	resume := func() { resumeOnce.Do(func() { close(dev.resume) }) }
	t.Cleanup(resume) // before the unmount, which must flush
	// Should the interrupt not end the wait, storage comes back after a
	// while and the test fails on the time taken rather than hanging.
	time.AfterFunc(10*time.Second, resume)
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	w, err := ext4.OpenWritable(dev, st.Size())
	if err != nil {
		t.Fatal(err)
	}
	var eintr atomic.Int64
	dir := t.TempDir()
	srv, err := bfs.MountWritable(context.Background(), dir, w, bfs.Options{
		Logger:     slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn})),
		Source:     "test-stall",
		DirtyLimit: 4 << 20,
		Observe: func(op string, _ time.Duration, errno syscall.Errno) {
			if op == "write" && errno == syscall.EINTR {
				eintr.Add(1)
			}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := srv.Unmount(); err != nil {
			t.Errorf("Unmount: %v", err)
		}
		if err := srv.Err(); err != nil {
			t.Errorf("flush at unmount: %v", err)
		}
	})
	path := filepath.Join(dir, "stalled")
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	// The fsync caller opens the file before storage stalls: an open
	// takes a hold (Writer.Hold, which has no context variant yet), and
	// that waits for the stalled change.
	const syncScript = "import os, sys\n" +
		"fd = os.open(sys.argv[1], os.O_RDONLY)\n" +
		"print('ready', flush=True)\n" +
		"sys.stdin.readline()\n" +
		"try:\n" +
		"    os.fsync(fd)\n" +
		"    print('synced', flush=True)\n" +
		"except KeyboardInterrupt:\n" +
		"    print('interrupted', flush=True)\n"
	syncer, syncIn, syncLines := startPythonFed(t, syncScript, path)
	if !syncLines.Scan() || syncLines.Text() != "ready" {
		t.Fatalf("fsync caller did not start: %q", syncLines.Text())
	}
	dev.stalled.Store(true)

	// Chunk i is "%08d" of i, repeated. Python turns SIGINT into
	// KeyboardInterrupt, so the write fails instead of being restarted;
	// the file offset then counts the bytes the kernel acknowledged.
	const script = "import os, sys\n" +
		"fd = os.open(sys.argv[1], os.O_WRONLY)\n" +
		"print('ready', flush=True)\n" +
		"i = 0\n" +
		"try:\n" +
		"    while True:\n" +
		"        os.write(fd, (b'%08d' % i) * (1 << 17))\n" +
		"        i += 1\n" +
		"except KeyboardInterrupt:\n" +
		"    print('interrupted', os.lseek(fd, 0, os.SEEK_CUR), flush=True)\n" +
		"sys.stdin.readline()\n" +
		"os.close(fd)\n" +
		"print('closed', flush=True)\n"
	cmd, stdin, lines := startPythonFed(t, script, path)
	if !lines.Scan() || lines.Text() != "ready" {
		t.Fatalf("writer did not start: %q", lines.Text())
	}
	// Wait until the flusher is stuck on the device and the writer on
	// the full cache.
	for deadline := time.Now().Add(20 * time.Second); dev.waiting.Load() == 0; {
		if time.Now().After(deadline) {
			t.Fatal("no flush reached the stalled device")
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond)
	sent := time.Now()
	if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	if !lines.Scan() {
		t.Fatal("the interrupted writer printed nothing")
	}
	took := time.Since(sent)
	fields := strings.Fields(lines.Text())
	if len(fields) != 2 || fields[0] != "interrupted" {
		t.Fatalf("writer: %q, want interrupted", lines.Text())
	}
	acked, err := strconv.ParseInt(fields[1], 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("interrupted write ended %v after SIGINT, %d bytes acknowledged", took.Round(time.Millisecond), acked)
	if took > time.Second {
		t.Errorf("the interrupted write took %v to end while storage stalled", took)
	}
	if eintr.Load() == 0 {
		t.Error("no write was answered EINTR")
	}
	if acked < 4<<20-1<<20 {
		t.Errorf("only %d bytes acknowledged before the cache filled", acked)
	}

	// An fsync waiting for the same stalled flush ends the same way, and
	// claims nothing.
	if _, err := syncIn.Write([]byte("\n")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond) // fsync now waits for the flush
	sent = time.Now()
	if err := syncer.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	if !syncLines.Scan() || syncLines.Text() != "interrupted" {
		t.Fatalf("fsync caller: %q, want interrupted", syncLines.Text())
	}
	if took := time.Since(sent); took > time.Second {
		t.Errorf("the interrupted fsync took %v to end while storage stalled", took)
	}

	resume()
	if _, err := stdin.Write([]byte("\n")); err != nil {
		t.Fatal(err)
	}
	if !lines.Scan() || lines.Text() != "closed" {
		t.Fatalf("writer after storage came back: %q", lines.Text())
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(got)) != acked {
		t.Fatalf("file holds %d bytes, %d were acknowledged", len(got), acked)
	}
	for off := int64(0); off < acked; off += 8 {
		want := fmt.Sprintf("%08d", off/(1<<20))
		if string(got[off:min(off+8, acked)]) != want[:min(8, acked-off)] {
			t.Fatalf("byte %d: %q, want %q", off, got[off:min(off+8, acked)], want)
		}
	}
}
