// Package image is the one place for encrypted images as a whole: Create
// builds one from a directory (MakeExt4: mkfs.ext4 -d sized from the tree,
// then crypto.CreateImage); Open turns a location (local path or blob URL)
// and a key into a servable tree (blob source → block cache → decrypting
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
	// Cache configures the block cache every source is read through.
	Cache blockcache.Options
	// DirectLocal reads a local file straight, bypassing the block cache.
	// Off by default: measured with bench/fs-vs-kernel.sh's image, caches
	// dropped, dd of 1 GiB, the cache's parallel read-ahead gave 720 and
	// 671 MB/s against 633 and 552 MB/s straight from the file.
	DirectLocal bool
	Logger      *slog.Logger
}

// Image is an opened image; Close releases it (and wipes the key schedule).
type Image struct {
	FS     *ext4.FS
	Volume *crypto.Volume
	Source blob.Source
	Cache  *blockcache.Cache // nil when the source is read directly
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
	src, err := blob.Open(ctx, spec.Location, spec.Blob)
	if err != nil {
		return nil, fmt.Errorf("open image source: %w", err) // names the location, without credentials
	}
	img.Source = src
	if c, ok := src.(io.Closer); ok {
		img.closers = append(img.closers, c.Close)
	}

	var dev io.ReaderAt = blob.ReaderAt(context.WithoutCancel(ctx), src)
	if IsRemote(spec.Location) || !spec.DirectLocal {
		opts := spec.Cache
		if opts.Logger == nil {
			opts.Logger = spec.Logger
		}
		cache, err := blockcache.New(src, opts)
		if err != nil {
			return nil, fmt.Errorf("block cache for %s: %w", img.Name, err)
		}
		img.Cache = cache
		img.closers = append(img.closers, cache.Close)
		dev = cache
	}

	if spec.Crypto.Format == "" && crypto.Detect(dev) == "" {
		return nil, fmt.Errorf("%s has no LUKS header: if it is a headerless image, pass --format plain", img.Name)
	}
	vol, err := crypto.Open(dev, src.Size(), spec.Key, spec.Crypto)
	if err != nil {
		return nil, fmt.Errorf("unlock %s: %w", img.Name, err)
	}
	img.Volume = vol
	img.closers = append(img.closers, vol.Close)
	if img.Cache != nil {
		// The volume reads its holes as zeros without touching the device,
		// so the cache need not fetch or read ahead through them (on a
		// block blob, where storage cannot say what is unwritten).
		img.Cache.SkipRanges(deviceHoles(vol), skipHoleMin)
	}

	fsys, err := ext4.Open(vol, vol.Size())
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

// skipHoleMin is the smallest volume hole the cache skips: a smaller one
// splits a sequential fetch in two, and one more request costs storage more
// than a few MiB of bytes (Azurite: ~20 ms of CPU per request against ~2 ms
// per MiB).
const skipHoleMin = 4 << 20

// deviceHoles returns the volume's holes as byte ranges of its device.
func deviceHoles(vol *crypto.Volume) []blob.Range {
	runs, base := vol.Holes().Runs(), vol.Info().DataOffset
	out := make([]blob.Range, 0, len(runs))
	for _, r := range runs {
		out = append(out, blob.Range{Off: base + r.Off, Len: r.Len})
	}
	return out
}
