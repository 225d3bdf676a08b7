package image

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/blobseal/blobseal/crypto"
)

// CreateOptions describe a new encrypted image.
type CreateOptions struct {
	From string // directory whose tree becomes the filesystem
	Out  string // image file to write (replaced atomically)
	Key  []byte // key file bytes: LUKS passphrase, or raw key for plain

	Crypto    crypto.FormatOptions
	BlockSize int    // ext4 block size, default 4096; must be ≥ the sector size
	Size      int64  // ext4 size in bytes; 0 = computed from the tree
	Label     string // ext4 volume label
	Journal   bool   // add an ext4 journal (useless for read-only images)
	// Mkfs is the mkfs.ext4 program; default found on PATH or in /sbin.
	Mkfs string
}

// CreateResult reports what Create built.
type CreateResult struct {
	FilesystemBytes int64 // plaintext ext4 size
	ImageBytes      int64 // apparent size of the image file
	HoleBytes       int64 // plaintext left out as holes
	Entries         int   // files, directories, links in the tree
}

// Create builds an ext4 filesystem from a directory with mkfs.ext4 -d (no
// root, no loop device), sized automatically with headroom, and encrypts it.
func Create(ctx context.Context, o CreateOptions) (*CreateResult, error) {
	if o.BlockSize == 0 {
		o.BlockSize = 4096
	}
	if o.Crypto.SectorSize == 0 {
		o.Crypto.SectorSize = 4096
	}
	if o.Crypto.SectorSize > o.BlockSize {
		return nil, fmt.Errorf("encryption sector size %d is larger than the ext4 block size %d: the filesystem could then write part of a sector; use --sector-size %d or a larger --block-size",
			o.Crypto.SectorSize, o.BlockSize, o.BlockSize)
	}
	st, err := os.Stat(o.From)
	if err != nil || !st.IsDir() {
		return nil, fmt.Errorf("--from %s must be an existing directory", o.From)
	}
	mkfs, err := findMkfs(o.Mkfs)
	if err != nil {
		return nil, err
	}
	usage, err := measureTree(o.From, int64(o.BlockSize))
	if err != nil {
		return nil, err
	}
	size := o.Size
	if size == 0 {
		size = usage.suggestSize(int64(o.BlockSize), o.Journal)
	}
	size = size / int64(o.BlockSize) * int64(o.BlockSize)

	dir := filepath.Dir(o.Out)
	plain, err := os.CreateTemp(dir, ".blobseal-plain-*.ext4")
	if err != nil {
		return nil, fmt.Errorf("temporary file next to %s: %w", o.Out, err)
	}
	defer os.Remove(plain.Name())
	defer plain.Close()

	// mkfs can still run out of room for a tree our estimate misjudged
	// (many tiny files, long names): grow and try again.
	for attempt := 0; ; attempt++ {
		err = runMkfs(ctx, mkfs, plain.Name(), size, usage, o, st)
		if err == nil {
			break
		}
		if attempt >= 3 || o.Size != 0 || !isNoSpace(err) {
			return nil, err
		}
		size = (size*3/2 + int64(o.BlockSize) - 1) / int64(o.BlockSize) * int64(o.BlockSize)
	}

	out, err := os.CreateTemp(dir, ".blobseal-image-*")
	if err != nil {
		return nil, err
	}
	defer os.Remove(out.Name()) // no-op after the rename
	defer out.Close()
	if err := crypto.CreateImage(ctx, out, plain, size, o.Key, o.Crypto); err != nil {
		return nil, err
	}
	if err := out.Chmod(0o644); err != nil {
		return nil, err
	}
	if err := os.Rename(out.Name(), o.Out); err != nil {
		return nil, fmt.Errorf("move image into place: %w", err)
	}
	res := &CreateResult{FilesystemBytes: size, Entries: usage.entries}
	if fi, err := os.Stat(o.Out); err == nil {
		res.ImageBytes = fi.Size()
	}
	if o.Crypto.Format != "plain" {
		if f, err := os.Open(o.Out); err == nil {
			if v, err := crypto.Open(f, res.ImageBytes, o.Key, crypto.OpenOptions{}); err == nil {
				res.HoleBytes = v.Info().HoleBytes
				v.Close()
			}
			f.Close()
		}
	}
	return res, nil
}

func findMkfs(explicit string) (string, error) {
	if explicit != "" {
		return explicit, nil
	}
	if p, err := exec.LookPath("mkfs.ext4"); err == nil {
		return p, nil
	}
	for _, p := range []string{"/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"} {
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", errors.New("mkfs.ext4 not found: install e2fsprogs (apt-get install e2fsprogs)")
}

// treeUsage is what a directory tree needs in an ext4 filesystem.
type treeUsage struct {
	dataBlocks int64 // file and directory blocks, and slow symlinks
	entries    int
}

func measureTree(root string, blockSize int64) (treeUsage, error) {
	var u treeUsage
	dirBytes := map[string]int64{}
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return fmt.Errorf("read source tree: %w", err)
		}
		u.entries++
		dirBytes[filepath.Dir(path)] += int64(8 + len(d.Name()) + 4)
		info, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case info.Mode().IsRegular():
			allocated := info.Size()
			if st, ok := info.Sys().(*syscall.Stat_t); ok && st.Blocks*512 < allocated {
				allocated = st.Blocks * 512 // sparse files stay sparse
			}
			blocks := (allocated + blockSize - 1) / blockSize
			u.dataBlocks += blocks + blocks/340 + 1 // extent index blocks for fragmented files
		case info.Mode()&fs.ModeSymlink != 0:
			if info.Size() > 59 {
				u.dataBlocks++
			}
		}
		return nil
	})
	for _, n := range dirBytes {
		u.dataBlocks += (n*12/10)/blockSize + 1 // htree index and slack
	}
	return u, err
}

// inodes returns the inode count to ask mkfs for.
func (u treeUsage) inodes() int64 { return int64(u.entries)*11/10 + 128 }

func (u treeUsage) suggestSize(blockSize int64, journal bool) int64 {
	data := u.dataBlocks * blockSize
	meta := u.inodes()*256 + data/64 // inode tables, bitmaps, descriptors
	size := (data+meta)*115/100 + 4<<20
	if journal {
		size += 32 << 20
	}
	return (size + 1<<20 - 1) &^ (1<<20 - 1)
}

func runMkfs(ctx context.Context, mkfs, file string, size int64, u treeUsage, o CreateOptions, root os.FileInfo) error {
	if err := os.Truncate(file, 0); err != nil {
		return err
	}
	args := []string{"-q", "-F", "-t", "ext4", "-b", strconv.Itoa(o.BlockSize), "-N", strconv.FormatInt(u.inodes(), 10), "-m", "0"}
	if !o.Journal {
		args = append(args, "-O", "^has_journal")
	}
	if o.Label != "" {
		args = append(args, "-L", o.Label)
	}
	if st, ok := root.Sys().(*syscall.Stat_t); ok {
		args = append(args, "-E", fmt.Sprintf("root_owner=%d:%d", st.Uid, st.Gid))
	}
	args = append(args, "-d", o.From, file, strconv.FormatInt(size/1024, 10)+"k")
	cmd := exec.CommandContext(ctx, mkfs, args...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("mkfs.ext4 failed (%v): %s", err, strings.TrimSpace(string(out)))
	}
	return nil
}

func isNoSpace(err error) bool {
	s := strings.ToLower(err.Error())
	return strings.Contains(s, "no space") || strings.Contains(s, "could not allocate") ||
		strings.Contains(s, "inode") && strings.Contains(s, "full") || strings.Contains(s, "too small")
}
