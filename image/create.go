package image

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

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
	// UUID fixes the filesystem UUID and hash seed (reproducible images).
	UUID string
	// Mkfs is the mkfs.ext4 program; default found on PATH or in /sbin.
	Mkfs string
	// Warn, when set, receives advice about slow inputs (huge directories).
	Warn func(msg string)
	// NoVerity leaves out the dm-verity tree that is otherwise appended
	// over the whole image (see AddVerity).
	NoVerity bool
	// Verity configures the tree.
	Verity VerityOptions
	// ReadWrite builds an image for read-write mounts (OpenWritable): with
	// a journal, without a verity tree, and, unless Size is given, with
	// room to grow (ReadWriteSize) and inodes at mke2fs's usual ratio.
	ReadWrite bool
}

// ReadWriteSize is the default size of a read-write image of a tree whose
// read-only image would take est: twice that, and at least 64 MiB free.
func ReadWriteSize(est TreeEstimate) int64 {
	base := est.ImageSize(true)
	return roundUp(max(2*base, base+64<<20), 1<<20)
}

// bytesPerInode is mke2fs's inode_ratio for ext4: one inode per 16 KiB.
const bytesPerInode = 16 << 10

// CreateResult reports what Create built.
type CreateResult struct {
	FilesystemBytes int64 // plaintext ext4 size
	ImageBytes      int64 // apparent size of the image file
	HoleBytes       int64 // plaintext left out as holes
	Entries         int   // files, directories, links in the tree
	// Verity describes the tree (nil with NoVerity): its root hash is what
	// a mount pins.
	Verity *VerityInfo
}

// Create builds an ext4 filesystem from a directory with MakeExt4 (mkfs.ext4
// -d: no root, no loop device, sized from the tree's allocated blocks) and
// encrypts it with crypto.CreateImage into Out, replaced atomically.
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
	var inodes uint64
	if o.ReadWrite {
		o.Journal, o.NoVerity = true, true
		est, err := EstimateTree(o.From, o.BlockSize)
		if err != nil {
			return nil, err
		}
		if o.Size == 0 {
			o.Size = roundUp(ReadWriteSize(est), int64(o.BlockSize))
		}
		inodes = max(uint64(o.Size/bytesPerInode), est.InodeCount())
	}
	dir := filepath.Dir(o.Out)
	plain, err := os.CreateTemp(dir, ".blobseal-plain-*.ext4")
	if err != nil {
		return nil, fmt.Errorf("temporary file next to %s: %w", o.Out, err)
	}
	defer os.Remove(plain.Name())
	defer plain.Close()
	size, est, err := makeExt4(ctx, o.From, plain.Name(), MakeOptions{
		BlockSize: o.BlockSize, Size: o.Size, Inodes: inodes, Label: o.Label, Journal: o.Journal,
		UUID: o.UUID, Mkfs: o.Mkfs, Warn: o.Warn,
	})
	if err != nil {
		return nil, err
	}

	out, err := os.CreateTemp(dir, ".blobseal-image-*")
	if err != nil {
		return nil, err
	}
	defer os.Remove(out.Name()) // no-op after the rename
	defer out.Close()
	created, err := crypto.CreateImage(ctx, out, plain, size, o.Key, o.Crypto)
	if err != nil {
		return nil, err
	}
	res := &CreateResult{FilesystemBytes: size, Entries: est.Entries, HoleBytes: created.HoleBytes}
	if !o.NoVerity {
		built, err := appendTree(ctx, out, created.Size, o.Verity)
		if err != nil {
			return nil, err
		}
		if err := out.Sync(); err != nil {
			return nil, fmt.Errorf("sync image: %w", err)
		}
		res.Verity = verityInfo(built)
	}
	if err := out.Chmod(0o644); err != nil {
		return nil, err
	}
	if err := out.Close(); err != nil { // a failed flush must not become the image
		return nil, fmt.Errorf("write %s: %w", o.Out, err)
	}
	if err := os.Rename(out.Name(), o.Out); err != nil {
		return nil, fmt.Errorf("move image into place: %w", err)
	}
	if fi, err := os.Stat(o.Out); err == nil {
		res.ImageBytes = fi.Size()
	}
	return res, nil
}
