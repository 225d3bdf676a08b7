package ext4

import (
	"context"
	"fmt"
)

const maxSymlinkLen = 4096 // PATH_MAX

// Readlink returns a symbolic link's target, from i_block for fast links
// (and inline data), otherwise from the link's data block.
func (f *FS) Readlink(link *Inode) (string, error) {
	if err := checkInode(link); err != nil {
		return "", err
	}
	if !link.IsSymlink() {
		return "", fmt.Errorf("ext4: inode %d is not a symbolic link (mode %#o): %w", link.Ino, link.Mode, ErrCorrupt)
	}
	if link.Size == 0 || link.Size > maxSymlinkLen || link.Size > uint64(f.blockSize) {
		return "", fmt.Errorf("ext4: inode %d: symbolic link length %d is invalid: %w", link.Ino, link.Size, ErrCorrupt)
	}
	if link.hasFlag(flagInlineData) {
		data, err := f.inlineData(link)
		if err != nil {
			return "", err
		}
		if uint64(len(data)) < link.Size {
			return "", fmt.Errorf("ext4: inode %d: inline symbolic link is shorter than its size: %w", link.Ino, ErrCorrupt)
		}
		return string(data[:link.Size]), nil
	}
	if f.isFastSymlink(link) {
		if link.Size >= 60 {
			return "", fmt.Errorf("ext4: inode %d: fast symbolic link of %d bytes does not fit i_block: %w", link.Ino, link.Size, ErrCorrupt)
		}
		return string(link.iblock()[:link.Size]), nil
	}
	buf := make([]byte, link.Size)
	if err := f.readData(context.Background(), link, buf, 0); err != nil {
		return "", err
	}
	return string(buf), nil
}

// isFastSymlink follows the kernel: a link with no data blocks (other than
// an xattr block) keeps its target in i_block.
func (f *FS) isFastSymlink(link *Inode) bool {
	if link.hasFlag(flagEAInode) {
		return link.Size < 60
	}
	var ea uint64
	if link.fileACL != 0 {
		ea = uint64(f.blockSize*f.clusterRatio) >> 9
	}
	return link.Blocks <= ea && !link.hasFlag(flagExtents)
}
