package crypto

import (
	"bytes"
	"context"
	"fmt"
	"io"

	"github.com/blobseal/blobseal/crypto/luks"
)

// OpenOptions say what an image may be. The LUKS header is not
// authenticated and whoever stores the image can rewrite it, so the mount
// configuration pins the ciphers and sector sizes it accepts; a header asking
// for anything else (cipher_null in particular) is refused.
type OpenOptions struct {
	Format      string   // "" or "luks" (LUKS2 or LUKS1, detected), or "plain"
	Ciphers     []string // allowed; default aes-xts-plain64
	SectorSizes []int    // allowed; default 512 and 4096
	Plain       PlainOptions
	// KDF bounds the keyslot key derivation a header may ask for (its
	// Ciphers and SectorSizes are ignored; zero fields take luks's defaults).
	KDF luks.Policy
	// ZeroSectors reads all-zero ciphertext sectors as zero plaintext even
	// when the image does not mark itself sparse: set it when an integrity
	// layer (a verity tree) vouches for every stored byte.
	ZeroSectors bool
}

// Open is OpenContext without cancellation.
func Open(dev io.ReaderAt, deviceSize int64, key []byte, opts OpenOptions) (*Volume, error) {
	return OpenContext(context.Background(), dev, deviceSize, key, opts)
}

// OpenContext unlocks an image with the key file's bytes: the keyslot
// passphrase for LUKS, the raw XTS key for plain images. Cancelling ctx
// interrupts the keyslot key derivation.
func OpenContext(ctx context.Context, dev io.ReaderAt, deviceSize int64, key []byte, opts OpenOptions) (*Volume, error) {
	switch opts.Format {
	case "plain":
		return openPlain(dev, deviceSize, key, opts.Plain, opts.ZeroSectors)
	case "", "luks", "luks1", "luks2":
	default:
		return nil, fmt.Errorf("unknown image format %q (use luks or plain)", opts.Format)
	}
	h, err := luks.ReadHeader(dev, deviceSize)
	if err != nil {
		return nil, err
	}
	pol := opts.KDF
	pol.Ciphers, pol.SectorSizes = opts.Ciphers, opts.SectorSizes
	u, err := h.UnlockContext(ctx, dev, key, pol)
	if err != nil {
		return nil, err
	}
	defer u.Wipe()
	size := u.Size
	if size < 0 { // "dynamic": to the end of the device
		size = alignDown(deviceSize-u.Offset, u.SectorSize)
	}
	if size <= 0 || u.Offset+size > deviceSize {
		return nil, fmt.Errorf("image is truncated: its header puts %d bytes of data at offset %d but the image has only %d bytes", size, u.Offset, deviceSize)
	}
	zeroSectors := opts.ZeroSectors
	for _, raw := range h.Tokens {
		zeroSectors = zeroSectors || isSparseToken(raw)
	}
	format := fmt.Sprintf("luks%d", h.Version)
	return newVolume(dev, volumeParams{
		key: u.VolumeKey, devSize: deviceSize, sectorSize: u.SectorSize, offset: u.Offset, size: size,
		ivUnit: 512, ivTweak: u.IVTweak, zeroSectors: zeroSectors,
		info: Info{Format: format, Cipher: u.Cipher, Keyslot: u.Keyslot, UUID: h.UUID, Warnings: h.Warnings},
	})
}

// Detect names the format of an image from its first bytes: "luks2",
// "luks1", or "" when there is no LUKS header (a plain image, or not an
// encrypted image at all — the two cannot be told apart).
func Detect(dev io.ReaderAt) string {
	var hdr [8]byte
	if n, _ := dev.ReadAt(hdr[:], 0); n < len(hdr) {
		return ""
	}
	if !bytes.Equal(hdr[:6], []byte("LUKS\xba\xbe")) {
		return ""
	}
	switch hdr[7] {
	case 1:
		return "luks1"
	case 2:
		return "luks2"
	}
	return ""
}
