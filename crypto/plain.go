package crypto

import (
	"fmt"
	"io"
)

// PlainOptions describe a headerless aes-xts-plain64 image, the equivalent
// of `cryptsetup open --type plain --cipher aes-xts-plain64 --key-file KEY
// --key-size BITS --sector-size S [--offset O] [--skip K] [--iv-large-sectors]`.
// Nothing in a plain image records these, so reader and writer must agree.
type PlainOptions struct {
	SectorSize     int   // default 4096 (cryptsetup's default is 512: pass --sector-size 4096 to it)
	Offset         int64 // bytes from the start of the device to the data (multiple of 512)
	Skip           int64 // IV offset, in 512-byte units (cryptsetup --skip)
	IVLargeSectors bool  // IVs count whole sectors instead of 512-byte units
	Size           int64 // plaintext size; 0 = to the end of the device
}

func (o PlainOptions) withDefaults() PlainOptions {
	if o.SectorSize == 0 {
		o.SectorSize = 4096
	}
	return o
}

// OpenPlain opens a headerless image. key is the raw XTS key: 32 bytes for
// AES-128-XTS or 64 bytes for AES-256-XTS (the key file's exact contents).
func OpenPlain(dev io.ReaderAt, deviceSize int64, key []byte, opts PlainOptions) (*Volume, error) {
	return openPlain(dev, deviceSize, key, opts, false)
}

func openPlain(dev io.ReaderAt, deviceSize int64, key []byte, opts PlainOptions, zeroSectors bool) (*Volume, error) {
	opts = opts.withDefaults()
	if len(key) != 32 && len(key) != 64 {
		return nil, fmt.Errorf("a plain image needs a raw key of 32 or 64 bytes; the key file has %d bytes (for LUKS images the key file is a passphrase and may have any length)", len(key))
	}
	if opts.Offset < 0 || opts.Offset%512 != 0 || opts.Skip < 0 {
		return nil, fmt.Errorf("plain offset %d and skip %d must be non-negative multiples of 512 bytes / sectors", opts.Offset, opts.Skip)
	}
	size := opts.Size
	if size == 0 {
		size = alignDown(deviceSize-opts.Offset, opts.SectorSize)
	}
	if size <= 0 || opts.Offset+size > deviceSize {
		return nil, fmt.Errorf("plain image of %d bytes is too small for offset %d and size %d", deviceSize, opts.Offset, size)
	}
	ivUnit, ivTweak := 512, uint64(opts.Skip)
	if opts.IVLargeSectors {
		ivUnit = opts.SectorSize
		ivTweak = uint64(opts.Skip) * 512 / uint64(opts.SectorSize)
	}
	return newVolume(dev, volumeParams{
		key: key, devSize: deviceSize, sectorSize: opts.SectorSize, offset: opts.Offset, size: size,
		ivUnit: ivUnit, ivTweak: ivTweak, zeroSectors: zeroSectors,
		info: Info{Format: "plain", Cipher: "aes-xts-plain64", Keyslot: -1},
	})
}
