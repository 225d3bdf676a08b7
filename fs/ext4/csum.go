package ext4

import "hash/crc32"

// castagnoli is the CRC32C table used by every metadata_csum checksum.
var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// crc32cRaw continues a CRC32C computation the way ext4 does: no initial or
// final inversion (Go's crc32.Update inverts on entry and exit, so undo it).
func crc32cRaw(crc uint32, p []byte) uint32 {
	return ^crc32.Update(^crc, castagnoli, p)
}

// crc32cU32 continues crc over v's four little-endian bytes. Byte by byte
// through the table: crc32.Update's assembly would move a local buffer to
// the heap, one allocation per inode checksum.
func crc32cU32(crc, v uint32) uint32 {
	for i := 0; i < 4; i++ {
		crc = castagnoli[byte(crc)^byte(v>>(8*i))] ^ crc>>8
	}
	return crc
}

// crc32cZeros continues crc over n zero bytes (a checksum field itself).
func crc32cZeros(crc uint32, n int) uint32 {
	for ; n > 0; n-- {
		crc = castagnoli[byte(crc)] ^ crc>>8
	}
	return crc
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
