package fs_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/blobseal/blobseal/crypto"
	"github.com/blobseal/blobseal/fs"
	"github.com/blobseal/blobseal/fs/ext4"
	"github.com/blobseal/blobseal/image"
	"github.com/blobseal/blobseal/internal/fusetest"
	"github.com/blobseal/blobseal/internal/testenv"
)

func TestMain(m *testing.M) { os.Exit(fusetest.RunMain(m)) }

// logBuffer collects slog output of a mount for assertions.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// mountTree mounts tree on a fresh directory, unmounting at cleanup.
func mountTree(t testing.TB, tree fs.Tree, logs io.Writer) (string, *fs.Server) {
	t.Helper()
	return mountTreeWith(t, tree, logs, fs.Options{})
}

// mountTreeWith mounts tree with opts (logger and source filled in) and
// unmounts it when the test ends.
func mountTreeWith(t testing.TB, tree fs.Tree, logs io.Writer, opts fs.Options) (string, *fs.Server) {
	t.Helper()
	testenv.RequireFUSE(t)
	if logs == nil {
		logs = testWriter{t}
	}
	dir := t.TempDir()
	opts.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	opts.Source = "test-image"
	srv, err := fs.Mount(context.Background(), dir, tree, opts)
	if err != nil {
		t.Fatalf("Mount: %v", err)
	}
	t.Cleanup(func() {
		if err := srv.Unmount(); err != nil {
			t.Errorf("Unmount: %v", err)
		}
	})
	return dir, srv
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// openImage opens a plaintext ext4 image file.
func openImage(t testing.TB, path string) *ext4.FS {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	fsys, err := ext4.Open(f, st.Size())
	if err != nil {
		t.Fatalf("ext4.Open: %v", err)
	}
	return fsys
}

// makeImage builds a plaintext ext4 image of src.
func makeImage(t testing.TB, src string) string {
	t.Helper()
	testenv.RequireTools(t, "mkfs.ext4", "debugfs")
	img := filepath.Join(t.TempDir(), "plain.ext4")
	if _, err := image.MakeExt4(context.Background(), src, img, image.MakeOptions{Label: "test"}); err != nil {
		t.Fatalf("MakeExt4: %v", err)
	}
	return img
}

func mustWrite(t testing.TB, path string, data []byte, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil { // past the umask
		t.Fatal(err)
	}
}

func randomBytes(t testing.TB, n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// sampleTree creates a tree exercising every feature the mount must carry:
// sizes around block boundaries, modes with special bits, owners, symlinks
// short (inline) and long, hard links, xattrs small and large, empty files
// and directories, 255-byte and non-UTF-8 names, a deep path, a fifo and a
// device node (as root), and nanosecond times.
func sampleTree(t testing.TB) string {
	t.Helper()
	src := filepath.Join(t.TempDir(), "src")
	for i, size := range []int{0, 1, 59, 60, 4095, 4096, 4097, 65536, 1<<20 + 7, 3<<20 + 1} {
		mustWrite(t, filepath.Join(src, "files", fmt.Sprintf("f%02d-%d", i, size)), randomBytes(t, size), 0o644)
	}
	mustWrite(t, filepath.Join(src, "modes", "private"), []byte("secret-ish"), 0o600)
	mustWrite(t, filepath.Join(src, "modes", "exec"), []byte("#!/bin/sh\n"), 0o755)
	mustWrite(t, filepath.Join(src, "modes", "setuid"), []byte("x"), 0o755)
	if err := os.Chmod(filepath.Join(src, "modes", "setuid"), 0o755|os.ModeSetuid|os.ModeSticky); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, filepath.Join(src, "empty"), nil, 0o644)
	for _, d := range []string{"emptydir", "links"} {
		if err := os.MkdirAll(filepath.Join(src, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	// Symlinks: short (stored in the inode), long (a block), dangling.
	links := map[string]string{"short": "../files/f01-1", "long": strings.Repeat("x/", 200) + "end", "dangling": "/nonexistent/target"}
	for name, target := range links {
		if err := os.Symlink(target, filepath.Join(src, "links", name)); err != nil {
			t.Fatal(err)
		}
	}
	// Hard links: three names for one inode, across directories.
	mustWrite(t, filepath.Join(src, "hard", "a"), []byte("shared content"), 0o640)
	for _, n := range []string{"hard/b", "hard/sub/c"} {
		if err := os.MkdirAll(filepath.Dir(filepath.Join(src, n)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Link(filepath.Join(src, "hard", "a"), filepath.Join(src, n)); err != nil {
			t.Fatal(err)
		}
	}
	// Names: the longest allowed, non-UTF-8 bytes, spaces and newlines.
	mustWrite(t, filepath.Join(src, "names", strings.Repeat("n", 255)), []byte("long name"), 0o644)
	mustWrite(t, filepath.Join(src, "names", "bad-\xff\xfe-utf8"), []byte("latin1"), 0o644)
	mustWrite(t, filepath.Join(src, "names", "with space\nand newline"), []byte("odd"), 0o644)
	// A deep path.
	deep := src
	for i := 0; i < 40; i++ {
		deep = filepath.Join(deep, fmt.Sprintf("level%02d", i))
	}
	mustWrite(t, filepath.Join(deep, "bottom"), []byte("deep"), 0o644)
	// Xattrs: small (in the inode) and large (an xattr block).
	xf := filepath.Join(src, "xattrs")
	mustWrite(t, xf, []byte("has attributes"), 0o644)
	for name, val := range map[string][]byte{"user.small": []byte("v"), "user.large": bytes.Repeat([]byte("L"), 2000), "user.empty": nil} {
		if err := unix.Setxattr(xf, name, val, 0); err != nil {
			testenv.Unavailable(t, "user xattrs not supported on %s: %v", src, err)
		}
	}
	if err := unix.Setxattr(filepath.Join(src, "emptydir"), "user.dir", []byte("on a dir"), 0); err != nil {
		t.Fatal(err)
	}
	if os.Geteuid() == 0 {
		if err := unix.Mkfifo(filepath.Join(src, "fifo"), 0o640); err != nil {
			t.Fatal(err)
		}
		if err := unix.Mknod(filepath.Join(src, "chardev"), unix.S_IFCHR|0o600, int(unix.Mkdev(1, 3))); err != nil {
			t.Fatal(err)
		}
		if err := unix.Mknod(filepath.Join(src, "blockdev"), unix.S_IFBLK|0o600, int(unix.Mkdev(259, 70000))); err != nil {
			t.Fatal(err)
		}
		for i, p := range []string{"modes/private", "hard/a", "emptydir", "links/short"} {
			if err := os.Lchown(filepath.Join(src, p), 1000+i, 2000+i*70000); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Nanosecond times on a few entries (applied last: writes move mtimes).
	ts := time.Date(2011, 2, 3, 4, 5, 6, 123456789, time.UTC)
	for _, p := range []string{"empty", "files/f05-4096", "hard/a", "emptydir"} {
		if err := os.Chtimes(filepath.Join(src, p), ts, ts); err != nil {
			t.Fatal(err)
		}
	}
	return src
}

// TestMountMatchesSourceAndKernel is the main conformance test: the FUSE
// view equals the source directory (content, modes, owners, link targets,
// hard-link identity, xattrs) and equals the kernel's own ext4 view of the
// same image in every stat field, times and inode numbers included.
func TestMountMatchesSourceAndKernel(t *testing.T) {
	src := sampleTree(t)
	img := makeImage(t, src)
	mnt, _ := mountTree(t, openImage(t, img), nil)

	fusetest.CompareTrees(t, src, mnt, fusetest.Compare{Xattrs: true, Ignore: []string{"lost+found"}})
	if os.Geteuid() != 0 {
		testenv.Unavailable(t, "the kernel loop-mount reference needs root")
	}
	ref := fusetest.LoopMount(t, img)
	fusetest.CompareTrees(t, ref, mnt, fusetest.Compare{Xattrs: true, Times: true, Inodes: true})
	// The birth-time comparison above is not vacuous: statx reports one.
	var sx unix.Statx_t
	if err := unix.Statx(unix.AT_FDCWD, filepath.Join(mnt, "empty"), 0, unix.STATX_BTIME, &sx); err != nil {
		t.Fatal(err)
	}
	if sx.Mask&unix.STATX_BTIME == 0 || sx.Btime.Sec == 0 {
		t.Errorf("statx through the mount gives no birth time (mask %#x)", sx.Mask)
	}
}

// TestDirectIO: each mode reads the same bytes; a file opened for direct
// I/O reaches the server on every read (a second read is not served from the
// page cache), and can still be mapped (the mount asks the kernel for
// FUSE_DIRECT_IO_ALLOW_MMAP, Linux 6.6+). Auto reads only large files
// directly, and only where the kernel offers that.
func TestDirectIO(t *testing.T) {
	src := filepath.Join(t.TempDir(), "src")
	small, large := randomBytes(t, 1<<20+3), randomBytes(t, fs.DirectIOMinSize+5)
	mustWrite(t, filepath.Join(src, "small"), small, 0o644)
	mustWrite(t, filepath.Join(src, "large"), large, 0o644)
	img := makeImage(t, src)

	var uts unix.Utsname
	_ = unix.Uname(&uts)
	kernel := unix.ByteSliceToString(uts.Release[:])
	var major, minor int
	fmt.Sscanf(kernel, "%d.%d", &major, &minor)
	mmapAllowed := major > 6 || major == 6 && minor >= 6

	for _, tc := range []struct {
		mode               fs.DirectIOMode
		smallDirect, large bool
	}{
		{fs.DirectIOOff, false, false},
		{fs.DirectIOOn, true, true},
		{fs.DirectIOAuto, false, mmapAllowed},
	} {
		t.Run(fmt.Sprint(tc.mode), func(t *testing.T) {
			var reads atomic.Int64
			observe := func(op string, _ time.Duration, _ syscall.Errno) {
				if op == "read" {
					reads.Add(1)
				}
			}
			mnt, _ := mountTreeWith(t, openImage(t, img), nil, fs.Options{DirectIO: tc.mode, Observe: observe})
			for _, f := range []struct {
				name   string
				want   []byte
				direct bool
			}{{"small", small, tc.smallDirect}, {"large", large, tc.large}} {
				path := filepath.Join(mnt, f.name)
				for pass := range 2 {
					before := reads.Load()
					got, err := os.ReadFile(path)
					if err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(got, f.want) {
						t.Fatalf("%s: pass %d read wrong bytes", f.name, pass)
					}
					if served := reads.Load() - before; pass == 1 && (served > 0) != f.direct {
						t.Errorf("%s: second read made %d FUSE reads; direct I/O expected: %v", f.name, served, f.direct)
					}
				}
				if !f.direct || mmapAllowed {
					checkMapped(t, path, f.want, kernel)
				}
			}
		})
	}
}

// checkMapped maps path in another process and compares what it reads with
// want. Not in this one: a page fault on the mount would wait for a FUSE
// read served by this process, while the Go runtime, which sees the
// faulting goroutine as running, waits for it to stop the world.
func checkMapped(t *testing.T, path string, want []byte, kernel string) {
	t.Helper()
	testenv.RequireTools(t, "python3")
	const script = "import hashlib, mmap, sys\n" +
		"f = open(sys.argv[1], 'rb')\n" +
		"m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n" +
		"print(hashlib.sha256(m).hexdigest())\n"
	out, err := exec.Command("python3", "-c", script, path).CombinedOutput()
	if err != nil {
		t.Fatalf("mmap of %s: %v: %s (kernel %s)", path, err, out, kernel)
	}
	sum := sha256.Sum256(want)
	if got := strings.TrimSpace(string(out)); got != hex.EncodeToString(sum[:]) {
		t.Errorf("mapped %s reads differently (sha256 %s)", path, got)
	}
}

// TestStatfsMatchesKernel compares statfs(2) with the kernel's loop mount.
func TestStatfsMatchesKernel(t *testing.T) {
	src := t.TempDir()
	mustWrite(t, filepath.Join(src, "a"), randomBytes(t, 100000), 0o644)
	img := makeImage(t, src)
	mnt, _ := mountTree(t, openImage(t, img), nil)
	ref := fusetest.LoopMount(t, img)
	var got, want unix.Statfs_t
	if err := unix.Statfs(mnt, &got); err != nil {
		t.Fatal(err)
	}
	if err := unix.Statfs(ref, &want); err != nil {
		t.Fatal(err)
	}
	if got.Bsize != want.Bsize || got.Blocks != want.Blocks || got.Bfree != want.Bfree ||
		got.Files != want.Files || got.Ffree != want.Ffree || got.Namelen != want.Namelen {
		t.Errorf("statfs: got bsize %d blocks %d bfree %d files %d ffree %d namelen %d; kernel %d %d %d %d %d %d",
			got.Bsize, got.Blocks, got.Bfree, got.Files, got.Ffree, got.Namelen,
			want.Bsize, want.Blocks, want.Bfree, want.Files, want.Ffree, want.Namelen)
	}
	if got.Flags&unix.ST_RDONLY == 0 {
		t.Errorf("mount is not flagged read-only (flags %#x)", got.Flags)
	}
}

// TestLargeDirectory lists and stats a directory of 20,000 entries that
// the kernel created (so it is hash-indexed) and compares every entry
// with the kernel's view.
func TestLargeDirectory(t *testing.T) {
	const n = 20000
	name := func(i int) string { return fmt.Sprintf("entry-%05d-%s", i, strings.Repeat("p", i%40)) }
	empty := t.TempDir()
	testenv.RequireTools(t, "mkfs.ext4", "debugfs")
	img := filepath.Join(t.TempDir(), "big.ext4")
	if _, err := image.MakeExt4(context.Background(), empty, img, image.MakeOptions{Size: 64 << 20, Inodes: n + 1000}); err != nil {
		t.Fatal(err)
	}
	fusetest.EditImage(t, img, func(dir string) {
		big := filepath.Join(dir, "big")
		if err := os.Mkdir(big, 0o755); err != nil {
			t.Fatal(err)
		}
		for i := 0; i < n; i++ {
			f, err := os.Create(filepath.Join(big, name(i)))
			if err != nil {
				t.Fatal(err)
			}
			if i%1000 == 0 {
				fmt.Fprintf(f, "content of %d", i)
			}
			f.Close()
		}
	})
	mnt, _ := mountTree(t, openImage(t, img), nil)
	entries, err := os.ReadDir(filepath.Join(mnt, "big"))
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != n {
		t.Fatalf("listed %d entries, want %d", len(entries), n)
	}
	// Lookups by name before any listing of the directory they are in
	// reach the hash index, not the kernel's cache.
	mnt2, _ := mountTree(t, openImage(t, img), nil)
	for _, i := range []int{0, 1, 4999, 12345, n - 1} {
		if _, err := os.Lstat(filepath.Join(mnt2, "big", name(i))); err != nil {
			t.Errorf("lookup %s: %v", name(i), err)
		}
	}
	if _, err := os.Lstat(filepath.Join(mnt2, "big", "entry-99999")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("lookup of a missing name: %v, want ENOENT", err)
	}
	fusetest.CompareTrees(t, fusetest.LoopMount(t, img), mnt, fusetest.Compare{Times: true, Inodes: true})
}

// TestSparseFile mounts an image holding a 5 GiB file that is mostly a
// hole: size and allocation match the kernel, the data islands read back,
// and the holes read as zeros.
func TestSparseFile(t *testing.T) {
	const size = 5 << 30
	src := t.TempDir()
	p := filepath.Join(src, "sparse")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	islands := map[int64][]byte{0: randomBytes(t, 5000), 1<<30 + 123: randomBytes(t, 70000), size - 4096: randomBytes(t, 4096)}
	for off, data := range islands {
		if _, err := f.WriteAt(data, off); err != nil {
			t.Fatal(err)
		}
	}
	f.Close()
	img := makeImage(t, src)
	if st, err := os.Stat(img); err != nil || st.Size() > 64<<20 {
		t.Fatalf("image of a sparse file is %v bytes (err %v); holes must not be allocated", st.Size(), err)
	}
	mnt, _ := mountTree(t, openImage(t, img), nil)
	var st unix.Stat_t
	if err := unix.Stat(filepath.Join(mnt, "sparse"), &st); err != nil {
		t.Fatal(err)
	}
	if st.Size != size {
		t.Fatalf("size %d, want %d", st.Size, int64(size))
	}
	if os.Geteuid() == 0 {
		var ref unix.Stat_t
		if err := unix.Stat(filepath.Join(fusetest.LoopMount(t, img), "sparse"), &ref); err != nil {
			t.Fatal(err)
		}
		if ref.Blocks != st.Blocks || ref.Ino != st.Ino {
			t.Errorf("blocks/ino %d/%d, kernel %d/%d", st.Blocks, st.Ino, ref.Blocks, ref.Ino)
		}
	}
	g, err := os.Open(filepath.Join(mnt, "sparse"))
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	for off, data := range islands {
		got := make([]byte, len(data)+2000)
		start := max(off-1000, 0)
		n, err := g.ReadAt(got, start)
		if err != nil && !(errors.Is(err, io.EOF) && start+int64(n) == size) {
			t.Fatalf("read at %d: %v", start, err)
		}
		want := make([]byte, n)
		copy(want[off-start:], data)
		if !bytes.Equal(got[:n], want) {
			t.Errorf("island at %d reads back differently", off)
		}
	}
	// A hole in the middle of the file reads as zeros, and the last byte
	// is followed by EOF.
	hole := make([]byte, 1<<20)
	if _, err := g.ReadAt(hole, 3<<30); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(hole, make([]byte, len(hole))) {
		t.Error("hole does not read as zeros")
	}
	if n, err := g.ReadAt(make([]byte, 10), size-1); n != 1 || !errors.Is(err, io.EOF) {
		t.Errorf("read at the last byte: %d, %v; want 1, EOF", n, err)
	}
	if testing.Short() {
		return
	}
	// All 5 GiB, byte for byte against the source.
	start := time.Now()
	if err := fusetest.SameContent(p, filepath.Join(mnt, "sparse")); err != nil {
		t.Error(err)
	}
	t.Logf("compared %d GiB in %v", size>>30, time.Since(start).Round(time.Millisecond))
}

// TestWritesAreRefused: every kind of modification fails with EROFS and
// leaves the tree as it was.
func TestWritesAreRefused(t *testing.T) {
	src := t.TempDir()
	mustWrite(t, filepath.Join(src, "file"), []byte("data"), 0o666)
	if err := os.Mkdir(filepath.Join(src, "dir"), 0o777); err != nil {
		t.Fatal(err)
	}
	mnt, _ := mountTree(t, openImage(t, makeImage(t, src)), nil)
	file, dir := filepath.Join(mnt, "file"), filepath.Join(mnt, "dir")
	ops := map[string]func() error{
		"open for write": func() error { f, err := os.OpenFile(file, os.O_WRONLY, 0); f.Close(); return err },
		"truncate":       func() error { return os.Truncate(file, 0) },
		"create":         func() error { f, err := os.Create(filepath.Join(dir, "new")); f.Close(); return err },
		"mkdir":          func() error { return os.Mkdir(filepath.Join(dir, "sub"), 0o755) },
		"remove":         func() error { return os.Remove(file) },
		"rmdir":          func() error { return os.Remove(dir) },
		"rename":         func() error { return os.Rename(file, filepath.Join(dir, "moved")) },
		"link":           func() error { return os.Link(file, filepath.Join(dir, "hard")) },
		"symlink":        func() error { return os.Symlink("x", filepath.Join(dir, "sym")) },
		"chmod":          func() error { return os.Chmod(file, 0o600) },
		"chtimes":        func() error { return os.Chtimes(file, time.Now(), time.Now()) },
		"setxattr":       func() error { return unix.Setxattr(file, "user.x", []byte("1"), 0) },
		"removexattr":    func() error { return unix.Removexattr(file, "user.x") },
		"mknod":          func() error { return unix.Mkfifo(filepath.Join(dir, "fifo"), 0o644) },
	}
	for name, op := range ops {
		if err := op(); !errors.Is(err, syscall.EROFS) {
			t.Errorf("%s: %v, want EROFS", name, err)
		}
	}
	if b, err := os.ReadFile(file); err != nil || string(b) != "data" {
		t.Errorf("file after refused writes: %q, %v", b, err)
	}
}

// TestCryptsetupImageMounts: an image cryptsetup encrypted (LUKS2 with the
// Azure tooling's parameters, and cryptsetup's argon2id defaults) mounts
// unchanged through crypto.Open and shows the same tree as the kernel's
// view of the plaintext.
func TestCryptsetupImageMounts(t *testing.T) {
	testenv.RequireTools(t, "cryptsetup")
	src := sampleTree(t)
	plain := makeImage(t, src)
	for name, args := range map[string][]string{
		"azure pbkdf2 4096": {"--type", "luks2", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--sector-size", "4096"},
		"argon2id 512":      {"--type", "luks2", "--pbkdf", "argon2id", "--pbkdf-memory", "32768", "--pbkdf-force-iterations", "4", "--sector-size", "512"},
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			img := filepath.Join(dir, "luks.img")
			copyFile(t, plain, img)
			st, _ := os.Stat(img)
			if err := os.Truncate(img, st.Size()+32<<20); err != nil {
				t.Fatal(err)
			}
			key := randomBytes(t, 32)
			keyFile := filepath.Join(dir, "key")
			if err := os.WriteFile(keyFile, key, 0o600); err != nil {
				t.Fatal(err)
			}
			cmd := append([]string{"reencrypt", "--encrypt", "--batch-mode", "--cipher", "aes-xts-plain64",
				"--reduce-device-size", "32M", "--key-file", keyFile}, args...)
			if out, err := exec.Command("cryptsetup", append(cmd, img)...).CombinedOutput(); err != nil {
				t.Fatalf("cryptsetup: %v: %s", err, out)
			}
			f, err := os.Open(img)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			st, _ = f.Stat()
			vol, err := crypto.Open(f, st.Size(), key, crypto.OpenOptions{})
			if err != nil {
				t.Fatalf("crypto.Open: %v", err)
			}
			defer vol.Close()
			fsys, err := ext4.Open(vol, vol.Size())
			if err != nil {
				t.Fatalf("ext4.Open on the decrypted volume: %v", err)
			}
			mnt, _ := mountTree(t, fsys, nil)
			fusetest.CompareTrees(t, src, mnt, fusetest.Compare{Xattrs: true, Ignore: []string{"lost+found"}})
			if os.Geteuid() == 0 {
				fusetest.CompareTrees(t, fusetest.LoopMount(t, plain), mnt, fusetest.Compare{Xattrs: true, Times: true, Inodes: true})
			}
		})
	}
}

func copyFile(t testing.TB, from, to string) {
	t.Helper()
	in, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.Create(to)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestNoLeaksAfterUnmount: mounting, reading and unmounting leaves no
// goroutine and no file descriptor behind, and nothing mounted.
func TestNoLeaksAfterUnmount(t *testing.T) {
	testenv.RequireFUSE(t)
	src := sampleTree(t)
	img := makeImage(t, src)
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, _ := f.Stat()
	fsys, err := ext4.Open(f, st.Size())
	if err != nil {
		t.Fatal(err)
	}
	// Round 0 warms up what the process keeps for its lifetime (the
	// runtime's and os/exec's descriptors); rounds 1..3 must add nothing.
	var goroutines, fds int
	for round := 0; round < 4; round++ {
		if round == 1 {
			runtime.GC()
			goroutines, fds = runtime.NumGoroutine(), countFDs(t)
		}
		dir := t.TempDir()
		srv, err := fs.Mount(context.Background(), dir, fsys, fs.Options{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = srv.Unmount() }) // a no-op once unmounted below
		if _, err := os.ReadFile(filepath.Join(dir, "files", "f09-3145729")); err != nil {
			t.Error(err)
		}
		if _, err := os.ReadDir(filepath.Join(dir, "names")); err != nil {
			t.Error(err)
		}
		if err := srv.Unmount(); err != nil {
			t.Fatalf("Unmount: %v", err)
		}
		select {
		case <-srv.Done():
		default:
			t.Fatal("Unmount returned before the server stopped")
		}
		if fusetest.IsMounted(t, dir) {
			t.Fatalf("%s still mounted after Unmount", dir)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for (runtime.NumGoroutine() > goroutines || countFDs(t) > fds) && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > goroutines {
		buf := make([]byte, 1<<20)
		t.Errorf("%d goroutines after unmount, %d before:\n%s", n, goroutines, buf[:runtime.Stack(buf, true)])
	}
	if n := countFDs(t); n > fds {
		t.Errorf("%d open file descriptors after unmount, %d before: %v", n, fds, listFDs())
	}
}

func listFDs() []string {
	ents, _ := os.ReadDir("/proc/self/fd")
	var out []string
	for _, e := range ents {
		target, _ := os.Readlink(filepath.Join("/proc/self/fd", e.Name()))
		out = append(out, e.Name()+"->"+target)
	}
	return out
}

func countFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// TestUnmountBusyDetachesLazily: an open file keeps the mount busy; after
// the grace period Unmount detaches lazily and says so, and the server
// stops once the file is closed.
func TestUnmountBusyDetachesLazily(t *testing.T) {
	testenv.RequireFUSE(t)
	src := t.TempDir()
	mustWrite(t, filepath.Join(src, "f"), []byte("busy"), 0o644)
	fsys := openImage(t, makeImage(t, src))
	dir := t.TempDir()
	srv, err := fs.Mount(context.Background(), dir, fsys, fs.Options{UnmountGrace: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Unmount() })
	f, err := os.Open(filepath.Join(dir, "f"))
	if err != nil {
		t.Fatal(err)
	}
	err = srv.Unmount()
	if err == nil || !strings.Contains(err.Error(), "lazily") {
		t.Errorf("Unmount of a busy mount: %v, want a lazy-detach error", err)
	}
	if fusetest.IsMounted(t, dir) {
		t.Errorf("%s still in the mount table after lazy detach", dir)
	}
	b := make([]byte, 4)
	if _, err := f.Read(b); err != nil || string(b) != "busy" {
		t.Errorf("open file after lazy detach: %q, %v", b, err)
	}
	f.Close()
	select {
	case <-srv.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("server still running 10s after the last file closed")
	}
}

// TestMountRefusesBadMountpoint: clear errors, no mount.
func TestMountRefusesBadMountpoint(t *testing.T) {
	testenv.RequireFUSE(t)
	src := t.TempDir()
	mustWrite(t, filepath.Join(src, "f"), nil, 0o644)
	fsys := openImage(t, makeImage(t, src))
	if _, err := fs.Mount(context.Background(), filepath.Join(src, "missing"), fsys, fs.Options{}); err == nil ||
		!strings.Contains(err.Error(), "mount point") {
		t.Errorf("missing mount point: %v", err)
	}
	if _, err := fs.Mount(context.Background(), filepath.Join(src, "f"), fsys, fs.Options{}); err == nil ||
		!strings.Contains(err.Error(), "not a directory") {
		t.Errorf("file as mount point: %v", err)
	}
}

// TestMountOptions: AllowOther reaches the kernel mount options; the mount
// is always read-only with kernel permission checks and 1 MiB reads; and
// (as root) the mount's read-ahead is raised to 1 MiB.
func TestMountOptions(t *testing.T) {
	testenv.RequireFUSE(t)
	testenv.RequireRoot(t) // user_allow_other is not set for ordinary users
	src := t.TempDir()
	mustWrite(t, filepath.Join(src, "f"), []byte("x"), 0o644)
	fsys := openImage(t, makeImage(t, src))
	dir := t.TempDir()
	srv, err := fs.Mount(context.Background(), dir, fsys, fs.Options{AllowOther: true, Source: "shared"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Unmount() })
	info, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	var line string
	for _, l := range strings.Split(string(info), "\n") {
		if strings.Contains(l, " "+dir+" ") {
			line = l
		}
	}
	for _, want := range []string{"allow_other", "default_permissions", " ro,", "fuse.blobseal shared", "max_read=1048576"} {
		if !strings.Contains(line, want) {
			t.Errorf("mountinfo line lacks %q: %s", want, line)
		}
	}
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		t.Fatal(err)
	}
	ra, err := os.ReadFile(fmt.Sprintf("/sys/class/bdi/%d:%d/read_ahead_kb", unix.Major(st.Dev), unix.Minor(st.Dev)))
	if err != nil || strings.TrimSpace(string(ra)) != "1024" {
		t.Errorf("read_ahead_kb of the mount: %q, %v; want 1024", ra, err)
	}
}

// TestConcurrentReaders: parallel readers of random ranges and parallel
// listings all see the source bytes (run with -race to check the tree).
func TestConcurrentReaders(t *testing.T) {
	src := t.TempDir()
	want := map[string][]byte{}
	for i := 0; i < 4; i++ {
		name := fmt.Sprintf("f%d", i)
		want[name] = randomBytes(t, 2<<20+i*4099)
		mustWrite(t, filepath.Join(src, name), want[name], 0o644)
	}
	mnt, _ := mountTree(t, openImage(t, makeImage(t, src)), nil)
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			name := fmt.Sprintf("f%d", g%4)
			f, err := os.Open(filepath.Join(mnt, name))
			if err != nil {
				errs <- err
				return
			}
			defer f.Close()
			data := want[name]
			for i := 0; i < 50; i++ {
				off := (g*7919 + i*104729) % len(data)
				n := min(len(data)-off, 1+(i*65537)%300000)
				buf := make([]byte, n)
				if _, err := f.ReadAt(buf, int64(off)); err != nil {
					errs <- fmt.Errorf("%s at %d+%d: %w", name, off, n, err)
					return
				}
				if !bytes.Equal(buf, data[off:off+n]) {
					errs <- fmt.Errorf("%s at %d+%d: wrong bytes", name, off, n)
					return
				}
				if _, err := os.ReadDir(mnt); err != nil {
					errs <- err
					return
				}
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}
