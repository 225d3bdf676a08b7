// Package luks reads and writes LUKS2 headers (and reads LUKS1 headers) the
// way cryptsetup lays them out, and unlocks a keyslot to obtain the volume key
// of an aes-xts-plain64 data segment.
//
// The header is not authenticated: whoever stores the image can rewrite it
// (CVE-2025-59054). Unlock therefore takes a Policy naming the ciphers and
// sector sizes the caller accepts and refuses anything else, cipher_null in
// particular, before any key material is derived. KDF costs are bounded so
// that a forged header cannot make Unlock hang or exhaust memory.
package luks

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/blobseal/blobseal/internal/secret"
)

// Sentinel errors, usable with errors.Is. Returned errors wrap them and add
// detail (never key material).
var (
	// ErrNotLUKS: no LUKS1 or LUKS2 header at the start of the device (nor a
	// LUKS2 secondary header at any of its possible offsets).
	ErrNotLUKS = errors.New("not a LUKS device (no LUKS header magic found)")
	// ErrWrongKey: no keyslot bound to the data segment accepts the passphrase.
	ErrWrongKey = errors.New("the key does not unlock any keyslot")
	// ErrForbiddenCipher: the header asks for a cipher the policy does not allow.
	ErrForbiddenCipher = errors.New("cipher not allowed by the mount policy")
	// ErrForbiddenSectorSize: the header asks for a sector size the policy does not allow.
	ErrForbiddenSectorSize = errors.New("sector size not allowed by the mount policy")
	// ErrCorruptHeader: a header copy fails a structural or checksum check.
	ErrCorruptHeader = errors.New("corrupt LUKS header")
	// ErrKDFLimit: a keyslot or digest asks for more KDF work or memory than
	// the policy allows.
	ErrKDFLimit = errors.New("key derivation cost exceeds the allowed limit")
	// ErrUnsupported: a valid header that uses a feature this package does not
	// implement (reencryption in progress, several segments, other ciphers).
	ErrUnsupported = errors.New("unsupported LUKS feature")
)

// CipherAESXTSPlain64 is the only data and keyslot cipher this package implements.
const CipherAESXTSPlain64 = "aes-xts-plain64"

// Default KDF limits, applied when the Policy leaves them zero. A forged
// header must not buy minutes of CPU or gigabytes of memory, so they admit
// what blobseal and the Azure tooling write (pbkdf2, 1000 iterations) and
// what cryptsetup's own benchmark picks for its defaults (pbkdf2 ~1.6 M
// iterations, argon2id 0.5-1 GiB × 4 passes on this project's machines, for
// a 2-second unlock), with room for a faster machine, and little more. One
// Unlock never spends more than the totals, however many keyslots the
// header lists (LUKS2 allows 32). Raise them in the Policy for images
// formatted with a larger --iter-time.
const (
	DefaultMaxIterations     = 5_000_000   // pbkdf2 iterations of one keyslot or digest
	DefaultMaxArgonMemoryKiB = 1024 * 1024 // 1 GiB, cryptsetup's default maximum
	DefaultMaxArgonTime      = 10
	DefaultMaxArgonThreads   = 16
	// DefaultMaxTotalIterations bounds pbkdf2 iterations over every keyslot
	// and digest check of one Unlock.
	DefaultMaxTotalIterations = 2 * DefaultMaxIterations
	// DefaultMaxTotalArgonWork bounds argon2 memory × passes (KiB) over
	// every keyslot of one Unlock: two keyslots at cryptsetup's largest
	// default, 1 GiB × 8.
	DefaultMaxTotalArgonWork = 16 * 1024 * 1024
)

// Policy pins what a header may ask for. The zero value allows
// aes-xts-plain64 with 512- or 4096-byte sectors, for the data segment and
// keyslot areas alike, and the default KDF limits.
type Policy struct {
	Ciphers     []string // allowed "cipher-mode-iv" strings; only aes-xts-plain64 is implemented
	SectorSizes []int    // allowed data segment sector sizes (512..4096, powers of two)

	MaxIterations     int // pbkdf2 iterations (keyslots and digests)
	MaxArgonMemoryKiB int
	MaxArgonTime      int
	MaxArgonThreads   int
	// Totals over everything one Unlock derives (see the defaults).
	MaxTotalIterations int64
	MaxTotalArgonWork  int64 // KiB × passes
}

func (p Policy) withDefaults() (Policy, error) {
	out := p
	if len(out.Ciphers) == 0 {
		out.Ciphers = []string{CipherAESXTSPlain64}
	}
	if len(out.SectorSizes) == 0 {
		out.SectorSizes = []int{512, 4096}
	}
	for _, c := range out.Ciphers {
		if c != CipherAESXTSPlain64 {
			return out, fmt.Errorf("luks: policy lists cipher %q; only %s is implemented: %w", c, CipherAESXTSPlain64, ErrUnsupported)
		}
	}
	for _, s := range out.SectorSizes {
		if !validSectorSize(s) {
			return out, fmt.Errorf("luks: policy lists sector size %d; it must be 512, 1024, 2048 or 4096", s)
		}
	}
	if out.MaxIterations <= 0 {
		out.MaxIterations = DefaultMaxIterations
	}
	if out.MaxArgonMemoryKiB <= 0 {
		out.MaxArgonMemoryKiB = DefaultMaxArgonMemoryKiB
	}
	if out.MaxArgonTime <= 0 {
		out.MaxArgonTime = DefaultMaxArgonTime
	}
	if out.MaxArgonThreads <= 0 {
		out.MaxArgonThreads = DefaultMaxArgonThreads
	}
	if out.MaxTotalIterations <= 0 {
		out.MaxTotalIterations = max(DefaultMaxTotalIterations, 2*int64(out.MaxIterations))
	}
	if out.MaxTotalArgonWork <= 0 {
		out.MaxTotalArgonWork = max(DefaultMaxTotalArgonWork, 2*int64(out.MaxArgonMemoryKiB)*int64(out.MaxArgonTime))
	}
	if out.MaxArgonThreads > 255 {
		out.MaxArgonThreads = 255 // argon2 lanes are a uint8 in x/crypto
	}
	return out, nil
}

func (p Policy) checkCipher(what, cipher string) error {
	if strings.EqualFold(cipher, "cipher_null") || strings.HasPrefix(strings.ToLower(cipher), "cipher_null-") {
		return fmt.Errorf("luks: %s asks for cipher %q, which stores data unencrypted; the mount allows %s — possibly a forged header (CVE-2025-59054): %w",
			what, cipher, strings.Join(p.Ciphers, ", "), ErrForbiddenCipher)
	}
	if !slices.Contains(p.Ciphers, cipher) {
		return fmt.Errorf("luks: %s asks for cipher %q but the mount allows %s — possibly a forged header: %w",
			what, cipher, strings.Join(p.Ciphers, ", "), ErrForbiddenCipher)
	}
	return nil
}

func (p Policy) checkSectorSize(what string, size int) error {
	if !slices.Contains(p.SectorSizes, size) {
		allowed := make([]string, len(p.SectorSizes))
		for i, s := range p.SectorSizes {
			allowed[i] = fmt.Sprint(s)
		}
		return fmt.Errorf("luks: %s asks for sector size %d but the mount allows %s — possibly a forged header: %w",
			what, size, strings.Join(allowed, " or "), ErrForbiddenSectorSize)
	}
	return nil
}

func validSectorSize(s int) bool {
	return s >= 512 && s <= 4096 && s&(s-1) == 0
}

// Header is a parsed LUKS1 or LUKS2 header. LUKS1 headers are presented in
// the LUKS2 shape: one segment, one pbkdf2 digest, "luks1" keyslots.
type Header struct {
	Version   int // 1 or 2
	UUID      string
	Label     string // LUKS2 only
	Subsystem string // LUKS2 only
	SeqID     uint64 // LUKS2 only: the header's update counter

	// MetadataSize is the size of one LUKS2 header copy (binary header plus
	// JSON area); 0 for LUKS1.
	MetadataSize int64

	Keyslots []Keyslot // sorted by ID
	Segments []Segment // sorted by ID
	Digests  []Digest  // sorted by ID
	Config   Config
	// Tokens maps a LUKS2 token id ("0".."31") to its raw JSON object.
	Tokens map[string]json.RawMessage

	// Warnings describe a damaged or stale header copy that was not used.
	Warnings []string

	deviceSize int64 // <= 0: unknown
}

// Keyslot is one keyslot of the header.
type Keyslot struct {
	ID       int
	Type     string // "luks2" (or "luks1" for LUKS1 headers); others are not unlockable
	KeySize  int    // volume key bytes
	Priority int    // 0 ignore, 1 normal (default), 2 high
	Area     KeyslotArea
	KDF      KDF
	AF       AntiForensic
}

// KeyslotArea is where a keyslot's encrypted, AF-split key material lives.
type KeyslotArea struct {
	Type       string // "raw"
	Offset     int64  // bytes from the device start
	Size       int64  // bytes
	Encryption string // e.g. aes-xts-plain64
	KeySize    int    // bytes of the area encryption key
}

// KDF describes how a passphrase becomes the keyslot area key.
type KDF struct {
	Type       string // "pbkdf2", "argon2i" or "argon2id"
	Hash       string // pbkdf2 only
	Iterations int    // pbkdf2 only
	Time       int    // argon2 only
	MemoryKiB  int    // argon2 only
	CPUs       int    // argon2 only
	Salt       []byte
}

// AntiForensic describes the key material splitter.
type AntiForensic struct {
	Type    string // "luks1"
	Stripes int
	Hash    string
}

// Segment is a data segment.
type Segment struct {
	ID         int
	Type       string // "crypt"
	Offset     int64  // bytes
	Size       int64  // bytes, -1 for "dynamic"
	IVTweak    uint64
	Encryption string
	SectorSize int
	Flags      []string
}

// Digest verifies a candidate volume key.
type Digest struct {
	ID         int
	Type       string // "pbkdf2"
	Hash       string
	Iterations int
	Salt       []byte
	Value      []byte
	Keyslots   []int
	Segments   []int
}

// Config is the LUKS2 config object.
type Config struct {
	JSONSize     int64
	KeyslotsSize int64
	Flags        []string
	Requirements []string // mandatory requirements
}

// Unlocked describes an unlocked data segment. Call Wipe when done.
type Unlocked struct {
	VolumeKey  secret.Bytes // 32 or 64 bytes for aes-xts-plain64
	Cipher     string       // "aes-xts-plain64"
	SectorSize int          // 512..4096
	Offset     int64        // data segment start, bytes
	Size       int64        // segment size in bytes, or -1 for "dynamic" (to end of device)
	IVTweak    uint64       // segment iv_tweak
	Keyslot    int
}

// Wipe zeroes the volume key.
func (u *Unlocked) Wipe() {
	if u != nil {
		u.VolumeKey.Wipe()
	}
}

// String describes the volume without key material.
func (u Unlocked) String() string {
	return fmt.Sprintf("luks volume (%s, %d-bit key, %d-byte sectors, offset %d, size %d, keyslot %d)",
		u.Cipher, len(u.VolumeKey)*8, u.SectorSize, u.Offset, u.Size, u.Keyslot)
}

var _ fmt.Stringer = Unlocked{}
