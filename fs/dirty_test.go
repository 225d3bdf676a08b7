package fs_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	bfs "github.com/blobseal/blobseal/fs"
	"github.com/blobseal/blobseal/fs/ext4"
	"github.com/blobseal/blobseal/image"
	"github.com/blobseal/blobseal/internal/testenv"
)

// smallWritableImage is an empty journaled ext4 image of size bytes.
func smallWritableImage(t *testing.T, size int64) string {
	t.Helper()
	testenv.RequireTools(t, "mkfs.ext4")
	img := filepath.Join(t.TempDir(), "small.ext4")
	if _, err := image.MakeExt4(context.Background(), t.TempDir(), img, image.MakeOptions{
		Label: "small", Journal: true, Size: size,
	}); err != nil {
		t.Fatalf("MakeExt4: %v", err)
	}
	return img
}

// TestDirtyCacheENOSPCReachesFsyncAndClose: writes of more than the
// filesystem holds all land in the cache (its bound is larger), and the
// ENOSPC met writing them out reaches the application at fsync, or at
// close when it does not fsync, once; the image stays consistent.
func TestDirtyCacheENOSPCReachesFsyncAndClose(t *testing.T) {
	for _, via := range []string{"fsync", "close"} {
		t.Run(via, func(t *testing.T) {
			img := smallWritableImage(t, 16<<20)
			m := mountWritableWith(t, img, bfs.Options{DirtyLimit: 128 << 20})
			f, err := os.Create(m.p("fill"))
			if err != nil {
				t.Fatal(err)
			}
			chunk := bytes.Repeat([]byte{7}, 1<<20)
			const chunks = 24
			for i := range chunks {
				if _, err := f.Write(chunk); err != nil {
					t.Fatalf("write %d: %v (want it held in the cache)", i, err)
				}
			}
			var st unix.Stat_t
			if err := unix.Stat(m.p("fill"), &st); err != nil || st.Size != chunks<<20 {
				t.Errorf("stat before the flush: size %d (%v), want %d", st.Size, err, chunks<<20)
			}
			if via == "fsync" {
				if err := f.Sync(); !errors.Is(err, syscall.ENOSPC) {
					t.Errorf("fsync: %v, want ENOSPC", err)
				}
				if err := f.Sync(); err != nil {
					t.Errorf("second fsync: %v, want nil (an error is reported once)", err)
				}
				if err := f.Close(); err != nil {
					t.Errorf("close after the reported error: %v, want nil", err)
				}
			} else if err := f.Close(); !errors.Is(err, syscall.ENOSPC) {
				t.Errorf("close: %v, want ENOSPC", err)
			}
			var sfs unix.Statfs_t
			if err := unix.Statfs(m.dir, &sfs); err != nil || sfs.Bavail > 16 {
				t.Errorf("statfs after the failed flush: %d blocks available (%v), want the filesystem full", sfs.Bavail, err)
			}
			// The mount goes on: room made, a write fits again.
			if err := os.Remove(m.p("fill")); err != nil {
				t.Fatal(err)
			}
			waitForFreeBytes(t, m.dir, 4<<20)
			if err := os.WriteFile(m.p("after"), chunk, 0o644); err != nil {
				t.Errorf("write after freeing space: %v", err)
			}
			m.unmount(t)
			e2fsckClean(t, img)
		})
	}
}

// failingDevice is an image file whose writes start failing with EIO, as
// a disk's would, when failing is set: the one fault the real stack here
// cannot produce on demand (the kernel has no device-mapper error target).
type failingDevice struct {
	*os.File
	failing atomic.Bool
}

var _ ext4.Device = (*failingDevice)(nil)

func (d *failingDevice) WriteAt(p []byte, off int64) (int, error) {
	if d.failing.Load() {
		return 0, &os.PathError{Op: "write", Path: d.Name(), Err: syscall.EIO}
	}
	return d.File.WriteAt(p, off)
}

func (d *failingDevice) Sync() error {
	if d.failing.Load() {
		return &os.PathError{Op: "fsync", Path: d.Name(), Err: syscall.EIO}
	}
	return d.File.Sync()
}

// TestDirtyCacheEIOReachesFsyncAndClose: data in the cache when the
// device fails cannot be stored; fsync answers EIO for a file fsynced,
// close for one that is only closed, and the unmount reports the failed
// flush instead of claiming a clean image.
func TestDirtyCacheEIOReachesFsyncAndClose(t *testing.T) {
	testenv.RequireFUSE(t)
	img := makeWritableImage(t, "")
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() }) // after the unmount (cleanups run last first)
	dev := &failingDevice{File: f}
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	w, err := ext4.OpenWritable(dev, st.Size())
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	srv, err := bfs.MountWritable(context.Background(), dir, w, bfs.Options{
		Logger: slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelError + 1})),
		Source: "test-eio",
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = srv.Unmount()
		<-srv.Done()
	})
	synced, err := os.Create(filepath.Join(dir, "synced"))
	if err != nil {
		t.Fatal(err)
	}
	defer synced.Close()
	closed, err := os.Create(filepath.Join(dir, "closed"))
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("lost"), 1<<18)
	for _, f := range []*os.File{synced, closed} {
		if _, err := f.Write(data); err != nil {
			t.Fatalf("write before the device fails: %v", err)
		}
	}
	dev.failing.Store(true)
	if err := synced.Sync(); !errors.Is(err, syscall.EIO) {
		t.Errorf("fsync with the device failing: %v, want EIO", err)
	}
	if err := closed.Close(); !errors.Is(err, syscall.EIO) {
		t.Errorf("close with the device failing: %v, want EIO", err)
	}
	synced.Close()
	if err := srv.Unmount(); err != nil {
		t.Fatalf("Unmount: %v", err)
	}
	if err := srv.Err(); err == nil {
		t.Error("the flush at unmount succeeded on a failing device")
	}
}

// TestDirtyCacheKeepsTheWritesMtime: a file's mtime is the time of its
// last write, both while the data waits in the cache and once a later
// flush (here the close, 300 ms on) stored it: the image keeps what stat
// showed, not the time of the flush.
func TestDirtyCacheKeepsTheWritesMtime(t *testing.T) {
	img := makeWritableImage(t, "")
	m := mountWritable(t, img)
	f, err := os.Create(m.p("f"))
	if err != nil {
		t.Fatal(err)
	}
	before := time.Now()
	if _, err := f.Write([]byte("data")); err != nil {
		t.Fatal(err)
	}
	after := time.Now()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	dirty := time.Unix(st.Mtim.Unix())
	if dirty.Before(before) || dirty.After(after) || st.Size != 4 || st.Blocks != 8 {
		t.Errorf("while dirty: mtime %v, size %d, %d blocks; want a time within the write (%v..%v), size 4 in one 4 KiB block",
			dirty, st.Size, st.Blocks, before, after)
	}
	time.Sleep(300 * time.Millisecond)
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	m.unmount(t)
	again := mountWritable(t, img)
	if err := unix.Stat(again.p("f"), &st); err != nil {
		t.Fatal(err)
	}
	if stored := time.Unix(st.Mtim.Unix()); !stored.Equal(dirty) {
		t.Errorf("mtime stored %v, stat showed %v before the flush", stored, dirty)
	}
}

// TestDirtyCacheCommittedByTheTimer: data written to a file that stays
// open, never fsynced, reaches the image with the periodic commit: a copy
// of the image taken after it (a crash, as the kernel sees it: the
// journal is replayed at mount) holds the data.
func TestDirtyCacheCommittedByTheTimer(t *testing.T) {
	testenv.RequireRoot(t)
	tools := testenv.RequireTools(t, "mount", "umount")
	img := makeWritableImage(t, "")
	m := mountWritable(t, img)
	f, err := os.Create(m.p("open"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	data := bytes.Repeat([]byte("committed by the timer;"), 5000)
	if _, err := f.Write(data); err != nil {
		t.Fatal(err)
	}
	time.Sleep(6500 * time.Millisecond) // one commit interval (5 s) and slack
	crashed := filepath.Join(t.TempDir(), "crashed.ext4")
	raw, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(crashed, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if out, err := exec.Command(tools[0], "-t", "ext4", "-o", "loop", crashed, dir).CombinedOutput(); err != nil {
		t.Fatalf("kernel mount of the copy (replaying its journal): %v: %s", err, out)
	}
	defer func() {
		if out, err := exec.Command(tools[1], dir).CombinedOutput(); err != nil {
			t.Errorf("umount: %v: %s", err, out)
		}
	}()
	got, err := os.ReadFile(filepath.Join(dir, "open"))
	if err != nil || !bytes.Equal(got, data) {
		t.Errorf("the copy holds %d bytes (%v), want the %d written before the commit", len(got), err, len(data))
	}
}
