package crypto

import (
	"bytes"
	"compress/flate"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sort"
	"strconv"
)

// Holes are the regions of a volume that were all zeros in the plaintext
// when the image was made. They are never encrypted or stored (the image
// file is sparse there, a page blob has no pages there), and the volume
// reads them as plaintext zeros without touching storage.
//
// Because encrypted zeros are not zeros, the list of holes must come from
// the image's metadata and must be authenticated: otherwise whoever stores
// the image could declare real data a hole and make it read as zeros. The
// list is kept in a LUKS2 token of type HoleTokenType, MACed with a key
// derived from the volume key (see holeMAC), so only someone holding the
// volume key can create or change it. A header without the token (every
// image cryptsetup makes) simply has no holes.

// HoleTokenType is the LUKS2 token type that carries the hole map.
const HoleTokenType = "blobseal-holes"

// maxHoleMapBytes bounds the decompressed run list a header may carry.
const maxHoleMapBytes = 16 << 20

// Run is a byte range [Off, Off+Len) of the plaintext volume.
type Run struct{ Off, Len int64 }

// End returns the first offset after the run.
func (r Run) End() int64 { return r.Off + r.Len }

// HoleMap is a sorted list of non-overlapping, non-adjacent, sector-aligned
// hole runs.
type HoleMap struct {
	runs []Run
}

// NewHoleMap validates and wraps runs (sorted by offset, aligned to
// sectorSize, inside size).
func NewHoleMap(runs []Run, sectorSize int, size int64) (*HoleMap, error) {
	var prevEnd int64 = -1
	for i, r := range runs {
		switch {
		case r.Len <= 0:
			return nil, fmt.Errorf("hole %d has length %d", i, r.Len)
		case r.Off%int64(sectorSize) != 0 || r.Len%int64(sectorSize) != 0:
			return nil, fmt.Errorf("hole %d [%d,+%d) is not aligned to %d-byte sectors", i, r.Off, r.Len, sectorSize)
		case r.Off <= prevEnd:
			return nil, fmt.Errorf("hole %d at %d overlaps or touches the previous one", i, r.Off)
		case r.End() > size || r.End() < r.Off:
			return nil, fmt.Errorf("hole %d [%d,+%d) extends past the volume size %d", i, r.Off, r.Len, size)
		}
		prevEnd = r.End()
	}
	return &HoleMap{runs: runs}, nil
}

// Runs returns the hole runs.
func (h *HoleMap) Runs() []Run {
	if h == nil {
		return nil
	}
	return h.runs
}

// Bytes returns the total size of the holes.
func (h *HoleMap) Bytes() int64 {
	var n int64
	for _, r := range h.Runs() {
		n += r.Len
	}
	return n
}

// Walk splits [start, end) into alternating data and hole pieces, in order.
func (h *HoleMap) Walk(start, end int64, fn func(off, end int64, hole bool) error) error {
	runs := h.Runs()
	i := sort.Search(len(runs), func(i int) bool { return runs[i].End() > start })
	for off := start; off < end; {
		if i < len(runs) && runs[i].Off <= off {
			stop := min(runs[i].End(), end)
			if err := fn(off, stop, true); err != nil {
				return err
			}
			off = stop
			i++
			continue
		}
		stop := end
		if i < len(runs) && runs[i].Off < end {
			stop = runs[i].Off
		}
		if err := fn(off, stop, false); err != nil {
			return err
		}
		off = stop
	}
	return nil
}

// Overlaps reports whether any hole intersects [start, end).
func (h *HoleMap) Overlaps(start, end int64) bool {
	runs := h.Runs()
	i := sort.Search(len(runs), func(i int) bool { return runs[i].End() > start })
	return i < len(runs) && runs[i].Off < end
}

// holeToken is the JSON form of the LUKS2 token.
type holeToken struct {
	Type       string   `json:"type"`
	Keyslots   []string `json:"keyslots"`
	Version    int      `json:"blobseal_version"`
	SectorSize int      `json:"sector_size"`
	Size       string   `json:"size"`
	Runs       string   `json:"runs"` // base64(deflate(varint pairs: gap, length, in sectors))
	MAC        string   `json:"mac"`  // base64(HMAC-SHA256)
}

// holeMACKey derives the MAC key from the volume key, so that the key to
// forge a hole map is exactly the key to read the data.
func holeMACKey(volumeKey []byte) ([]byte, error) {
	return hkdf.Key(sha256.New, volumeKey, nil, "blobseal hole map v1", 32)
}

func holeMAC(volumeKey []byte, sectorSize int, size int64, runs []byte) ([]byte, error) {
	key, err := holeMACKey(volumeKey)
	if err != nil {
		return nil, err
	}
	defer wipe(key)
	m := hmac.New(sha256.New, key)
	var hdr [16]byte
	binary.BigEndian.PutUint64(hdr[:8], uint64(sectorSize))
	binary.BigEndian.PutUint64(hdr[8:], uint64(size))
	m.Write([]byte("blobseal-holes-v1\x00"))
	m.Write(hdr[:])
	m.Write(runs)
	return m.Sum(nil), nil
}

// encodeRuns serialises the runs as varint (gap, length) pairs in sectors.
func encodeRuns(runs []Run, sectorSize int) []byte {
	var raw bytes.Buffer
	var tmp [binary.MaxVarintLen64]byte
	var prev int64
	for _, r := range runs {
		raw.Write(tmp[:binary.PutUvarint(tmp[:], uint64((r.Off-prev)/int64(sectorSize)))])
		raw.Write(tmp[:binary.PutUvarint(tmp[:], uint64(r.Len/int64(sectorSize)))])
		prev = r.End()
	}
	var out bytes.Buffer
	zw, _ := flate.NewWriter(&out, flate.BestCompression) // level is valid
	zw.Write(raw.Bytes())
	zw.Close()
	return out.Bytes()
}

func decodeRuns(enc []byte, sectorSize int, size int64) ([]Run, error) {
	raw, err := io.ReadAll(io.LimitReader(flate.NewReader(bytes.NewReader(enc)), maxHoleMapBytes+1))
	if err != nil {
		return nil, fmt.Errorf("hole map does not decompress: %v", err)
	}
	if len(raw) > maxHoleMapBytes {
		return nil, fmt.Errorf("hole map larger than %d bytes", maxHoleMapBytes)
	}
	var runs []Run
	var prev int64
	ss := int64(sectorSize)
	limit := uint64(size / ss)
	for r := bytes.NewReader(raw); r.Len() > 0; {
		gap, err1 := binary.ReadUvarint(r)
		n, err2 := binary.ReadUvarint(r)
		if err1 != nil || err2 != nil {
			return nil, errors.New("hole map run list is truncated")
		}
		if gap > limit || n > limit {
			return nil, errors.New("hole map run outside the volume")
		}
		off := prev + int64(gap)*ss
		runs = append(runs, Run{Off: off, Len: int64(n) * ss})
		prev = off + int64(n)*ss
		if prev > size {
			return nil, errors.New("hole map run outside the volume")
		}
	}
	return runs, nil
}

// MarshalHoleToken builds the authenticated LUKS2 token for runs.
func MarshalHoleToken(h *HoleMap, volumeKey []byte, sectorSize int, size int64) (json.RawMessage, error) {
	enc := encodeRuns(h.Runs(), sectorSize)
	mac, err := holeMAC(volumeKey, sectorSize, size, enc)
	if err != nil {
		return nil, err
	}
	return json.Marshal(holeToken{
		Type: HoleTokenType, Keyslots: []string{}, Version: 1, SectorSize: sectorSize,
		Size: strconv.FormatInt(size, 10), Runs: base64.StdEncoding.EncodeToString(enc),
		MAC: base64.StdEncoding.EncodeToString(mac),
	})
}

// ErrHoleMapForged reports a hole map whose MAC does not verify.
var ErrHoleMapForged = errors.New("the image's hole map does not verify against the volume key: the header was modified after the image was made (possible tampering by storage)")

// ParseHoleToken verifies and decodes a hole token for a volume with the
// given key, sector size and size. The MAC binds the map to the volume key,
// which is random per image, so a token cannot be moved between images. Any mismatch is an error: a token
// that does not verify must never be used, nor silently ignored.
func ParseHoleToken(raw json.RawMessage, volumeKey []byte, sectorSize int, size int64) (*HoleMap, error) {
	var t holeToken
	if err := json.Unmarshal(raw, &t); err != nil {
		return nil, fmt.Errorf("hole map token is not valid JSON: %v", err)
	}
	if t.Type != HoleTokenType || t.Version != 1 {
		return nil, fmt.Errorf("hole map token has type %q version %d, want %q version 1", t.Type, t.Version, HoleTokenType)
	}
	if t.SectorSize != sectorSize || t.Size != strconv.FormatInt(size, 10) {
		return nil, fmt.Errorf("%w (token is for %s bytes in %d-byte sectors, volume is %d in %d)", ErrHoleMapForged, t.Size, t.SectorSize, size, sectorSize)
	}
	enc, err := base64.StdEncoding.DecodeString(t.Runs)
	if err != nil {
		return nil, fmt.Errorf("hole map runs are not base64: %v", err)
	}
	mac, err := base64.StdEncoding.DecodeString(t.MAC)
	if err != nil {
		return nil, fmt.Errorf("hole map MAC is not base64: %v", err)
	}
	want, err := holeMAC(volumeKey, sectorSize, size, enc)
	if err != nil {
		return nil, err
	}
	if !hmac.Equal(mac, want) {
		return nil, ErrHoleMapForged
	}
	runs, err := decodeRuns(enc, sectorSize, size)
	if err != nil {
		return nil, err
	}
	return NewHoleMap(runs, sectorSize, size)
}

// holeFinder accumulates zero runs while an image is written, in order.
type holeFinder struct {
	minRun int64
	runs   []Run
	cur    Run // pending zero run, Len 0 if none
}

func (f *holeFinder) add(off int64, n int64, zero bool) {
	if zero {
		if f.cur.Len > 0 && f.cur.End() == off {
			f.cur.Len += n
			return
		}
		f.flush()
		f.cur = Run{Off: off, Len: n}
		return
	}
	f.flush()
}

func (f *holeFinder) flush() {
	if f.cur.Len >= f.minRun && f.cur.Len > 0 {
		f.runs = append(f.runs, f.cur)
	}
	f.cur = Run{}
}

func (f *holeFinder) result() []Run {
	f.flush()
	return f.runs
}

func isZero(p []byte) bool {
	for len(p) >= 8 {
		if binary.LittleEndian.Uint64(p) != 0 {
			return false
		}
		p = p[8:]
	}
	for _, b := range p {
		if b != 0 {
			return false
		}
	}
	return true
}

func wipe(p []byte) {
	for i := range p {
		p[i] = 0
	}
}
