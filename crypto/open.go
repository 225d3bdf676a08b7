package crypto

import (
	"bytes"
	"encoding/json"
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
}

// Open unlocks an image with the key file's bytes: the keyslot passphrase
// for LUKS, the raw XTS key for plain images.
func Open(dev io.ReaderAt, deviceSize int64, key []byte, opts OpenOptions) (*Volume, error) {
	switch opts.Format {
	case "plain":
		return OpenPlain(dev, deviceSize, key, opts.Plain)
	case "", "luks", "luks1", "luks2":
	default:
		return nil, fmt.Errorf("unknown image format %q (use luks or plain)", opts.Format)
	}
	h, err := luks.ReadHeader(dev, deviceSize)
	if err != nil {
		return nil, err
	}
	u, err := h.Unlock(dev, key, luks.Policy{Ciphers: opts.Ciphers, SectorSizes: opts.SectorSizes})
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
	var holes *HoleMap
	for id, raw := range h.Tokens {
		if !isHoleToken(raw) {
			continue
		}
		if holes != nil {
			return nil, fmt.Errorf("%w (more than one hole map token)", ErrHoleMapForged)
		}
		if holes, err = ParseHoleToken(raw, u.VolumeKey, u.SectorSize, size); err != nil {
			return nil, fmt.Errorf("LUKS2 token %s: %w", id, err)
		}
	}
	format := fmt.Sprintf("luks%d", h.Version)
	return newVolume(dev, volumeParams{
		key: u.VolumeKey, sectorSize: u.SectorSize, offset: u.Offset, size: size,
		ivUnit: 512, ivTweak: u.IVTweak, holes: holes,
		info: Info{Format: format, Cipher: u.Cipher, Keyslot: u.Keyslot, UUID: h.UUID, Warnings: h.Warnings},
	})
}

func isHoleToken(raw json.RawMessage) bool {
	var t struct {
		Type string `json:"type"`
	}
	return json.Unmarshal(raw, &t) == nil && t.Type == HoleTokenType
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
