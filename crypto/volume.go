// Package crypto opens and creates encrypted volumes (LUKS2, LUKS1 and plain
// aes-xts-plain64) in userspace, byte-compatible with cryptsetup and
// dm-crypt, and exposes the plaintext as an io.ReaderAt.
package crypto

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/blobseal/blobseal/crypto/xts"
)

// Volume is the plaintext view of an encrypted data segment. ReadAt and
// WriteAt are safe for concurrent use; each call does one backing read per
// contiguous stored run and decrypts the whole batch at once.
type Volume struct {
	dev        io.ReaderAt
	lender     Lender          // dev's lending capability; nil when it has none
	ctxDev     ContextReaderAt // dev's interruptible read; nil when it has none
	devSize    int64           // bytes of the device
	devW       io.WriterAt     // nil when read-only
	ctxDevW    ContextWriterAt // dev's interruptible write; nil when it has none
	cipher     *xts.Cipher
	offset     int64 // start of the data segment on the device
	size       int64 // plaintext bytes
	sectorSize int
	ivUnit     int
	ivTweak    uint64
	// zeroSectors: a sector whose ciphertext is all zeros was never written
	// (a hole of a sparse image or an unwritten page) and reads as
	// plaintext zeros instead of the noise dm-crypt would decrypt it to.
	zeroSectors bool
	info        Info

	closeOnce sync.Once
	bufs      sync.Pool

	decrypted   atomic.Uint64 // bytes
	decryptNano atomic.Int64
}

// Stats are the volume's counters.
type Stats struct {
	BytesDecrypted uint64
	DecryptTime    time.Duration // wall time inside the cipher, summed over calls
}

// Stats returns the volume's counters.
func (v *Volume) Stats() Stats {
	return Stats{BytesDecrypted: v.decrypted.Load(), DecryptTime: time.Duration(v.decryptNano.Load())}
}

// Info describes an opened volume; it holds no key material.
type Info struct {
	Format     string // "luks2", "luks1" or "plain"
	Cipher     string // "aes-xts-plain64"
	KeyBits    int    // 256 or 512 (XTS key size)
	SectorSize int
	DataOffset int64
	Size       int64
	Keyslot    int // -1 for plain
	UUID       string
	// ZeroSectors: all-zero ciphertext sectors read as plaintext zeros
	// (sparse images; see OpenOptions.ZeroSectors).
	ZeroSectors bool
	// Warnings describe a damaged or outdated header copy that was not used;
	// worth logging, since the next damage could make the image unreadable.
	Warnings []string
}

// volumeParams is everything needed to serve a segment.
type volumeParams struct {
	key         []byte // copied into the cipher; the caller wipes its copy
	devSize     int64
	sectorSize  int
	offset      int64
	size        int64
	ivUnit      int
	ivTweak     uint64
	zeroSectors bool
	info        Info
}

// Lender is an optional capability of a volume's device: it lends its own
// memory for a range instead of copying it (blockcache.Cache does), which
// saves one copy of every byte read. Capabilities are taken from the device
// handed to Open and from nothing beneath it: a wrapper that checks,
// meters or limits reads must implement Lender itself, through its own
// checks, or the volume uses its ReadAt; no fast path reaches around it.
type Lender interface {
	// ReadFunc calls fn with the bytes [off, off+n) in order, in slices
	// valid only during the call, or returns an error; it gives up when ctx
	// ends.
	ReadFunc(ctx context.Context, off, n int64, fn func(b []byte) error) error
}

func newVolume(dev io.ReaderAt, p volumeParams) (*Volume, error) {
	if err := checkGeometry(p.sectorSize, p.size); err != nil {
		return nil, err
	}
	c, err := xts.New(p.key, p.sectorSize)
	if err != nil {
		return nil, err
	}
	p.info.KeyBits = len(p.key) * 8
	p.info.SectorSize = p.sectorSize
	p.info.DataOffset = p.offset
	p.info.Size = p.size
	p.info.ZeroSectors = p.zeroSectors
	v := &Volume{
		dev: dev, devSize: p.devSize, cipher: c, offset: p.offset, size: p.size, sectorSize: p.sectorSize,
		ivUnit: p.ivUnit, ivTweak: p.ivTweak, zeroSectors: p.zeroSectors, info: p.info,
	}
	if l, ok := dev.(Lender); ok {
		v.lender = l
	}
	if r, ok := dev.(ContextReaderAt); ok {
		v.ctxDev = r
	}
	if w, ok := dev.(io.WriterAt); ok {
		v.devW = w
	}
	if w, ok := dev.(ContextWriterAt); ok && v.devW != nil {
		v.ctxDevW = w
	}
	return v, nil
}

// Size returns the plaintext size in bytes.
func (v *Volume) Size() int64 { return v.size }

// Info describes the volume.
func (v *Volume) Info() Info { return v.info }

// String describes the volume without key material.
func (v *Volume) String() string {
	return fmt.Sprintf("%s %s-%d, %d-byte sectors, %d bytes at offset %d",
		v.info.Format, v.info.Cipher, v.info.KeyBits, v.sectorSize, v.size, v.offset)
}

// ErrClosed is returned by a closed volume.
var ErrClosed = errors.New("volume is closed")

// Close wipes the key schedule. The backing device is not closed.
func (v *Volume) Close() error {
	v.closeOnce.Do(func() { v.cipher.Close() })
	return nil
}

// ContextReaderAt is an optional capability of a volume's device: a read
// that gives up when ctx ends (blockcache.Cache has it), so a reader that is
// interrupted does not wait for storage. Devices without it are read with
// ReadAt, which cannot be interrupted.
type ContextReaderAt interface {
	ReadAtContext(ctx context.Context, p []byte, off int64) (int, error)
}

// ReadAt reads plaintext. It returns io.EOF when the read reaches the end.
func (v *Volume) ReadAt(p []byte, off int64) (int, error) {
	return v.ReadAtContext(context.Background(), p, off)
}

// ReadAtContext is ReadAt that gives up when ctx ends (when the device
// can: see Lender and ContextReaderAt).
func (v *Volume) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("read at negative offset %d", off)
	}
	span, n := SpanOf(off, int64(len(p)), v.size, v.sectorSize)
	if n == 0 {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	// Aligned requests decrypt straight into p; others go through a buffer.
	var buf []byte
	aligned := span.Skip == 0 && span.Len() == n
	if aligned {
		buf = p[:n]
	} else {
		buf = v.getBuf(int(span.Len()))
		defer v.putBuf(buf)
	}
	if err := v.readSectors(ctx, buf, span.Start); err != nil {
		return 0, err
	}
	if !aligned {
		copy(p, buf[span.Skip:span.Skip+int(n)])
	}
	if n < int64(len(p)) {
		return int(n), io.EOF
	}
	return int(n), nil
}

// readSectors fills buf (whole sectors) with the plaintext at start.
func (v *Volume) readSectors(ctx context.Context, buf []byte, start int64) error {
	end := start + int64(len(buf))
	if v.lender != nil && v.offset%int64(v.sectorSize) == 0 && v.offset+end <= v.devSize {
		return v.decryptChunks(ctx, v.lender, buf, start)
	}
	if err := v.readDevice(ctx, buf, v.offset+start); err != nil {
		return err
	}
	return v.decrypt(buf, buf, start)
}

// decryptChunks fills dst with the plaintext at off, decrypting each chunk
// the device lends straight into dst. Chunks normally end at multiples of the
// cache block size (a multiple of 4096, so of every sector size); bytes of a
// chunk that splits a sector are copied into dst and decrypted there once the
// sector is whole.
func (v *Volume) decryptChunks(ctx context.Context, cr Lender, dst []byte, off int64) error {
	pos, pending := 0, -1 // pending: start of bytes copied but not yet decrypted
	err := cr.ReadFunc(ctx, v.offset+off, int64(len(dst)), func(b []byte) error {
		out := dst[pos : pos+len(b)]
		if pending < 0 && len(b)%v.sectorSize == 0 {
			pos += len(b)
			return v.decrypt(out, b, off+int64(pos-len(b)))
		}
		copy(out, b)
		if pending < 0 {
			pending = pos
		}
		pos += len(b)
		if pos%v.sectorSize != 0 {
			return nil
		}
		whole := dst[pending:pos]
		from := pending
		pending = -1
		return v.decrypt(whole, whole, off+int64(from))
	})
	if err == nil && pos != len(dst) {
		err = fmt.Errorf("device lent %d of %d bytes", pos, len(dst))
	}
	if err != nil {
		return fmt.Errorf("read %d bytes at device offset %d: %w", len(dst), v.offset+off, err)
	}
	return nil
}

func (v *Volume) readDevice(ctx context.Context, p []byte, devOff int64) error {
	var n int
	var err error
	if v.ctxDev != nil {
		n, err = v.ctxDev.ReadAtContext(ctx, p, devOff)
	} else {
		n, err = v.dev.ReadAt(p, devOff)
	}
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		return fmt.Errorf("image is truncated: %d bytes missing at device offset %d (the image file or blob is shorter than its header says)", len(p)-n, devOff+int64(n))
	}
	return fmt.Errorf("read %d bytes at device offset %d: %w", len(p), devOff, err)
}

// decrypt writes the plaintext of src (whole sectors at plaintext offset
// off) to dst, which may be src itself. With zeroSectors, all-zero
// ciphertext sectors become zero plaintext and the runs between them are
// decrypted in one call each.
func (v *Volume) decrypt(dst, src []byte, off int64) error {
	if !v.zeroSectors {
		return v.decryptRun(dst, src, off)
	}
	ss := v.sectorSize
	run := -1 // start of the pending run of written sectors
	for i := 0; i <= len(src); i += ss {
		if i < len(src) && !isZero(src[i:i+ss]) {
			if run < 0 {
				run = i
			}
			continue
		}
		if run >= 0 {
			if err := v.decryptRun(dst[run:i], src[run:i], off+int64(run)); err != nil {
				return err
			}
			run = -1
		}
		if i < len(src) {
			clear(dst[i : i+ss])
		}
	}
	return nil
}

func (v *Volume) decryptRun(dst, src []byte, off int64) error {
	iv := IVOf(off, v.ivUnit, v.ivTweak)
	step := IVStep(v.sectorSize, v.ivUnit)
	start := time.Now()
	// Runs up to a FUSE reply decrypt on the calling goroutine: a mount
	// serves its reads concurrently already, and handing half of each
	// 1 MiB read to another core cost CPU in wake-ups and switches (cold
	// 1 GiB reads through a verified mount, three alternating pairs on 2
	// shared cores: medians 1.50 against 1.56 mount CPU-s/GiB, and faster
	// in every pair). Larger runs (tools reading big chunks) spread over
	// all cores.
	decrypt := v.cipher.Decrypt
	if len(src) > serialDecryptMax {
		decrypt = v.cipher.DecryptParallel
	}
	err := decrypt(dst, src, iv, step)
	v.decryptNano.Add(int64(time.Since(start)))
	v.decrypted.Add(uint64(len(src)))
	return err
}

// serialDecryptMax is the largest run decryptRun decrypts on the calling
// goroutine: fs.DefaultMaxRead, the largest FUSE read.
const serialDecryptMax = 1 << 20

func (v *Volume) encrypt(dst, src []byte, off int64) error {
	iv := IVOf(off, v.ivUnit, v.ivTweak)
	step := IVStep(v.sectorSize, v.ivUnit)
	return v.cipher.EncryptParallel(dst, src, iv, step)
}

// ErrReadOnly is returned by WriteAt on a volume whose device cannot be written.
var ErrReadOnly = errors.New("volume is read-only: its device does not support writing")

// ContextWriterAt is an optional capability of a volume's device: a write
// that gives up when ctx ends (blockcache.WriteBack has it, and may wait
// there for dirty memory to be flushed).
type ContextWriterAt interface {
	WriteAtContext(ctx context.Context, p []byte, off int64) (int, error)
}

// WriteAt is WriteAtContext without cancellation.
func (v *Volume) WriteAt(p []byte, off int64) (int, error) {
	return v.WriteAtContext(context.Background(), p, off)
}

// WriteAtContext encrypts p and writes it in place, whole sectors at a
// time (XTS per sector). Partial sectors are read, merged and rewritten.
//
// Sparse images: a never-written sector is all-zero ciphertext and reads
// as plaintext zeros, so a write into one needs nothing special. After a
// write, a sector's ciphertext is all zeros only if AES-XTS maps its
// plaintext to 4096 (or 512) zero bytes, a chance of 2^-32768 (2^-4096):
// the zero-sector convention is kept for written sectors too, rather than
// tracking written sectors in metadata.
func (v *Volume) WriteAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	if v.devW == nil {
		return 0, ErrReadOnly
	}
	if off < 0 || off+int64(len(p)) > v.size {
		return 0, fmt.Errorf("write [%d,+%d) outside the volume of %d bytes", off, len(p), v.size)
	}
	span, n := SpanOf(off, int64(len(p)), v.size, v.sectorSize)
	if n == 0 {
		return 0, nil
	}
	buf := v.getBuf(int(span.Len()))
	defer v.putBuf(buf)
	if span.Skip != 0 || span.Len() != n {
		// Read-modify-write of the partial first and last sectors.
		first := buf[:v.sectorSize]
		if err := v.readSectors(ctx, first, span.Start); err != nil {
			return 0, err
		}
		if span.Len() > int64(v.sectorSize) {
			last := buf[len(buf)-v.sectorSize:]
			if err := v.readSectors(ctx, last, span.End-int64(v.sectorSize)); err != nil {
				return 0, err
			}
		}
	}
	copy(buf[span.Skip:], p)
	if err := v.encrypt(buf, buf, span.Start); err != nil {
		return 0, err
	}
	var err error
	if v.ctxDevW != nil {
		_, err = v.ctxDevW.WriteAtContext(ctx, buf, v.offset+span.Start)
	} else {
		_, err = v.devW.WriteAt(buf, v.offset+span.Start)
	}
	if err != nil {
		return 0, fmt.Errorf("write %d bytes at device offset %d: %w", len(buf), v.offset+span.Start, err)
	}
	return len(p), nil
}

func (v *Volume) getBuf(n int) []byte {
	if b, ok := v.bufs.Get().(*[]byte); ok && cap(*b) >= n {
		return (*b)[:n]
	}
	return make([]byte, n)
}

func (v *Volume) putBuf(b []byte) {
	if cap(b) <= 4<<20 { // keep the pool from pinning huge buffers
		v.bufs.Put(&b)
	}
}
