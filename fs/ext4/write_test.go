package ext4

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/blobseal/blobseal/internal/testenv"
)

// TestOpenWritableRefusesFeatures: a filesystem with a feature the writer
// does not maintain is refused with the feature's name; the reader still
// opens it.
func TestOpenWritableRefusesFeatures(t *testing.T) {
	for _, c := range []struct {
		args []string
		name string
	}{
		{[]string{"-O", "inline_data"}, "inline_data"},
		{[]string{"-O", "quota"}, "quota"},
		{[]string{"-O", "bigalloc", "-C", "16384"}, "bigalloc"},
		{[]string{"-O", "^extent,^64bit,^flex_bg,^metadata_csum,^huge_file,^dir_nlink,^extra_isize"}, "extent"},
		{[]string{"-O", "encrypt"}, "encrypt"},
		{[]string{"-O", "project"}, "project"},
	} {
		t.Run(c.name, func(t *testing.T) {
			img := mkfs(t, nil, "", 32, c.args...)
			fh, err := os.OpenFile(img, os.O_RDWR, 0)
			must(t, err)
			defer fh.Close()
			st, err := fh.Stat()
			must(t, err)
			_, err = OpenWritable(fh, st.Size())
			if err == nil || !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), c.name) {
				t.Fatalf("OpenWritable: %v, want ErrUnsupported naming %q", err, c.name)
			}
			if _, err := Open(fh, st.Size()); err != nil && c.name != "encrypt" {
				t.Errorf("the reader should still open it: %v", err)
			}
		})
	}
}

// writeVariants are mke2fs configurations the writer must keep e2fsck-clean.
var writeVariants = []struct {
	name    string
	args    []string
	timeRes time.Duration // 128-byte inodes store whole seconds
}{
	{"default-1k", nil, time.Nanosecond}, // mke2fs's defaults for a small image: 1 KiB blocks, metadata_csum, 64bit, flex_bg
	{"4k", []string{"-b", "4096"}, time.Nanosecond},
	{"gdt_csum", []string{"-O", "^metadata_csum,uninit_bg"}, time.Nanosecond},
	{"no-flex-no-64bit", []string{"-O", "^flex_bg,^64bit", "-b", "4096"}, time.Nanosecond},
	{"inode128-nojournal", []string{"-I", "128", "-O", "^has_journal"}, time.Second},
	{"2k-sparse_super2-csum_seed", []string{"-b", "2048", "-O", "sparse_super2,^resize_inode,metadata_csum_seed"}, time.Nanosecond},
	{"no-sparse_super-large_dir", []string{"-O", "^sparse_super,^resize_inode,large_dir", "-g", "2048"}, time.Nanosecond},
}

// TestWriterScript applies a fixed workload touching every operation to
// images of each variant and to a reference directory; e2fsck -fn must
// find no error and the kernel's mount must show the reference tree.
func TestWriterScript(t *testing.T) {
	testenv.RequireRoot(t)
	for _, v := range writeVariants {
		t.Run(v.name, func(t *testing.T) {
			img := mkfs(t, nil, "", 64, v.args...)
			ref := t.TempDir()
			must(t, os.Mkdir(ref+"/lost+found", 0o700))
			w := openWritable(t, img)
			both := func(what string, op func(o treeOps) error) {
				t.Helper()
				if err := op(hostOps{ref}); err != nil {
					t.Fatalf("%s on the reference: %v", what, err)
				}
				if err := op(writerOps{w}); err != nil {
					t.Fatalf("%s through the writer: %v", what, err)
				}
			}
			times := script(t, both)
			must(t, w.Checkpoint())
			e2fsckClean(t, img)
			mnt := mountRO(t, img)
			compareTrees(t, ref, mnt)
			for p, want := range times {
				var st unix.Stat_t
				must(t, unix.Lstat(filepath.Join(mnt, p), &st))
				at, mt := time.Unix(st.Atim.Unix()), time.Unix(st.Mtim.Unix())
				if !at.Equal(want[0].Truncate(v.timeRes)) || !mt.Equal(want[1].Truncate(v.timeRes)) {
					t.Errorf("%s: atime/mtime %v/%v, want %v/%v", p, at, mt, want[0], want[1])
				}
			}
			f, _ := openImage(t, img)
			compareWithKernel(t, f, img)
			if a, err := lookupPath(f, "/a"); err != nil || !a.hasFlag(flagIndex) {
				t.Errorf("/a, grown past one block, is not indexed (%v)", err)
			}
		})
	}
}

// script is the fixed workload; op applies one step to both trees. It
// returns the atimes and mtimes it set last.
func script(t *testing.T, op func(string, func(treeOps) error)) map[string][2]time.Time {
	big := fill(1, 300_000)
	op("mkdir", func(o treeOps) error { return o.mkdir("a", 0o755) })
	op("mkdir nested", func(o treeOps) error { return o.mkdir("a/b", 0o700) })
	op("create", func(o treeOps) error { return o.create("a/small", 0o644) })
	op("write small", func(o treeOps) error { return o.writeAt("a/small", []byte("hello, ext4\n"), 0) })
	op("create big", func(o treeOps) error { return o.create("big", 0o600) })
	op("write big", func(o treeOps) error { return o.writeAt("big", big, 0) })
	op("overwrite inside", func(o treeOps) error { return o.writeAt("big", fill(2, 5000), 70_001) })
	op("append", func(o treeOps) error { return o.writeAt("big", fill(3, 3000), 300_000) })
	// Every other block written: hundreds of extents, a tree of depth 1 or 2.
	op("create sparse", func(o treeOps) error { return o.create("sparse", 0o644) })
	for i := int64(0); i < 400; i++ {
		op("sparse write", func(o treeOps) error { return o.writeAt("sparse", fill(uint64(i), 100), i*8192+17) })
	}
	op("truncate shrink", func(o treeOps) error { return o.truncate("sparse", 1_000_003) })
	op("truncate extend", func(o treeOps) error { return o.truncate("a/small", 10_000) })
	op("write past EOF", func(o treeOps) error { return o.writeAt("a/small", []byte("tail"), 20_000) })
	op("truncate shrink mid-block", func(o treeOps) error { return o.truncate("big", 123_457) })
	op("truncate extend again", func(o treeOps) error { return o.truncate("big", 200_000) })
	op("create prealloc", func(o treeOps) error { return o.create("prealloc", 0o644) })
	op("fallocate", func(o treeOps) error { return o.fallocate("prealloc", 5000, 70_000, false) })
	op("fallocate keep size", func(o treeOps) error { return o.fallocate("prealloc", 100_000, 30_000, true) })
	op("write into unwritten", func(o treeOps) error { return o.writeAt("prealloc", fill(8, 10_000), 20_001) })
	op("fallocate over data", func(o treeOps) error { return o.fallocate("a/small", 0, 50_000, false) })
	op("hard link", func(o treeOps) error { return o.link("a/small", "a/b/small-link") })
	op("fast symlink", func(o treeOps) error { return o.symlink("a/small", "fast") })
	op("slow symlink", func(o treeOps) error { return o.symlink(strings.Repeat("long/", 40)+"end", "a/slow") })
	op("fifo", func(o treeOps) error { return o.mkfifo("fifo", 0o640) })
	op("char device", func(o treeOps) error { return o.mknod("null", syscall.S_IFCHR|0o666, 1, 3) })
	op("block device, big numbers", func(o treeOps) error { return o.mknod("a/blk", syscall.S_IFBLK|0o600, 300, 70000) })
	op("socket node", func(o treeOps) error { return o.mknod("sock", syscall.S_IFSOCK|0o755, 0, 0) })
	for i := 0; i < 120; i++ { // enough entries to span directory blocks
		op("many", func(o treeOps) error { return o.create(fmt.Sprintf("a/entry-%03d-with-a-longer-name", i), 0o644) })
	}
	for i := 0; i < 120; i += 3 {
		op("unlink", func(o treeOps) error { return o.unlink(fmt.Sprintf("a/entry-%03d-with-a-longer-name", i)) })
	}
	op("rename in dir", func(o treeOps) error { return o.rename("a/entry-001-with-a-longer-name", "a/renamed", 0) })
	op("rename across", func(o treeOps) error { return o.rename("a/entry-002-with-a-longer-name", "a/b/moved", 0) })
	op("rename over", func(o treeOps) error { return o.rename("a/entry-004-with-a-longer-name", "a/renamed", 0) })
	op("mkdir c", func(o treeOps) error { return o.mkdir("c", 0o755) })
	op("mkdir c/d", func(o treeOps) error { return o.mkdir("c/d", 0o755) })
	op("rename dir across", func(o treeOps) error { return o.rename("c/d", "a/b/d", 0) })
	op("mkdir e", func(o treeOps) error { return o.mkdir("e", 0o755) })
	op("rename dir over empty dir", func(o treeOps) error { return o.rename("a/b/d", "e", 0) })
	op("rename noreplace", func(o treeOps) error { return o.rename("a/renamed", "a/noreplace", RenameNoReplace) })
	op("exchange file and dir across dirs", func(o treeOps) error { return o.rename("a/noreplace", "c", RenameExchange) })
	op("exchange back", func(o treeOps) error { return o.rename("c", "a/noreplace", RenameExchange) })
	op("rename back", func(o treeOps) error { return o.rename("a/noreplace", "a/renamed", 0) })
	op("rmdir", func(o treeOps) error { return o.rmdir("c") })
	op("unlink big", func(o treeOps) error { return o.unlink("big") })
	op("unlink linked", func(o treeOps) error { return o.unlink("a/small") })
	op("xattr small", func(o treeOps) error { return o.setxattr("a/renamed", "user.small", []byte("v"), 0) })
	op("xattr empty", func(o treeOps) error { return o.setxattr("a/renamed", "user.empty", nil, XattrCreate) })
	op("xattr to block", func(o treeOps) error { return o.setxattr("a/renamed", "user.big", fill(4, 700), 0) })
	op("xattr trusted", func(o treeOps) error { return o.setxattr("a/renamed", "trusted.t", []byte{0, 1, 2}, 0) })
	op("xattr security", func(o treeOps) error { return o.setxattr("a/renamed", "security.s", []byte("label"), 0) })
	op("xattr replace", func(o treeOps) error {
		return o.setxattr("a/renamed", "user.small", []byte("longer value"), XattrReplace)
	})
	op("xattr on dir", func(o treeOps) error { return o.setxattr("a/b", "user.dir", []byte("d"), 0) })
	acl := linuxACL([3]uint32{aclUserObj, 7, 0xFFFFFFFF}, [3]uint32{aclUser, 5, 1000},
		[3]uint32{aclGroupObj, 5, 0xFFFFFFFF}, [3]uint32{aclMask, 5, 0xFFFFFFFF}, [3]uint32{aclOther, 1, 0xFFFFFFFF})
	op("default ACL", func(o treeOps) error { return o.setxattr("a", "system.posix_acl_default", acl, 0) })
	op("xattrs spill", func(o treeOps) error { return o.setxattr("sparse", "user.one", fill(5, 90), 0) })
	op("xattrs spill 2", func(o treeOps) error { return o.setxattr("sparse", "user.two", fill(6, 90), 0) })
	op("xattr remove", func(o treeOps) error { return o.removexattr("sparse", "user.one") })
	op("xattr remove block", func(o treeOps) error { return o.removexattr("a/renamed", "user.big") })
	op("chmod", func(o treeOps) error { return o.chmod("a/b/small-link", 0o4751) })
	op("chown", func(o treeOps) error { return o.chown("a/b/small-link", 1234, 70000) })
	op("chown dir", func(o treeOps) error { return o.chown("a/b", 5, 6) })
	// Times last, children before parents, so no later change moves them.
	times := map[string][2]time.Time{}
	for i, p := range []string{"a/b/small-link", "a/b/moved", "a/b", "a/renamed", "a/slow", "sparse", "prealloc", "fifo", "e", "a", "lost+found", "."} {
		at := time.Unix(1_700_000_000+int64(i)*1000, int64(i)*111_111_111+7)
		mt := time.Unix(1_600_000_000-int64(i)*77, int64(i)*3+999_000_000)
		op("utimes "+p, func(o treeOps) error { return o.utimes(p, at, mt) })
		times[p] = [2]time.Time{at, mt}
	}
	return times
}

// TestWriterRandom runs a random operation sequence (seed printed) on the
// image and a reference directory, comparing errnos step by step and the
// trees after each batch through e2fsck and the kernel's mount.
func TestWriterRandom(t *testing.T) {
	testenv.RequireRoot(t)
	seed := testSeed(t, "EXT4_WRITE_SEED", 0x5eed_0001)
	v := writeVariants[seed%uint64(len(writeVariants))]
	t.Logf("seed %d, mke2fs variant %s (rerun with EXT4_WRITE_SEED=%d)", seed, v.name, seed)
	r := rand.New(rand.NewPCG(seed, 0))
	img := mkfs(t, nil, "", 64, v.args...)
	ref := t.TempDir()
	must(t, os.Mkdir(ref+"/lost+found", 0o700))
	w := openWritable(t, img)
	// Paths are drawn mostly from what exists in the reference, so most
	// operations succeed; one in eight is arbitrary, for the error paths.
	leaves := []string{"f0", "f1", "f2", "f3", "d0", "d1", "d2", "d3", "l0"}
	arbitrary := func() string {
		p := ""
		for n := r.IntN(3) + 1; n > 0; n-- {
			p += "/" + leaves[r.IntN(len(leaves))]
		}
		return p[1:]
	}
	existing := func(kind uint32) []string {
		var out []string
		must(t, filepath.Walk(ref, func(hp string, fi os.FileInfo, err error) error {
			must(t, err)
			rel, _ := filepath.Rel(ref, hp)
			if rel != "lost+found" && (kind == 0 || uint32(fi.Mode().Type()) == kind) {
				out = append(out, rel)
			}
			return nil
		}))
		return out
	}
	choose := func(kind uint32) string {
		if c := existing(kind); len(c) > 1 && r.IntN(8) != 0 {
			return c[1+r.IntN(len(c)-1)] // c[0] is ".", the reference's root itself
		}
		return arbitrary()
	}
	newName := func() string {
		if r.IntN(8) == 0 {
			return arbitrary()
		}
		dirs := existing(uint32(os.ModeDir))
		d := dirs[r.IntN(len(dirs))]
		return strings.TrimPrefix(d+"/"+leaves[r.IntN(len(leaves))], "./")
	}
	succeeded := 0
	for batch := 0; batch < 4; batch++ {
		for step := 0; step < 150; step++ {
			var op func(treeOps) error
			desc := ""
			switch k := r.IntN(15); k {
			case 13:
				p, name := choose(0), []string{"user.a", "user.b", "user.c", "trusted.d"}[r.IntN(4)]
				// Four names of at most 150 bytes fit one 1 KiB xattr block,
				// so the reference (the host's ext4, other geometry) agrees.
				value, flags := fill(r.Uint64(), r.IntN(150)), r.IntN(3)
				desc = fmt.Sprintf("setxattr %s %s %d bytes flags %d", p, name, len(value), flags)
				op = func(o treeOps) error { return o.setxattr(p, name, value, flags) }
			case 14:
				p, name := choose(0), []string{"user.a", "user.b", "user.c", "trusted.d"}[r.IntN(4)]
				desc = "removexattr " + p + " " + name
				op = func(o treeOps) error { return o.removexattr(p, name) }
			case 0, 1:
				p := choose(0)
				data := fill(r.Uint64(), r.IntN(40_000)+1)
				off := int64(r.IntN(300_000))
				desc = fmt.Sprintf("write %d@%d %s", len(data), off, p)
				op = func(o treeOps) error { return o.writeAt(p, data, off) }
			case 2:
				p := newName()
				desc = "create " + p
				op = func(o treeOps) error { return o.create(p, 0o644) }
			case 3:
				p := choose(0)
				size := int64(r.IntN(350_000))
				desc = fmt.Sprintf("truncate %s %d", p, size)
				op = func(o treeOps) error { return o.truncate(p, size) }
			case 4:
				p := newName()
				desc = "mkdir " + p
				op = func(o treeOps) error { return o.mkdir(p, 0o755) }
			case 5:
				p := choose(0)
				desc = "unlink " + p
				op = func(o treeOps) error { return o.unlink(p) }
			case 6:
				p := choose(uint32(os.ModeDir))
				desc = "rmdir " + p
				op = func(o treeOps) error { return o.rmdir(p) }
			case 7, 8:
				p, q := choose(0), newName()
				flags := []uint32{0, 0, RenameNoReplace, RenameExchange}[r.IntN(4)]
				desc = fmt.Sprintf("rename %s %s flags %d", p, q, flags)
				op = func(o treeOps) error { return o.rename(p, q, flags) }
			case 9:
				p, q := choose(0), newName()
				desc = "link " + p + " " + q
				op = func(o treeOps) error { return o.link(p, q) }
			case 10:
				p := newName()
				target := strings.Repeat("t", r.IntN(120)+1)
				desc = "symlink " + p
				op = func(o treeOps) error { return o.symlink(target, p) }
			case 12:
				p := choose(0)
				off, length, keep := int64(r.IntN(300_000)), int64(r.IntN(100_000)+1), r.IntN(2) == 0
				desc = fmt.Sprintf("fallocate %s %d+%d keep=%v", p, off, length, keep)
				op = func(o treeOps) error { return o.fallocate(p, off, length, keep) }
			case 11:
				p := choose(0)
				mode := uint32(r.IntN(0o1000))
				desc = fmt.Sprintf("chmod %s %#o", p, mode)
				op = func(o treeOps) error { return o.chmod(p, mode) }
			}
			want := errnoOf(op(hostOps{ref}))
			got := op(writerOps{w})
			if errnoOf(got) != want {
				t.Fatalf("seed %d batch %d step %d: %s: writer %v, reference errno %v", seed, batch, step, desc, got, want)
			}
			if got == nil {
				succeeded++
			}
		}
		t.Logf("batch %d: %d of %d operations so far succeeded on both", batch, succeeded, 150*(batch+1))
		must(t, w.Checkpoint())
		e2fsckClean(t, img)
		compareTrees(t, ref, mountCopy(t, img))
		if t.Failed() {
			t.Fatalf("seed %d: trees differ after batch %d", seed, batch)
		}
	}
}

// errnoOf extracts the errno of an operation's error (0 for success, -1
// for an error that carries none).
func errnoOf(err error) syscall.Errno {
	if err == nil {
		return 0
	}
	var e syscall.Errno
	if errors.As(err, &e) {
		return e
	}
	return ^syscall.Errno(0)
}

// TestWriterENOSPC fills a small filesystem until writes fail with ENOSPC,
// checks it stays e2fsck-clean, then frees space and writes again.
func TestWriterENOSPC(t *testing.T) {
	img := mkfs(t, nil, "", 4)
	w := openWritable(t, img)
	o := writerOps{w}
	chunk := fill(9, 64<<10)
	var err error
	var files int
	for i := 0; err == nil && i < 1000; i++ {
		name := fmt.Sprintf("f%d", i)
		if err = o.create(name, 0o644); err != nil {
			break
		}
		files++
		for off := int64(0); err == nil && off < 1<<20; off += int64(len(chunk)) {
			err = o.writeAt(name, chunk, off)
		}
	}
	if !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("filling the filesystem ended with %v, want ENOSPC", err)
	}
	must(t, w.Checkpoint())
	e2fsckClean(t, img)
	if st := w.FS().StatFS(); st.FreeBlocks > metaReserve && st.FreeInodes != 0 {
		t.Errorf("ENOSPC with %d blocks and %d inodes free", st.FreeBlocks, st.FreeInodes)
	}
	// A file of separate blocks fills what is left: its extent tree keeps
	// growing as space runs out, which the metadata reserve must cover.
	must(t, o.unlink("f0"))
	must(t, o.create("frag", 0o644))
	bs := int64(w.FS().BlockSize())
	for i := int64(0); ; i++ {
		if err = o.writeAt("frag", chunk[:bs], 2*i*bs); err != nil {
			break
		}
	}
	if !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("filling with separate blocks ended with %v, want ENOSPC", err)
	}
	if d, n := extentDepth(t, w, "frag"); d < 1 {
		t.Errorf("frag has %d extents at depth %d; the test wants a tree", n, d)
	}
	must(t, w.Checkpoint())
	e2fsckClean(t, img)
	must(t, o.unlink("frag"))
	must(t, o.unlink("f1"))
	must(t, o.create("again", 0o644))
	must(t, o.writeAt("again", chunk[:5000], 0))
	must(t, w.Checkpoint())
	e2fsckClean(t, img)
	t.Logf("%d files before ENOSPC", files)
}

// TestWriterOnMke2fsTree changes a tree that mke2fs -d built (xattr blocks,
// ACLs, hard links, devices, a directory e2fsck -D indexed, whose index the
// writer grows) and checks the result against the same changes made to the
// source directory.
func TestWriterOnMke2fsTree(t *testing.T) {
	for _, v := range []struct {
		name       string
		args       []string
		wantLevels int
	}{
		{"1k-metadata_csum", nil, 1},
		{"4k-no-csum", []string{"-b", "4096", "-O", "^metadata_csum"}, 0},
	} {
		t.Run(v.name, func(t *testing.T) { writerOnMke2fsTree(t, v.args, v.wantLevels) })
	}
}

func writerOnMke2fsTree(t *testing.T, args []string, wantLevels int) {
	tools := testenv.RequireTools(t, "e2fsck")
	src := makeTree(t, t.TempDir(), treeOptions{})
	must(t, os.Mkdir(filepath.Join(src, "big"), 0o755))
	bigName := func(i int) string { return fmt.Sprintf("big/file-with-a-long-name-%04d", i) }
	for i := 0; i < 1500; i++ {
		writeFile(t, filepath.Join(src, bigName(i)), nil, 0o644)
	}
	img := mkfs(t, nil, src, 64, args...)
	// The image's root is mke2fs's (0755, with lost+found); make the
	// reference's match.
	must(t, os.Chmod(src, 0o755))
	must(t, os.Mkdir(filepath.Join(src, "lost+found"), 0o700))
	// e2fsck -D indexes the large directory; exit status 1 means "fixed".
	if out, err := exec.Command(tools[0], "-fyD", img).CombinedOutput(); err != nil {
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 1 {
			t.Fatalf("e2fsck -fyD: %v\n%s", err, out)
		}
	}
	f, _ := openImage(t, img)
	if in, err := lookupPath(f, "/big"); err != nil || !in.hasFlag(flagIndex) {
		t.Fatalf("/big is not an indexed directory after e2fsck -D (%v); the test needs one", err)
	}
	w := openWritable(t, img)
	step := func(what string, op func(o treeOps) error) {
		t.Helper()
		if err := op(hostOps{src}); err != nil {
			t.Fatalf("%s on the reference: %v", what, err)
		}
		if err := op(writerOps{w}); err != nil {
			t.Fatalf("%s through the writer: %v", what, err)
		}
	}
	// Enough names to split leaves and to grow the index by a level.
	for i := 0; i < 4000; i++ {
		name := fmt.Sprintf("big/new-%d-%s", i, strings.Repeat("x", i%50))
		step("create in indexed dir", func(o treeOps) error { return o.create(name, 0o600) })
	}
	for i := 0; i < 1500; i += 7 {
		step("unlink in indexed dir", func(o treeOps) error { return o.unlink(bigName(i)) })
	}
	step("rename out of indexed dir", func(o treeOps) error { return o.rename(bigName(9), "sub/moved", 0) })
	step("write into file with xattr block", func(o treeOps) error { return o.writeAt("sizes/f0000001", fill(5, 9000), 100) })
	step("unlink file with xattr block", func(o treeOps) error { return o.unlink("sizes/f0000001") })
	step("unlink file with ACL", func(o treeOps) error { return o.unlink("sizes/f0000059") })
	step("truncate sparse", func(o treeOps) error { return o.truncate("sparse", 1<<20+100) })
	step("unlink one of three links", func(o treeOps) error { return o.unlink("small.txt") })
	step("unlink device", func(o treeOps) error { return o.unlink("blk-big") })
	ents, err := os.ReadDir(filepath.Join(src, "medium"))
	must(t, err)
	for _, e := range ents {
		step("rm -r medium", func(o treeOps) error { return o.unlink("medium/" + e.Name()) })
	}
	step("rmdir medium", func(o treeOps) error { return o.rmdir("medium") })
	step("rename deep dir", func(o treeOps) error { return o.rename("d00/d01/d02", "tiny/d02", 0) })
	step("overwrite big file", func(o treeOps) error { return o.writeAt("sizes/f0300000", fill(6, 500_000), 1000) })
	must(t, w.Checkpoint())
	e2fsckClean(t, img)
	compareTrees(t, src, mountCopy(t, img))
	f, _ = openImage(t, img)
	in, err := lookupPath(f, "/big")
	must(t, err)
	if !in.hasFlag(flagIndex) {
		t.Fatal("/big lost its index")
	}
	b, err := f.dirBlockAt(in, 0)
	must(t, err)
	_, levels, root, err := f.dxRootInfo(in, b)
	if err != nil || levels != wantLevels {
		t.Errorf("/big's index: %d levels (%v), want %d", levels, err, wantLevels)
	} else if levels == 1 && root.count() < 2 {
		t.Errorf("/big's root indexes %d nodes; the workload should have split the first", root.count())
	}
	// Every name is found through the index, by us as by the kernel above.
	for i := 0; i < 4000; i += 97 {
		if ino, err := f.dxLookup(in, []byte(fmt.Sprintf("new-%d-%s", i, strings.Repeat("x", i%50)))); err != nil || ino == 0 {
			t.Errorf("index lookup of new-%d: inode %d, %v", i, ino, err)
		}
	}
}

// extentDepth reads the depth of a file's extent tree from its i_block.
func extentDepth(t *testing.T, w *Writer, p string) (depth int, exts int) {
	t.Helper()
	in, err := lookupPath(w.FS(), p)
	must(t, err)
	wi := wInode{in}
	m, err := w.loadExtents(wi)
	must(t, err)
	h, err := parseExtentHeader(in.iblock())
	must(t, err)
	return int(h.depth), len(m.exts)
}

// TestWriterContiguityAndTreeGrowth: a file written sequentially in chunks
// stays (nearly) one extent; a file of thousands of separate blocks grows an
// extent tree of depth 2 and shrinks back to the inode on truncate, with the
// kernel reading the same bytes and e2fsck clean at each stage.
func TestWriterContiguityAndTreeGrowth(t *testing.T) {
	img := mkfs(t, nil, "", 64) // 1 KiB blocks: 84 extents per tree block
	w := openWritable(t, img)
	o := writerOps{w}
	seq := fill(11, 6<<20)
	must(t, o.create("seq", 0o644))
	for off := 0; off < len(seq); off += 100_000 {
		must(t, o.writeAt("seq", seq[off:min(off+100_000, len(seq))], int64(off)))
	}
	if d, n := extentDepth(t, w, "seq"); n > 3 {
		t.Errorf("6 MiB written sequentially in 100 kB chunks has %d extents (depth %d), want at most 3", n, d)
	}
	must(t, o.create("holes", 0o644))
	want := make([]byte, 4000*2048)
	for i := 0; i < 4000; i++ {
		b := fill(uint64(i), 1024)
		copy(want[i*2048:], b)
		must(t, o.writeAt("holes", b, int64(i*2048)))
	}
	want = want[:3999*2048+1024]
	d, n := extentDepth(t, w, "holes")
	if d != 2 || n != 4000 {
		t.Errorf("4000 separate blocks: depth %d with %d extents, want depth 2 with 4000", d, n)
	}
	must(t, w.Checkpoint())
	e2fsckClean(t, img)
	mnt := mountCopy(t, img)
	for name, data := range map[string][]byte{"seq": seq, "holes": want} {
		got, err := os.ReadFile(filepath.Join(mnt, name))
		must(t, err)
		if !bytes.Equal(got, data) {
			t.Errorf("%s: the kernel reads %d bytes that differ from the %d written", name, len(got), len(data))
		}
	}
	must(t, o.truncate("holes", 5000))
	if d, n := extentDepth(t, w, "holes"); d != 0 || n != 3 {
		t.Errorf("after truncating to 5000 bytes: depth %d with %d extents, want 0 and 3", d, n)
	}
	must(t, w.Checkpoint())
	e2fsckClean(t, img)
}

// TestWriterConcurrent runs writers and readers at once (meaningful under
// -race): each writer owns a file; readers list and read through View.
func TestWriterConcurrent(t *testing.T) {
	img := mkfs(t, nil, "", 32)
	w := openWritable(t, img)
	const writers = 4
	done := make(chan error, 2*writers)
	for i := 0; i < writers; i++ {
		go func() {
			o := writerOps{w}
			name := fmt.Sprintf("w%d", i)
			err := o.create(name, 0o644)
			for j := 0; err == nil && j < 50; j++ {
				err = o.writeAt(name, fill(uint64(i*100+j), 3000), int64(j*3000))
				if err == nil && j%10 == 9 {
					err = w.Sync() // readers run on during its device I/O
				}
			}
			done <- err
		}()
		go func() {
			var err error
			for j := 0; err == nil && j < 100; j++ {
				err = w.View(func(f *FS) error {
					root, err := f.Inode(RootIno)
					if err != nil {
						return err
					}
					ents, err := f.ReadDir(root)
					for _, e := range ents {
						in, ierr := f.Inode(e.Ino)
						if ierr == nil && in.IsRegular() {
							_, ierr = f.ReadAt(in, make([]byte, 5000), 0)
							if ierr == io.EOF {
								ierr = nil
							}
						}
						err = errors.Join(err, ierr)
					}
					return err
				})
			}
			done <- err
		}()
	}
	for i := 0; i < 2*writers; i++ {
		must(t, <-done)
	}
	must(t, w.Checkpoint())
	e2fsckClean(t, img)
	for i := 0; i < writers; i++ {
		in, err := lookupPath(w.FS(), fmt.Sprintf("w%d", i))
		must(t, err)
		got := readAll(t, w.FS(), in)
		for j := 0; j < 50; j++ {
			if !bytes.Equal(got[j*3000:(j+1)*3000], fill(uint64(i*100+j), 3000)) {
				t.Fatalf("w%d: chunk %d differs", i, j)
			}
		}
	}
}

// memDevice is a volume in memory for the fuzzer.
type memDevice struct{ b []byte }

var (
	_ Device = (*memDevice)(nil)
	_ Device = (*readOnlyDevice)(nil)
)

func (d *memDevice) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off >= int64(len(d.b)) {
		return 0, io.EOF
	}
	n := copy(p, d.b[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (d *memDevice) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(p)) > int64(len(d.b)) {
		return 0, fmt.Errorf("write of %d bytes at %d beyond the %d-byte volume", len(p), off, len(d.b))
	}
	return copy(d.b[off:], p), nil
}

func (d *memDevice) Sync() error { return nil }

// FuzzWriter opens damaged images read-write (the seeds are FuzzOpen's
// mke2fs images) and runs a bounded set of changes over what it finds: no
// panic, no endless loop; errors are expected.
func FuzzWriter(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		img := decodeSparse(data)
		w, err := OpenWritable(&memDevice{img}, int64(len(img)))
		if err != nil {
			return
		}
		fs := w.FS()
		root, err := fs.Inode(RootIno)
		if err != nil {
			return
		}
		ents, _ := fs.ReadDir(root)
		in, err := w.Create(RootIno, "new", 0o644, 0, 0)
		if err == nil {
			_, _ = w.WriteAt(in.Ino, fill(1, 5000), 100)
			_ = w.Truncate(in.Ino, 3000)
			_ = w.SetXattr(in.Ino, "user.x", []byte("v"), 0)
		}
		_, _ = w.Mkdir(RootIno, "dir", 0o755, 0, 0)
		for i, e := range ents {
			if i >= 8 {
				break
			}
			_ = w.Rename(RootIno, e.Name, RootIno, e.Name+".moved", 0)
			_, _ = w.WriteAt(e.Ino, []byte("overwrite"), 10)
			_ = w.SetXattr(e.Ino, "user.y", fill(2, 300), 0)
			_ = w.RemoveXattr(e.Ino, "user.k")
			_ = w.Unlink(RootIno, e.Name+".moved")
			_ = w.Rmdir(RootIno, e.Name+".moved")
		}
		_ = w.Sync()
	})
}

// TestWriterNoJournalMarksInUse: without a journal nothing makes a crash
// consistent, so the filesystem is marked not clean while open; reopening
// after a crash is refused with a pointer to e2fsck, after Close it works.
func TestWriterNoJournalMarksInUse(t *testing.T) {
	img := mkfs(t, nil, "", 16, "-O", "^has_journal")
	w := openWritable(t, img)
	must(t, writerOps{w}.create("f", 0o644))
	must(t, w.Sync())
	fh, size := mustOpen(t, img)
	if _, err := OpenWritable(&readOnlyDevice{fh}, size); err == nil || !strings.Contains(err.Error(), "e2fsck") {
		t.Fatalf("reopening an image still in use (or crashed): %v, want a refusal naming e2fsck", err)
	}
	must(t, w.Close())
	w2 := openWritable(t, img)
	if _, err := lookupPath(w2.FS(), "f"); err != nil {
		t.Error(err)
	}
	must(t, w2.Close())
	e2fsckClean(t, img)
}

// readOnlyDevice refuses writes, so a refused open provably changed nothing.
type readOnlyDevice struct{ f *os.File }

func (d *readOnlyDevice) ReadAt(p []byte, off int64) (int, error) { return d.f.ReadAt(p, off) }
func (d *readOnlyDevice) WriteAt([]byte, int64) (int, error) {
	return 0, errors.New("read-only device")
}
func (d *readOnlyDevice) Sync() error { return nil }

// TestWriterLargeSparseFile writes past 4 GiB (64-bit size, large_file) in
// a small filesystem; the kernel must see the size and the bytes.
func TestWriterLargeSparseFile(t *testing.T) {
	img := mkfs(t, nil, "", 32, "-O", "^large_file")
	w := openWritable(t, img)
	o := writerOps{w}
	must(t, o.create("huge", 0o644))
	const off = 5<<30 + 12345
	tail := []byte("the end of a sparse 5 GiB file")
	must(t, o.writeAt("huge", tail, off))
	must(t, o.writeAt("huge", []byte("start"), 0))
	must(t, w.Checkpoint())
	e2fsckClean(t, img)
	mnt := mountCopy(t, img)
	fh, err := os.Open(filepath.Join(mnt, "huge"))
	must(t, err)
	defer fh.Close()
	st, err := fh.Stat()
	must(t, err)
	if st.Size() != off+int64(len(tail)) {
		t.Fatalf("the kernel sees size %d, want %d", st.Size(), off+len(tail))
	}
	got := make([]byte, len(tail)+10)
	_, err = fh.ReadAt(got, off-10)
	must(t, err)
	if !bytes.Equal(got[10:], tail) || !bytes.Equal(got[:10], make([]byte, 10)) {
		t.Errorf("the kernel reads %q around the end", got)
	}
}

// BenchmarkWriterSequential writes 128 MiB in 1 MiB calls and syncs, on an
// image file with 4 KiB blocks and a journal (the data path the FUSE layer
// will drive; page cache and disk included).
func BenchmarkWriterSequential(b *testing.B) {
	img := mkfs(b, nil, "", 512, "-b", "4096")
	w := openWritable(b, img)
	chunk := fill(1, 1<<20)
	b.SetBytes(128 << 20)
	for i := 0; i < b.N; i++ {
		in, err := w.Create(RootIno, fmt.Sprintf("f%d", i), 0o644, 0, 0)
		if err != nil {
			b.Fatal(err)
		}
		for off := int64(0); off < 128<<20; off += int64(len(chunk)) {
			if _, err := w.WriteAt(in.Ino, chunk, off); err != nil {
				b.Fatal(err)
			}
		}
		if err := w.Sync(); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkWriterSmallFiles creates 1000 files of 4 KiB and syncs.
func BenchmarkWriterSmallFiles(b *testing.B) {
	img := mkfs(b, nil, "", 256, "-b", "4096")
	w := openWritable(b, img)
	data := fill(2, 4096)
	for i := 0; i < b.N; i++ {
		dir, err := w.Mkdir(RootIno, fmt.Sprintf("d%d", i), 0o755, 0, 0)
		if err != nil {
			b.Fatal(err)
		}
		for j := 0; j < 1000; j++ {
			in, err := w.Create(dir.Ino, fmt.Sprintf("file-%04d", j), 0o644, 0, 0)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := w.WriteAt(in.Ino, data, 0); err != nil {
				b.Fatal(err)
			}
		}
		if err := w.Sync(); err != nil {
			b.Fatal(err)
		}
	}
}

// gatedDevice holds every Sync until the test opens the gate.
type gatedDevice struct {
	*os.File
	entered chan struct{}
	gate    chan struct{}
}

var _ Device = (*gatedDevice)(nil)

func (d *gatedDevice) Sync() error {
	select {
	case d.entered <- struct{}{}:
	default:
	}
	<-d.gate
	return d.File.Sync()
}

// TestWriterReadsDuringSync: while Sync waits for the device, readers
// still get through View (the commit's device I/O holds no reader lock).
func TestWriterReadsDuringSync(t *testing.T) {
	img := mkfs(t, nil, "", 16)
	fh, err := os.OpenFile(img, os.O_RDWR, 0)
	must(t, err)
	defer fh.Close()
	dev := &gatedDevice{File: fh, entered: make(chan struct{}, 1), gate: make(chan struct{})}
	close(dev.gate) // open while setting up
	w, err := OpenWritable(dev, 16<<20)
	must(t, err)
	in, err := w.Create(RootIno, "f", 0o644, 0, 0)
	must(t, err)
	_, err = w.WriteAt(in.Ino, []byte("content"), 0)
	must(t, err)
	dev.gate = make(chan struct{}) // closed again: Syncs now wait
	synced := make(chan error, 1)
	go func() { synced <- w.Sync() }()
	<-dev.entered
	err = w.View(func(f *FS) error {
		root, err := f.Inode(RootIno)
		if err != nil {
			return err
		}
		ino, err := f.Lookup(root, "f")
		if err != nil {
			return err
		}
		got, err := f.Inode(ino)
		if err == nil && got.Size != 7 {
			err = fmt.Errorf("size %d, want 7", got.Size)
		}
		return err
	})
	select {
	case err := <-synced:
		t.Fatalf("Sync returned (%v) before the device finished", err)
	default:
	}
	must(t, err)
	close(dev.gate)
	must(t, <-synced)
	must(t, w.Checkpoint())
	e2fsckClean(t, img)
}

// TestOpenWritableRefusesDamage: a damaged group descriptor, or a
// superblock marked with errors, is refused with the e2fsck to run, and
// nothing is written.
func TestOpenWritableRefusesDamage(t *testing.T) {
	for _, c := range []struct {
		name   string
		damage func(img []byte)
	}{
		{"descriptor checksum", func(img []byte) { img[2048+0xC] ^= 1 }}, // group 0's free block count (1 KiB blocks: table at block 2)
		{"error state", func(img []byte) {
			sb := img[1024:2048]
			binary.LittleEndian.PutUint16(sb[0x3A:], binary.LittleEndian.Uint16(sb[0x3A:])|2)
			binary.LittleEndian.PutUint32(sb[0x3FC:], crc32cRaw(^uint32(0), sb[:0x3FC]))
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			img := mkfs(t, nil, "", 16)
			b, err := os.ReadFile(img)
			must(t, err)
			c.damage(b)
			must(t, os.WriteFile(img, b, 0o600))
			fh, size := mustOpen(t, img)
			_, err = OpenWritable(&readOnlyDevice{fh}, size)
			if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "e2fsck -f") {
				t.Fatalf("OpenWritable: %v; want ErrCorrupt naming e2fsck -f", err)
			}
		})
	}
}

// TestWriterMigratesBlockMaps changes an ext3 image (block-mapped files and
// directories) after tune2fs turned extents on: changed files move to
// extent trees, their indirect blocks freed or reused, and the kernel sees
// the reference tree, e2fsck-clean.
func TestWriterMigratesBlockMaps(t *testing.T) {
	testenv.RequireRoot(t)
	tools := testenv.RequireTools(t, "tune2fs")
	src := t.TempDir()
	writeFile(t, filepath.Join(src, "big"), fill(1, 3<<20), 0o644) // double-indirect at 1 KiB blocks
	writeFile(t, filepath.Join(src, "mid"), fill(2, 200_000), 0o644)
	writeFile(t, filepath.Join(src, "gone"), fill(3, 500_000), 0o644)
	for i := 0; i < 150; i++ {
		writeFile(t, filepath.Join(src, "dir", fmt.Sprintf("entry-with-a-long-name-%03d", i)), []byte{byte(i)}, 0o644)
	}
	img := mkfs(t, nil, src, 64, "-t", "ext3", "-b", "1024")
	runCmd(t, nil, tools[0], "-O", "extents", img)
	must(t, os.Chmod(src, 0o755))
	must(t, os.Mkdir(filepath.Join(src, "lost+found"), 0o700))
	f, _ := openImage(t, img)
	if in, err := lookupPath(f, "/big"); err != nil || in.hasFlag(flagExtents) {
		t.Fatalf("/big is not block-mapped (%v); the test needs ext3 files", err)
	}
	w := openWritable(t, img)
	step := func(what string, op func(o treeOps) error) {
		t.Helper()
		if err := op(hostOps{src}); err != nil {
			t.Fatalf("%s on the reference: %v", what, err)
		}
		if err := op(writerOps{w}); err != nil {
			t.Fatalf("%s through the writer: %v", what, err)
		}
	}
	step("append", func(o treeOps) error { return o.writeAt("big", fill(4, 100_000), 3<<20) })
	step("overwrite", func(o treeOps) error { return o.writeAt("big", fill(5, 5000), 12_345) })
	step("truncate", func(o treeOps) error { return o.truncate("mid", 70_001) })
	step("unlink", func(o treeOps) error { return o.unlink("gone") })
	for i := 0; i < 60; i++ {
		step("create in block-mapped dir", func(o treeOps) error { return o.create(fmt.Sprintf("dir/new-%02d", i), 0o600) })
	}
	for i := 0; i < 150; i += 2 {
		step("unlink in block-mapped dir", func(o treeOps) error {
			return o.unlink(fmt.Sprintf("dir/entry-with-a-long-name-%03d", i))
		})
	}
	must(t, w.Checkpoint())
	e2fsckClean(t, img)
	compareTrees(t, src, mountCopy(t, img))
	f, _ = openImage(t, img)
	for _, p := range []string{"/big", "/mid"} {
		if in, err := lookupPath(f, p); err != nil || !in.hasFlag(flagExtents) {
			t.Errorf("%s was changed but not migrated to extents (%v)", p, err)
		}
	}
}

// gatedWriteDevice holds data writes (writes of 64 KiB or more) until the
// test opens the gate.
type gatedWriteDevice struct {
	*os.File
	entered chan struct{}
	gate    chan struct{}
}

var _ Device = (*gatedWriteDevice)(nil)

func (d *gatedWriteDevice) WriteAt(p []byte, off int64) (int, error) {
	if len(p) >= 64<<10 {
		d.entered <- struct{}{}
		<-d.gate
	}
	return d.File.WriteAt(p, off)
}

// TestWriterReadsDuringDataWrite: while a large write's data goes to the
// device, readers get through View and see the file as it was.
func TestWriterReadsDuringDataWrite(t *testing.T) {
	img := mkfs(t, nil, "", 16)
	fh, err := os.OpenFile(img, os.O_RDWR, 0)
	must(t, err)
	defer fh.Close()
	dev := &gatedWriteDevice{File: fh, entered: make(chan struct{}, 1), gate: make(chan struct{})}
	w, err := OpenWritable(dev, 16<<20)
	must(t, err)
	in, err := w.Create(RootIno, "f", 0o644, 0, 0)
	must(t, err)
	wrote := make(chan error, 1)
	go func() {
		_, err := w.WriteAt(in.Ino, fill(1, 1<<20), 0)
		wrote <- err
	}()
	<-dev.entered
	err = w.View(func(f *FS) error {
		got, err := f.Inode(in.Ino)
		if err == nil && got.Size != 0 {
			err = fmt.Errorf("size %d while the write is in flight, want the old 0", got.Size)
		}
		return err
	})
	must(t, err)
	close(dev.gate)
	must(t, <-wrote)
	must(t, w.Checkpoint())
	e2fsckClean(t, img)
	got, err := lookupPath(w.FS(), "f")
	must(t, err)
	if !bytes.Equal(readAll(t, w.FS(), got), fill(1, 1<<20)) {
		t.Error("content differs after the gated write")
	}
}

// testSeed is the seed of a randomized test: $env when set; under CI a
// fixed one, so a run there is reproducible and never flaky; else the clock,
// so local runs keep exploring. The caller logs it.
func testSeed(t *testing.T, env string, ciSeed uint64) uint64 {
	t.Helper()
	if s := os.Getenv(env); s != "" {
		var seed uint64
		if _, err := fmt.Sscan(s, &seed); err != nil {
			t.Fatalf("%s=%q: %v", env, s, err)
		}
		return seed
	}
	if os.Getenv("CI") == "true" {
		return ciSeed
	}
	return uint64(time.Now().UnixNano())
}
