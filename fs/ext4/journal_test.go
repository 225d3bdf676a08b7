package ext4

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/blobseal/blobseal/internal/testenv"
)

// ext4IocShutdown is EXT4_IOC_SHUTDOWN, _IOR('X', 125, __u32); with
// goingLogFlush the kernel commits its journal and then stops writing,
// leaving the transactions unreplayed: a crash, as xfstests' godown makes.
const (
	ext4IocShutdown = 0x8004587D
	goingLogFlush   = 1
)

// kernelCrashImage has the kernel write a workload through its journal and
// "crash" (shutdown after the log flush), returning the image, which then
// needs recovery.
func kernelCrashImage(t *testing.T, args ...string) string {
	t.Helper()
	testenv.RequireRoot(t)
	tools := testenv.RequireTools(t, "mount", "umount")
	img := mkfs(t, nil, "", 64, args...)
	mnt := t.TempDir()
	runCmd(t, nil, tools[0], "-o", "loop", img, mnt)
	mounted := true
	t.Cleanup(func() {
		if mounted {
			runCmd(t, nil, tools[1], mnt)
		}
	})
	fd, err := unix.Open(mnt, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	must(t, err)
	// Each syncfs commits a transaction; freeing metadata blocks (the
	// directory "gone") makes the kernel log revoke records.
	must(t, os.MkdirAll(filepath.Join(mnt, "dir/sub"), 0o755))
	must(t, os.MkdirAll(filepath.Join(mnt, "gone"), 0o755))
	for i := 0; i < 30; i++ {
		writeFile(t, filepath.Join(mnt, "dir", fmt.Sprintf("f%02d", i)), fill(uint64(i), 1000*i+1), 0o644)
		writeFile(t, filepath.Join(mnt, "gone", fmt.Sprintf("a-long-file-name-to-fill-blocks-%02d", i)), []byte("x"), 0o644)
	}
	must(t, unix.Syncfs(fd))
	writeFile(t, filepath.Join(mnt, "big"), fill(99, 3<<20), 0o600)
	must(t, unix.Syncfs(fd))
	must(t, os.Rename(filepath.Join(mnt, "dir/f05"), filepath.Join(mnt, "dir/sub/moved")))
	must(t, os.Remove(filepath.Join(mnt, "dir/f07")))
	must(t, os.RemoveAll(filepath.Join(mnt, "gone")))
	must(t, unix.Syncfs(fd))
	must(t, os.Symlink("dir/f01", filepath.Join(mnt, "link")))
	must(t, os.Mkdir(filepath.Join(mnt, "gone"), 0o700))
	must(t, unix.Syncfs(fd))
	err = unix.IoctlSetPointerInt(fd, ext4IocShutdown, goingLogFlush)
	unix.Close(fd)
	must(t, err)
	runCmd(t, nil, tools[1], mnt)
	mounted = false
	sb := make([]byte, 1024)
	fh, err := os.Open(img)
	must(t, err)
	_, err = fh.ReadAt(sb, 1024)
	fh.Close()
	must(t, err)
	if binary.LittleEndian.Uint32(sb[0x60:])&incompatRecover == 0 {
		t.Fatal("the kernel left no journal to recover; the test cannot check replay")
	}
	return img
}

// kernelMountCycle mounts img read-write and unmounts it, so the kernel
// replays its journal and empties its orphan list.
func kernelMountCycle(t *testing.T, img string) {
	t.Helper()
	tools := testenv.RequireTools(t, "mount", "umount")
	mnt := t.TempDir()
	runCmd(t, nil, tools[0], "-o", "loop", img, mnt)
	mounted := true
	t.Cleanup(func() {
		if mounted {
			runCmd(t, nil, tools[1], mnt)
		}
	})
	runCmd(t, nil, tools[1], mnt)
	mounted = false
}

// copyFile copies an image so two replays can be compared.
func copyFile(t *testing.T, src string) string {
	t.Helper()
	b, err := os.ReadFile(src)
	must(t, err)
	dst := filepath.Join(t.TempDir(), "copy.img")
	must(t, os.WriteFile(dst, b, 0o600))
	return dst
}

// TestRecoverKernelJournal: we replay a journal the kernel wrote; the
// result must be e2fsck-clean and show exactly the tree the kernel's own
// replay of the same image shows.
func TestRecoverKernelJournal(t *testing.T) {
	for _, v := range []struct {
		name string
		args []string
	}{
		{"csum_v3-1k", nil},
		{"csum_v3-4k", []string{"-b", "4096"}},
		{"no-csum", []string{"-O", "^metadata_csum"}},
	} {
		t.Run(v.name, func(t *testing.T) {
			testenv.RequireTools(t, "mount", "umount")
			img := kernelCrashImage(t, v.args...)
			byKernel := copyFile(t, img)
			if _, err := Open(mustOpen(t, img)); !errors.Is(err, ErrUnsupported) {
				t.Fatalf("the reader opened an image needing recovery: %v", err)
			}
			w := openWritable(t, img)
			if w.ReplayedTransactions() < 4 {
				t.Fatalf("%d transactions replayed, want the workload's 4 or more", w.ReplayedTransactions())
			}
			t.Logf("replayed %d transactions", w.ReplayedTransactions())
			e2fsckClean(t, img)
			// The kernel replays its copy on a read-write mount.
			kernelMountCycle(t, byKernel)
			e2fsckClean(t, byKernel)
			compareTrees(t, mountCopy(t, byKernel), mountCopy(t, img))
			got, err := os.ReadFile(filepath.Join(mountCopy(t, img), "big"))
			must(t, err)
			if string(got) != string(fill(99, 3<<20)) {
				t.Error("big: content differs after replay")
			}
			// And the writer works on the recovered filesystem.
			o := writerOps{w}
			must(t, o.create("after", 0o644))
			must(t, o.writeAt("after", []byte("written after recovery"), 0))
			must(t, w.Checkpoint())
			e2fsckClean(t, img)
		})
	}
}

func mustOpen(t *testing.T, img string) (*os.File, int64) {
	t.Helper()
	fh, err := os.Open(img)
	must(t, err)
	t.Cleanup(func() { fh.Close() })
	st, err := fh.Stat()
	must(t, err)
	return fh, st.Size()
}

// journalLog locates the journal of an image that needs recovery: the
// journal superblock and the volume offset of each log block.
func journalLog(t *testing.T, img string) (*journalSuper, func(i uint32) int64) {
	t.Helper()
	fh, size := mustOpen(t, img)
	sb := make([]byte, 1024)
	_, err := fh.ReadAt(sb, 1024)
	must(t, err)
	f, err := Open(sbOverlay{fh, clearRecover(sb)}, size)
	must(t, err)
	jin, err := f.Inode(f.sb.journalInum)
	must(t, err)
	n := jin.Size >> f.blockLog
	runs, err := f.mapBlocks(jin, 0, n)
	must(t, err)
	off := func(i uint32) int64 {
		for _, r := range runs {
			if uint64(i) >= r.lblk && uint64(i) < r.lblk+r.count {
				return int64(r.pblk+uint64(i)-r.lblk) << f.blockLog
			}
		}
		t.Fatalf("journal block %d unmapped", i)
		return 0
	}
	b := make([]byte, f.blockSize)
	_, err = fh.ReadAt(b, off(0))
	must(t, err)
	j, err := parseJournalSuper(b, f.blockSize, uint32(n))
	must(t, err)
	return j, off
}

// TestRecoverRefusesDamagedJournal: a committed transaction with a bad
// checksum or a block number outside the filesystem is refused, and the
// image is left exactly as it was.
func TestRecoverRefusesDamagedJournal(t *testing.T) {
	for _, c := range []struct {
		name   string
		args   []string
		damage func(t *testing.T, j *journalSuper, blk []byte) // the log's first descriptor block and data block
		want   string
	}{
		{"data-checksum", nil, func(t *testing.T, j *journalSuper, b []byte) {
			b[j.blockSize+100] ^= 0xFF // first logged block, after the descriptor
		}, "bad checksum"},
		{"descriptor-checksum", nil, func(t *testing.T, j *journalSuper, b []byte) {
			b[j.blockSize-5] ^= 0x01 // descriptor padding, covered by its checksum
		}, "bad checksum"},
		{"impossible-block", []string{"-O", "^metadata_csum"}, func(t *testing.T, j *journalSuper, b []byte) {
			be.PutUint32(b[12:], 0xFFFFFFF0) // the first tag's block number
		}, "beyond the filesystem"},
	} {
		t.Run(c.name, func(t *testing.T) {
			img := kernelCrashImage(t, c.args...)
			j, off := journalLog(t, img)
			fh, err := os.OpenFile(img, os.O_RDWR, 0)
			must(t, err)
			defer fh.Close()
			two := make([]byte, 2*j.blockSize)
			_, err = fh.ReadAt(two[:j.blockSize], off(j.start))
			must(t, err)
			_, err = fh.ReadAt(two[j.blockSize:], off(j.start+1))
			must(t, err)
			if be.Uint32(two) != jbd2Magic || be.Uint32(two[4:]) != jBlockDescriptor {
				t.Fatal("the log does not start with a descriptor block")
			}
			c.damage(t, j, two)
			_, err = fh.WriteAt(two[:j.blockSize], off(j.start))
			must(t, err)
			_, err = fh.WriteAt(two[j.blockSize:], off(j.start+1))
			must(t, err)
			before, err := os.ReadFile(img)
			must(t, err)
			st, err := fh.Stat()
			must(t, err)
			_, err = OpenWritable(fh, st.Size())
			if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), "e2fsck") {
				t.Fatalf("OpenWritable: %v; want ErrCorrupt saying %q and naming e2fsck", err, c.want)
			}
			after, err := os.ReadFile(img)
			must(t, err)
			if !bytes.Equal(before, after) {
				t.Error("the refused recovery changed the image")
			}
		})
	}
}

// FuzzJournal feeds arbitrary journals (superblock in block 0, 1 KiB
// blocks) to the parser and the recovery scan: no panic, no replay of a
// block outside the filesystem, bounded work.
func FuzzJournal(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		const bs = 1024
		if len(data) < bs || len(data) > 64*bs {
			return
		}
		j, err := parseJournalSuper(data[:bs], bs, 1<<16)
		if err != nil {
			return
		}
		reads := 0
		read := func(i uint32) ([]byte, error) {
			reads++
			b := make([]byte, bs)
			if off := int(i) * bs; off < len(data) {
				copy(b, data[off:])
			}
			return b, nil
		}
		const fsBlocks = 1 << 20
		plan, err := scanJournal(j, read, fsBlocks)
		if err != nil {
			return
		}
		if reads > 2*int(j.maxLen)+1 {
			t.Fatalf("scan read %d blocks of a %d-block journal", reads, j.maxLen)
		}
		err = plan.apply(read, func(blk uint64, b []byte) error {
			if blk >= fsBlocks || len(b) != bs {
				t.Fatalf("replay of block %d (%d bytes) outside the filesystem", blk, len(b))
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	})
}

// TestGenerateJournalSeeds rewrites FuzzJournal's seed corpus from journals
// the kernel wrote (run with EXT4_GEN_JOURNAL_SEEDS=1; the seeds are
// committed). Each seed is the journal superblock and the log after it,
// cut to at most 64 blocks of 1 KiB.
func TestGenerateJournalSeeds(t *testing.T) {
	if os.Getenv("EXT4_GEN_JOURNAL_SEEDS") == "" {
		t.Skip("set EXT4_GEN_JOURNAL_SEEDS=1 to regenerate the seeds")
	}
	dir := filepath.Join("testdata", "fuzz", "FuzzJournal")
	must(t, os.MkdirAll(dir, 0o755))
	for name, args := range map[string][]string{"kernel-csum-v3": nil, "kernel-no-csum": {"-O", "^metadata_csum"}} {
		img := kernelCrashImage(t, args...)
		j, off := journalLog(t, img)
		fh, _ := mustOpen(t, img)
		var data []byte
		for i := uint32(0); i < 64 && i < j.maxLen; i++ {
			b := make([]byte, j.blockSize)
			_, err := fh.ReadAt(b, off(i))
			must(t, err)
			data = append(data, b...)
		}
		seed := "go test fuzz v1\n[]byte(" + strconv.Quote(string(data)) + ")\n"
		must(t, os.WriteFile(filepath.Join(dir, "seed-"+name), []byte(seed), 0o644))
	}
}

// TestJournalSeedsHaveCommits keeps the fuzz seeds meaningful: each must
// parse and scan to committed transactions.
func TestJournalSeedsHaveCommits(t *testing.T) {
	paths, err := filepath.Glob(filepath.Join("testdata", "fuzz", "FuzzJournal", "seed-*"))
	must(t, err)
	if len(paths) < 2 {
		t.Fatalf("%d journal seeds, want 2", len(paths))
	}
	for _, p := range paths {
		raw, err := os.ReadFile(p)
		must(t, err)
		lit := strings.TrimSuffix(strings.TrimPrefix(string(raw), "go test fuzz v1\n[]byte("), ")\n")
		s, err := strconv.Unquote(lit)
		must(t, err)
		data := []byte(s)
		j, err := parseJournalSuper(data[:1024], 1024, 1<<16)
		must(t, err)
		plan, err := scanJournal(j, func(i uint32) ([]byte, error) {
			b := make([]byte, 1024)
			if int(i)*1024 < len(data) {
				copy(b, data[int(i)*1024:])
			}
			return b, nil
		}, 1<<20)
		must(t, err)
		if plan.commits == 0 || len(plan.blocks) == 0 {
			t.Errorf("%s: %d commits, %d blocks", p, plan.commits, len(plan.blocks))
		}
		t.Logf("%s: %d commits, %d blocks, %d revoked", filepath.Base(p), plan.commits, len(plan.blocks), len(plan.revoked))
	}
}
