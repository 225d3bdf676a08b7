package main

import (
	"bufio"
	"bytes"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/blobseal/blobseal/internal/fusetest"
	"github.com/blobseal/blobseal/internal/testenv"
)

// TestMountDirectThenExternalUnmount: as root `blobseal mount` calls
// mount(2) itself (go-fuse's DirectMount: a minimal container image has no
// fusermount3), serves the image's bytes, and `fusermount3 -u` from outside
// still ends it cleanly, leaving nothing mounted. (Unprivileged, go-fuse
// falls back to fusermount3, the path every mount took before; this
// machine's /dev/fuse is root-only, so no unprivileged mount runs here.)
func TestMountDirectThenExternalUnmount(t *testing.T) {
	testenv.RequireTools(t, "mkfs.ext4", "debugfs", "fusermount3")
	testenv.RequireFUSE(t)
	testenv.RequireRoot(t) // mount(2) needs CAP_SYS_ADMIN
	dir := t.TempDir()
	content := random(t, 3<<20+7)
	writeTestFile(t, filepath.Join(dir, "src", "data.bin"), content, 0o644)
	key := filepath.Join(dir, "key")
	if err := os.WriteFile(key, random(t, 32), 0o600); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "img")
	if _, stderr, code := blobseal(t, "image", "create", "--from", filepath.Join(dir, "src"), "--key-file", key, img); code != 0 {
		t.Fatalf("image create: %s", stderr)
	}
	mnt := filepath.Join(dir, "mnt")
	p := startMountLogged(t, "--key-file", key, img, mnt)
	if log := p.String(); !strings.Contains(log, "mountDirect: calling syscall.Mount") || strings.Contains(log, "callFusermount") {
		t.Errorf("root did not mount with mount(2) directly; log:\n%s", log)
	}
	sameBytes(t, filepath.Join(mnt, "data.bin"), content)
	if out, err := exec.Command("fusermount3", "-u", mnt).CombinedOutput(); err != nil {
		t.Fatalf("fusermount3 -u: %v: %s", err, out)
	}
	p.wait(t, "unmounted from outside")
	if fusetest.IsMounted(t, mnt) {
		t.Errorf("%s still mounted", mnt)
	}
}

// loggedMount is a running `blobseal mount` whose log the test reads
// while it runs.
type loggedMount struct {
	cmd    *exec.Cmd
	mu     sync.Mutex
	log    strings.Builder
	exited chan struct{} // closed once the process is reaped
	err    error         // its exit status, set before exited closes
}

func (m *loggedMount) String() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.log.String()
}

// startMountLogged runs `blobseal mount` with FUSE request logging on and
// waits for "ready"; the cleanup SIGTERMs it if the test did not end it.
func startMountLogged(t *testing.T, args ...string) *loggedMount {
	t.Helper()
	if err := os.MkdirAll(args[len(args)-1], 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(binary, append([]string{"mount", "--debug-fuse", "--log-level", "debug"}, args...)...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	m := &loggedMount{cmd: cmd, exited: make(chan struct{})}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// The debug log is large; keep only the lines the test looks for.
	logDone := make(chan struct{})
	go func() {
		defer close(logDone)
		s := bufio.NewScanner(stderr)
		s.Buffer(nil, 1<<20)
		for s.Scan() {
			if l := s.Text(); !strings.Contains(l, "msg=fuse ") || strings.Contains(l, "mount") {
				m.mu.Lock()
				m.log.WriteString(l + "\n")
				m.mu.Unlock()
			}
		}
		io.Copy(io.Discard, stderr)
	}()
	ready := make(chan bool, 1)
	go func() {
		s := bufio.NewScanner(stdout)
		ready <- s.Scan() && s.Text() == "ready"
		io.Copy(io.Discard, stdout)
		<-logDone
		m.err = cmd.Wait()
		close(m.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-m.exited:
			return
		default:
		}
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-m.exited:
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			t.Errorf("blobseal mount ignored SIGTERM for 15s")
		}
	})
	select {
	case ok := <-ready:
		if !ok {
			<-m.exited
			t.Fatalf("blobseal mount did not print ready (%v); log:\n%s", m.err, m)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("blobseal mount not ready after 60s")
	}
	return m
}

// wait requires a clean exit whose log says why.
func (m *loggedMount) wait(t *testing.T, logged string) {
	t.Helper()
	select {
	case <-m.exited:
		if m.err != nil {
			t.Fatalf("blobseal mount exited with %v; log:\n%s", m.err, m)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("blobseal mount still running 15s after its unmount")
	}
	if !strings.Contains(m.String(), logged) {
		t.Errorf("log lacks %q:\n%s", logged, m)
	}
}

func sameBytes(t *testing.T, path string, want []byte) {
	t.Helper()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s through the mount differs from the source", path)
	}
}
