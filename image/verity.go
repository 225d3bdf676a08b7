package image

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"os"

	"github.com/blobseal/blobseal/blob"
	"github.com/blobseal/blobseal/verity"
)

// VerityOptions configure the tree AddVerity (and Create) writes.
type VerityOptions struct {
	// Salt fixes the salt (reproducible images); nil draws 32 random bytes.
	Salt []byte
	// Progress, when set, receives the bytes hashed so far.
	Progress func(done, total int64)
}

// VerityInfo is what a caller must pin to mount an image with integrity:
// the root hash (and, to pin the geometry too, the hash offset), with the
// salt and block count for reference.
type VerityInfo struct {
	RootHash   string `json:"root_hash"`
	HashOffset int64  `json:"hash_offset"`
	Salt       string `json:"salt"`
	DataBlocks int64  `json:"data_blocks"`
	BlockSize  int    `json:"data_block_size"`
	Algorithm  string `json:"hash_algorithm"`
	TreeBytes  int64  `json:"tree_bytes"`
}

func verityInfo(b *verity.Built) *VerityInfo {
	return &VerityInfo{
		RootHash: b.RootHex(), HashOffset: b.HashOffset, Salt: hex.EncodeToString(b.Params.Salt),
		DataBlocks: b.Params.DataBlocks, BlockSize: b.Params.DataBlockSize, Algorithm: b.Params.Algorithm,
		TreeBytes: b.TreeBytes,
	}
}

// ErrHasTree is returned by AddVerity for an image that already ends with
// a tree.
var ErrHasTree = errors.New("the image already ends with a verity tree")

// AddVerity appends a dm-verity tree over the whole of the image file at
// path (whatever made it: blobseal, cryptsetup, anything), in blobseal's
// layout: the file is padded with zeros to whole 4096-byte blocks, the
// superblock follows, then the tree. `veritysetup verify IMG IMG ROOT
// --hash-offset OFF` accepts the result. An image that already ends with a
// tree is refused with ErrHasTree, since a second tree would cover the
// first.
func AddVerity(ctx context.Context, path string, o VerityOptions) (*VerityInfo, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("open image: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file", path)
	}
	size := st.Size()
	if size == 0 {
		return nil, fmt.Errorf("%s is empty", path)
	}
	if off, ok := verity.Locate(size); ok {
		sb := make([]byte, verity.SuperblockSize)
		if _, err := f.ReadAt(sb, off); err == nil {
			if p, err := verity.ParseSuperblock(sb); err == nil && p.DataSize() == off {
				return nil, fmt.Errorf("%s: %w (superblock at offset %d covering %d blocks); mount it with the root hash it was made with", path, ErrHasTree, off, p.DataBlocks)
			}
		}
	}
	built, err := appendTree(ctx, f, size, o)
	if err != nil {
		return nil, err
	}
	if err := f.Sync(); err != nil {
		return nil, fmt.Errorf("sync %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return nil, fmt.Errorf("write %s: %w", path, err)
	}
	return verityInfo(built), nil
}

// appendTree pads f (size bytes of image) to whole blocks and writes the
// tree after it. Holes of the sparse file are not read.
func appendTree(ctx context.Context, f *os.File, size int64, o VerityOptions) (*verity.Built, error) {
	hashOffset, total, err := verity.AppendedLayout(size)
	if err != nil {
		return nil, err
	}
	if err := f.Truncate(hashOffset); err != nil {
		return nil, fmt.Errorf("pad image to whole blocks: %w", err)
	}
	holes, err := blob.FileHoles(ctx, f, hashOffset)
	if err != nil {
		return nil, err
	}
	built, err := verity.Build(ctx, f, f, hashOffset, verity.BuildOptions{
		Params:   verity.Params{DataBlocks: hashOffset / verity.DefaultBlockSize, Salt: o.Salt},
		Zeros:    holes,
		Progress: o.Progress,
	})
	if err != nil {
		return nil, fmt.Errorf("build the verity tree: %w", err)
	}
	if built.HashOffset+built.TreeBytes != total {
		return nil, fmt.Errorf("internal error: tree ends at %d, layout says %d", built.HashOffset+built.TreeBytes, total)
	}
	return built, nil
}

// ParseRootHash decodes a root hash given in hex (as veritysetup prints it).
func ParseRootHash(s string) ([]byte, error) {
	b, err := hex.DecodeString(s)
	if err != nil || (len(b) != 32 && len(b) != 64) {
		return nil, fmt.Errorf("verity root hash %q is not 64 (sha256) or 128 (sha512) hex digits", truncateForError(s))
	}
	return b, nil
}

func truncateForError(s string) string {
	if len(s) > 140 {
		return s[:140] + "…"
	}
	return s
}
