package blob

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// fileSource is a local image file. Its written ranges are the file's data
// extents (SEEK_DATA/SEEK_HOLE), so sparse images skip their holes too.
type fileSource struct {
	f        *os.File
	path     string
	size     int64
	version  string
	writable bool
}

var (
	_ Source      = (*fileSource)(nil)
	_ RangeLister = (*fileSource)(nil)
	_ Versioned   = (*fileSource)(nil)
	_ WriterAt    = (*fileSource)(nil)
)

func openFile(path string, writable bool) (*fileSource, error) {
	flag := os.O_RDONLY
	if writable {
		flag = os.O_RDWR
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		switch {
		case errors.Is(err, fs.ErrNotExist):
			return nil, fmt.Errorf("open %s: image file does not exist", path)
		case errors.Is(err, fs.ErrPermission):
			return nil, fmt.Errorf("open %s: permission denied: %w", path, err)
		}
		return nil, fmt.Errorf("open image file: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("stat %s: %w", path, err)
	}
	size := st.Size()
	if !st.Mode().IsRegular() {
		// Block devices report size 0 in stat; ask the device.
		end, serr := f.Seek(0, io.SeekEnd)
		if serr != nil || st.Mode()&fs.ModeDevice == 0 {
			f.Close()
			return nil, fmt.Errorf("open %s: not a regular file or block device", path)
		}
		size = end
	}
	return &fileSource{
		f: f, path: path, size: size, writable: writable,
		version: strconv.FormatInt(size, 10) + "-" + strconv.FormatInt(st.ModTime().UnixNano(), 10),
	}, nil
}

func (s *fileSource) Size() int64     { return s.size }
func (s *fileSource) String() string  { return "file " + s.path }
func (s *fileSource) Version() string { return s.version }

// Close releases the file descriptor.
func (s *fileSource) Close() error { return s.f.Close() }

func (s *fileSource) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	n, err := clamp(ctx, p, off, s.size, s.String())
	if err != nil {
		return 0, err
	}
	if n > 0 {
		m, err := s.f.ReadAt(p[:n], off)
		if int64(m) < n {
			if err == nil || err == io.EOF {
				return m, fmt.Errorf("read %s: file shrank below its opened size %d", s.path, s.size)
			}
			return m, fmt.Errorf("read %s at %d: %w", s.path, off, err)
		}
	}
	if n < int64(len(p)) {
		return int(n), io.EOF
	}
	return int(n), nil
}

func (s *fileSource) WriteAt(ctx context.Context, p []byte, off int64) (int, error) {
	if !s.writable {
		return 0, fmt.Errorf("write %s: opened read-only (set Options.Writable)", s.path)
	}
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	if off < 0 || off+int64(len(p)) > s.size {
		return 0, fmt.Errorf("write %s: range [%d, %d) outside the file size %d", s.path, off, off+int64(len(p)), s.size)
	}
	n, err := s.f.WriteAt(p, off)
	if err != nil {
		return n, fmt.Errorf("write %s at %d: %w", s.path, off, err)
	}
	return n, nil
}

// WrittenRanges lists the file's data extents; bytes outside them are holes
// and read as zeros. File systems without SEEK_DATA report one full range.
func (s *fileSource) WrittenRanges(ctx context.Context) ([]Range, error) {
	return dataExtents(ctx, s.f, s.size)
}

func dataExtents(ctx context.Context, f *os.File, size int64) ([]Range, error) {
	var rs []Range
	fd := int(f.Fd())
	for off := int64(0); off < size; {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // no data after off
		}
		if err != nil {
			// SEEK_DATA unsupported: treat everything as data.
			return []Range{{Off: 0, Len: size}}, nil
		}
		if data >= size {
			break
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil || hole > size {
			hole = size
		}
		rs = append(rs, Range{Off: data, Len: hole - data})
		off = hole
	}
	return MergeRanges(rs), nil
}

// FileHoles lists the holes of a sparse file (SEEK_HOLE/SEEK_DATA): ranges
// of its first size bytes with no data, which read as zeros. A file system
// without SEEK_DATA reports none.
func FileHoles(ctx context.Context, f *os.File, size int64) ([]Range, error) {
	data, err := dataExtents(ctx, f, size)
	if err != nil {
		return nil, err
	}
	var holes []Range
	pos := int64(0)
	for _, r := range data {
		if r.Off > pos {
			holes = append(holes, Range{Off: pos, Len: r.Off - pos})
		}
		pos = r.End()
	}
	if pos < size {
		holes = append(holes, Range{Off: pos, Len: size - pos})
	}
	return holes, nil
}
