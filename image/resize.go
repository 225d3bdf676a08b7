package image

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/blobseal/blobseal/blob"
	"github.com/blobseal/blobseal/crypto"
	"github.com/blobseal/blobseal/crypto/luks"
	"github.com/blobseal/blobseal/fs/ext4"
	"github.com/blobseal/blobseal/internal/secret"
)

// ResizeAlign is the granularity of image sizes Resize accepts: whole
// 4 KiB blocks (page blob pages and every encryption sector size divide it).
const ResizeAlign = 4096

// ResizeResult describes a completed Resize.
type ResizeResult struct {
	Name                   string // path or URL, credentials removed
	OldBytes, NewBytes     int64  // image (file or blob) size
	OldFSBytes, NewFSBytes int64  // ext4 filesystem size
	Groups                 uint32 // ext4 block groups after the resize
}

// Resize grows an image offline to newSize bytes: a local file is
// extended, a page blob is grown under its write lease (Set Blob
// Properties); the encrypted volume follows (LUKS2/LUKS1 data segments of
// size "dynamic", as blobseal and cryptsetup make them, and plain images
// reach to the end of the device); then the ext4 filesystem is grown into
// it (ext4.Grow). A journal left by a crash is replayed first.
//
// Everything that can refuse is checked before anything changes: images
// with a verity tree (read-only by design), block blobs, LUKS segments of
// fixed size, shrinking, and a filesystem that cannot grow that far (the
// message names the largest size). The device grows first, the new ext4
// groups next, and one journal transaction switches the filesystem over,
// so a crash part-way leaves the old filesystem in a larger device (or,
// after the journal's replay, the new one): Resize with the same size
// finishes the job, since it grows the filesystem to whatever the device
// holds.
func Resize(ctx context.Context, spec Spec, newSize int64) (res ResizeResult, err error) {
	name := secret.RedactURL(spec.Location)
	res.Name = name
	if spec.Integrity.RootHash != nil || spec.Integrity.Require {
		return res, fmt.Errorf("%s: %w: a verity root hash pins the image's bytes, so it cannot be resized", name, ErrVerityReadOnly)
	}
	if newSize <= 0 || newSize%ResizeAlign != 0 {
		return res, fmt.Errorf("resize %s: new size %d is not a positive multiple of %d bytes", name, newSize, ResizeAlign)
	}
	var dev resizeDevice
	if IsRemote(spec.Location) {
		dev, err = openBlobForResize(ctx, spec, name)
	} else {
		dev, err = openFileForResize(spec.Location)
	}
	if err != nil {
		return res, err
	}
	defer func() {
		if cerr := dev.close(); cerr != nil && err == nil {
			err = fmt.Errorf("resize %s: %w", name, cerr)
		}
	}()
	oldSize := dev.size()
	res.OldBytes, res.NewBytes = oldSize, newSize
	if hasTree(dev, oldSize) {
		return res, fmt.Errorf("%s ends with a verity tree: %w; rebuild it larger (blobseal image create --size), or build a writable image (--read-write)", name, ErrVerityReadOnly)
	}
	if newSize < oldSize {
		return res, fmt.Errorf("resize %s: it is already %d bytes; resize only grows images (asked for %d)", name, oldSize, newSize)
	}
	if err := checkGrowableVolume(dev, oldSize, spec, name); err != nil {
		return res, err
	}
	// Unlocked once, for the new size: until the device grows, only the
	// old part is read.
	vol, err := crypto.OpenContext(ctx, dev, newSize, spec.Key, spec.Crypto)
	if err != nil {
		return res, fmt.Errorf("unlock %s: %w", name, err)
	}
	defer vol.Close()
	info := vol.Info()
	// The volume as the device is now; the filesystem may be smaller (a
	// resize interrupted after the device grew): ext4 goes by its own
	// superblock.
	curVol := alignDown(oldSize-info.DataOffset, int64(info.SectorSize))
	newFS := vol.Size()
	fsDev := volumeDevice{vol, dev}

	// Replay a journal a crash left, clear orphans, refuse what the writer
	// cannot maintain: exactly what a read-write mount would do first.
	w, err := openWriter(spec, name, fsDev)
	if err != nil {
		return res, err
	}
	if err := w.Close(); err != nil {
		return res, fmt.Errorf("%s: %w", name, err)
	}
	plan, err := ext4.CheckGrow(fsDev, curVol, newFS)
	if err != nil {
		var limit *ext4.GrowLimitError
		if errors.As(err, &limit) {
			return res, fmt.Errorf("resize %s: %w; the image can grow to at most %d bytes", name, err, limit.MaxBytes+info.DataOffset)
		}
		return res, fmt.Errorf("resize %s: %w", name, err)
	}
	res.OldFSBytes = int64(plan.OldBlocks) * int64(plan.BlockSize)
	if plan.NewBlocks == plan.OldBlocks && newSize == oldSize {
		return res, fmt.Errorf("resize %s: it is already %d bytes and its filesystem fills it; resize only grows images", name, oldSize)
	}
	if newSize > oldSize {
		if err := dev.grow(ctx, newSize); err != nil {
			return res, err
		}
	}
	g, err := ext4.Grow(fsDev, curVol, newFS)
	if err != nil {
		return res, fmt.Errorf("resize %s: the device grew to %d bytes but its filesystem did not (run resize again): %w", name, newSize, err)
	}
	res.NewFSBytes = int64(g.NewBlocks) * int64(g.BlockSize)
	res.Groups = g.NewGroups
	return res, nil
}

// checkGrowableVolume refuses a LUKS data segment of fixed size (the volume
// would not follow the device; rewriting the header is not done here) and
// a plain image pinned to a size.
func checkGrowableVolume(dev io.ReaderAt, size int64, spec Spec, name string) error {
	if spec.Crypto.Format == "plain" {
		if spec.Crypto.Plain.Size != 0 {
			return fmt.Errorf("resize %s: the plain volume is pinned to %d bytes; resize needs it to reach the end of the image", name, spec.Crypto.Plain.Size)
		}
		return nil
	}
	if crypto.Detect(dev) == "" {
		return fmt.Errorf("%s has no LUKS header: if it is a headerless image, pass --format plain", name)
	}
	h, err := luks.ReadHeader(dev, size)
	if err != nil {
		return fmt.Errorf("resize %s: %w", name, err)
	}
	for _, s := range h.Segments {
		if s.Size >= 0 {
			return fmt.Errorf("resize %s: LUKS data segment %d has a fixed size of %d bytes; only images whose segment size is \"dynamic\" (as blobseal and cryptsetup luksFormat make them) grow with their device", name, s.ID, s.Size)
		}
	}
	return nil
}

func alignDown(n, a int64) int64 { return n - n%a }

// resizeDevice is the image's storage during a resize: read, write,
// durability barrier, and growth.
type resizeDevice interface {
	io.ReaderAt
	io.WriterAt
	size() int64
	grow(ctx context.Context, n int64) error
	sync() error
	close() error
}

// volumeDevice is the ext4 Device of a resize: the volume encrypts into
// the image, whose sync is the barrier.
type volumeDevice struct {
	*crypto.Volume
	dev resizeDevice
}

func (d volumeDevice) Sync() error { return d.dev.sync() }

var (
	_ ext4.Device  = volumeDevice{}
	_ resizeDevice = fileDevice{}
	_ resizeDevice = (*blobDevice)(nil)
)

// fileDevice is a local image file.
type fileDevice struct{ *os.File }

func openFileForResize(path string) (resizeDevice, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("open image for resizing: %w", err)
	}
	st, err := f.Stat()
	if err != nil || !st.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("%s is not a regular file (%v)", path, err)
	}
	return fileDevice{f}, nil
}

func (d fileDevice) size() int64 {
	st, err := d.Stat()
	if err != nil {
		return 0
	}
	return st.Size()
}

func (d fileDevice) grow(_ context.Context, n int64) error {
	if err := d.Truncate(n); err != nil {
		return fmt.Errorf("grow %s: %w", d.Name(), err)
	}
	return d.File.Sync()
}

func (d fileDevice) sync() error { return d.File.Sync() }

func (d fileDevice) close() error {
	return errors.Join(d.File.Sync(), d.File.Close())
}

// blobDevice is a page blob under this process's write lease: reads go
// to the blob (they see the writer's own writes), writes are Put Page
// calls that return once storage has them, so sync only checks the
// writer is still usable.
type blobDevice struct {
	ctx context.Context
	src blob.Source
	pw  *blob.PageWriter
}

func openBlobForResize(ctx context.Context, spec Spec, name string) (_ resizeDevice, err error) {
	src, err := blob.Open(ctx, spec.Location, spec.Blob)
	if err != nil {
		return nil, fmt.Errorf("open image source: %w", err)
	}
	closeSrc := func() {
		if c, ok := src.(io.Closer); ok {
			c.Close()
		}
	}
	pw, err := blob.NewPageWriter(ctx, src, blob.WriterOptions{Lease: spec.Write.Lease})
	if errors.Is(err, blob.ErrUnsupported) {
		closeSrc()
		return nil, fmt.Errorf("%s cannot be resized: %w; upload the image as a page blob (blobseal image upload --type page)", name, err)
	}
	if err != nil {
		closeSrc()
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return &blobDevice{ctx: ctx, src: src, pw: pw}, nil
}

func (d *blobDevice) ReadAt(p []byte, off int64) (int, error) { return d.src.ReadAt(d.ctx, p, off) }
func (d *blobDevice) WriteAt(p []byte, off int64) (int, error) {
	return d.pw.WriteAt(d.ctx, p, off)
}
func (d *blobDevice) size() int64                             { return d.src.Size() }
func (d *blobDevice) grow(ctx context.Context, n int64) error { return d.pw.Grow(ctx, n) }
func (d *blobDevice) sync() error                             { return d.pw.Err() }

// close releases the lease (bounded: an unanswered release lapses anyway).
func (d *blobDevice) close() error {
	ctx, cancel := context.WithTimeout(context.Background(), releaseTimeout)
	defer cancel()
	err := d.pw.Close(ctx)
	if c, ok := d.src.(io.Closer); ok {
		err = errors.Join(err, c.Close())
	}
	return err
}
