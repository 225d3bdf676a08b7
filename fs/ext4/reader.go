package ext4

import "io"

// FileReader adapts one file of an FS to io.ReaderAt (and io.SectionReader).
type FileReader struct {
	fs *FS
	in *Inode
}

var _ io.ReaderAt = (*FileReader)(nil)

// FileReader returns an io.ReaderAt over the file's data.
func (f *FS) FileReader(in *Inode) *FileReader { return &FileReader{fs: f, in: in} }

// ReadAt implements io.ReaderAt.
func (r *FileReader) ReadAt(p []byte, off int64) (int, error) { return r.fs.ReadAt(r.in, p, off) }

// Size is the file's length in bytes.
func (r *FileReader) Size() int64 { return int64(r.in.Size) }
