package fs_test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/blobseal/blobseal/internal/testenv"
)

// Known limits of the FUSE mount, which the differential test below does
// not exercise because they differ from the kernel's ext4 by design:
//   - atime is never updated by reads (as with noatime);
//   - O_TMPFILE, RENAME_WHITEOUT, FALLOC_FL_PUNCH_HOLE/ZERO_RANGE/COLLAPSE
//     answer EOPNOTSUPP or EINVAL; copy_file_range falls back to copying;
//   - fsync of one file commits everything (one journal, as ext4), and
//     O_DIRECT is served through the same path as buffered I/O;
//   - POSIX ACLs are stored as xattrs but not enforced (default_permissions
//     checks mode bits only), and no quota or project IDs are kept;
//   - syncfs(2) never reaches a FUSE server (the kernel sends no request
//     for it outside virtiofs): data written without fsync is durable
//     after the next periodic commit (every 5 s) or at unmount;
//   - ctime of a written file is the time its data left the write cache
//     (at the latest its close), not the time of the write.

// posixRecorder logs each step's outcome so two filesystems' runs compare.
type posixRecorder struct {
	root string
	log  []string
}

func (r *posixRecorder) p(rel string) string { return filepath.Join(r.root, rel) }

func (r *posixRecorder) rec(step string, v ...any) {
	for i, x := range v {
		if err, ok := x.(error); ok || x == nil {
			v[i] = errnoName(err)
		}
	}
	r.log = append(r.log, step+": "+fmt.Sprint(v...))
}

func errnoName(err error) string {
	if err == nil {
		return "ok"
	}
	return errnoOf(err).Error()
}

func (r *posixRecorder) stat(step, rel string) {
	var st unix.Stat_t
	err := unix.Lstat(r.p(rel), &st)
	r.rec(step, err, fmt.Sprintf(" mode=%#o nlink=%d uid=%d gid=%d size=%d", st.Mode, st.Nlink, st.Uid, st.Gid, st.Size))
}

// posixSequences runs the same syscall sequences on the filesystem at root.
func posixSequences(r *posixRecorder) {
	w := func(rel, data string) {
		r.rec("write "+rel, os.WriteFile(r.p(rel), []byte(data), 0o644))
	}
	// open flags
	fd, err := unix.Open(r.p("excl"), unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY, 0o640)
	r.rec("O_EXCL new", err)
	unix.Close(fd)
	_, err = unix.Open(r.p("excl"), unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY, 0o640)
	r.rec("O_EXCL existing", err)
	w("trunc", "abcdef")
	fd, err = unix.Open(r.p("trunc"), unix.O_TRUNC|unix.O_WRONLY, 0)
	r.rec("O_TRUNC", err)
	unix.Close(fd)
	r.stat("after O_TRUNC", "trunc")
	w("app", "12")
	fd, err = unix.Open(r.p("app"), unix.O_APPEND|unix.O_WRONLY, 0)
	r.rec("O_APPEND open", err)
	_, err = unix.Write(fd, []byte("34"))
	r.rec("O_APPEND write", err)
	_, err = unix.Pwrite(fd, []byte("56"), 0) // Linux appends regardless
	r.rec("O_APPEND pwrite", err)
	unix.Close(fd)
	b, err := os.ReadFile(r.p("app"))
	r.rec("O_APPEND content", err, string(b))
	_, err = unix.Open(r.p("nonexistent"), unix.O_RDONLY, 0)
	r.rec("open missing", err)
	_, err = unix.Open(r.p("trunc/x"), unix.O_RDONLY, 0)
	r.rec("open below a file", err)

	// directories
	r.rec("mkdir d", unix.Mkdir(r.p("d"), 0o755))
	r.rec("mkdir d/e", unix.Mkdir(r.p("d/e"), 0o700))
	r.stat("dir nlink", "d")
	r.rec("mkdir existing", unix.Mkdir(r.p("d"), 0o755))
	r.rec("mkdir below a file", unix.Mkdir(r.p("trunc/x"), 0o755))
	r.rec("rmdir non-empty", unix.Rmdir(r.p("d")))
	r.rec("rmdir file", unix.Rmdir(r.p("trunc")))
	r.rec("rmdir missing", unix.Rmdir(r.p("nope")))
	r.rec("unlink dir", unix.Unlink(r.p("d")))
	r.rec("link to dir", unix.Link(r.p("d"), r.p("dlink")))
	_, err = unix.Open(r.p("d"), unix.O_WRONLY, 0)
	r.rec("open dir for writing", err)
	r.rec("truncate dir", unix.Truncate(r.p("d"), 0))

	// names
	r.rec("255-byte name", os.WriteFile(r.p(strings.Repeat("n", 255)), nil, 0o644))
	r.rec("256-byte name", os.WriteFile(r.p(strings.Repeat("n", 256)), nil, 0o644))
	r.rec("mkdir 256-byte name", unix.Mkdir(r.p(strings.Repeat("m", 256)), 0o755))
	r.rec("long symlink target", unix.Symlink(strings.Repeat("t", 4000), r.p("longlink")))
	r.stat("long symlink", "longlink")

	// renames
	w("rf", "rename me")
	r.rec("rename file onto dir", unix.Rename(r.p("rf"), r.p("d")))
	r.rec("rename dir onto file", unix.Rename(r.p("d"), r.p("rf")))
	r.rec("mkdir d2", unix.Mkdir(r.p("d2"), 0o755))
	r.rec("rename dir onto non-empty dir", unix.Rename(r.p("d2"), r.p("d")))
	r.rec("rename dir onto empty dir", unix.Rename(r.p("d/e"), r.p("d2")))
	r.stat("after dir replace", "d2")
	r.stat("parent after dir replace", "d")
	r.rec("rename onto itself", unix.Rename(r.p("rf"), r.p("rf")))
	r.rec("link rf rf2", unix.Link(r.p("rf"), r.p("rf2")))
	r.rec("rename between hard links", unix.Rename(r.p("rf"), r.p("rf2")))
	r.stat("rf after", "rf")
	r.stat("rf2 after", "rf2")
	r.rec("rename dir into its child", unix.Rename(r.p("d"), r.p("d/sub")))
	r.rec("rename missing", unix.Rename(r.p("none"), r.p("x")))
	r.rec("NOREPLACE existing", unix.Renameat2(unix.AT_FDCWD, r.p("rf"), unix.AT_FDCWD, r.p("trunc"), unix.RENAME_NOREPLACE))
	r.rec("NOREPLACE free", unix.Renameat2(unix.AT_FDCWD, r.p("rf"), unix.AT_FDCWD, r.p("rf3"), unix.RENAME_NOREPLACE))
	r.rec("EXCHANGE missing", unix.Renameat2(unix.AT_FDCWD, r.p("rf3"), unix.AT_FDCWD, r.p("none"), unix.RENAME_EXCHANGE))
	r.rec("EXCHANGE file and dir", unix.Renameat2(unix.AT_FDCWD, r.p("rf3"), unix.AT_FDCWD, r.p("d2"), unix.RENAME_EXCHANGE))
	r.stat("rf3 after exchange", "rf3")
	r.stat("d2 after exchange", "d2")
	r.rec("EXCHANGE|NOREPLACE", unix.Renameat2(unix.AT_FDCWD, r.p("rf3"), unix.AT_FDCWD, r.p("d2"), unix.RENAME_EXCHANGE|unix.RENAME_NOREPLACE))

	// chmod and chown semantics
	w("suid", "x")
	r.rec("chmod 06755", unix.Chmod(r.p("suid"), 0o6755))
	r.stat("after chmod", "suid")
	r.rec("chown", unix.Chown(r.p("suid"), 1000, 1000))
	r.stat("after chown (suid cleared)", "suid")
	r.rec("chmod 02745", unix.Chmod(r.p("suid"), 0o2745))
	r.rec("chown -1 -1", unix.Chown(r.p("suid"), -1, -1))
	r.stat("after chown -1 -1", "suid")
	r.rec("lchown symlink", unix.Lchown(r.p("longlink"), 7, 8))
	r.stat("symlink owner", "longlink")

	// times: UTIME_OMIT keeps, explicit values are kept to the nanosecond
	var before, after unix.Stat_t
	_ = unix.Lstat(r.p("trunc"), &before)
	ts := []unix.Timespec{{Sec: 1234567890, Nsec: 123456789}, {Nsec: unix.UTIME_OMIT}}
	r.rec("utimensat atime, OMIT mtime", unix.UtimesNanoAt(unix.AT_FDCWD, r.p("trunc"), ts, 0))
	_ = unix.Lstat(r.p("trunc"), &after)
	r.rec("times", nil, fmt.Sprintf(" atime=%d.%d mtime kept=%v", after.Atim.Sec, after.Atim.Nsec, after.Mtim == before.Mtim))
	ts = []unix.Timespec{{Nsec: unix.UTIME_OMIT}, {Nsec: unix.UTIME_NOW}}
	r.rec("utimensat OMIT atime, NOW mtime", unix.UtimesNanoAt(unix.AT_FDCWD, r.p("trunc"), ts, 0))
	_ = unix.Lstat(r.p("trunc"), &before)
	r.rec("times", nil, fmt.Sprintf(" atime kept=%v mtime moved=%v", before.Atim == after.Atim, before.Mtim != after.Mtim))
	r.rec("utimensat symlink nofollow", unix.UtimesNanoAt(unix.AT_FDCWD, r.p("longlink"),
		[]unix.Timespec{{Sec: 5}, {Sec: 6}}, unix.AT_SYMLINK_NOFOLLOW))

	// xattrs
	r.rec("setxattr", unix.Setxattr(r.p("trunc"), "user.a", []byte("1"), 0))
	r.rec("XATTR_CREATE existing", unix.Setxattr(r.p("trunc"), "user.a", []byte("2"), unix.XATTR_CREATE))
	r.rec("XATTR_REPLACE missing", unix.Setxattr(r.p("trunc"), "user.b", []byte("2"), unix.XATTR_REPLACE))
	r.rec("removexattr missing", unix.Removexattr(r.p("trunc"), "user.b"))
	_, err = unix.Getxattr(r.p("trunc"), "user.a", make([]byte, 0))
	r.rec("getxattr size probe", err)
	_, err = unix.Getxattr(r.p("trunc"), "user.none", make([]byte, 8))
	r.rec("getxattr missing", err)

	// special files and set-group-ID directories
	r.rec("mkfifo", unix.Mkfifo(r.p("fifo"), 0o600))
	r.stat("fifo", "fifo")
	r.rec("mknod char", unix.Mknod(r.p("chr"), unix.S_IFCHR|0o644, int(unix.Mkdev(4, 5))))
	r.rec("mkdir sgid", unix.Mkdir(r.p("sgid"), 0o755))
	r.rec("chown sgid", unix.Chown(r.p("sgid"), 0, 4242))
	r.rec("chmod sgid", unix.Chmod(r.p("sgid"), 0o2775))
	r.rec("mkdir in sgid", unix.Mkdir(r.p("sgid/sub"), 0o755))
	r.stat("dir in sgid dir", "sgid/sub")
	w("sgid/file", "x")
	r.stat("file in sgid dir", "sgid/file")

	// an unlinked open file
	fd, err = unix.Open(r.p("open-unlinked"), unix.O_CREAT|unix.O_RDWR, 0o600)
	r.rec("create open-unlinked", err)
	r.rec("unlink it", unix.Unlink(r.p("open-unlinked")))
	_, err = unix.Write(fd, []byte("still writable"))
	r.rec("write after unlink", err)
	var st unix.Stat_t
	r.rec("fstat after unlink", unix.Fstat(fd, &st), fmt.Sprintf(" nlink=%d size=%d", st.Nlink, st.Size))
	unix.Close(fd)
	r.rec("mkdir open-removed", unix.Mkdir(r.p("open-removed"), 0o755))
	fd, err = unix.Open(r.p("open-removed"), unix.O_RDONLY|unix.O_DIRECTORY, 0)
	r.rec("open dir", err)
	r.rec("rmdir it", unix.Rmdir(r.p("open-removed")))
	r.rec("fstat removed dir", unix.Fstat(fd, &st), fmt.Sprintf(" nlink=%d mode=%#o", st.Nlink, st.Mode))
	_, err = unix.Openat(fd, "new", unix.O_CREAT|unix.O_WRONLY, 0o644)
	r.rec("create in removed dir", err)
	unix.Close(fd)
	r.rec("truncate grows", unix.Truncate(r.p("trunc"), 100000))
	r.stat("after grow", "trunc")
}

// loopMountRW mounts a plaintext image read-write through the kernel.
func loopMountRW(t *testing.T, img string) string {
	t.Helper()
	testenv.RequireRoot(t)
	tools := testenv.RequireTools(t, "mount", "umount")
	dir := t.TempDir()
	if out, err := exec.Command(tools[0], "-t", "ext4", "-o", "loop", img, dir).CombinedOutput(); err != nil {
		t.Fatalf("loop mount %s: %v: %s", img, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command(tools[1], dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
		}
	})
	return dir
}

// TestWritablePOSIXMatchesKernelExt4 is a differential conformance check:
// the same syscall sequences on the FUSE mount and on the kernel's ext4
// (a loop mount of an image of the same geometry) give the same errnos
// and results, and leave the same tree.
func TestWritablePOSIXMatchesKernelExt4(t *testing.T) {
	kernel := &posixRecorder{root: loopMountRW(t, makeWritableImage(t, ""))}
	m := mountWritable(t, makeWritableImage(t, ""))
	fuse := &posixRecorder{root: m.dir}
	posixSequences(kernel)
	posixSequences(fuse)
	if len(kernel.log) != len(fuse.log) {
		t.Fatalf("%d steps on the kernel, %d on FUSE", len(kernel.log), len(fuse.log))
	}
	for i := range kernel.log {
		if kernel.log[i] != fuse.log[i] {
			t.Errorf("step %d:\n kernel ext4: %s\n        FUSE: %s", i, kernel.log[i], fuse.log[i])
		}
	}
	// Not vacuous: the sequences reach the error paths they are about.
	all := strings.Join(fuse.log, "\n")
	for _, want := range []string{"O_EXCL existing: file exists", "rmdir non-empty: directory not empty",
		"256-byte name: file name too long", "link to dir: operation not permitted", "O_APPEND content: ok123456"} {
		if !strings.Contains(all, want) {
			t.Errorf("FUSE log lacks %q:\n%s", want, all)
		}
	}
	diffSnapshots(t, "tree after the sequences", snapshot(t, kernel.root, false), snapshot(t, fuse.root, false))
	m.unmount(t)
	e2fsckClean(t, m.img)
}
