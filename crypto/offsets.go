package crypto

import "fmt"

// Sector arithmetic for the plaintext view of a volume. All offsets are
// plaintext offsets relative to the start of the data segment; sectors are
// the encryption sectors (512..4096 bytes). Kept apart from the I/O code so
// that it can be tested exhaustively on its own.

// Span is the whole-sector range that covers a byte request.
type Span struct {
	Start int64 // first byte of the first sector (aligned)
	End   int64 // one past the last byte of the last sector (aligned)
	Skip  int   // bytes to skip in the first sector to reach the request
}

// Len returns the aligned length in bytes.
func (s Span) Len() int64 { return s.End - s.Start }

// Sectors returns the number of sectors in the span.
func (s Span) Sectors(sectorSize int) int64 { return s.Len() / int64(sectorSize) }

// alignDown rounds off down to a multiple of sectorSize (a power of two).
func alignDown(off int64, sectorSize int) int64 { return off &^ int64(sectorSize-1) }

// alignUp rounds off up to a multiple of sectorSize (a power of two).
func alignUp(off int64, sectorSize int) int64 {
	return (off + int64(sectorSize-1)) &^ int64(sectorSize-1)
}

// SpanOf returns the sectors covering [off, off+n) clipped to a volume of
// size bytes (a multiple of sectorSize), and how many request bytes remain
// after clipping. n == 0 or off >= size gives an empty span.
func SpanOf(off, n, size int64, sectorSize int) (Span, int64) {
	if off < 0 || n <= 0 || off >= size {
		return Span{Start: off, End: off}, 0
	}
	if off+n > size || off+n < off {
		n = size - off
	}
	start := alignDown(off, sectorSize)
	return Span{Start: start, End: alignUp(off+n, sectorSize), Skip: int(off - start)}, n
}

// IVOf returns the plain64 IV number of the sector that starts at the
// plaintext offset off. LUKS counts IVs in 512-byte units whatever the
// sector size (ivUnit 512); plain mode with large IVs counts whole sectors
// (ivUnit = sector size). ivTweak is the segment's iv_tweak, in IV units.
func IVOf(off int64, ivUnit int, ivTweak uint64) uint64 {
	return uint64(off)/uint64(ivUnit) + ivTweak
}

// IVStep returns how much the IV advances from one sector to the next.
func IVStep(sectorSize, ivUnit int) uint64 { return uint64(sectorSize / ivUnit) }

// checkGeometry validates a sector size and a volume size against each other.
func checkGeometry(sectorSize int, size int64) error {
	if sectorSize < 512 || sectorSize > 4096 || sectorSize&(sectorSize-1) != 0 {
		return fmt.Errorf("sector size %d is not one of 512, 1024, 2048, 4096", sectorSize)
	}
	if size < 0 || size%int64(sectorSize) != 0 {
		return fmt.Errorf("volume size %d is not a whole number of %d-byte sectors", size, sectorSize)
	}
	return nil
}
