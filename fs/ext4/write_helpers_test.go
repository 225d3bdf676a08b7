package ext4

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/blobseal/blobseal/internal/testenv"
)

// openWritable opens img read-write through the package under test.
func openWritable(t testing.TB, img string) *Writer {
	t.Helper()
	fh, err := os.OpenFile(img, os.O_RDWR, 0)
	must(t, err)
	t.Cleanup(func() { fh.Close() })
	st, err := fh.Stat()
	must(t, err)
	w, err := OpenWritable(fh, st.Size())
	if err != nil {
		t.Fatalf("OpenWritable(%s): %v", img, err)
	}
	return w
}

// e2fsckClean runs e2fsck -fn, the reference checker, and fails the test
// unless it exits 0 (no errors found, nothing changed).
func e2fsckClean(t testing.TB, img string) {
	t.Helper()
	tools := testenv.RequireTools(t, "e2fsck")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, tools[0], "-fn", img).CombinedOutput()
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		t.Fatalf("e2fsck -fn %s: exit code %d, want 0:\n%s", img, ee.ExitCode(), out)
	default:
		t.Fatalf("e2fsck -fn %s: %v", img, err)
	}
}

// treeOps is one set of file operations, applied to the image through the
// Writer and to an ordinary directory as the reference.
type treeOps interface {
	mkdir(p string, perm uint32) error
	create(p string, perm uint32) error
	writeAt(p string, data []byte, off int64) error
	truncate(p string, size int64) error
	fallocate(p string, off, length int64, keepSize bool) error
	unlink(p string) error
	rmdir(p string) error
	rename(from, to string, flags uint32) error
	link(from, to string) error
	symlink(target, p string) error
	mkfifo(p string, perm uint32) error
	mknod(p string, mode, major, minor uint32) error
	chmod(p string, perm uint32) error
	chown(p string, uid, gid uint32) error
	utimes(p string, atime, mtime time.Time) error
	setxattr(p, name string, value []byte, flags int) error
	removexattr(p, name string) error
}

// hostOps applies operations to a directory on the host's filesystem.
type hostOps struct{ root string }

func (h hostOps) j(p string) string { return filepath.Join(h.root, p) }

func (h hostOps) mkdir(p string, perm uint32) error {
	if err := unix.Mkdir(h.j(p), perm); err != nil {
		return err
	}
	return unix.Chmod(h.j(p), perm) // umask-proof
}

func (h hostOps) create(p string, perm uint32) error {
	fd, err := unix.Open(h.j(p), unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY, perm)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return unix.Fchmod(fd, perm)
}

func (h hostOps) writeAt(p string, data []byte, off int64) error {
	fd, err := unix.Open(h.j(p), unix.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	_, err = unix.Pwrite(fd, data, off)
	return err
}

func (h hostOps) truncate(p string, size int64) error { return unix.Truncate(h.j(p), size) }

func (h hostOps) fallocate(p string, off, length int64, keepSize bool) error {
	fd, err := unix.Open(h.j(p), unix.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	mode := uint32(0)
	if keepSize {
		mode = unix.FALLOC_FL_KEEP_SIZE
	}
	return unix.Fallocate(fd, mode, off, length)
}
func (h hostOps) unlink(p string) error { return unix.Unlink(h.j(p)) }
func (h hostOps) rmdir(p string) error  { return unix.Rmdir(h.j(p)) }
func (h hostOps) rename(a, b string, flags uint32) error {
	return unix.Renameat2(unix.AT_FDCWD, h.j(a), unix.AT_FDCWD, h.j(b), uint(flags))
}
func (h hostOps) link(a, b string) error         { return unix.Link(h.j(a), h.j(b)) }
func (h hostOps) symlink(target, p string) error { return unix.Symlink(target, h.j(p)) }
func (h hostOps) mkfifo(p string, perm uint32) error {
	if err := unix.Mkfifo(h.j(p), perm); err != nil {
		return err
	}
	return unix.Chmod(h.j(p), perm)
}
func (h hostOps) mknod(p string, mode, major, minor uint32) error {
	if err := unix.Mknod(h.j(p), mode, int(unix.Mkdev(major, minor))); err != nil {
		return err
	}
	return unix.Chmod(h.j(p), mode&0o7777)
}
func (h hostOps) chmod(p string, perm uint32) error { return unix.Chmod(h.j(p), perm) }
func (h hostOps) chown(p string, uid, gid uint32) error {
	return unix.Lchown(h.j(p), int(uid), int(gid))
}
func (h hostOps) utimes(p string, a, m time.Time) error {
	return unix.UtimesNanoAt(unix.AT_FDCWD, h.j(p), []unix.Timespec{unix.NsecToTimespec(a.UnixNano()), unix.NsecToTimespec(m.UnixNano())}, unix.AT_SYMLINK_NOFOLLOW)
}

func (h hostOps) setxattr(p, name string, v []byte, flags int) error {
	return unix.Lsetxattr(h.j(p), name, v, flags)
}
func (h hostOps) removexattr(p, name string) error { return unix.Lremovexattr(h.j(p), name) }

// writerOps applies operations through the Writer, resolving paths with
// the reader's lookups.
type writerOps struct{ w *Writer }

// resolve walks p like the kernel's path walk for these tests: every
// component but the last must be a directory. The tests' symlinks all
// dangle (their targets never exist), so following one yields ENOENT.
// It reads under View, as any reader alongside the writer must.
func (o writerOps) resolve(p string, wantDir bool) (ino uint32, err error) {
	err = o.w.View(func(f *FS) error {
		var err error
		ino, err = resolveIn(f, p, wantDir)
		return err
	})
	return ino, err
}

func resolveIn(f *FS, p string, wantDir bool) (uint32, error) {
	in, err := f.Inode(RootIno)
	if err != nil {
		return 0, err
	}
	parts := strings.Split(strings.Trim(p, "/"), "/")
	for _, c := range parts {
		if c == "" {
			continue
		}
		switch {
		case in.IsSymlink():
			return 0, syscall.ENOENT
		case !in.IsDir():
			return 0, syscall.ENOTDIR
		}
		ino, err := f.Lookup(in, c)
		if errors.Is(err, ErrNotFound) {
			return 0, syscall.ENOENT
		}
		if err != nil {
			return 0, err
		}
		if in, err = f.Inode(ino); err != nil {
			return 0, err
		}
	}
	if wantDir {
		switch {
		case in.IsSymlink():
			return 0, syscall.ENOENT
		case !in.IsDir():
			return 0, syscall.ENOTDIR
		}
	}
	return in.Ino, nil
}

func (o writerOps) ino(p string) (uint32, error) { return o.resolve(p, false) }

// follow resolves p as a call that follows a final symlink does.
func (o writerOps) follow(p string) (uint32, error) {
	ino, err := o.resolve(p, false)
	if err != nil {
		return 0, err
	}
	symlink := false
	err = o.w.View(func(f *FS) error {
		in, err := f.Inode(ino)
		symlink = err == nil && in.IsSymlink()
		return nil
	})
	if symlink {
		return 0, syscall.ENOENT
	}
	return ino, err
}

func (o writerOps) parent(p string) (uint32, string, error) {
	dir, base := path.Split(strings.Trim(p, "/"))
	ino, err := o.resolve(dir, true)
	return ino, base, err
}

func (o writerOps) mkdir(p string, perm uint32) error {
	d, n, err := o.parent(p)
	if err == nil {
		_, err = o.w.Mkdir(d, n, perm, 0, 0)
	}
	return err
}

func (o writerOps) create(p string, perm uint32) error {
	d, n, err := o.parent(p)
	if err == nil {
		_, err = o.w.Create(d, n, perm, 0, 0)
	}
	return err
}

func (o writerOps) writeAt(p string, data []byte, off int64) error {
	ino, err := o.follow(p)
	if err == nil {
		_, err = o.w.WriteAt(ino, data, off)
	}
	return err
}

func (o writerOps) truncate(p string, size int64) error {
	ino, err := o.follow(p)
	if err == nil {
		err = o.w.Truncate(ino, uint64(size))
	}
	return err
}

func (o writerOps) fallocate(p string, off, length int64, keepSize bool) error {
	ino, err := o.follow(p)
	if err == nil {
		err = o.w.Fallocate(ino, uint64(off), uint64(length), keepSize)
	}
	return err
}

func (o writerOps) unlink(p string) error {
	d, n, err := o.parent(p)
	if err == nil {
		err = o.w.Unlink(d, n)
	}
	return err
}

func (o writerOps) rmdir(p string) error {
	d, n, err := o.parent(p)
	if err == nil {
		err = o.w.Rmdir(d, n)
	}
	return err
}

func (o writerOps) rename(a, b string, flags uint32) error {
	da, na, err := o.parent(a)
	if err != nil {
		return err
	}
	db, nb, err := o.parent(b)
	if err != nil {
		return err
	}
	return o.w.Rename(da, na, db, nb, flags)
}

func (o writerOps) link(a, b string) error {
	ino, err := o.ino(a)
	if err != nil {
		return err
	}
	d, n, err := o.parent(b)
	if err == nil {
		err = o.w.Link(ino, d, n)
	}
	return err
}

func (o writerOps) symlink(target, p string) error {
	d, n, err := o.parent(p)
	if err == nil {
		_, err = o.w.Symlink(d, n, target, 0, 0)
	}
	return err
}

func (o writerOps) mkfifo(p string, perm uint32) error {
	d, n, err := o.parent(p)
	if err == nil {
		_, err = o.w.Mknod(d, n, syscall.S_IFIFO|perm, 0, 0, 0)
	}
	return err
}

func (o writerOps) mknod(p string, mode, major, minor uint32) error {
	d, n, err := o.parent(p)
	if err == nil {
		// Linux's new_encode_dev, the form ext4 stores.
		rdev := minor&0xff | major<<8 | (minor&^0xff)<<12
		_, err = o.w.Mknod(d, n, mode, rdev, 0, 0)
	}
	return err
}

func (o writerOps) setattr(p string, a SetAttr) error {
	ino, err := o.ino(p)
	if err == nil {
		_, err = o.w.Setattr(ino, a)
	}
	return err
}

func (o writerOps) chmod(p string, perm uint32) error {
	if _, err := o.follow(p); err != nil {
		return err
	}
	return o.setattr(p, SetAttr{Mode: &perm})
}
func (o writerOps) chown(p string, uid, gid uint32) error {
	return o.setattr(p, SetAttr{UID: &uid, GID: &gid})
}
func (o writerOps) utimes(p string, a, m time.Time) error {
	return o.setattr(p, SetAttr{Atime: &a, Mtime: &m})
}

func (o writerOps) setxattr(p, name string, v []byte, flags int) error {
	ino, err := o.ino(p)
	if err == nil {
		err = o.w.SetXattr(ino, name, v, flags)
	}
	return err
}

func (o writerOps) removexattr(p, name string) error {
	ino, err := o.ino(p)
	if err == nil {
		err = o.w.RemoveXattr(ino, name)
	}
	return err
}

// compareTrees checks that got (the kernel's mount of the image) holds
// exactly the tree of want (the reference directory): names, types,
// permissions, owners, link counts, sizes, contents, link targets and
// extended attributes.
// (Times are checked by the callers that set them.)
func compareTrees(t *testing.T, want, got string) {
	t.Helper()
	n := 0
	err := filepath.Walk(want, func(wp string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(want, wp)
		gp := filepath.Join(got, rel)
		var ws, gs unix.Stat_t
		must(t, unix.Lstat(wp, &ws))
		if err := unix.Lstat(gp, &gs); err != nil {
			t.Errorf("%s: missing in the image: %v", rel, err)
			return nil
		}
		n++
		if ft := ws.Mode & unix.S_IFMT; (ft == unix.S_IFCHR || ft == unix.S_IFBLK) && ws.Rdev != gs.Rdev {
			t.Errorf("%s: device %d:%d, want %d:%d", rel, unix.Major(gs.Rdev), unix.Minor(gs.Rdev), unix.Major(ws.Rdev), unix.Minor(ws.Rdev))
		}
		if ws.Mode != gs.Mode || ws.Uid != gs.Uid || ws.Gid != gs.Gid || ws.Nlink != gs.Nlink {
			t.Errorf("%s: mode/uid/gid/nlink %#o/%d/%d/%d, want %#o/%d/%d/%d", rel, gs.Mode, gs.Uid, gs.Gid, gs.Nlink, ws.Mode, ws.Uid, ws.Gid, ws.Nlink)
		}
		if wx, gx := hostXattrs(t, wp), hostXattrs(t, gp); !equalMaps(wx, gx) {
			t.Errorf("%s: xattrs %q, want %q", rel, gx, wx)
		}
		switch ws.Mode & unix.S_IFMT {
		case unix.S_IFREG:
			wb, err := os.ReadFile(wp)
			must(t, err)
			gb, err := os.ReadFile(gp)
			must(t, err)
			if !bytes.Equal(wb, gb) {
				t.Errorf("%s: content differs (%d bytes, want %d)", rel, len(gb), len(wb))
			}
		case unix.S_IFLNK:
			wl, _ := os.Readlink(wp)
			gl, _ := os.Readlink(gp)
			if wl != gl {
				t.Errorf("%s: link target %q, want %q", rel, gl, wl)
			}
		case unix.S_IFDIR:
			if names(t, wp) != names(t, gp) {
				t.Errorf("%s: entries %q, want %q", rel, names(t, gp), names(t, wp))
			}
		}
		return nil
	})
	must(t, err)
	if n < 2 {
		t.Errorf("compared only %d entries", n)
	}
}

func names(t *testing.T, dir string) string {
	ents, err := os.ReadDir(dir)
	must(t, err)
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	sort.Strings(out)
	return strings.Join(out, "\x00")
}

// mountCopy loop-mounts a copy of img read-only. The image keeps changing
// between mounts, and mount(8) may reuse a loop device still attached to
// the same file, whose block cache would show an older state.
func mountCopy(t *testing.T, img string) string {
	t.Helper()
	src, err := os.Open(img)
	must(t, err)
	defer src.Close()
	cp := filepath.Join(t.TempDir(), "snapshot.img")
	dst, err := os.Create(cp)
	must(t, err)
	_, err = io.Copy(dst, src)
	must(t, err)
	must(t, dst.Close())
	return mountRO(t, cp)
}
