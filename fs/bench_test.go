package fs_test

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/blobseal/blobseal/image"
)

const benchFileSize = 64 << 20

// benchImage is a plaintext image holding one 64 MiB random file.
func benchImage(b *testing.B) string {
	b.Helper()
	src := b.TempDir()
	mustWrite(b, filepath.Join(src, "big"), randomBytes(b, benchFileSize), 0o644)
	return makeImage(b, src)
}

// BenchmarkFUSESequentialRead reads a 64 MiB file through the mount with
// 1 MiB reads. The file's pages are dropped from the FUSE mount's cache
// before each pass (the image file itself stays in the page cache), so
// this measures FUSE plus the ext4 reader, not the disk.
func BenchmarkFUSESequentialRead(b *testing.B) {
	mnt, _ := mountTree(b, openImage(b, benchImage(b)), io.Discard)
	f, err := os.Open(filepath.Join(mnt, "big"))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	b.SetBytes(benchFileSize)
	b.ResetTimer()
	for range b.N {
		if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
			b.Fatal(err)
		}
		for off := int64(0); off < benchFileSize; off += int64(len(buf)) {
			if _, err := f.ReadAt(buf, off); err != nil {
				b.Fatal(err)
			}
		}
	}
}

// BenchmarkTreeSequentialRead is the same read straight from the ext4
// reader, without FUSE: the difference is the cost of the kernel round trip.
func BenchmarkTreeSequentialRead(b *testing.B) {
	fsys := openImage(b, benchImage(b))
	root, err := fsys.Inode(2)
	if err != nil {
		b.Fatal(err)
	}
	ino, err := fsys.Lookup(root, "big")
	if err != nil {
		b.Fatal(err)
	}
	in, err := fsys.Inode(ino)
	if err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	b.SetBytes(benchFileSize)
	b.ResetTimer()
	for range b.N {
		for off := int64(0); off < benchFileSize; off += int64(len(buf)) {
			if _, err := fsys.ReadAt(in, buf, off); err != nil && err != io.EOF {
				b.Fatal(err)
			}
		}
	}
}

// BenchmarkFUSESequentialWrite writes 32 MiB through a writable mount of a
// plaintext image in 1 MiB writes and fsyncs, truncating first, so each
// pass allocates afresh: FUSE, the dirty cache and the ext4 Writer.
func BenchmarkFUSESequentialWrite(b *testing.B) {
	const size = 32 << 20
	img := filepath.Join(b.TempDir(), "rw.ext4")
	if _, err := image.MakeExt4(context.Background(), b.TempDir(), img, image.MakeOptions{
		Label: "bench", Journal: true, Size: 256 << 20,
	}); err != nil {
		b.Fatal(err)
	}
	m := mountWritable(b, img)
	f, err := os.Create(m.p("seq"))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	buf := randomBytes(b, 1<<20)
	b.SetBytes(size)
	b.ResetTimer()
	for range b.N {
		if err := f.Truncate(0); err != nil {
			b.Fatal(err)
		}
		for off := int64(0); off < size; off += int64(len(buf)) {
			if _, err := f.WriteAt(buf, off); err != nil {
				b.Fatal(err)
			}
		}
		if err := f.Sync(); err != nil {
			b.Fatal(err)
		}
	}
}
