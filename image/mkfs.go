package image

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/blobseal/blobseal/fs/ext4"
)

// MakeOptions control MakeExt4. The zero value is valid.
type MakeOptions struct {
	// BlockSize is the ext4 block size; 0 means 4096. mke2fs would pick
	// 1 KiB for small images, which an encryption sector larger than the
	// block cannot serve, so it is always passed explicitly.
	BlockSize int
	// Size is the image size in bytes; 0 sizes it from the source tree.
	Size int64
	// Inodes is the inode count; 0 sizes it from the source tree.
	Inodes uint64
	// Label is the volume label (at most 16 bytes).
	Label string
	// Journal keeps the ext4 journal. A read-only image never replays it,
	// so by default it is left out to save space and upload time.
	Journal bool
	// UUID fixes the filesystem UUID (and the directory hash seed), for
	// reproducible images; empty lets mke2fs pick random ones.
	UUID string
	// Mkfs is the mkfs.ext4 program; empty looks it up in PATH and sbin.
	Mkfs string
	// Warn, when set, receives advice about slow inputs.
	Warn func(msg string)
}

// slowDirEntries is where mke2fs -d becomes noticeably slow.
const slowDirEntries = 5000

// Size limits of the automatic estimate.
const (
	minImageSize = 4 << 20
	inodeSize    = 256
)

// MakeExt4 writes a new ext4 filesystem holding a copy of dir (contents,
// modes, owners, times to the nanosecond, hard links, symlinks, xattrs,
// sparse files) into
// the file at path, without root, with mke2fs -d. It returns the image size.
// With an automatic size, a too small estimate is retried larger.
func MakeExt4(ctx context.Context, dir, path string, opts MakeOptions) (int64, error) {
	size, _, err := makeExt4(ctx, dir, path, opts)
	return size, err
}

// makeExt4 is MakeExt4 that also returns the tree estimate it sized from.
func makeExt4(ctx context.Context, dir, path string, opts MakeOptions) (size int64, est TreeEstimate, err error) {
	if opts.BlockSize == 0 {
		opts.BlockSize = 4096
	}
	switch opts.BlockSize {
	case 1024, 2048, 4096:
	default:
		return 0, est, fmt.Errorf("block size %d: use 1024, 2048 or 4096", opts.BlockSize)
	}
	if len(opts.Label) > 16 {
		return 0, est, fmt.Errorf("label %q is longer than 16 bytes", opts.Label)
	}
	if st, err := os.Stat(dir); err != nil {
		return 0, est, fmt.Errorf("source directory: %w", err)
	} else if !st.IsDir() {
		return 0, est, fmt.Errorf("source %s is not a directory", dir)
	}
	mkfs := opts.Mkfs
	if mkfs == "" {
		if mkfs, err = findProgram("mkfs.ext4"); err != nil {
			return 0, est, err
		}
	}
	est, err = EstimateTree(dir, opts.BlockSize)
	if err != nil {
		return 0, est, err
	}
	if est.MaxDirEntries >= slowDirEntries && opts.Warn != nil {
		opts.Warn(fmt.Sprintf("a directory in %s has %d entries; mke2fs -d copies large directories in quadratic time (about 80 s for 20,000 entries)", dir, est.MaxDirEntries))
	}
	size = opts.Size
	if size == 0 {
		size = est.ImageSize(opts.Journal)
	}
	if size%int64(opts.BlockSize) != 0 {
		return 0, est, fmt.Errorf("size %d is not a multiple of the block size %d", size, opts.BlockSize)
	}
	inodes := opts.Inodes
	if inodes == 0 {
		inodes = est.InodeCount()
	}
	for attempt := 0; ; attempt++ {
		out, err := runMke2fs(ctx, mkfs, dir, path, size, inodes, opts)
		if err == nil {
			if err := copyAttrs(ctx, dir, path); err != nil {
				return 0, est, err
			}
			return size, est, nil
		}
		if ctx.Err() != nil {
			return 0, est, ctx.Err()
		}
		full := bytes.Contains(out, []byte("space")) || bytes.Contains(out, []byte("allocate")) ||
			bytes.Contains(out, []byte("populat")) || bytes.Contains(out, []byte("too small"))
		if opts.Size != 0 || !full || attempt >= 3 {
			return 0, est, fmt.Errorf("mkfs.ext4 for a %d MiB image from %s: %w: %s", size>>20, dir, err, bytes.TrimSpace(out))
		}
		size = roundUp(size+size/2, 1<<20)
	}
}

func runMke2fs(ctx context.Context, mkfs, dir, path string, size int64, inodes uint64, opts MakeOptions) ([]byte, error) {
	if err := os.Truncate(path, 0); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return nil, fmt.Errorf("stat %s: %w", dir, err)
	}
	rootUID, rootGID := st.Uid, st.Gid
	// A read-only image is never resized; one with a journal (read-write)
	// keeps the reserved GDT blocks that let `image resize` grow it far.
	features := "resize_inode"
	if !opts.Journal {
		features = "^resize_inode,^has_journal"
	}
	args := []string{
		"-F", "-q",
		"-t", "ext4",
		"-b", strconv.Itoa(opts.BlockSize),
		"-I", strconv.Itoa(inodeSize), // 128-byte inodes lose nanosecond times
		"-N", strconv.FormatUint(inodes, 10),
		"-m", "0",
		"-O", features,
		"-E", fmt.Sprintf("nodiscard,root_owner=%d:%d", rootUID, rootGID),
		"-d", dir,
	}
	if opts.Label != "" {
		args = append(args, "-L", opts.Label)
	}
	if opts.UUID != "" {
		args = append(args, "-U", opts.UUID, "-E", "hash_seed="+opts.UUID)
	}
	args = append(args, path, strconv.FormatInt(size>>10, 10)+"k")
	cmd := exec.CommandContext(ctx, mkfs, args...)
	// Stable, locale-free messages: the retry matches on them.
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	return cmd.CombinedOutput()
}

// copyAttrs finishes what mke2fs -d leaves inexact: 1.47.0 copies times
// in whole seconds, sets every ctime and crtime to the time it ran, and
// gives the root directory neither the source's mode nor its times. One
// debugfs run sets, for every inode, the source's atime, mtime and ctime
// to the nanosecond (and its birth time where the source filesystem
// reports one), so a mount of the image stats like the source.
func copyAttrs(ctx context.Context, dir, path string) error {
	script, err := timesScript(dir, path)
	if err != nil {
		return err
	}
	debugfs, err := findProgram("debugfs")
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, debugfs, "-w", "-f", "-", path)
	cmd.Stdin = strings.NewReader(script)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("debugfs (set inode times): %w: %s", err, bytes.TrimSpace(out))
	}
	// debugfs reports a refused command on its output but exits 0.
	for _, line := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(line, "debugfs") || strings.TrimSpace(line) == "" {
			continue
		}
		return fmt.Errorf("debugfs (set inode times): %s", line)
	}
	return nil
}

// timesScript is the debugfs script that gives every inode of the ext4
// image at path the times of its source entry under dir. Inodes are named
// by number (<N>), so no file name needs quoting.
func timesScript(dir, path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return "", err
	}
	tree, err := ext4.Open(f, st.Size())
	if err != nil {
		return "", fmt.Errorf("read back the new filesystem: %w", err)
	}
	var script strings.Builder
	inodes := map[string]uint32{dir: ext4.RootIno}
	done := map[uint32]bool{}
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		ino, ok := inodes[p]
		if !ok {
			parent, err := tree.Inode(inodes[filepath.Dir(p)])
			if err != nil {
				return err
			}
			if ino, err = tree.Lookup(parent, d.Name()); err != nil {
				return fmt.Errorf("%s is not in the new filesystem: %w", p, err)
			}
			if d.IsDir() {
				inodes[p] = ino
			}
		}
		if done[ino] { // a hard link: one inode, one set of times
			return nil
		}
		done[ino] = true
		var sx unix.Statx_t
		if err := unix.Statx(unix.AT_FDCWD, p, unix.AT_SYMLINK_NOFOLLOW, unix.STATX_BASIC_STATS|unix.STATX_BTIME, &sx); err != nil {
			return fmt.Errorf("stat %s: %w", p, err)
		}
		if ino == ext4.RootIno {
			fmt.Fprintf(&script, "sif <%d> mode 0%o\n", ino, uint32(sx.Mode))
		}
		setTime(&script, ino, "atime", sx.Atime)
		setTime(&script, ino, "mtime", sx.Mtime)
		setTime(&script, ino, "ctime", sx.Ctime)
		if sx.Mask&unix.STATX_BTIME != 0 {
			setTime(&script, ino, "crtime", sx.Btime)
		}
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("copy times from %s: %w", dir, err)
	}
	return script.String(), nil
}

// setTime writes the debugfs commands that set one ext4 timestamp: the
// low 32 bits of the seconds, then the extra field holding the epoch bits
// (seconds beyond 32 bits, for times after 2038) and the nanoseconds.
func setTime(w io.Writer, ino uint32, field string, t unix.StatxTimestamp) {
	sec := t.Sec
	epoch := uint32((sec-int64(int32(sec)))>>32) & 3
	fmt.Fprintf(w, "sif <%d> %s 0x%x\n", ino, field, uint32(int32(sec)))
	fmt.Fprintf(w, "sif <%d> %s_extra 0x%x\n", ino, field, t.Nsec<<2|epoch)
}

// TreeEstimate is what a directory tree needs on ext4.
type TreeEstimate struct {
	BlockSize int
	Inodes    uint64 // distinct inodes, hard links counted once
	Blocks    uint64 // data, directory, symlink and xattr blocks
	Entries   int    // names in the tree, the root included
	// MaxDirEntries is the largest directory's entry count: mke2fs 1.47.0
	// inserts entries in time quadratic in it (20,000 entries: ~80 s).
	MaxDirEntries int
}

// EstimateTree walks dir (not following symlinks) and counts what an ext4
// copy of it will use: allocated (not apparent) file blocks, so sparse
// files stay cheap; directory blocks from the entry sizes; long symlinks
// and large xattr sets take a block each.
func EstimateTree(dir string, blockSize int) (TreeEstimate, error) {
	bs := uint64(blockSize)
	est := TreeEstimate{BlockSize: blockSize}
	seen := make(map[[2]uint64]bool)
	dirBytes := make(map[string]uint64)
	dirEntries := make(map[string]int)
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return fmt.Errorf("stat %s: %w", p, err)
		}
		est.Entries++
		if p != dir {
			dirBytes[filepath.Dir(p)] += uint64(8+len(d.Name())+3) &^ 3
			dirEntries[filepath.Dir(p)]++
		}
		if st.Nlink > 1 && st.Mode&syscall.S_IFMT != syscall.S_IFDIR {
			key := [2]uint64{uint64(st.Dev), st.Ino}
			if seen[key] {
				return nil
			}
			seen[key] = true
		}
		est.Inodes++
		switch st.Mode & syscall.S_IFMT {
		case syscall.S_IFREG:
			apparent := (uint64(st.Size) + bs - 1) / bs
			allocated := (uint64(st.Blocks)*512 + bs - 1) / bs
			n := min(apparent, allocated)
			// Extent tree blocks: one per ~340 extents; assume fragments
			// of 32 MiB at worst.
			est.Blocks += n + n/(8192*340) + 1
		case syscall.S_IFDIR:
			dirBytes[p] += 24 // "." and ".."
		case syscall.S_IFLNK:
			if st.Size >= 60 {
				est.Blocks++
			}
		}
		est.Blocks += xattrBlocks(p, bs)
		return nil
	})
	if err != nil {
		return est, fmt.Errorf("scan %s: %w", dir, err)
	}
	for _, n := range dirEntries {
		est.MaxDirEntries = max(est.MaxDirEntries, n)
	}
	for _, n := range dirBytes {
		blocks := (n + bs - 13) / (bs - 12) // room for the block tail
		if blocks > 1 {
			blocks += 1 + blocks/500 // hash tree index blocks
		}
		est.Blocks += blocks
	}
	return est, nil
}

// xattrBlocks is the external xattr block an inode needs when its
// attributes do not fit in the 256-byte inode's spare room.
func xattrBlocks(p string, bs uint64) uint64 {
	sz, err := unix.Llistxattr(p, nil)
	if err != nil || sz <= 0 {
		return 0
	}
	names := make([]byte, sz)
	if sz, err = unix.Llistxattr(p, names); err != nil {
		return 1
	}
	var total uint64
	for _, name := range bytes.Split(names[:sz], []byte{0}) {
		if len(name) == 0 {
			continue
		}
		vs, _ := unix.Lgetxattr(p, string(name), nil)
		total += uint64(16 + len(name) + max(vs, 0) + 4)
	}
	if total <= 96 {
		return 0
	}
	return (total + bs - 1) / bs
}

// InodeCount is the -N value: the tree plus reserved inodes and headroom.
func (e TreeEstimate) InodeCount() uint64 {
	return e.Inodes + e.Inodes/4 + 64
}

// ImageSize is the image size with ~25 % headroom for metadata the
// estimate does not model, rounded up to a MiB.
func (e TreeEstimate) ImageSize(journal bool) int64 {
	bs := uint64(e.BlockSize)
	blocks := e.Blocks + (e.InodeCount()*inodeSize+bs-1)/bs
	groups := blocks/(8*bs) + 1
	blocks += groups * 4 // bitmaps, superblock and descriptor copies
	if journal {
		blocks += max(1024, min(blocks/16, 32768))
	}
	size := int64(blocks*bs) + int64(blocks*bs)/4 + 1<<20
	return max(roundUp(size, 1<<20), minImageSize)
}

func roundUp(n, to int64) int64 { return (n + to - 1) / to * to }

// findProgram looks a tool up in PATH, then in the sbin directories that a
// non-root PATH often lacks.
func findProgram(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, d := range []string{"/usr/sbin", "/sbin"} {
		p := filepath.Join(d, name)
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found: install e2fsprogs", name)
}
