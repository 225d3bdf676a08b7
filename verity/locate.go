package verity

// AppendedLayout returns the parameters-independent facts of the layout
// blobseal writes: a tree with DefaultBlockSize blocks and DefaultAlgorithm,
// its superblock right after dataSize bytes of data (rounded up to a block).
// It returns the hash offset and the total image size with the tree.
func AppendedLayout(dataSize int64) (hashOffset, imageSize int64, err error) {
	if dataSize <= 0 {
		return 0, 0, ErrBadSuperblock
	}
	bs := int64(DefaultBlockSize)
	blocks := (dataSize + bs - 1) / bs
	p := Params{HashType: 1, Algorithm: DefaultAlgorithm, DataBlockSize: DefaultBlockSize, HashBlockSize: DefaultBlockSize, DataBlocks: blocks}
	g, err := newGeometry(p, blocks*bs)
	if err != nil {
		return 0, 0, err
	}
	return blocks * bs, g.treeEnd(), nil
}

// Locate returns the hash offset of a tree appended to an image of size
// bytes in blobseal's layout (AppendedLayout): the data fills whole
// 4096-byte blocks up to the superblock and the tree ends the image. The
// layout is what `veritysetup format IMG IMG --hash-offset=<data size>`
// writes onto a file of whole blocks, too. It reports false when no data
// size gives exactly this image size. Nothing found here is trusted: the
// superblock is parsed with limits and the tree checked against the root.
func Locate(size int64) (int64, bool) {
	bs := int64(DefaultBlockSize)
	if size < 2*bs || size%bs != 0 {
		return 0, false
	}
	// total(n) grows strictly with the number of data blocks n.
	lo, hi := int64(1), size/bs
	for lo <= hi {
		n := lo + (hi-lo)/2
		_, total, err := AppendedLayout(n * bs)
		switch {
		case err != nil:
			return 0, false
		case total == size:
			return n * bs, true
		case total < size:
			lo = n + 1
		default:
			hi = n - 1
		}
	}
	return 0, false
}
