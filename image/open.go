// Package image turns a location (local path or blob URL) and a key into a
// servable filesystem tree: blob source → block cache → decrypting volume →
// ext4 reader. Both `blobseal mount` and the sidecar open images here, so
// the read path is assembled in exactly one place.
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
	// Cache configures the read cache used for remote sources.
	Cache blockcache.Options
	// CacheLocal puts local files behind the cache too (normally the
	// kernel's page cache serves them better).
	CacheLocal bool
	Logger     *slog.Logger
}

// Image is an opened image; Close releases it (and wipes the key schedule).
type Image struct {
	FS     *ext4.FS
	Volume *crypto.Volume
	Source blob.Source
	Cache  *blockcache.Cache // nil when the source is read directly

	closers []func() error
}

// IsRemote reports whether a location names a blob rather than a file.
func IsRemote(location string) bool {
	return strings.HasPrefix(location, "https://") || strings.HasPrefix(location, "http://")
}

// Open opens, unlocks and parses the image. Errors say which stage failed.
func Open(ctx context.Context, spec Spec) (img *Image, err error) {
	img = &Image{}
	defer func() {
		if err != nil {
			img.Close()
			img = nil
		}
	}()
	src, err := blob.Open(ctx, spec.Location, spec.Blob)
	if err != nil {
		return nil, fmt.Errorf("open image source: %w", err)
	}
	img.Source = src
	if c, ok := src.(io.Closer); ok {
		img.closers = append(img.closers, c.Close)
	}

	var dev io.ReaderAt = blob.ReaderAt(context.WithoutCancel(ctx), src)
	if IsRemote(spec.Location) || spec.CacheLocal {
		opts := spec.Cache
		if opts.Logger == nil {
			opts.Logger = spec.Logger
		}
		cache, err := blockcache.New(src, opts)
		if err != nil {
			return nil, fmt.Errorf("start block cache: %w", err)
		}
		img.Cache = cache
		img.closers = append(img.closers, cache.Close)
		dev = cache
	}

	vol, err := crypto.Open(dev, src.Size(), spec.Key, spec.Crypto)
	if err != nil {
		return nil, fmt.Errorf("unlock %s: %w", src, err)
	}
	img.Volume = vol
	img.closers = append(img.closers, vol.Close)

	fsys, err := ext4.Open(vol, vol.Size())
	if err != nil {
		return nil, fmt.Errorf("read ext4 filesystem in %s: %w", src, err)
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
