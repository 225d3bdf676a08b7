// Package fusetest holds what the FUSE mount tests share: a TestMain that
// fails the run when a mount outlives the tests, kernel loop mounts as the
// reference view of an image, and a byte-for-byte tree comparison.
package fusetest

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/blobseal/blobseal/internal/testenv"
)

// RunMain runs the tests (a *testing.M, or a wrapper that prepares more
// inside the private directory) with TMPDIR pointing at a private directory, so
// every t.TempDir mount point lies under it, then fails the run if
// anything is still mounted there (after detaching it, so the machine is
// left clean either way).
func RunMain(m interface{ Run() int }) int {
	root, err := os.MkdirTemp("", "blobseal-mounttest-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "fusetest:", err)
		return 1
	}
	os.Setenv("TMPDIR", root)
	code := m.Run()
	left, err := MountsUnder(root)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fusetest:", err)
		return 1
	}
	if len(left) > 0 {
		fmt.Fprintf(os.Stderr, "FAIL: still mounted after the tests: %q\n", left)
		for i := len(left) - 1; i >= 0; i-- {
			_ = unix.Unmount(left[i], unix.MNT_DETACH)
		}
		code = 1
	}
	if len(left) == 0 {
		os.RemoveAll(root)
	}
	return code
}

// MountsUnder lists the mount points in /proc/self/mountinfo at or below
// dir, in mount order.
func MountsUnder(dir string) ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []string
	s := bufio.NewScanner(f)
	s.Buffer(make([]byte, 64<<10), 1<<20)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMountinfo(fields[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			out = append(out, mp)
		}
	}
	return out, s.Err()
}

// unescapeMountinfo undoes the kernel's octal escapes (\040 for space...).
func unescapeMountinfo(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// IsMounted reports whether dir is a mount point right now.
func IsMounted(t testing.TB, dir string) bool {
	t.Helper()
	list, err := MountsUnder(dir)
	if err != nil {
		t.Fatal(err)
	}
	return slices.Contains(list, dir)
}

// LoopMount mounts a plaintext ext4 image read-only through the kernel
// (root only) and unmounts it at cleanup: the reference view of an image.
func LoopMount(t testing.TB, image string) string {
	t.Helper()
	testenv.RequireRoot(t)
	tools := testenv.RequireTools(t, "mount", "umount")
	dir := t.TempDir()
	if out, err := exec.Command(tools[0], "-t", "ext4", "-o", "loop,ro,noload", image, dir).CombinedOutput(); err != nil {
		t.Fatalf("loop mount %s: %v: %s", image, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command(tools[1], dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
		}
	})
	return dir
}

// EditImage loop-mounts a plaintext ext4 image read-write through the
// kernel (root only), runs edit on the mounted directory and unmounts. It
// builds trees mke2fs -d would take long to copy (mke2fs 1.47.0 inserts
// directory entries in quadratic time) and gives kernel-made structures
// such as hash-indexed directories.
func EditImage(t testing.TB, image string, edit func(dir string)) {
	t.Helper()
	testenv.RequireRoot(t)
	tools := testenv.RequireTools(t, "mount", "umount")
	dir := t.TempDir()
	if out, err := exec.Command(tools[0], "-t", "ext4", "-o", "loop", image, dir).CombinedOutput(); err != nil {
		t.Fatalf("loop mount %s read-write: %v: %s", image, err, out)
	}
	defer func() {
		if out, err := exec.Command(tools[1], dir).CombinedOutput(); err != nil {
			t.Fatalf("umount %s: %v: %s", dir, err, out)
		}
	}()
	edit(dir)
}

// Compare selects what CompareTrees checks besides names, types, modes,
// owners, sizes, link targets, content and hard-link grouping.
type Compare struct {
	Times  bool // atime, mtime, ctime and statx btime to the nanosecond
	Inodes bool // st_ino, st_nlink, st_blocks, st_rdev identical
	Xattrs bool // user.* attributes
	// SkipRootMeta leaves out the root directory's own metadata.
	SkipRootMeta bool
	// Ignore lists relative paths (and what is below them) present in got
	// only by design, such as "lost+found" when comparing with a source tree.
	Ignore []string
}

// entry is one path's metadata.
type entry struct {
	st     unix.Stat_t
	btime  unix.StatxTimestamp // zero when statx reports none
	target string
	xattrs map[string]string
}

// CompareTrees walks want and got and reports every difference.
func CompareTrees(t testing.TB, want, got string, c Compare) {
	t.Helper()
	w, wOrder := scan(t, want, c.Xattrs)
	g, _ := scan(t, got, c.Xattrs)
	diffs := 0
	report := func(format string, args ...any) {
		t.Helper()
		if diffs++; diffs <= 30 {
			t.Errorf(format, args...)
		}
	}
	for p := range g {
		if ignored(p, c.Ignore) {
			continue
		}
		if _, ok := w[p]; !ok {
			report("%q: present in %s only", p, got)
		}
	}
	wGroup, gGroup := linkGroups(w, wOrder), linkGroups(g, wOrder)
	for _, p := range wOrder {
		we := w[p]
		ge, ok := g[p]
		if !ok {
			report("%q: missing from %s", p, got)
			continue
		}
		ws, gs := &we.st, &ge.st
		if p == "." && c.SkipRootMeta {
			continue
		}
		if ws.Mode != gs.Mode || ws.Uid != gs.Uid || ws.Gid != gs.Gid {
			report("%q: mode/owner %o %d:%d, got %o %d:%d", p, ws.Mode, ws.Uid, ws.Gid, gs.Mode, gs.Uid, gs.Gid)
		}
		if ws.Mode&unix.S_IFMT != unix.S_IFDIR || c.Inodes {
			if ws.Size != gs.Size {
				report("%q: size %d, got %d", p, ws.Size, gs.Size)
			}
		}
		if c.Times && (ws.Mtim != gs.Mtim || ws.Atim != gs.Atim || ws.Ctim != gs.Ctim) {
			report("%q: times a=%v m=%v c=%v, got a=%v m=%v c=%v", p, ws.Atim, ws.Mtim, ws.Ctim, gs.Atim, gs.Mtim, gs.Ctim)
		}
		if c.Times && we.btime != ge.btime {
			report("%q: birth time %+v, got %+v", p, we.btime, ge.btime)
		}
		if c.Inodes && (ws.Ino != gs.Ino || ws.Nlink != gs.Nlink || ws.Blocks != gs.Blocks || ws.Rdev != gs.Rdev) {
			report("%q: ino/nlink/blocks/rdev %d/%d/%d/%#x, got %d/%d/%d/%#x", p,
				ws.Ino, ws.Nlink, ws.Blocks, ws.Rdev, gs.Ino, gs.Nlink, gs.Blocks, gs.Rdev)
		}
		if we.target != ge.target {
			report("%q: link target %q, got %q", p, we.target, ge.target)
		}
		if c.Xattrs && !mapsEqual(we.xattrs, ge.xattrs) {
			report("%q: xattrs %q, got %q", p, we.xattrs, ge.xattrs)
		}
		if wGroup[p] != gGroup[p] {
			report("%q: hard-link group %q, got %q", p, wGroup[p], gGroup[p])
		}
		if ws.Mode&unix.S_IFMT == unix.S_IFREG && ws.Size == gs.Size && ws.Size > 0 {
			if err := SameContent(filepath.Join(want, p), filepath.Join(got, p)); err != nil {
				report("%q: %v", p, err)
			}
		}
	}
	if diffs > 30 {
		t.Errorf("... %d differences in all", diffs)
	}
}

func ignored(p string, list []string) bool {
	for _, i := range list {
		if p == i || strings.HasPrefix(p, i+"/") {
			return true
		}
	}
	return false
}

// scan lstats every path under root (relative names, "." for the root).
func scan(t testing.TB, root string, xattrs bool) (map[string]*entry, []string) {
	t.Helper()
	m := make(map[string]*entry)
	var order []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		e := &entry{}
		if err := unix.Lstat(p, &e.st); err != nil {
			return err
		}
		var sx unix.Statx_t
		if err := unix.Statx(unix.AT_FDCWD, p, unix.AT_SYMLINK_NOFOLLOW, unix.STATX_BASIC_STATS|unix.STATX_BTIME, &sx); err != nil {
			return fmt.Errorf("statx %s: %w", p, err)
		}
		if sx.Mask&unix.STATX_BTIME != 0 {
			e.btime = sx.Btime
		}
		if e.st.Mode&unix.S_IFMT == unix.S_IFLNK {
			if e.target, err = os.Readlink(p); err != nil {
				return err
			}
		}
		if xattrs {
			if e.xattrs, err = userXattrs(p); err != nil {
				return err
			}
		}
		m[rel] = e
		order = append(order, rel)
		return nil
	})
	if err != nil {
		t.Fatalf("walk %s: %v", root, err)
	}
	return m, order
}

// linkGroups names, for each non-directory path, the first path (in
// order) sharing its inode: equal names mean the same hard-link group.
func linkGroups(m map[string]*entry, order []string) map[string]string {
	first := make(map[uint64]string)
	out := make(map[string]string)
	for _, p := range order {
		e, ok := m[p]
		if !ok || e.st.Mode&unix.S_IFMT == unix.S_IFDIR {
			continue
		}
		if f, ok := first[e.st.Ino]; ok {
			out[p] = f
		} else {
			first[e.st.Ino] = p
			out[p] = p
		}
	}
	return out
}

func userXattrs(p string) (map[string]string, error) {
	sz, err := unix.Llistxattr(p, nil)
	if err != nil || sz == 0 {
		return nil, err
	}
	buf := make([]byte, sz)
	if sz, err = unix.Llistxattr(p, buf); err != nil {
		return nil, err
	}
	out := make(map[string]string)
	for _, name := range bytes.Split(buf[:sz], []byte{0}) {
		if !bytes.HasPrefix(name, []byte("user.")) {
			continue
		}
		vsz, err := unix.Lgetxattr(p, string(name), nil)
		if err != nil {
			return nil, fmt.Errorf("getxattr %s %s: %w", p, name, err)
		}
		val := make([]byte, vsz)
		if vsz, err = unix.Lgetxattr(p, string(name), val); err != nil {
			return nil, fmt.Errorf("getxattr %s %s: %w", p, name, err)
		}
		out[string(name)] = string(val[:vsz])
	}
	if len(out) == 0 {
		return nil, nil
	}
	return out, nil
}

func mapsEqual(a, b map[string]string) bool {
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

// SameContent compares two files chunk by chunk and names the first
// offset where they differ.
func SameContent(a, b string) error {
	fa, err := os.Open(a)
	if err != nil {
		return err
	}
	defer fa.Close()
	fb, err := os.Open(b)
	if err != nil {
		return err
	}
	defer fb.Close()
	ba, bb := make([]byte, 1<<20), make([]byte, 1<<20)
	for off := int64(0); ; {
		na, erra := io.ReadFull(fa, ba)
		nb, errb := io.ReadFull(fb, bb)
		if erra != nil && erra != io.EOF && erra != io.ErrUnexpectedEOF {
			return fmt.Errorf("read %s at %d: %w", a, off, erra)
		}
		if errb != nil && errb != io.EOF && errb != io.ErrUnexpectedEOF {
			return fmt.Errorf("read %s at %d: %w", b, off, errb)
		}
		if !bytes.Equal(ba[:na], bb[:nb]) {
			i := 0
			for i < na && i < nb && ba[i] == bb[i] {
				i++
			}
			return fmt.Errorf("content differs from offset %d (lengths %d and %d in that chunk)", off+int64(i), na, nb)
		}
		if na < len(ba) {
			return nil
		}
		off += int64(na)
	}
}
