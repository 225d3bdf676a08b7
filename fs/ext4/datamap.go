package ext4

// ByteRange is a half-open range [Off, Off+Len) of a file's bytes.
type ByteRange struct {
	Off, Len uint64
}

// DataRanges lists the ranges of in's bytes that have data behind them, in
// order; the rest of [0, Size) are holes or unwritten extents and read as
// zeros. Its cost follows the number of extents, not the file size, so
// callers can skip holes of any size (SEEK_DATA in one call).
func (f *FS) DataRanges(in *Inode) ([]ByteRange, error) {
	if in.Size == 0 {
		return nil, nil
	}
	if in.hasFlag(flagInlineData) {
		return []ByteRange{{0, in.Size}}, nil
	}
	nblocks := (in.Size + uint64(f.blockSize) - 1) >> f.blockLog
	runs, err := f.mapBlocks(in, 0, nblocks)
	if err != nil {
		return nil, err
	}
	var out []ByteRange
	for _, r := range runs {
		if r.zero {
			continue
		}
		off := r.lblk << f.blockLog
		n := min(r.count<<f.blockLog, in.Size-off)
		if k := len(out); k > 0 && out[k-1].Off+out[k-1].Len == off {
			out[k-1].Len += n // physically apart, logically adjacent
			continue
		}
		out = append(out, ByteRange{off, n})
	}
	return out, nil
}
