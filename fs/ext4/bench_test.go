package ext4

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/blobseal/blobseal/internal/testenv"
)

// BenchmarkReadFile reads a 64 MiB file sequentially in 1 MiB ReadAt calls
// from an in-memory image (4 KiB blocks).
func BenchmarkReadFile(b *testing.B) {
	src := b.TempDir()
	writeFile(b, filepath.Join(src, "big"), fill(1, 64<<20), 0o644)
	img := mkfs(b, nil, src, 80, "-b", "4096")
	data, err := os.ReadFile(img)
	must(b, err)
	f, err := Open(bytes.NewReader(data), int64(len(data)))
	must(b, err)
	in, err := lookupPath(f, "/big")
	must(b, err)
	buf := make([]byte, 1<<20)
	b.SetBytes(int64(in.Size))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for off := int64(0); off < int64(in.Size); off += int64(len(buf)) {
			if _, err := f.ReadAt(in, buf, off); err != nil {
				b.Fatal(err)
			}
		}
	}
}

// bigDirImage has the kernel create a 20,000-entry directory (indexed
// unless mkfs args disable dir_index) and returns the image and the names.
func bigDirImage(b *testing.B, args ...string) ([]byte, []string) {
	tools := testenv.RequireTools(b, "mkfs.ext4", "mount", "umount")
	testenv.RequireRoot(b)
	img := mkfs(b, nil, "", 40, append(args, "-N", "25000")...)
	mnt := b.TempDir()
	runCmd(b, nil, tools[1], "-o", "loop", img, mnt)
	var names []string
	must(b, os.Mkdir(filepath.Join(mnt, "big"), 0o755))
	for i := 0; i < 20000; i++ {
		n := fmt.Sprintf("entry-%06d", i*7919%20000)
		names = append(names, n)
		fh, err := os.Create(filepath.Join(mnt, "big", n))
		must(b, err)
		must(b, fh.Close())
	}
	runCmd(b, nil, tools[2], mnt)
	data, err := os.ReadFile(img)
	must(b, err)
	return data, names
}

func benchLookup(b *testing.B, args ...string) {
	data, names := bigDirImage(b, args...)
	f, err := Open(bytes.NewReader(data), int64(len(data)))
	must(b, err)
	dir, err := lookupPath(f, "/big")
	must(b, err)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := f.Lookup(dir, names[i%len(names)]); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkLookupHtree looks names up in a 20,000-entry indexed directory.
func BenchmarkLookupHtree(b *testing.B) { benchLookup(b, "-b", "4096") }

// BenchmarkLookupLinear is the same directory without dir_index, for contrast.
func BenchmarkLookupLinear(b *testing.B) { benchLookup(b, "-b", "4096", "-O", "^dir_index") }

// BenchmarkWriterUntar is metadata-heavy work in-process, like untarring a
// source tree: 3,000 small files in 110 nested directories, written
// through the Writer onto a fresh journaled image file, then synced.
func BenchmarkWriterUntar(b *testing.B) {
	data := fill(7, 8<<10)
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		img := mkfs(b, nil, "", 128, "-b", "4096", "-N", "8192")
		w := openWritable(b, img)
		b.StartTimer()
		for d := 0; d < 10; d++ {
			top, err := w.Mkdir(RootIno, fmt.Sprintf("pkg%02d", d), 0o755, 0, 0)
			must(b, err)
			for s := 0; s < 10; s++ {
				sub, err := w.Mkdir(top.Ino, fmt.Sprintf("sub%02d", s), 0o755, 0, 0)
				must(b, err)
				for n := 0; n < 30; n++ {
					in, err := w.Create(sub.Ino, fmt.Sprintf("file_%03d_test.go", n), 0o644, 0, 0)
					must(b, err)
					size := 200 + (d*300+s*30+n)*37%(8<<10-200)
					if _, err := w.WriteAt(in.Ino, data[:size], 0); err != nil {
						b.Fatal(err)
					}
				}
			}
		}
		must(b, w.Sync())
	}
}
