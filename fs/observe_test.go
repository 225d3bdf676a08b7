package fs_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/blobseal/blobseal/fs"
	"github.com/blobseal/blobseal/fs/ext4"
)

// observation is one call of fs.Options.Observe.
type observation struct {
	op    string
	d     time.Duration
	errno syscall.Errno
}

// recorder collects observations from concurrent FUSE requests.
type recorder struct {
	mu  sync.Mutex
	obs []observation
}

func (r *recorder) observe(op string, d time.Duration, errno syscall.Errno) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.obs = append(r.obs, observation{op, d, errno})
}

func (r *recorder) snapshot() []observation {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]observation(nil), r.obs...)
}

// panicOnSize makes reads panic for files of one size, so a reader bug's
// EIO can be observed.
type panicOnSize struct {
	fs.Tree
	size uint64
}

func (p panicOnSize) ReadAtContext(ctx context.Context, file *ext4.Inode, b []byte, off int64) (int, error) {
	if file.Size == p.size {
		panic("reader bug")
	}
	return p.Tree.ReadAtContext(ctx, file, b, off)
}

// TestObserveSeesEveryAnsweredOperation: each kind of request the kernel
// sends reaches Observe once with the errno the kernel got, including the
// EIO guard substitutes for a panic.
func TestObserveSeesEveryAnsweredOperation(t *testing.T) {
	src := t.TempDir()
	mustWrite(t, filepath.Join(src, "good"), []byte("good content"), 0o644)
	mustWrite(t, filepath.Join(src, "explodes"), []byte("exactly 17 bytes!"), 0o644)
	if err := os.Symlink("good", filepath.Join(src, "link")); err != nil {
		t.Fatal(err)
	}
	tree := panicOnSize{Tree: openImage(t, makeImage(t, src)), size: 17}
	rec := &recorder{}
	dir := t.TempDir()
	srv, err := fs.Mount(context.Background(), dir, tree, fs.Options{
		Logger:  slog.New(slog.NewTextHandler(io.Discard, nil)),
		Observe: rec.observe,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Unmount() })

	if b, err := os.ReadFile(filepath.Join(dir, "good")); err != nil || string(b) != "good content" {
		t.Fatalf("read good: %q, %v", b, err)
	}
	if _, err := os.ReadFile(filepath.Join(dir, "explodes")); !errors.Is(err, syscall.EIO) {
		t.Fatalf("read of a panicking file: %v, want EIO", err)
	}
	if _, err := os.Lstat(filepath.Join(dir, "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("lstat missing: %v", err)
	}
	if _, err := os.ReadDir(dir); err != nil {
		t.Fatal(err)
	}
	if target, err := os.Readlink(filepath.Join(dir, "link")); err != nil || target != "good" {
		t.Fatalf("readlink: %q, %v", target, err)
	}
	if _, err := unix.Listxattr(filepath.Join(dir, "good"), nil); err != nil {
		t.Fatalf("listxattr: %v", err)
	}
	if _, err := unix.Getxattr(filepath.Join(dir, "good"), "user.absent", nil); !errors.Is(err, syscall.ENODATA) {
		t.Fatalf("getxattr of an absent attribute: %v, want ENODATA", err)
	}
	var sfs unix.Statfs_t
	if err := unix.Statfs(dir, &sfs); err != nil {
		t.Fatal(err)
	}

	seen := map[string]map[syscall.Errno]int{}
	var total time.Duration
	for _, o := range rec.snapshot() {
		if o.d < 0 {
			t.Errorf("%s: negative duration %v", o.op, o.d)
		}
		total += o.d
		if seen[o.op] == nil {
			seen[o.op] = map[syscall.Errno]int{}
		}
		seen[o.op][o.errno]++
	}
	want := []struct {
		op    string
		errno syscall.Errno
	}{
		{"lookup", 0}, {"lookup", syscall.ENOENT}, {"open", 0}, {"read", 0}, {"read", syscall.EIO},
		{"readdir", 0}, {"readlink", 0}, {"listxattr", 0}, {"getxattr", syscall.ENODATA}, {"statfs", 0},
	}
	for _, w := range want {
		if seen[w.op][w.errno] == 0 {
			t.Errorf("no %s observed with errno %d (%v); saw %v", w.op, w.errno, w.errno, seen)
		}
	}
	if total <= 0 {
		t.Errorf("observed durations sum to %v; the hook is not timing anything", total)
	}
}
