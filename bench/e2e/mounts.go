package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// mountProc is a FUSE server process (blobseal or rclone) serving one
// mount point for one measurement.
type mountProc struct {
	name       string // "blobseal" or "rclone", for errors
	mountpoint string
	cmd        *exec.Cmd
	argv       string // the command line, for the report
	stderr     *tailBuffer
	exited     chan struct{}
	waitErr    error
}

// tailBuffer keeps the last few KiB a child wrote to stderr, for errors.
type tailBuffer struct {
	mu  sync.Mutex
	buf []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, p...)
	if len(t.buf) > 8<<10 {
		t.buf = append([]byte(nil), t.buf[len(t.buf)-(8<<10):]...)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return strings.TrimSpace(string(t.buf))
}

// mountStartTimeout bounds how long a server may take to become servable.
const mountStartTimeout = 2 * time.Minute

// startBlobseal runs `blobseal mount` on url at a fresh mount point and
// waits for its "ready" line. The shared key reaches it through the
// environment, never the command line.
func (h *harness) startBlobseal(ctx context.Context, url string, extra ...string) (*mountProc, error) {
	mnt, err := os.MkdirTemp(h.work, "mnt-blobseal-")
	if err != nil {
		return nil, err
	}
	args := append([]string{"mount", "--key-file", h.keyFile,
		"--cache-memory", fmt.Sprint(h.cfg.CacheMiB), "--log-level", "warn"}, extra...)
	args = append(args, url, mnt)
	cmd := exec.Command(h.cfg.Blobseal, args...)
	cmd.Env = append(os.Environ(), "AZURE_STORAGE_CONNECTION_STRING="+h.connString)
	p := &mountProc{name: "blobseal", mountpoint: mnt, cmd: cmd,
		argv: "AZURE_STORAGE_CONNECTION_STRING=… " + h.cfg.Blobseal + " " + strings.Join(args, " ")}
	ready := make(chan struct{})
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := p.start(); err != nil {
		return nil, err
	}
	go func() {
		sc := bufio.NewScanner(stdout)
		signalled := false
		for sc.Scan() {
			if !signalled && strings.TrimSpace(sc.Text()) == "ready" {
				close(ready)
				signalled = true
			}
		}
	}()
	if err := p.waitUntil(ctx, ready); err != nil {
		return nil, err
	}
	return p, nil
}

// startRclone runs `rclone mount --read-only` of the crypt remote and waits
// until the plaintext file is visible through it.
func (h *harness) startRclone(ctx context.Context, remote string) (*mountProc, error) {
	mnt, err := os.MkdirTemp(h.work, "mnt-rclone-")
	if err != nil {
		return nil, err
	}
	args := []string{"--config", h.rcloneConf, "mount", "--read-only", remote + ":", mnt}
	cmd := exec.Command(h.cfg.Rclone, args...)
	p := &mountProc{name: "rclone", mountpoint: mnt, cmd: cmd,
		argv: h.cfg.Rclone + " " + strings.Join(args, " ")}
	if err := p.start(); err != nil {
		return nil, err
	}
	// rclone prints nothing when ready.
	if err := p.waitForData(ctx); err != nil {
		return nil, err
	}
	return p, nil
}

// waitForData waits until the mount table lists the mount and the data
// file appears in it: the readiness signal of peers that print none.
func (p *mountProc) waitForData(ctx context.Context) error {
	ready := make(chan struct{})
	go func() {
		for {
			select {
			case <-p.exited:
				return
			case <-ctx.Done():
				return
			case <-time.After(50 * time.Millisecond):
			}
			if isMounted(p.mountpoint) {
				if _, err := os.Stat(filepath.Join(p.mountpoint, dataFileName)); err == nil {
					close(ready)
					return
				}
			}
		}
	}()
	return p.waitUntil(ctx, ready)
}

func (p *mountProc) start() error {
	p.stderr = &tailBuffer{}
	p.cmd.Stderr = p.stderr
	p.exited = make(chan struct{})
	if err := p.cmd.Start(); err != nil {
		os.Remove(p.mountpoint)
		return fmt.Errorf("start %s: %w", p.name, err)
	}
	go func() {
		p.waitErr = p.cmd.Wait()
		close(p.exited)
	}()
	return nil
}

// waitUntil waits for ready; on exit, timeout or cancellation it stops
// the process and returns an error holding its stderr.
func (p *mountProc) waitUntil(ctx context.Context, ready <-chan struct{}) error {
	t := time.NewTimer(mountStartTimeout)
	defer t.Stop()
	var err error
	select {
	case <-ready:
		return nil
	case <-p.exited:
		err = fmt.Errorf("%s exited before the mount was ready (%v): %s", p.name, p.waitErr, p.stderr)
	case <-t.C:
		err = fmt.Errorf("%s not ready after %v: %s", p.name, mountStartTimeout, p.stderr)
	case <-ctx.Done():
		err = ctx.Err()
	}
	return errors.Join(err, p.stop())
}

func (p *mountProc) pid() int { return p.cmd.Process.Pid }

// stop unmounts and waits for the server to exit: fusermount3 -u first
// (the server then exits by itself), SIGTERM and SIGKILL of this one
// process if it does not, and a lazy unmount so nothing stays mounted.
func (p *mountProc) stop() error {
	var errs []error
	if isMounted(p.mountpoint) {
		if out, err := exec.Command("fusermount3", "-u", p.mountpoint).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("fusermount3 -u %s: %v: %s", p.mountpoint, err, bytes.TrimSpace(out)))
		}
	}
	exitedWithin := func(d time.Duration) bool {
		select {
		case <-p.exited:
			return true
		case <-time.After(d):
			return false
		}
	}
	if !exitedWithin(10 * time.Second) {
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		if !exitedWithin(10 * time.Second) {
			_ = p.cmd.Process.Kill()
			<-p.exited
		}
	}
	if isMounted(p.mountpoint) {
		_ = exec.Command("fusermount3", "-uz", p.mountpoint).Run()
	}
	if err := os.Remove(p.mountpoint); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// isMounted reports whether dir is a mount point, from /proc/self/mountinfo.
func isMounted(dir string) bool {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return false
	}
	return mountinfoHas(b, dir)
}

// mountinfoHas reports whether the mountinfo text lists dir as a mount
// point (field 5; spaces are escaped as \040).
func mountinfoHas(mountinfo []byte, dir string) bool {
	want := strings.ReplaceAll(filepath.Clean(dir), " ", `\040`)
	sc := bufio.NewScanner(bytes.NewReader(mountinfo))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) > 4 && f[4] == want {
			return true
		}
	}
	return false
}

var _ io.Writer = (*tailBuffer)(nil)
