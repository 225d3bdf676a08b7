package ext4

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/blobseal/blobseal/internal/testenv"
)

// run executes a program with an argument list and a deadline, failing the
// test with its output on error.
func runCmd(t testing.TB, env []string, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	if env != nil {
		cmd.Env = append(os.Environ(), env...)
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// mkfs builds an image of sizeMiB from src with extra mke2fs arguments.
func mkfs(t testing.TB, env []string, src string, sizeMiB int, args ...string) string {
	t.Helper()
	return mkfsKiB(t, env, src, sizeMiB<<10, args...)
}

// mkfsKiB builds an image of sizeKiB from src (empty if src is "").
func mkfsKiB(t testing.TB, env []string, src string, sizeKiB int, args ...string) string {
	t.Helper()
	tools := testenv.RequireTools(t, "mkfs.ext4")
	img := filepath.Join(t.TempDir(), "fs.img")
	full := append([]string{"-q", "-F"}, args...)
	if src != "" {
		full = append(full, "-d", src)
	}
	full = append(full, img, fmt.Sprintf("%dk", sizeKiB))
	runCmd(t, env, tools[0], full...)
	return img
}

// openImage opens an image file through the package under test.
func openImage(t testing.TB, img string) (*FS, *os.File) {
	t.Helper()
	fh, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fh.Close() })
	st, err := fh.Stat()
	if err != nil {
		t.Fatal(err)
	}
	f, err := Open(fh, st.Size())
	if err != nil {
		t.Fatalf("Open(%s): %v", img, err)
	}
	return f, fh
}

// treeOptions selects the optional, heavier parts of a generated tree.
type treeOptions struct {
	hugeSparse bool // a file over 4 GiB with data at 4.5 GiB
	sparse70M  bool // data at the end of a 70 MiB file (triple indirect at 1 KiB blocks)
}

// fill returns deterministic pseudo-random bytes.
func fill(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := 0; i+8 <= n; i += 8 {
		binary.LittleEndian.PutUint64(b[i:], r.Uint64())
	}
	for i := n &^ 7; i < n; i++ {
		b[i] = byte(r.Uint32())
	}
	return b
}

func writeFile(t testing.TB, p string, data []byte, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, data, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil { // umask-proof
		t.Fatal(err)
	}
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// linuxACL encodes a POSIX ACL in the Linux xattr wire format (version 2).
func linuxACL(entries ...[3]uint32) []byte {
	b := binary.LittleEndian.AppendUint32(nil, 2)
	for _, e := range entries {
		b = binary.LittleEndian.AppendUint16(b, uint16(e[0]))
		b = binary.LittleEndian.AppendUint16(b, uint16(e[1]))
		b = binary.LittleEndian.AppendUint32(b, e[2])
	}
	return b
}

// makeTree generates a source directory exercising every file kind the
// reader must handle. It needs root (chown, mknod, trusted xattrs).
func makeTree(t testing.TB, base string, opt treeOptions) string {
	t.Helper()
	testenv.RequireRoot(t)
	src, err := os.MkdirTemp(base, "src")
	must(t, err)
	must(t, os.MkdirAll(src, 0o755))
	j := func(p ...string) string { return filepath.Join(append([]string{src}, p...)...) }

	writeFile(t, j("empty"), nil, 0o644)
	for i, n := range []int{1, 59, 60, 61, 100, 1023, 1024, 1025, 4095, 4096, 4097, 65537, 300_000} {
		writeFile(t, j("sizes", fmt.Sprintf("f%07d", n)), fill(uint64(i+1), n), 0o644)
	}
	writeFile(t, j("small.txt"), []byte("hello, world\n"), 0o640)
	must(t, os.Link(j("small.txt"), j("hardlink-to-small")))
	must(t, os.MkdirAll(j("sub"), 0o755))
	must(t, os.Link(j("small.txt"), j("sub", "another-link")))

	// Sparse file: data, hole, data, hole, data at the end.
	sp, err := os.Create(j("sparse"))
	must(t, err)
	for _, off := range []int64{0, 1 << 20, 3<<20 - 5000} {
		_, err := sp.WriteAt(fill(uint64(off), 5000), off)
		must(t, err)
	}
	must(t, sp.Truncate(4<<20))
	must(t, sp.Close())
	if opt.hugeSparse {
		hs, err := os.Create(j("huge-sparse"))
		must(t, err)
		_, err = hs.WriteAt(fill(7, 8192), 4608<<20) // 4.5 GiB
		must(t, err)
		_, err = hs.WriteAt([]byte("start"), 0)
		must(t, err)
		must(t, hs.Truncate(4608<<20+1<<20))
		must(t, hs.Close())
	}
	if opt.sparse70M {
		s7, err := os.Create(j("sparse-70m"))
		must(t, err)
		_, err = s7.WriteAt(fill(70, 3000), 70<<20-3000)
		must(t, err)
		_, err = s7.WriteAt(fill(71, 3000), 12<<10) // first single-indirect block at 1 KiB blocks
		must(t, err)
		_, err = s7.WriteAt(fill(72, 3000), 300<<10) // double-indirect range
		must(t, err)
		must(t, s7.Close())
	}

	// Names: longest allowed, non-UTF-8, a deep path.
	writeFile(t, j(strings.Repeat("n", 255)), []byte("long name"), 0o644)
	writeFile(t, j("bad-\xff\xfe-name"), []byte("not utf-8"), 0o644)
	deep := []string{}
	for i := 0; i < 24; i++ {
		deep = append(deep, fmt.Sprintf("d%02d", i))
	}
	writeFile(t, j(append(deep, "leaf")...), []byte("deep"), 0o600)

	// Small directories (inline candidates) and a medium one spanning blocks.
	must(t, os.MkdirAll(j("emptydir"), 0o700))
	writeFile(t, j("tiny", "a"), []byte("a"), 0o644)
	for i := 0; i < 150; i++ {
		writeFile(t, j("medium", fmt.Sprintf("entry-with-a-longish-name-%03d", i)), []byte{byte(i)}, 0o644)
	}

	// Symlinks: fast (< 60 bytes) and slow.
	must(t, os.Symlink("small.txt", j("fast-link")))
	must(t, os.Symlink(strings.Repeat("x", 59), j("link-59")))
	must(t, os.Symlink(strings.Repeat("y", 60), j("link-60")))
	must(t, os.Symlink(strings.Repeat("long/path/", 30)+"end", j("slow-link")))

	// Special files.
	must(t, unix.Mknod(j("chr-null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))))
	must(t, unix.Mknod(j("blk-big"), unix.S_IFBLK|0o600, int(unix.Mkdev(300, 70000))))
	must(t, unix.Mknod(j("fifo"), unix.S_IFIFO|0o644, 0))
	must(t, unix.Mknod(j("socket"), unix.S_IFSOCK|0o755, 0))

	// Ownership and mode bits, including 32-bit ids.
	must(t, os.Lchown(j("small.txt"), 1000, 1000))
	must(t, os.Lchown(j("sizes", "f0000100"), 70000, 80000))
	must(t, os.Lchown(j("fast-link"), 1234, 5678))
	must(t, os.Chmod(j("sizes", "f0001023"), 0o4755|os.ModeSetuid))
	must(t, unix.Chmod(j("sizes", "f0001024"), 0o6711))
	must(t, unix.Chmod(j("medium"), 0o1777))

	// Extended attributes: small (in-inode), large (xattr block), trusted,
	// security and a POSIX ACL.
	must(t, unix.Setxattr(j("small.txt"), "user.comment", []byte("a note"), 0))
	must(t, unix.Setxattr(j("small.txt"), "trusted.x", []byte{0, 1, 2, 3}, 0))
	must(t, unix.Setxattr(j("sizes", "f0000001"), "user.big", fill(99, 700), 0))
	must(t, unix.Setxattr(j("sizes", "f0000001"), "user.empty", nil, 0))
	must(t, unix.Setxattr(j("sub"), "security.label", []byte("sekrit"), 0))
	acl := linuxACL([3]uint32{aclUserObj, 7, 0xFFFFFFFF}, [3]uint32{aclUser, 4, 1000},
		[3]uint32{aclGroupObj, 5, 0xFFFFFFFF}, [3]uint32{aclMask, 5, 0xFFFFFFFF}, [3]uint32{aclOther, 4, 0xFFFFFFFF})
	must(t, unix.Setxattr(j("tiny"), "system.posix_acl_default", acl, 0))
	must(t, unix.Setxattr(j("sizes", "f0000059"), "system.posix_acl_access", acl, 0))

	// Fixed, distinct times (mkfs -d keeps seconds).
	t0 := time.Date(2021, 3, 4, 5, 6, 7, 0, time.UTC)
	i := 0
	must(t, filepath.Walk(src, func(p string, fi os.FileInfo, err error) error {
		if err != nil || fi.Mode()&os.ModeSymlink != 0 {
			return err
		}
		i++
		return os.Chtimes(p, t0.Add(time.Duration(i)*time.Hour), t0.Add(time.Duration(i)*time.Minute))
	}))
	return src
}

// lookupPath resolves a slash-separated path with Lookup.
func lookupPath(f *FS, p string) (*Inode, error) {
	in, err := f.Inode(RootIno)
	if err != nil {
		return nil, err
	}
	for _, c := range strings.Split(strings.Trim(p, "/"), "/") {
		if c == "" {
			continue
		}
		ino, err := f.Lookup(in, c)
		if err != nil {
			return nil, err
		}
		if in, err = f.Inode(ino); err != nil {
			return nil, err
		}
	}
	return in, nil
}

// readAll reads a file through ReadAt with an odd chunk size so reads
// straddle block boundaries.
func readAll(t testing.TB, f *FS, in *Inode) []byte {
	t.Helper()
	var out bytes.Buffer
	buf := make([]byte, 64<<10+17)
	for off := int64(0); ; {
		n, err := f.ReadAt(in, buf, off)
		out.Write(buf[:n])
		off += int64(n)
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("ReadAt inode %d off %d: %v", in.Ino, off, err)
		}
	}
	return out.Bytes()
}

// fileHash hashes a file through ReadAt without keeping it in memory.
func fileHash(t testing.TB, f *FS, in *Inode) [32]byte {
	t.Helper()
	h := sha256.New()
	buf := make([]byte, 1<<20+3)
	var total uint64
	for off := int64(0); ; {
		n, err := f.ReadAt(in, buf, off)
		h.Write(buf[:n])
		off += int64(n)
		total += uint64(n)
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("ReadAt inode %d off %d: %v", in.Ino, off, err)
		}
	}
	if total != in.Size {
		t.Fatalf("inode %d: read %d bytes, size %d", in.Ino, total, in.Size)
	}
	var sum [32]byte
	copy(sum[:], h.Sum(nil))
	return sum
}

func hostHash(t testing.TB, p string) [32]byte {
	t.Helper()
	fh, err := os.Open(p)
	must(t, err)
	defer fh.Close()
	h := sha256.New()
	_, err = io.Copy(h, fh)
	must(t, err)
	var sum [32]byte
	copy(sum[:], h.Sum(nil))
	return sum
}

// hostXattrs returns name → value for a host path (no symlink following).
func hostXattrs(t testing.TB, p string) map[string]string {
	t.Helper()
	out := map[string]string{}
	buf := make([]byte, 1<<16)
	n, err := unix.Llistxattr(p, buf)
	if errors.Is(err, unix.ENOTSUP) {
		return out
	}
	must(t, err)
	for _, name := range strings.Split(string(buf[:n]), "\x00") {
		if name == "" {
			continue
		}
		vb := make([]byte, 1<<16)
		vn, err := unix.Lgetxattr(p, name, vb)
		must(t, err)
		out[name] = string(vb[:vn])
	}
	return out
}

func ourXattrs(t testing.TB, f *FS, in *Inode) map[string]string {
	t.Helper()
	names, err := f.ListXattr(in)
	if err != nil {
		t.Fatalf("ListXattr inode %d: %v", in.Ino, err)
	}
	out := map[string]string{}
	for _, n := range names {
		v, err := f.GetXattr(in, n)
		if err != nil {
			t.Fatalf("GetXattr inode %d %q: %v", in.Ino, n, err)
		}
		out[n] = string(v)
	}
	return out
}

func equalMaps(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// compareContent checks a file's bytes against a host file. Small files are
// hashed whole; big sparse ones are compared over the host's data segments
// (SEEK_DATA/SEEK_HOLE) plus zero checks sampled inside each hole, so a
// 4.5 GiB sparse file costs a few reads.
func compareContent(t testing.TB, f *FS, in *Inode, hostPath string) {
	t.Helper()
	if in.Size <= 64<<20 {
		if fileHash(t, f, in) != hostHash(t, hostPath) {
			t.Errorf("%s (inode %d): content differs", hostPath, in.Ino)
		}
		return
	}
	fh, err := os.Open(hostPath)
	must(t, err)
	defer fh.Close()
	size := int64(in.Size)
	check := func(off, n int64, wantZero bool) {
		if off+n > size {
			n = size - off
		}
		if n <= 0 {
			return
		}
		got := make([]byte, n)
		if m, err := f.ReadAt(in, got, off); int64(m) != n || (err != nil && err != io.EOF) {
			t.Fatalf("%s: ReadAt(%d, %d) = %d, %v", hostPath, n, off, m, err)
		}
		want := make([]byte, n)
		if !wantZero {
			_, err := fh.ReadAt(want, off)
			if err != nil && err != io.EOF {
				t.Fatal(err)
			}
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s: bytes %d..%d differ (hole=%v)", hostPath, off, off+n, wantZero)
		}
	}
	fd := int(fh.Fd())
	for off := int64(0); off < size; {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if err != nil { // ENXIO: only a hole remains
			data = size
		}
		if data > off { // hole [off, data): sample start, middle, end
			for _, s := range []int64{off, off + (data-off)/2, data - 4096} {
				if s >= off {
					check(s, min(4096, data-s), true)
				}
			}
		}
		if data >= size {
			break
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		must(t, err)
		for s := data; s < hole; s += 8 << 20 {
			check(s, min(8<<20, hole-s), false)
		}
		off = hole
	}
}

func setxattr(p, name string, v []byte) error { return unix.Setxattr(p, name, v, 0) }
