package verity

import (
	"bytes"
	"encoding/binary"
	"fmt"
)

// On-disk superblock (little-endian, 512 bytes), as cryptsetup's
// lib/verity/verity.c declares it:
//
//	0   signature "verity\0\0"
//	8   version (1)
//	12  hash_type
//	16  uuid[16]
//	32  algorithm[32], NUL-terminated
//	64  data_block_size
//	68  hash_block_size
//	72  data_blocks (64-bit)
//	80  salt_size (16-bit), 6 bytes padding
//	88  salt[256]
//	344 padding to 512
var superblockMagic = []byte("verity\x00\x00")

const (
	sbVersion        = 1
	sbAlgorithmOff   = 32
	sbAlgorithmLen   = 32
	sbDataBlockOff   = 64
	sbHashBlockOff   = 68
	sbDataBlocksOff  = 72
	sbSaltSizeOff    = 80
	sbSaltOff        = 88
	sbSuperblockSize = SuperblockSize
)

// ParseSuperblock decodes and validates a superblock from the first 512
// bytes of b. Every field is checked against the limits of validate, so a
// forged superblock cannot ask for absurd work or memory.
func ParseSuperblock(b []byte) (Params, error) {
	var p Params
	if len(b) < sbSuperblockSize {
		return p, fmt.Errorf("%w: %d bytes, need %d", ErrNoSuperblock, len(b), sbSuperblockSize)
	}
	if !bytes.Equal(b[:8], superblockMagic) {
		return p, fmt.Errorf("%w (no \"verity\" signature)", ErrNoSuperblock)
	}
	if v := binary.LittleEndian.Uint32(b[8:]); v != sbVersion {
		return p, fmt.Errorf("%w: version %d (only version 1 exists)", ErrBadSuperblock, v)
	}
	p.HashType = int(binary.LittleEndian.Uint32(b[12:]))
	copy(p.UUID[:], b[16:32])
	alg := b[sbAlgorithmOff : sbAlgorithmOff+sbAlgorithmLen]
	n := bytes.IndexByte(alg, 0)
	if n < 0 {
		return p, fmt.Errorf("%w: the algorithm name is not NUL-terminated", ErrBadSuperblock)
	}
	for _, c := range alg[:n] {
		if c < 0x21 || c > 0x7e {
			return p, fmt.Errorf("%w: the algorithm name holds a non-printable byte", ErrBadSuperblock)
		}
	}
	p.Algorithm = string(bytes.ToLower(alg[:n]))
	p.DataBlockSize = int(binary.LittleEndian.Uint32(b[sbDataBlockOff:]))
	p.HashBlockSize = int(binary.LittleEndian.Uint32(b[sbHashBlockOff:]))
	blocks := binary.LittleEndian.Uint64(b[sbDataBlocksOff:])
	if blocks > 1<<62 {
		return p, fmt.Errorf("%w: %d data blocks", ErrBadSuperblock, blocks)
	}
	p.DataBlocks = int64(blocks)
	salt := int(binary.LittleEndian.Uint16(b[sbSaltSizeOff:]))
	if salt > MaxSaltSize {
		return p, fmt.Errorf("%w: salt of %d bytes (at most %d)", ErrBadSuperblock, salt, MaxSaltSize)
	}
	p.Salt = bytes.Clone(b[sbSaltOff : sbSaltOff+salt])
	if err := p.validate(); err != nil {
		return p, err
	}
	return p, nil
}

// MarshalSuperblock encodes p as a 512-byte superblock.
func (p Params) MarshalSuperblock() ([]byte, error) {
	if err := p.validate(); err != nil {
		return nil, err
	}
	if len(p.Algorithm) >= sbAlgorithmLen {
		return nil, fmt.Errorf("%w: algorithm name %q too long", ErrBadSuperblock, p.Algorithm)
	}
	b := make([]byte, sbSuperblockSize)
	copy(b, superblockMagic)
	binary.LittleEndian.PutUint32(b[8:], sbVersion)
	binary.LittleEndian.PutUint32(b[12:], uint32(p.HashType))
	copy(b[16:32], p.UUID[:])
	copy(b[sbAlgorithmOff:], p.Algorithm)
	binary.LittleEndian.PutUint32(b[sbDataBlockOff:], uint32(p.DataBlockSize))
	binary.LittleEndian.PutUint32(b[sbHashBlockOff:], uint32(p.HashBlockSize))
	binary.LittleEndian.PutUint64(b[sbDataBlocksOff:], uint64(p.DataBlocks))
	binary.LittleEndian.PutUint16(b[sbSaltSizeOff:], uint16(len(p.Salt)))
	copy(b[sbSaltOff:], p.Salt)
	return b, nil
}
