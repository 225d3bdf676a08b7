package luks

import (
	"bytes"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
	"strings"
)

// LUKS2 binary header layout (cryptsetup docs/on-disk-format-luks2.pdf).
const (
	binHeaderSize = 4096
	offVersion    = 6
	offHdrSize    = 8
	offSeqID      = 16
	offLabel      = 24
	offCsumAlg    = 72
	offSalt       = 104
	offUUID       = 168
	offSubsystem  = 208
	offHdrOffset  = 256
	offCsum       = 448
	lenLabel      = 48
	lenCsumAlg    = 32
	lenSalt       = 64
	lenUUID       = 40
	lenSubsystem  = 48
	lenCsum       = 64
)

const (
	magicPrimary   = "LUKS\xba\xbe"
	magicSecondary = "SKUL\xba\xbe"
)

// The valid sizes of one LUKS2 header copy (binary header plus JSON area)
// are the powers of two from 16 KiB to 4 MiB; the secondary copy starts at
// one of them.
const (
	minMetadataSize = 16 << 10
	maxMetadataSize = 4 << 20
)

func validMetadataSize(n int64) bool {
	return n >= minMetadataSize && n <= maxMetadataSize && n&(n-1) == 0
}

func hasMagic(b []byte, magic string) bool {
	return len(b) >= len(magic) && string(b[:len(magic)]) == magic
}

func hashByName(name string) (func() hash.Hash, error) {
	switch strings.ToLower(name) {
	case "sha1":
		return sha1.New, nil
	case "sha224":
		return sha256.New224, nil
	case "sha256":
		return sha256.New, nil
	case "sha384":
		return sha512.New384, nil
	case "sha512":
		return sha512.New, nil
	}
	return nil, fmt.Errorf("hash %q is not supported (sha1, sha224, sha256, sha384, sha512)", truncate(name, 20))
}

// readAtFull reads len(buf) bytes at off; a short read is an error that
// names the range.
func readAtFull(r io.ReaderAt, buf []byte, off int64) error {
	n, err := r.ReadAt(buf, off)
	if n == len(buf) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		return fmt.Errorf("device ends inside bytes %d..%d (read %d of %d bytes)", off, off+int64(len(buf)), n, len(buf))
	}
	return &readError{fmt.Errorf("reading bytes %d..%d: %w", off, off+int64(len(buf)), err)}
}

// readError is an I/O failure of the device (as opposed to a device that is
// too short). ReadHeader passes it on rather than calling the header corrupt
// or absent, so that a transient storage error is not mistaken for either.
type readError struct{ err error }

func (e *readError) Error() string { return e.err.Error() }
func (e *readError) Unwrap() error { return e.err }

func isReadError(err error) bool {
	var re *readError
	return errors.As(err, &re)
}

func cString(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

// headerCopy is one validated LUKS2 header copy.
type headerCopy struct {
	name    string
	offset  int64
	hdrSize int64
	seqID   uint64
	label   string
	subsys  string
	uuid    string
	md      *metadata
}

// ReadHeader reads and validates the LUKS1 or LUKS2 header at the start of
// r. deviceSize is the size of the device in bytes (<= 0 if unknown; offsets
// are then only checked when read). For LUKS2 both header copies are
// checked and the valid one with the higher seqid is used; a damaged copy is
// reported in Header.Warnings.
func ReadHeader(r io.ReaderAt, deviceSize int64) (*Header, error) {
	if r == nil {
		return nil, errors.New("luks: ReadHeader: nil reader")
	}
	first := make([]byte, binHeaderSize)
	n, err := r.ReadAt(first, 0)
	if n < len(first) && err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("luks: reading header: %w", err)
	}
	first = first[:n]

	if len(first) >= 8 && hasMagic(first, magicPrimary) && binary.BigEndian.Uint16(first[offVersion:]) == 1 {
		h, err := parseLUKS1(first, deviceSize)
		if err != nil {
			return nil, fmt.Errorf("luks: %w: LUKS1 header: %v", ErrCorruptHeader, err)
		}
		return h, nil
	}

	primary, perr := readCopy(r, 0, deviceSize, "primary")
	if isReadError(perr) {
		return nil, fmt.Errorf("luks: reading header: %w", perr)
	}
	var secondary *headerCopy
	var serr error
	tried := map[int64]bool{}
	if primary != nil {
		tried[primary.hdrSize] = true
		secondary, serr = readCopy(r, primary.hdrSize, deviceSize, "secondary")
	} else if len(first) >= offHdrSize+8 && hasMagic(first, magicPrimary) {
		// Damaged primary: its size field may still be right.
		if sz := int64(binary.BigEndian.Uint64(first[offHdrSize:])); validMetadataSize(sz) {
			tried[sz] = true
			secondary, serr = readCopy(r, sz, deviceSize, "secondary")
		}
	}
	if primary == nil && secondary == nil {
		// Search every possible secondary offset, as cryptsetup does.
		for off := int64(minMetadataSize); off <= maxMetadataSize; off *= 2 {
			if tried[off] {
				continue
			}
			if deviceSize > 0 && off+binHeaderSize > deviceSize {
				break
			}
			s, err := readCopy(r, off, deviceSize, "secondary")
			if isReadError(err) {
				return nil, fmt.Errorf("luks: reading header: %w", err)
			}
			if s != nil {
				secondary, serr = s, nil
				break
			}
			if serr == nil || !errors.Is(err, errNoMagic) {
				serr = err // keep the most telling problem
			}
		}
	}

	if isReadError(serr) {
		return nil, fmt.Errorf("luks: reading header: %w", serr)
	}
	primaryMagic := hasMagic(first, magicPrimary)
	switch {
	case primary == nil && secondary == nil:
		if !primaryMagic && (serr == nil || errors.Is(serr, errNoMagic)) {
			return nil, fmt.Errorf("luks: %w", ErrNotLUKS)
		}
		msg := perr.Error()
		if serr != nil && !errors.Is(serr, errNoMagic) {
			msg += "; " + serr.Error()
		} else {
			msg += "; no valid secondary copy found"
		}
		return nil, fmt.Errorf("luks: %w: both copies unusable: %s", ErrCorruptHeader, msg)
	}

	use, other, otherErr := primary, secondary, serr
	if primary == nil || (secondary != nil && secondary.seqID > primary.seqID) {
		use, other, otherErr = secondary, primary, perr
	}
	h := &Header{
		Version:      2,
		UUID:         use.uuid,
		Label:        use.label,
		Subsystem:    use.subsys,
		SeqID:        use.seqID,
		MetadataSize: use.hdrSize,
		Keyslots:     use.md.Keyslots,
		Segments:     use.md.Segments,
		Digests:      use.md.Digests,
		Config:       use.md.Config,
		Tokens:       use.md.Tokens,
		deviceSize:   deviceSize,
	}
	switch {
	case other == nil && otherErr != nil:
		h.Warnings = append(h.Warnings, "using the "+use.name+" header copy; the other is unusable: "+otherErr.Error())
	case other == nil:
		h.Warnings = append(h.Warnings, "using the "+use.name+" header copy; no other copy found")
	case other.seqID != use.seqID:
		h.Warnings = append(h.Warnings, fmt.Sprintf("header copies differ: using the %s copy (seqid %d), the %s copy is older (seqid %d)", use.name, use.seqID, other.name, other.seqID))
	}
	if err := h.checkLayout(); err != nil {
		return nil, fmt.Errorf("luks: %w: %s copy at offset %d: %v", ErrCorruptHeader, use.name, use.offset, err)
	}
	return h, nil
}

var errNoMagic = errors.New("no LUKS2 header magic")

// readCopy reads and checks the LUKS2 header copy at off.
func readCopy(r io.ReaderAt, off, deviceSize int64, name string) (*headerCopy, error) {
	fail := func(format string, a ...any) error {
		return fmt.Errorf("%s copy at offset %d: "+format, append([]any{name, off}, a...)...)
	}
	bin := make([]byte, binHeaderSize)
	if err := readAtFull(r, bin, off); err != nil {
		if isReadError(err) {
			return nil, fail("%w", err)
		}
		if !hasMagic(bin, magicPrimary) && !hasMagic(bin, magicSecondary) {
			return nil, fail("%w (%v)", errNoMagic, err)
		}
		return nil, fail("truncated binary header: %v", err)
	}
	want := magicPrimary
	if off != 0 {
		want = magicSecondary
	}
	if !hasMagic(bin, want) {
		return nil, fail("%w", errNoMagic)
	}
	if v := binary.BigEndian.Uint16(bin[offVersion:]); v != 2 {
		return nil, fail("version %d is not 2", v)
	}
	hdrSize := binary.BigEndian.Uint64(bin[offHdrSize:])
	if !validMetadataSize(int64(hdrSize)) {
		return nil, fail("hdr_size %d is not a valid LUKS2 metadata size (16 KiB to 4 MiB, power of two)", hdrSize)
	}
	if at := binary.BigEndian.Uint64(bin[offHdrOffset:]); at != uint64(off) {
		return nil, fail("hdr_offset field says %d", at)
	}
	if off != 0 && off != int64(hdrSize) {
		return nil, fail("hdr_size %d does not match the position of a secondary copy", hdrSize)
	}
	if deviceSize > 0 && off+int64(hdrSize) > deviceSize {
		return nil, fail("metadata needs %d bytes but the device is only %d bytes (truncated?)", hdrSize, deviceSize)
	}
	csumAlg := cString(bin[offCsumAlg : offCsumAlg+lenCsumAlg])
	newHash, err := hashByName(csumAlg)
	if err != nil {
		return nil, fail("checksum algorithm: %v", err)
	}
	full := make([]byte, hdrSize)
	copy(full, bin)
	if err := readAtFull(r, full[binHeaderSize:], off+binHeaderSize); err != nil {
		if isReadError(err) {
			return nil, fail("%w", err)
		}
		return nil, fail("truncated JSON area: %v", err)
	}
	stored := make([]byte, lenCsum)
	copy(stored, full[offCsum:offCsum+lenCsum])
	sum := headerChecksum(full, newHash)
	if subtle.ConstantTimeCompare(sum, stored[:len(sum)]) != 1 {
		return nil, fail("checksum mismatch (%s over header and JSON area)", csumAlg)
	}
	jsonArea := full[binHeaderSize:]
	if i := bytes.IndexByte(jsonArea, 0); i >= 0 {
		jsonArea = jsonArea[:i]
	}
	md, err := parseJSON(jsonArea)
	if err != nil {
		return nil, fail("%v", err)
	}
	if md.Config.JSONSize != int64(hdrSize)-binHeaderSize {
		return nil, fail("config json_size %d does not match hdr_size %d minus 4096", md.Config.JSONSize, hdrSize)
	}
	return &headerCopy{
		name:    name,
		offset:  off,
		hdrSize: int64(hdrSize),
		seqID:   binary.BigEndian.Uint64(bin[offSeqID:]),
		label:   cString(bin[offLabel : offLabel+lenLabel]),
		subsys:  cString(bin[offSubsystem : offSubsystem+lenSubsystem]),
		uuid:    cString(bin[offUUID : offUUID+lenUUID]),
		md:      md,
	}, nil
}

// headerChecksum hashes the whole header copy with its checksum field zeroed.
func headerChecksum(full []byte, newHash func() hash.Hash) []byte {
	h := newHash()
	h.Write(full[:offCsum])
	h.Write(make([]byte, lenCsum))
	h.Write(full[offCsum+lenCsum:])
	return h.Sum(nil)
}

// checkLayout checks that keyslot areas stay between the header copies and
// the end of the keyslots area, and inside the device.
func (h *Header) checkLayout() error {
	areaStart := 2 * h.MetadataSize
	areaEnd := areaStart + h.Config.KeyslotsSize
	if h.Version == 1 {
		areaStart, areaEnd = 0, -1
	}
	for _, k := range h.Keyslots {
		if k.Type != "luks2" && k.Type != "luks1" {
			continue
		}
		end := k.Area.Offset + k.Area.Size
		if end < k.Area.Offset || k.Area.Offset < areaStart || (areaEnd >= 0 && end > areaEnd) {
			return fmt.Errorf("keyslot %d area %d..%d lies outside the keyslots area %d..%d", k.ID, k.Area.Offset, end, areaStart, areaEnd)
		}
		if h.deviceSize > 0 && end > h.deviceSize {
			return fmt.Errorf("keyslot %d area %d..%d lies beyond the end of the device (%d bytes)", k.ID, k.Area.Offset, end, h.deviceSize)
		}
	}
	for _, s := range h.Segments {
		if s.Type != "crypt" {
			continue
		}
		if h.deviceSize > 0 && (s.Offset > h.deviceSize || (s.Size >= 0 && s.Size > h.deviceSize-s.Offset)) {
			return fmt.Errorf("segment %d (offset %d, size %d) lies beyond the end of the device (%d bytes)", s.ID, s.Offset, s.Size, h.deviceSize)
		}
	}
	return nil
}
