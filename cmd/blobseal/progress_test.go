package main

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/blobseal/blobseal/internal/testenv"
)

// openPTY opens a pseudo-terminal pair: what a user's shell gives a command.
func openPTY(t *testing.T) (master, tty *os.File) {
	t.Helper()
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		testenv.Unavailable(t, "no pseudo-terminals: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	if err := unix.IoctlSetPointerInt(int(m.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		t.Fatal(err)
	}
	n, err := unix.IoctlGetInt(int(m.Fd()), unix.TIOCGPTN)
	if err != nil {
		t.Fatal(err)
	}
	s, err := os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	return m, s
}

// TestProgressOnTerminalOnly: the progress bar draws on a terminal, and
// nothing of it reaches a pipe, a file or a buffer (logs, CI, scripts).
func TestProgressOnTerminalOnly(t *testing.T) {
	master, tty := openPTY(t)
	var screen bytes.Buffer
	copied := make(chan struct{})
	go func() {
		io.Copy(&screen, master) // ends with EIO once the terminal closes
		close(copied)
	}()
	// Updates as image create and upload send them: every 200 ms.
	bar := newProgress(tty, "encrypting")
	for done := int64(0); done <= 3<<20; done += 1 << 20 {
		bar.update(done, 4<<20)
		time.Sleep(200 * time.Millisecond)
	}
	bar.finish()
	tty.Close()
	<-copied
	if drawn := screen.String(); !strings.Contains(drawn, "encrypting  75% |") || !strings.Contains(drawn, "\r") {
		t.Errorf("no progress bar on the terminal: %q", drawn)
	}

	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	var buf bytes.Buffer
	for _, out := range []io.Writer{w, &buf, io.Discard} {
		if p := newProgress(out, "uploading"); p.w != nil {
			t.Errorf("progress on for %T", out)
		}
	}
	w.Close()

	// And the binary, with stderr a pipe.
	testenv.RequireTools(t, "mkfs.ext4", "debugfs")
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	writeTestFile(t, filepath.Join(src, "data"), random(t, 1<<20), 0o644)
	key := writeKey(t, dir, 32)
	_, stderr, code := blobseal(t, "image", "create", "--from", src, "--key-file", key, filepath.Join(dir, "pipe.img"))
	if code != 0 || strings.Contains(stderr, "encrypting") || strings.ContainsAny(stderr, "\r\x1b") {
		t.Errorf("exit %d; progress drawn into a pipe: %q", code, stderr)
	}
}
