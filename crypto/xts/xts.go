// Package xts implements the aes-xts-plain64 sector cipher used by dm-crypt,
// cryptsetup LUKS1/LUKS2 and plain mode.
//
// A Cipher encrypts or decrypts runs of whole sectors. The IV ("plain64") of a
// sector is a little-endian 64-bit number padded to 16 bytes; the caller gives
// the IV of the first sector and how much it advances per sector, because
// LUKS2 counts IVs in 512-byte units even with 4096-byte sectors (step 8)
// while plain mode with --iv-large-sectors counts whole sectors (step 1).
package xts

import (
	"crypto/aes"
	"errors"
	"fmt"

	xxts "golang.org/x/crypto/xts"
)

// Cipher is an AES-XTS sector cipher. It is safe for concurrent use.
type Cipher struct {
	sectorSize int
	keyBytes   int
	impl       *xxts.Cipher
}

// New returns a Cipher for a 32-byte (AES-128-XTS) or 64-byte (AES-256-XTS)
// key and a sector size that is a power of two between 512 and 4096.
func New(key []byte, sectorSize int) (*Cipher, error) {
	if len(key) != 32 && len(key) != 64 {
		return nil, fmt.Errorf("xts: key must be 32 or 64 bytes, got %d", len(key))
	}
	if sectorSize < 512 || sectorSize > 4096 || sectorSize&(sectorSize-1) != 0 {
		return nil, fmt.Errorf("xts: sector size must be 512, 1024, 2048 or 4096, got %d", sectorSize)
	}
	impl, err := xxts.NewCipher(aes.NewCipher, key)
	if err != nil {
		return nil, fmt.Errorf("xts: %w", err)
	}
	return &Cipher{sectorSize: sectorSize, keyBytes: len(key), impl: impl}, nil
}

// SectorSize returns the encryption sector size in bytes.
func (c *Cipher) SectorSize() int { return c.sectorSize }

// KeySize returns the key length in bytes (32 or 64).
func (c *Cipher) KeySize() int { return c.keyBytes }

// ErrPartialSector reports a buffer that is not a whole number of sectors.
var ErrPartialSector = errors.New("xts: buffer is not a whole number of sectors")

// Encrypt encrypts len(src)/SectorSize() sectors from src into dst. The first
// sector uses IV number iv, each following one iv advanced by ivStep.
// dst and src may overlap entirely or not at all.
func (c *Cipher) Encrypt(dst, src []byte, iv, ivStep uint64) error {
	if err := c.check(dst, src); err != nil {
		return err
	}
	for off := 0; off < len(src); off += c.sectorSize {
		c.impl.Encrypt(dst[off:off+c.sectorSize], src[off:off+c.sectorSize], iv)
		iv += ivStep
	}
	return nil
}

// Decrypt is the inverse of Encrypt.
func (c *Cipher) Decrypt(dst, src []byte, iv, ivStep uint64) error {
	if err := c.check(dst, src); err != nil {
		return err
	}
	for off := 0; off < len(src); off += c.sectorSize {
		c.impl.Decrypt(dst[off:off+c.sectorSize], src[off:off+c.sectorSize], iv)
		iv += ivStep
	}
	return nil
}

func (c *Cipher) check(dst, src []byte) error {
	if len(src)%c.sectorSize != 0 {
		return ErrPartialSector
	}
	if len(dst) < len(src) {
		return errors.New("xts: output buffer smaller than input")
	}
	return nil
}

// String never reveals key material.
func (c *Cipher) String() string {
	return fmt.Sprintf("aes-xts-plain64(%d-bit, %d-byte sectors)", c.keyBytes*4, c.sectorSize)
}

// Close drops the key schedule. The Cipher must not be used afterwards.
func (c *Cipher) Close() { c.impl = nil }
