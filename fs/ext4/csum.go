package ext4

import (
	"encoding/binary"
	"hash/crc32"
)

// castagnoli is the CRC32C table used by every metadata_csum checksum.
var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// crc32cRaw continues a CRC32C computation the way ext4 does: no initial or
// final inversion (Go's crc32.Update inverts on entry and exit, so undo it).
func crc32cRaw(crc uint32, p []byte) uint32 {
	return ^crc32.Update(^crc, castagnoli, p)
}

func crc32cU32(crc, v uint32) uint32 {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], v)
	return crc32cRaw(crc, b[:])
}

// crc16 is the reflected CRC-16 (polynomial 0x8005, "CRC-16/ARC" without
// the final step) that the older gdt_csum feature uses for group descriptors.
func crc16(crc uint16, p []byte) uint16 {
	for _, b := range p {
		crc ^= uint16(b)
		for i := 0; i < 8; i++ {
			if crc&1 != 0 {
				crc = crc>>1 ^ 0xA001
			} else {
				crc >>= 1
			}
		}
	}
	return crc
}
