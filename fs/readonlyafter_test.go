package fs_test

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	bfs "github.com/blobseal/blobseal/fs"
	"github.com/blobseal/blobseal/fs/ext4"
	"github.com/blobseal/blobseal/internal/testenv"
)

// TestReadOnlyAfter: once Options.ReadOnlyAfter closes (a lost write
// lease), a writable mount answers writes with EROFS and fsync with EIO,
// and reads go on.
func TestReadOnlyAfter(t *testing.T) {
	testenv.RequireFUSE(t)
	src := t.TempDir()
	if err := os.WriteFile(filepath.Join(src, "kept"), []byte("readable"), 0o644); err != nil {
		t.Fatal(err)
	}
	img := makeWritableImage(t, src)
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() }) // after the unmount (cleanups run last first)
	st, _ := f.Stat()
	w, err := ext4.OpenWritable(f, st.Size())
	if err != nil {
		t.Fatal(err)
	}
	lost := make(chan struct{})
	dir := t.TempDir()
	srv, err := bfs.MountWritable(context.Background(), dir, w, bfs.Options{
		Logger: slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn})),
		Source: "test-ro-after", ReadOnlyAfter: lost,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = srv.Unmount()
		<-srv.Done()
	})
	open, err := os.OpenFile(filepath.Join(dir, "open-before"), os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		t.Fatalf("create before: %v", err)
	}
	defer open.Close()
	close(lost)
	if err := os.WriteFile(filepath.Join(dir, "after"), []byte("x"), 0o644); !errors.Is(err, syscall.EROFS) {
		t.Errorf("create after: %v, want EROFS", err)
	}
	if _, err := open.Write([]byte("x")); !errors.Is(err, syscall.EROFS) {
		t.Errorf("write to a file opened before: %v, want EROFS", err)
	}
	if err := open.Sync(); !errors.Is(err, syscall.EIO) {
		t.Errorf("fsync after: %v, want EIO", err)
	}
	if got, err := os.ReadFile(filepath.Join(dir, "kept")); err != nil || string(got) != "readable" {
		t.Errorf("read after: %q, %v", got, err)
	}
}
