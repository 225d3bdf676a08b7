package fs_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	bfs "github.com/blobseal/blobseal/fs"
	"github.com/blobseal/blobseal/fs/ext4"
	"github.com/blobseal/blobseal/image"
	"github.com/blobseal/blobseal/internal/fusetest"
	"github.com/blobseal/blobseal/internal/testenv"
)

// makeWritableImage builds a plaintext ext4 image of src (an empty tree
// when src is ""), journaled, 64 MiB, with inodes to spare.
func makeWritableImage(t testing.TB, src string) string {
	t.Helper()
	testenv.RequireTools(t, "mkfs.ext4", "debugfs")
	if src == "" {
		src = t.TempDir()
	}
	img := filepath.Join(t.TempDir(), "rw.ext4")
	if _, err := image.MakeExt4(context.Background(), src, img, image.MakeOptions{
		Label: "rw", Journal: true, Size: 64 << 20, Inodes: 8192,
	}); err != nil {
		t.Fatalf("MakeExt4: %v", err)
	}
	return img
}

// rwMount is a writable mount of a plaintext image file.
type rwMount struct {
	dir string
	srv *bfs.Server
	img string
}

// mountWritable mounts img read-write; the test's cleanup unmounts it (if
// the test has not) and checks the flush at unmount succeeded.
func mountWritable(t testing.TB, img string) *rwMount {
	t.Helper()
	return mountWritableWith(t, img, bfs.Options{})
}

// mountWritableWith is mountWritable with options (logger and source are
// the test's).
func mountWritableWith(t testing.TB, img string, opts bfs.Options) *rwMount {
	t.Helper()
	testenv.RequireFUSE(t)
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	w, err := ext4.OpenWritable(f, st.Size())
	if err != nil {
		f.Close()
		t.Fatalf("OpenWritable: %v", err)
	}
	dir := t.TempDir()
	opts.Logger = slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	opts.Source = "test-rw"
	srv, err := bfs.MountWritable(context.Background(), dir, w, opts)
	if err != nil {
		f.Close()
		t.Fatalf("MountWritable: %v", err)
	}
	m := &rwMount{dir: dir, srv: srv, img: img}
	t.Cleanup(func() {
		m.unmount(t)
		f.Close()
	})
	return m
}

// unmount ends the mount and fails the test unless the writer flushed.
func (m *rwMount) unmount(t testing.TB) {
	t.Helper()
	if err := m.srv.Unmount(); err != nil {
		t.Errorf("Unmount: %v", err)
	}
	if err := m.srv.Err(); err != nil {
		t.Errorf("flush at unmount: %v", err)
	}
}

func (m *rwMount) p(rel string) string { return filepath.Join(m.dir, rel) }

// e2fsckClean fails the test unless e2fsck -fn finds nothing to fix.
func e2fsckClean(t testing.TB, img string) {
	t.Helper()
	tools := testenv.RequireTools(t, "e2fsck")
	out, err := exec.Command(tools[0], "-fn", img).CombinedOutput()
	if err != nil {
		t.Fatalf("e2fsck -fn %s: %v (want exit 0):\n%s", img, err, out)
	}
}

// snapshot describes every entry under root: each stat field the kernel
// shows (inode numbers, times to the nanosecond, blocks), user xattrs, and
// the content or link target, so two views of one filesystem compare as
// strings. Directory sizes and link counts are included: ext4 keeps them.
func snapshot(t testing.TB, root string, withIno bool) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if rel == "lost+found" {
			return filepath.SkipDir
		}
		if rel == "." && !withIno {
			return nil // the image's root also holds lost+found
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		var b strings.Builder
		if withIno {
			fmt.Fprintf(&b, "ino=%d mtime=%d.%09d ctime=%d.%09d atime=%d.%09d blocks=%d ",
				st.Ino, st.Mtim.Sec, st.Mtim.Nsec, st.Ctim.Sec, st.Ctim.Nsec, st.Atim.Sec, st.Atim.Nsec, st.Blocks)
		}
		fmt.Fprintf(&b, "mode=%#o nlink=%d uid=%d gid=%d rdev=%#x", st.Mode, st.Nlink, st.Uid, st.Gid, st.Rdev)
		if st.Mode&unix.S_IFMT != unix.S_IFDIR || withIno {
			fmt.Fprintf(&b, " size=%d", st.Size)
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFREG:
			data, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			fmt.Fprintf(&b, " sha=%x", sha256.Sum256(data))
		case unix.S_IFLNK:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			fmt.Fprintf(&b, " ->%q", target)
		}
		if st.Mode&unix.S_IFMT != unix.S_IFLNK {
			b.WriteString(xattrString(t, p))
		}
		out[rel] = b.String()
		return nil
	})
	if err != nil {
		t.Fatalf("snapshot %s: %v", root, err)
	}
	return out
}

func xattrString(t testing.TB, p string) string {
	buf := make([]byte, 64<<10)
	n, err := unix.Llistxattr(p, buf)
	if err != nil {
		t.Fatalf("listxattr %s: %v", p, err)
	}
	var names []string
	for _, name := range strings.Split(string(buf[:n]), "\x00") {
		if strings.HasPrefix(name, "user.") {
			names = append(names, name)
		}
	}
	sort.Strings(names)
	var b strings.Builder
	for _, name := range names {
		v := make([]byte, 64<<10)
		n, err := unix.Lgetxattr(p, name, v)
		if err != nil {
			t.Fatalf("getxattr %s %s: %v", p, name, err)
		}
		fmt.Fprintf(&b, " %s=%x", name, sha256.Sum256(v[:n]))
	}
	return b.String()
}

// diffSnapshots reports every path whose description differs.
func diffSnapshots(t testing.TB, what string, want, got map[string]string) {
	t.Helper()
	bad := 0
	for p, w := range want {
		if g, ok := got[p]; !ok {
			t.Errorf("%s: %q missing", what, p)
			bad++
		} else if g != w {
			t.Errorf("%s: %q differs:\n want %s\n  got %s", what, p, w, g)
			bad++
		}
		if bad > 20 {
			t.Fatalf("%s: too many differences", what)
		}
	}
	for p := range got {
		if _, ok := want[p]; !ok {
			t.Errorf("%s: unexpected %q", what, p)
		}
	}
}

// workload changes a tree through the given root in every way the writer
// supports: files, holes, truncation, directories, renames (plain,
// replacing, NOREPLACE, EXCHANGE), hard and symbolic links, xattrs,
// modes, owners, times, a file unlinked while open, and fallocate.
func workload(t testing.TB, root string) {
	t.Helper()
	j := func(p string) string { return filepath.Join(root, p) }
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(j("a/b/c"), 0o755))
	must(os.WriteFile(j("a/small"), []byte("hello"), 0o644))
	must(os.WriteFile(j("a/b/block"), bytes.Repeat([]byte("B"), 4096*3+17), 0o600))
	big := make([]byte, 3<<20+123)
	for i := range big {
		big[i] = byte(i * 7)
	}
	must(os.WriteFile(j("big"), big, 0o644))
	// A file with holes: data at 0, 1 MiB and 9 MiB.
	f, err := os.Create(j("holey"))
	must(err)
	for _, off := range []int64{0, 1 << 20, 9 << 20} {
		_, err := f.WriteAt([]byte("island"), off)
		must(err)
	}
	must(f.Truncate(12 << 20))
	must(f.Sync())
	must(f.Close())
	must(os.Truncate(j("big"), 1<<20+5))  // shrink
	must(os.Truncate(j("a/small"), 8192)) // grow: a hole
	must(os.Rename(j("a/small"), j("a/b/c/moved")))
	must(os.WriteFile(j("victim"), []byte("replaced"), 0o644))
	must(os.WriteFile(j("replacer"), []byte("replacement"), 0o644))
	must(os.Rename(j("replacer"), j("victim")))
	must(os.Mkdir(j("newdir"), 0o700))
	must(os.Mkdir(j("dir2"), 0o755))
	must(os.Rename(j("newdir"), j("dir2/newdir")))
	if err := unix.Renameat2(unix.AT_FDCWD, j("big"), unix.AT_FDCWD, j("victim"), unix.RENAME_NOREPLACE); err != unix.EEXIST {
		t.Fatalf("rename NOREPLACE onto an existing name: %v, want EEXIST", err)
	}
	must(unix.Renameat2(unix.AT_FDCWD, j("a/b"), unix.AT_FDCWD, j("dir2"), unix.RENAME_EXCHANGE))
	must(os.Link(j("victim"), j("a/hardlink")))
	must(os.Link(j("victim"), j("dir2/hardlink2")))
	must(os.Symlink("victim", j("short-link")))
	must(os.Symlink(strings.Repeat("long/", 100)+"target", j("long-link")))
	must(unix.Setxattr(j("victim"), "user.small", []byte("v"), 0))
	must(unix.Setxattr(j("victim"), "user.large", bytes.Repeat([]byte("X"), 1500), 0))
	must(unix.Setxattr(j("a"), "user.dir", []byte("dir attr"), 0))
	must(unix.Setxattr(j("holey"), "user.gone", []byte("x"), 0))
	must(unix.Removexattr(j("holey"), "user.gone"))
	must(os.Chmod(j("holey"), 0o640|os.ModeSetgid))
	must(os.Lchown(j("a/hardlink"), 1234, 5678))
	ts := time.Date(2020, 1, 2, 3, 4, 5, 987654321, time.UTC)
	must(os.Chtimes(j("holey"), ts, ts))
	must(unix.Mkfifo(j("newfifo"), 0o644))
	must(unix.Mknod(j("newchr"), unix.S_IFCHR|0o600, int(unix.Mkdev(1, 7))))
	// Unlinked while open: still readable and writable through the handle.
	g, err := os.Create(j("tmpfile"))
	must(err)
	_, err = g.WriteString("still here")
	must(err)
	must(os.Remove(j("tmpfile")))
	_, err = g.WriteString(" after unlink")
	must(err)
	got := make([]byte, 64)
	n, err := g.ReadAt(got, 0)
	if string(got[:n]) != "still here after unlink" {
		t.Fatalf("unlinked open file reads %q (%v)", got[:n], err)
	}
	must(g.Close())
	fd, err := unix.Open(j("prealloc"), unix.O_CREAT|unix.O_RDWR, 0o644)
	must(err)
	must(unix.Fallocate(fd, 0, 0, 1<<20))
	must(unix.Fallocate(fd, unix.FALLOC_FL_KEEP_SIZE, 1<<20, 1<<20))
	must(unix.Close(fd))
	// A shared writable mapping reaches the file through page writeback.
	must(os.WriteFile(j("mapped"), make([]byte, 3*4096), 0o644))
	mf, err := os.OpenFile(j("mapped"), os.O_RDWR, 0)
	must(err)
	_, err = mmapWrite(mf, 4090, "across a page boundary")
	must(err)
	must(mf.Close())
	if b, err := os.ReadFile(j("mapped")); err != nil || string(b[4090:4112]) != "across a page boundary" {
		t.Fatalf("mapped write reads back %q (%v)", b[4090:4112], err)
	}
	must(os.RemoveAll(j("a/b/c")))
	for i := range 50 {
		must(os.WriteFile(j(fmt.Sprintf("dir2/many-%03d", i)), []byte(strings.Repeat("m", i)), 0o644))
	}
	for i := 0; i < 50; i += 3 {
		must(os.Remove(j(fmt.Sprintf("dir2/many-%03d", i))))
	}
}

// TestWritableWorkloadMatchesKernel: a workload through a writable mount
// leaves a filesystem e2fsck accepts, which the kernel's ext4 shows
// exactly as the FUSE mount showed it: every stat field (inode numbers,
// nanosecond times, blocks), xattrs, contents and link targets.
func TestWritableWorkloadMatchesKernel(t *testing.T) {
	img := makeWritableImage(t, sampleTree(t))
	m := mountWritable(t, img)
	workload(t, m.dir)
	seen := snapshot(t, m.dir, true)
	// The snapshot's reads must not have moved anything (no atime updates).
	again := snapshot(t, m.dir, true)
	diffSnapshots(t, "second FUSE look", seen, again)
	m.unmount(t)
	e2fsckClean(t, img)
	if os.Geteuid() != 0 {
		testenv.Unavailable(t, "the kernel loop-mount reference needs root")
	}
	ref := fusetest.LoopMount(t, img)
	diffSnapshots(t, "kernel ext4 vs FUSE", seen, snapshot(t, ref, true))
	if len(seen) < 80 {
		t.Errorf("snapshot has only %d entries", len(seen))
	}
}

// TestWritableRandomOpsMatchReference is fsx-style: random operations go
// to the mount and to a host directory; after each batch both trees must
// hold the same names, types, modes, sizes, contents and link counts.
// Besides path operations (each a whole open-write-close), long-lived
// handles write, read, truncate, fallocate, stat, fsync and write through
// shared mappings while their data is still in the dirty cache, whose bound is the smallest (4 MiB) so writes of up
// to 1 MiB cross it and wait for the flusher: reads after writes across
// runs, truncation below dirty data, sizes of unflushed files.
func TestWritableRandomOpsMatchReference(t *testing.T) {
	seed := testSeed(t, "BLOBSEAL_RW_SEED", 13)
	t.Logf("seed %d (BLOBSEAL_RW_SEED=%d reproduces)", seed, seed)
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	m := mountWritableWith(t, makeWritableImage(t, ""), bfs.Options{DirtyLimit: 4 << 20})
	ref := t.TempDir()
	roots := []string{m.dir, ref}
	names := []string{"f0", "f1", "f2", "d0/f3", "d0/f4", "d1/f5", "d0/d2/f6"}
	dirs := []string{"d0", "d1", "d0/d2"}
	for _, r := range roots {
		for _, d := range dirs {
			if err := os.MkdirAll(filepath.Join(r, d), 0o755); err != nil {
				t.Fatal(err)
			}
		}
	}
	h := &fsxHandles{t: t}
	t.Cleanup(h.closeAll) // before the unmount (cleanups run last first)
	randomData := func(n int) []byte {
		data := make([]byte, n)
		for i := range data {
			data[i] = byte(rng.Uint32())
		}
		return data
	}
	for batch := range 20 {
		for step := range 60 {
			op := rng.IntN(16)
			a, b := names[rng.IntN(len(names))], names[rng.IntN(len(names))]
			off := rng.Int64N(300 << 10)
			size := rng.IntN(70 << 10)
			if op >= 8 {
				if len(h.open) == 0 {
					op = 8
				}
				where := fmt.Sprintf("batch %d step %d", batch, step)
				k := rng.IntN(max(1, len(h.open)))
				switch op {
				case 8:
					h.openBoth(where, roots, a)
				case 9: // pwrite, now and then large enough to cross the bound
					if rng.IntN(4) == 0 {
						size = 1 + rng.IntN(1<<20)
					}
					data := randomData(size)
					h.both(where+" pwrite", k, func(f *os.File) (string, error) {
						n, err := f.WriteAt(data, off)
						return fmt.Sprint(n), err
					})
				case 10: // pread what may still be dirty
					at, n := rng.Int64N(1<<20), 1+rng.IntN(200<<10)
					h.both(where+" pread", k, func(f *os.File) (string, error) {
						buf := make([]byte, n)
						got, err := f.ReadAt(buf, at)
						if errors.Is(err, io.EOF) {
							err = nil
						}
						return fmt.Sprintf("%d %x", got, sha256.Sum256(buf[:got])), err
					})
				case 11: // ftruncate, often below dirty data
					to := rng.Int64N(1 << 20)
					h.both(where+" ftruncate", k, func(f *os.File) (string, error) { return "", f.Truncate(to) })
				case 12:
					h.both(where+" fstat", k, func(f *os.File) (string, error) {
						st, err := f.Stat()
						if err != nil {
							return "", err
						}
						return fmt.Sprint(st.Size()), nil
					})
				case 13:
					h.both(where+" fsync", k, func(f *os.File) (string, error) { return "", f.Sync() })
				case 14: // fallocate over or past dirty data
					mode := uint32(0)
					if rng.IntN(2) == 0 {
						mode = unix.FALLOC_FL_KEEP_SIZE
					}
					at, n := rng.Int64N(1<<20), 1+rng.Int64N(256<<10)
					h.both(where+" fallocate", k, func(f *os.File) (string, error) {
						return "", unix.Fallocate(int(f.Fd()), mode, at, n)
					})
				case 15: // a shared mapping writes into the file's pages
					at, text := rng.IntN(1<<20), fmt.Sprintf("mapped %d.%d;", batch, step)
					h.both(where+" mmap write", k, func(f *os.File) (string, error) {
						return mmapWrite(f, at, text)
					})
				}
				continue
			}
			data := randomData(size)
			var errs [2]error
			for i, r := range roots {
				pa, pb := filepath.Join(r, a), filepath.Join(r, b)
				switch op {
				case 0, 1, 2: // write at an offset
					f, err := os.OpenFile(pa, os.O_CREATE|os.O_WRONLY, 0o644)
					if err == nil {
						_, err = f.WriteAt(data, off)
						f.Close()
					}
					errs[i] = err
				case 3:
					errs[i] = os.Truncate(pa, off)
				case 4:
					errs[i] = os.Rename(pa, pb)
				case 5:
					errs[i] = os.Remove(pa)
				case 6:
					errs[i] = os.Link(pa, pb)
				case 7:
					f, err := os.OpenFile(pa, os.O_APPEND|os.O_WRONLY, 0)
					if err == nil {
						_, err = f.Write(data[:size%4096])
						f.Close()
					}
					errs[i] = err
				}
			}
			if errnoOf(errs[0]) != errnoOf(errs[1]) {
				t.Fatalf("batch %d op %d on %s,%s: mount %v, reference %v", batch, op, a, b, errs[0], errs[1])
			}
		}
		diffSnapshots(t, fmt.Sprintf("batch %d", batch), snapshot(t, ref, false), snapshot(t, m.dir, false))
		if t.Failed() {
			return
		}
	}
	if h.ops < 100 {
		t.Errorf("only %d operations went through open handles", h.ops)
	}
	h.closeAll()
	m.unmount(t)
	e2fsckClean(t, m.img)
}

// mmapWrite stores text at offset at of f through a shared mapping and
// msyncs it, in a python3 child: a page fault on a FUSE file served by
// this very process could stall it (the Go runtime waits for the faulting
// thread to stop the world, the serving threads wait for the runtime).
func mmapWrite(f *os.File, at int, text string) (string, error) {
	st, err := f.Stat()
	if err != nil || st.Size() < int64(at+len(text)) {
		return "beyond the end", err // a store there would be SIGBUS
	}
	script := `import mmap, os, sys
fd = int(sys.argv[1]); at = int(sys.argv[2]); text = sys.argv[3].encode()
m = mmap.mmap(fd, at + len(text), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
m[at:at + len(text)] = text
m.flush()
m.close()`
	cmd := exec.Command("python3", "-c", script, "3", fmt.Sprint(at), text)
	cmd.ExtraFiles = []*os.File{f}
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("%w: %s", err, out)
	}
	return "", nil
}

// fsxHandles are files open on the mount and on the reference at once.
type fsxHandles struct {
	t    *testing.T
	open [][2]*os.File
	ops  int
}

// openBoth opens name on both roots; past four handles the oldest closes.
func (h *fsxHandles) openBoth(where string, roots []string, name string) {
	var fs [2]*os.File
	var errs [2]error
	for i, r := range roots {
		fs[i], errs[i] = os.OpenFile(filepath.Join(r, name), os.O_CREATE|os.O_RDWR, 0o644)
	}
	if errnoOf(errs[0]) != errnoOf(errs[1]) {
		h.t.Fatalf("%s: open %s: mount %v, reference %v", where, name, errs[0], errs[1])
	}
	if errs[0] != nil {
		return
	}
	h.open = append(h.open, fs)
	if len(h.open) > 4 {
		h.both(where+" close", 0, func(f *os.File) (string, error) { return "", f.Close() })
		h.open = h.open[1:]
	}
}

// both runs op on handle k of each side; results and errnos must agree.
func (h *fsxHandles) both(what string, k int, op func(*os.File) (string, error)) {
	h.t.Helper()
	h.ops++
	mount, merr := op(h.open[k][0])
	ref, rerr := op(h.open[k][1])
	if errnoOf(merr) != errnoOf(rerr) || mount != ref {
		h.t.Fatalf("%s: mount %q %v, reference %q %v", what, mount, merr, ref, rerr)
	}
}

func (h *fsxHandles) closeAll() {
	for _, fs := range h.open {
		for _, f := range fs {
			if err := f.Close(); err != nil {
				h.t.Errorf("close: %v", err)
			}
		}
	}
	h.open = nil
}

func errnoOf(err error) syscall.Errno {
	var e syscall.Errno
	if errors.As(err, &e) {
		return e
	}
	if err != nil {
		return syscall.Errno(^uint(0) >> 1)
	}
	return 0
}

// testSeed is a fixed seed under CI, the env variable's if set, else the
// clock (as fs/ext4's randomized tests).
func testSeed(t *testing.T, env string, ciSeed uint64) uint64 {
	t.Helper()
	if s := os.Getenv(env); s != "" {
		var seed uint64
		if _, err := fmt.Sscan(s, &seed); err != nil {
			t.Fatalf("%s=%q: %v", env, s, err)
		}
		return seed
	}
	if testenv.InCI() {
		return ciSeed
	}
	return uint64(time.Now().UnixNano())
}

// TestWritableConcurrentWritersAndReaders: writers each fill their own
// files and directory while readers list and read everything; afterwards
// every file holds what its writer wrote and e2fsck is satisfied.
func TestWritableConcurrentWritersAndReaders(t *testing.T) {
	m := mountWritable(t, makeWritableImage(t, ""))
	const writers, files = 4, 25
	var wg sync.WaitGroup
	stop := make(chan struct{})
	errs := make(chan error, 64)
	content := func(w, i int) []byte {
		return bytes.Repeat([]byte(fmt.Sprintf("w%d-f%d;", w, i)), 100*(i+1))
	}
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			dir := m.p(fmt.Sprintf("w%d", w))
			if err := os.Mkdir(dir, 0o755); err != nil {
				errs <- err
				return
			}
			for i := range files {
				p := filepath.Join(dir, fmt.Sprintf("f%d", i))
				if err := os.WriteFile(p+".tmp", content(w, i), 0o644); err != nil {
					errs <- err
					return
				}
				if err := os.Rename(p+".tmp", p); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	var readers sync.WaitGroup
	for range 3 {
		readers.Add(1)
		go func() {
			defer readers.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				_ = filepath.WalkDir(m.dir, func(p string, d fs.DirEntry, err error) error {
					if err == nil && d.Type().IsRegular() {
						_, _ = os.ReadFile(p) // files come and go; only crashes and races count
					}
					return nil
				})
			}
		}()
	}
	wg.Wait()
	close(stop)
	readers.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	for w := range writers {
		for i := range files {
			got, err := os.ReadFile(m.p(fmt.Sprintf("w%d/f%d", w, i)))
			if err != nil || !bytes.Equal(got, content(w, i)) {
				t.Fatalf("w%d/f%d: %d bytes, %v", w, i, len(got), err)
			}
		}
	}
	m.unmount(t)
	e2fsckClean(t, m.img)
}

// TestWritableErrnos: the errors a writable mount answers are the ones
// ext4 answers.
func TestWritableErrnos(t *testing.T) {
	m := mountWritable(t, makeWritableImage(t, ""))
	if err := os.Mkdir(m.p("d"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(m.p("d/f"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		what string
		err  error
		want syscall.Errno
	}{
		{"mkdir existing", os.Mkdir(m.p("d"), 0o755), syscall.EEXIST},
		{"rmdir non-empty", unix.Rmdir(m.p("d")), syscall.ENOTEMPTY},
		{"unlink dir", unix.Unlink(m.p("d")), syscall.EISDIR},
		{"link to dir", os.Link(m.p("d"), m.p("d2")), syscall.EPERM},
		{"long name", os.WriteFile(m.p(strings.Repeat("x", 256)), nil, 0o644), syscall.ENAMETOOLONG},
		{"dir into itself", os.Rename(m.p("d"), m.p("d/sub")), syscall.EINVAL},
		{"file as dir", os.WriteFile(m.p("d/f/x"), nil, 0o644), syscall.ENOTDIR},
		{"rmdir file", unix.Rmdir(m.p("d/f")), syscall.ENOTDIR},
		{"removexattr absent", unix.Removexattr(m.p("d/f"), "user.none"), syscall.ENODATA},
	} {
		if got := errnoOf(c.err); got != c.want {
			t.Errorf("%s: %v, want %v", c.what, c.err, c.want)
		}
	}
	// ENOSPC: fill the 64 MiB filesystem; the mount stays usable and clean.
	f, err := os.Create(m.p("fill"))
	if err != nil {
		t.Fatal(err)
	}
	chunk := bytes.Repeat([]byte{1}, 1<<20)
	for i := 0; ; i++ {
		if _, err = f.Write(chunk); err != nil || i > 100 {
			break
		}
	}
	// The write cache may take the last writes before its flush meets
	// ENOSPC; then close reports it (as the kernel's writeback errors).
	cerr := f.Close()
	if errnoOf(err) != syscall.ENOSPC && errnoOf(cerr) != syscall.ENOSPC {
		t.Errorf("filling the filesystem: write %v, close %v, want ENOSPC from one of them", err, cerr)
	}
	var sfs unix.Statfs_t
	if err := unix.Statfs(m.dir, &sfs); err != nil || sfs.Bavail > 64 {
		t.Errorf("statfs after filling: %d blocks available (%v)", sfs.Bavail, err)
	}
	if err := os.Remove(m.p("fill")); err != nil {
		t.Fatal(err)
	}
	waitForFreeBytes(t, m.dir, 40<<20)
	m.unmount(t)
	e2fsckClean(t, m.img)
}

// waitForFreeBytes waits until statfs of dir shows at least n bytes free.
// FUSE sends RELEASE after close(2) returns, asynchronously: until it
// arrives a removed file is still held open, and its blocks are freed when
// it does (a FUSE limit; the kernel's ext4 frees at once).
func waitForFreeBytes(t *testing.T, dir string, n uint64) {
	t.Helper()
	var sfs unix.Statfs_t
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		err := unix.Statfs(dir, &sfs)
		if err == nil && sfs.Bfree*uint64(sfs.Bsize) >= n {
			return
		}
		if err != nil || time.Now().After(deadline) {
			t.Errorf("statfs of %s: %d blocks of %d bytes free (%v), want %d bytes", dir, sfs.Bfree, sfs.Bsize, err, n)
			return
		}
	}
}
