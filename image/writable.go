package image

import (
	"context"
	"errors"
	"fmt"
	"os"

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
	// Name is the image's path, for logs and errors.
	Name string

	file *os.File
}

// ErrVerityReadOnly refuses to write an image that has a verity tree: the
// tree would no longer match, and the root hash is pinned elsewhere.
var ErrVerityReadOnly = errors.New("a dm-verity tree makes an image read-only")

// syncedVolume is the Writer's device: the volume encrypts each write into
// the image file, whose Sync is the durability barrier.
type syncedVolume struct {
	*crypto.Volume
	file *os.File
}

func (d syncedVolume) Sync() error { return d.file.Sync() }

var _ ext4.Device = syncedVolume{}

// OpenWritable opens a local image file for writing. Blob URLs, a pinned
// root hash and images with a verity tree are refused, saying why; so is a
// filesystem whose features the writer cannot maintain (the writer's own
// message names them). A journal left by a crash is replayed.
func OpenWritable(ctx context.Context, spec Spec) (_ *Writable, err error) {
	if IsRemote(spec.Location) {
		return nil, fmt.Errorf("read-write mounts take a local image file, not a blob URL (%s): download the image, or mount it read-only", secret.RedactURL(spec.Location))
	}
	if spec.Integrity.RootHash != nil || spec.Integrity.Require {
		return nil, fmt.Errorf("%s: %w: a verity root hash pins the image's bytes; mount it without --read-write, or drop the root hash for a writable image", spec.Location, ErrVerityReadOnly)
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
	w, err := ext4.OpenWritable(syncedVolume{vol, f}, vol.Size())
	if err != nil {
		return nil, fmt.Errorf("%s: cannot write this filesystem: %w", spec.Location, err)
	}
	if spec.Logger != nil && w.ReplayedTransactions() > 0 {
		spec.Logger.Info("replayed the journal of an image that was not unmounted cleanly",
			"image", spec.Location, "transactions", w.ReplayedTransactions())
	}
	return &Writable{Writer: w, Volume: vol, Name: spec.Location, file: f}, nil
}

// hasTree reports whether the file ends with a verity tree in blobseal's
// layout (a superblock whose data size is where it sits).
func hasTree(f *os.File, size int64) bool {
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
// mount's own, finds nothing to do), wipes the key and closes the file.
func (i *Writable) Close() error {
	if i == nil || i.file == nil {
		return nil
	}
	errs := []error{i.Writer.Close(), i.Volume.Close(), i.file.Sync(), i.file.Close()}
	i.file = nil
	return errors.Join(errs...)
}
