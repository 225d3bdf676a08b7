// Package image is the one place for encrypted images as a whole: Create
// builds one from a directory (MakeExt4: mkfs.ext4 -d sized from the tree,
// then crypto.CreateImage, then a verity tree over all of it); AddVerity
// puts a tree on an existing image; Open turns a location (local path or
// blob URL), a key and a pinned root hash into a servable tree (blob source
// → block cache verifying every fetch against the verity tree → decrypting
// volume → ext4 reader), for `blobseal mount` and the sidecar alike; Check
// reads every entry and byte for `blobseal image check`. Serving the tree
// over FUSE is package fs.
package image

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"

	"github.com/blobseal/blobseal/blob"
	"github.com/blobseal/blobseal/blockcache"
	"github.com/blobseal/blobseal/crypto"
	"github.com/blobseal/blobseal/fs/ext4"
	"github.com/blobseal/blobseal/internal/secret"
	"github.com/blobseal/blobseal/verity"
)

// Spec says what to open and how.
type Spec struct {
	// Location is a local path or a blob URL (https://…, http://127.0.0.1:…).
	Location string
	// Key is the key file's bytes: the LUKS passphrase, or the raw XTS key
	// for plain images. The caller keeps ownership and wipes it.
	Key []byte
	// Crypto pins the formats, ciphers and sector sizes the image may use.
	Crypto crypto.OpenOptions
	// Blob configures storage access (credentials, timeouts, retries).
	Blob blob.Options
	// Cache configures the block cache every source is read through. Its
	// ReadDeadline is the read timeout: how long a read may wait for
	// storage, the source's retries included (blob.RetrySource), before
	// it fails with EIO; an interrupted reader stops waiting sooner.
	Cache blockcache.Options
	// Integrity pins the image's verity tree.
	Integrity Integrity
	// DirectLocal reads a local file straight, bypassing the block cache.
	// Off by default: measured with bench/fs-vs-kernel.sh's image, caches
	// dropped, dd of 1 GiB, the cache's parallel read-ahead gave 720 and
	// 671 MB/s against 633 and 552 MB/s straight from the file.
	DirectLocal bool
	// Write tunes read-write opens of page blobs (OpenWritable).
	Write  WriteOptions
	Logger *slog.Logger
}

// Integrity says how the image's bytes are authenticated.
type Integrity struct {
	// RootHash pins the image's dm-verity tree; every block read is
	// verified against it before it is used. Nil reads the image without
	// integrity protection (Open logs a warning).
	RootHash []byte
	// HashOffset is where the tree's superblock is; 0 finds it at the end
	// of the image (blobseal's layout). Giving it pins the data size too.
	HashOffset int64
	// Require refuses to open the image without a RootHash.
	Require bool
	// Tree tunes the tree's node cache (zero values: defaults).
	Tree verity.Options
}

// ErrIntegrityRequired is returned by Open when integrity is required and
// no root hash is configured.
var ErrIntegrityRequired = errors.New("integrity protection is required but no verity root hash is configured")

// Image is an opened image; Close releases it (and wipes the key schedule).
type Image struct {
	FS     *ext4.FS
	Volume *crypto.Volume
	Source blob.Source
	Cache  *blockcache.Cache // nil when the source is read directly
	Tree   *verity.Tree      // nil without integrity protection
	// Name is the location for logs and errors, credentials removed.
	Name string

	closers []func() error
}

// IsRemote reports whether a location names a blob rather than a file.
func IsRemote(location string) bool {
	l := strings.ToLower(location)
	return strings.HasPrefix(l, "https://") || strings.HasPrefix(l, "http://")
}

// Open opens, unlocks and parses the image. Errors say which stage failed.
func Open(ctx context.Context, spec Spec) (img *Image, err error) {
	img = &Image{Name: secret.RedactURL(spec.Location)}
	defer func() {
		if err != nil {
			img.Close()
			img = nil
		}
	}()
	log := spec.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	in := spec.Integrity
	if in.RootHash == nil {
		if in.Require {
			return nil, fmt.Errorf("%s: %w: pin the root hash `blobseal image create` (or `blobseal image verity`) printed (--verity-root-hash, or verity_root_hash in the configuration), or turn off require_integrity to accept an image storage can modify undetected", img.Name, ErrIntegrityRequired)
		}
		log.Warn("no verity root hash configured: storage can modify this image undetected (tampered blocks decrypt to garbage, an older image with the same key mounts silently); pin the root hash `blobseal image create` printed", "image", img.Name)
	}
	src, err := blob.Open(ctx, spec.Location, spec.Blob)
	if err != nil {
		return nil, fmt.Errorf("open image source: %w", err) // names the location, without credentials
	}
	img.Source = src
	if c, ok := src.(io.Closer); ok {
		img.closers = append(img.closers, c.Close)
	}

	data := src // what the volume may read: with a tree, only what it covers
	cryptoOpts := spec.Crypto
	if in.RootHash != nil {
		topts := in.Tree
		topts.HashOffset = in.HashOffset
		if topts.HashOffset == 0 {
			topts.HashOffset = -1
		}
		if topts.Logger == nil {
			topts.Logger = log
		}
		tree, err := verity.Open(ctx, src, in.RootHash, topts)
		if err != nil {
			return nil, fmt.Errorf("%s fails its integrity check, nothing was decrypted: %w", img.Name, err)
		}
		img.Tree = tree
		img.closers = append(img.closers, tree.Close)
		if data, err = blob.Prefix(src, tree.DataSize()); err != nil {
			return nil, err
		}
		// The tree vouches for every stored byte, zeros included.
		cryptoOpts.ZeroSectors = true
	}

	var dev io.ReaderAt = blob.ReaderAt(context.WithoutCancel(ctx), data)
	if IsRemote(spec.Location) || !spec.DirectLocal || img.Tree != nil {
		opts := spec.Cache
		if opts.Logger == nil {
			opts.Logger = log
		}
		if img.Tree != nil {
			opts.Verifier = img.Tree // the only way in: every fetch is verified
		}
		cache, err := blockcache.New(data, opts)
		if err != nil {
			return nil, fmt.Errorf("block cache for %s: %w", img.Name, err)
		}
		img.Cache = cache
		img.closers = append(img.closers, cache.Close)
		dev = cache
	}

	if cryptoOpts.Format == "" && crypto.Detect(dev) == "" {
		if img.Tree != nil {
			if _, err := dev.ReadAt(make([]byte, 8), 0); errors.Is(err, blockcache.ErrIntegrity) {
				return nil, fmt.Errorf("%s: the image's first block does not match its verity tree: it was modified after the tree was built; nothing was decrypted: %w", img.Name, err)
			}
		}
		return nil, fmt.Errorf("%s has no LUKS header: if it is a headerless image, pass --format plain", img.Name)
	}
	vol, err := crypto.OpenContext(ctx, dev, data.Size(), spec.Key, cryptoOpts)
	if err != nil {
		if errors.Is(err, blockcache.ErrIntegrity) {
			return nil, fmt.Errorf("%s: the LUKS header does not match its verity tree: it was modified after the tree was built (tampering by storage?); nothing was unlocked: %w", img.Name, err)
		}
		return nil, fmt.Errorf("unlock %s: %w", img.Name, err)
	}
	img.Volume = vol
	img.closers = append(img.closers, vol.Close)

	fsys, err := ext4.Open(vol, vol.Size())
	if errors.Is(err, blockcache.ErrIntegrity) {
		return nil, fmt.Errorf("%s: the filesystem's superblock does not match its verity tree: the image was modified after the tree was built: %w", img.Name, err)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: the unlocked volume is not a readable ext4 filesystem (wrong --format or sector size?): %w", img.Name, err)
	}
	img.FS = fsys
	return img, nil
}

// Close releases everything in reverse order of opening.
func (i *Image) Close() error {
	if i == nil {
		return nil
	}
	var errs []error
	for k := len(i.closers) - 1; k >= 0; k-- {
		errs = append(errs, i.closers[k]())
	}
	i.closers = nil
	return errors.Join(errs...)
}
