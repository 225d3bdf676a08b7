package image

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"syscall"
	"time"

	"github.com/blobseal/blobseal/blob"
	"github.com/blobseal/blobseal/blockcache"
	"github.com/blobseal/blobseal/crypto"
	"github.com/blobseal/blobseal/fs/ext4"
	"github.com/blobseal/blobseal/internal/secret"
	"github.com/blobseal/blobseal/verity"
)

// Writable is an image file opened read-write: the ext4 Writer over the
// decrypting (and encrypting) volume over the file. Close flushes the
// filesystem and releases everything.
type Writable struct {
	Writer *ext4.Writer
	Volume *crypto.Volume
	// Name is the image's path or URL (credentials removed), for logs and
	// errors.
	Name string
	// Lease is the blob's write lease (nil for a local file): its Lost
	// channel closes when another party breaks it or it lapses, after
	// which nothing more reaches storage.
	Lease *blob.Lease

	writeBack *blockcache.WriteBack // nil for a local file

	closers []func() error // in order of opening; Close runs them in reverse
	closed  chan struct{}  // closed by Close: stops WatchLease
}

// WatchLease returns the channel that closes when the blob's write lease
// is lost (nil for a local file: never), for fs.Options.ReadOnlyAfter, and
// logs the loss at error level when it happens: from then on nothing more
// reaches storage, and what was not stored yet is lost.
func (i *Writable) WatchLease(log *slog.Logger) <-chan struct{} {
	if i.Lease == nil {
		return nil
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	lost := i.Lease.Lost()
	go func() {
		select {
		case <-lost:
			log.Error("write lease lost: the mount is read-only now; writes not yet stored are lost (unmount, then mount again)",
				"image", i.Name, "err", i.Lease.Err())
		case <-i.closed:
		}
	}()
	return lost
}

// WriteBackStats returns the counters of a page blob's write-back cache
// (dirty memory, uploads, flushes that failed, background ones included);
// false for a local file, which has none.
func (i *Writable) WriteBackStats() (blockcache.WriteBackStats, bool) {
	if i.writeBack == nil {
		return blockcache.WriteBackStats{}, false
	}
	return i.writeBack.Stats(), true
}

// ErrVerityReadOnly refuses to write an image that has a verity tree: the
// tree would no longer match, and the root hash is pinned elsewhere.
var ErrVerityReadOnly = errors.New("a dm-verity tree makes an image read-only")

// WriteOptions tune a read-write open of a page blob.
type WriteOptions struct {
	// Lease configures the write lease (its duration: how long a crashed
	// writer keeps others out).
	Lease blob.LeaseOptions
	// WriteBack bounds dirty memory and the time one flush (one fsync) may
	// wait for storage before it fails with EIO.
	WriteBack blockcache.WriteBackOptions
}

// syncedVolume is the Writer's device: the volume encrypts each write into
// the image file, whose Sync is the durability barrier.
type syncedVolume struct {
	*crypto.Volume
	file *os.File
}

func (d syncedVolume) Sync() error { return d.file.Sync() }

// SectorSize is the volume's write unit: the Writer overwrites file data
// outside its metadata lock when it divides the filesystem block (writes
// of different files then never share a sector).
func (d syncedVolume) SectorSize() int { return d.Volume.Info().SectorSize }

// sectorSizer is what ext4.OpenWritable looks for to run data overwrites
// concurrently (fs/ext4/write_data.go).
type sectorSizer interface{ SectorSize() int }

var (
	_ ext4.Device = syncedVolume{}
	_ sectorSizer = syncedVolume{}
)

// flushedVolume is the Writer's device over a page blob: the volume
// encrypts into the write-back cache, whose Flush is the durability
// barrier (it returns once storage acknowledged every earlier write).
type flushedVolume struct {
	*crypto.Volume
	wb *blockcache.WriteBack
	pw *blob.PageWriter
}

// Sync flushes. A flush that failed while the writer is still usable (an
// outage: FlushTimeout passed) kept its dirty data, so the journal may try
// again; a lost lease or a changed blob is final.
func (d flushedVolume) Sync() error {
	err := d.wb.Flush(context.Background())
	if err != nil && d.pw.Err() == nil {
		return fmt.Errorf("%w (%w)", err, ext4.ErrSyncRetryable)
	}
	return err
}

// WriteAt is WriteAtContext without cancellation.
func (d flushedVolume) WriteAt(p []byte, off int64) (int, error) {
	return d.WriteAtContext(context.Background(), p, off)
}

// WriteAtContext writes through the volume into the write-back cache. A
// write refused with EIO while the lease holds (dirty memory full and
// storage not taking the flush: an outage) is marked
// ext4.ErrWriteRetryable: the cache kept every earlier write, so the
// Writer undoes this one and goes on, and writes succeed again once
// storage is back.
func (d flushedVolume) WriteAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	n, err := d.Volume.WriteAtContext(ctx, p, off)
	if err != nil && ctx.Err() == nil && errors.Is(err, syscall.EIO) && d.pw.Err() == nil {
		return n, fmt.Errorf("%w (%w)", err, ext4.ErrWriteRetryable)
	}
	return n, err
}

// SectorSize is the volume's write unit (see syncedVolume.SectorSize); the
// write-back cache takes concurrent writes to different ranges.
func (d flushedVolume) SectorSize() int { return d.Volume.Info().SectorSize }

var (
	_ ext4.Device = flushedVolume{}
	_ sectorSizer = flushedVolume{}
)

// OpenWritable opens an image for writing: a local file, or a page blob
// (under a renewed write lease, through a write-back cache; see
// openWritableBlob). A pinned root hash and images with a verity tree are
// refused, saying why; so are block blobs and a filesystem whose features
// the writer cannot maintain (the writer's own message names them). A
// journal left by a crash is replayed.
func OpenWritable(ctx context.Context, spec Spec) (_ *Writable, err error) {
	if spec.Integrity.RootHash != nil || spec.Integrity.Require {
		return nil, fmt.Errorf("%s: %w: a verity root hash pins the image's bytes; mount it without --read-write, or drop the root hash for a writable image", secret.RedactURL(spec.Location), ErrVerityReadOnly)
	}
	if IsRemote(spec.Location) {
		return openWritableBlob(ctx, spec)
	}
	f, err := os.OpenFile(spec.Location, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("open image for writing: %w", err)
	}
	defer func() {
		if err != nil {
			f.Close()
		}
	}()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file", spec.Location)
	}
	if hasTree(f, st.Size()) {
		return nil, fmt.Errorf("%s ends with a verity tree: %w; mount it read-only with its root hash, or build a writable image (blobseal image create --read-write)", spec.Location, ErrVerityReadOnly)
	}
	if spec.Crypto.Format == "" && crypto.Detect(f) == "" {
		return nil, fmt.Errorf("%s has no LUKS header: if it is a headerless image, pass --format plain", spec.Location)
	}
	vol, err := crypto.OpenContext(ctx, f, st.Size(), spec.Key, spec.Crypto)
	if err != nil {
		return nil, fmt.Errorf("unlock %s: %w", spec.Location, err)
	}
	defer func() {
		if err != nil {
			vol.Close()
		}
	}()
	w, err := openWriter(spec, spec.Location, syncedVolume{vol, f})
	if err != nil {
		return nil, err
	}
	return &Writable{Writer: w, Volume: vol, Name: spec.Location,
		closers: []func() error{f.Close, f.Sync, vol.Close, w.Close}}, nil
}

// openWriter opens the filesystem on dev, replaying a journal left by a
// crash.
func openWriter(spec Spec, name string, dev interface {
	ext4.Device
	Size() int64
}) (*ext4.Writer, error) {
	w, err := ext4.OpenWritable(dev, dev.Size())
	if err != nil {
		return nil, fmt.Errorf("%s: cannot write this filesystem: %w", name, err)
	}
	if spec.Logger != nil && w.ReplayedTransactions() > 0 {
		spec.Logger.Info("replayed the journal of an image that was not unmounted cleanly",
			"image", name, "transactions", w.ReplayedTransactions())
	}
	return w, nil
}

// openWritableBlob opens a page blob for writing: the blob source, its
// PageWriter under a renewed lease (a second writer is refused, naming the
// lease), a write-back cache over the block cache, the volume unlocked as
// for reads, the ext4 writer. The Writer's Sync is WriteBack.Flush, so an
// fsync returns only once storage acknowledged it.
func openWritableBlob(ctx context.Context, spec Spec) (_ *Writable, err error) {
	name := secret.RedactURL(spec.Location)
	img := &Writable{Name: name, closed: make(chan struct{})}
	defer func() {
		if err != nil {
			img.Close()
		}
	}()
	src, err := blob.Open(ctx, spec.Location, spec.Blob)
	if err != nil {
		return nil, fmt.Errorf("open image source: %w", err)
	}
	if c, ok := src.(io.Closer); ok {
		img.closers = append(img.closers, c.Close)
	}
	if hasTree(blob.ReaderAt(ctx, src), src.Size()) {
		return nil, fmt.Errorf("%s ends with a verity tree: %w; mount it read-only with its root hash, or build a writable image (blobseal image create --read-write)", name, ErrVerityReadOnly)
	}
	// The lease is taken before anything is read through the cache, so
	// every read after it sees what this writer (and only it) wrote.
	lo := spec.Write.Lease
	pw, err := blob.NewPageWriter(ctx, src, blob.WriterOptions{Lease: lo})
	if errors.Is(err, blob.ErrUnsupported) {
		return nil, fmt.Errorf("%s is not a page blob: %w; only page blobs can be written in place: upload the image as one (blobseal image upload --type page)", name, err)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	// Released last (closers run in reverse): after the final flush.
	img.Lease = pw.Lease()
	img.closers = append(img.closers, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), releaseTimeout)
		defer cancel()
		return pw.Close(ctx)
	})
	copts := spec.Cache
	if copts.Logger == nil {
		copts.Logger = spec.Logger
	}
	// The disk tier cannot follow writes (blockcache.NewWriteBack).
	copts.DiskDir, copts.DiskBytes = "", 0
	cache, err := blockcache.New(src, copts)
	if err != nil {
		return nil, fmt.Errorf("block cache for %s: %w", name, err)
	}
	img.closers = append(img.closers, cache.Close)
	wo := spec.Write.WriteBack
	if wo.Logger == nil {
		wo.Logger = spec.Logger
	}
	wb, err := blockcache.NewWriteBack(cache, pw, wo)
	if err != nil {
		return nil, fmt.Errorf("write-back cache for %s: %w", name, err)
	}
	img.writeBack = wb
	img.closers = append(img.closers, func() error { return wb.Close(context.Background()) })
	if spec.Crypto.Format == "" && crypto.Detect(wb) == "" {
		return nil, fmt.Errorf("%s has no LUKS header: if it is a headerless image, pass --format plain", name)
	}
	vol, err := crypto.OpenContext(ctx, wb, src.Size(), spec.Key, spec.Crypto)
	if err != nil {
		return nil, fmt.Errorf("unlock %s: %w", name, err)
	}
	img.Volume = vol
	img.closers = append(img.closers, vol.Close)
	w, err := openWriter(spec, name, flushedVolume{vol, wb, pw})
	if err != nil {
		return nil, err
	}
	img.Writer = w
	img.closers = append(img.closers, w.Close)
	return img, nil
}

// releaseTimeout bounds releasing the lease at close: if storage does not
// answer, the lease lapses on its own.
const releaseTimeout = 10 * time.Second

// hasTree reports whether the image ends with a verity tree in blobseal's
// layout (a superblock whose data size is where it sits).
func hasTree(f io.ReaderAt, size int64) bool {
	off, ok := verity.Locate(size)
	if !ok {
		return false
	}
	sb := make([]byte, verity.SuperblockSize)
	if _, err := f.ReadAt(sb, off); err != nil {
		return false
	}
	p, err := verity.ParseSuperblock(sb)
	return err == nil && p.DataSize() == off
}

// Close flushes the filesystem (a second close of the Writer, after the
// mount's own, finds nothing to do) down to storage, wipes the key, closes
// the file or releases the blob's lease.
func (i *Writable) Close() error {
	if i == nil {
		return nil
	}
	if i.closed != nil && len(i.closers) > 0 {
		close(i.closed)
	}
	var errs []error
	for k := len(i.closers) - 1; k >= 0; k-- {
		errs = append(errs, i.closers[k]())
	}
	i.closers = nil
	return errors.Join(errs...)
}
