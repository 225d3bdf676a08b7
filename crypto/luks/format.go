package luks

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"

	"golang.org/x/crypto/pbkdf2"

	"github.com/blobseal/blobseal/crypto/xts"
	"github.com/blobseal/blobseal/internal/secret"
)

// Defaults for images blobseal creates. The passphrase is a 32-byte random
// secret released by the HSM, so a slow KDF adds start-up time and nothing
// else (see DESIGN.md); 1000 pbkdf2 iterations is also cryptsetup's minimum.
const (
	DefaultSectorSize     = 4096
	DefaultKeyBytes       = 64
	DefaultPBKDF          = "pbkdf2"
	DefaultHash           = "sha256"
	DefaultIterations     = 1000
	DefaultArgonTime      = 4
	DefaultArgonMemoryKiB = 64 * 1024
	DefaultArgonThreads   = 4
	DefaultDataOffset     = 16 << 20

	afStripes        = 4000
	digestIterations = 1000
	saltBytes        = 32
	maxKeyslotsSize  = 128 << 20 // cryptsetup's LUKS2 limit
	formatSeqID      = 1
)

// FormatOptions configure Format. Zero fields take the defaults above.
type FormatOptions struct {
	SectorSize     int    // data sector size: 512, 1024, 2048 or 4096 (default 4096)
	KeyBytes       int    // volume key size: 32 or 64 (default 64, AES-256-XTS)
	PBKDF          string // "pbkdf2" (default), "argon2id" or "argon2i"
	Hash           string // pbkdf2 and AF hash (default sha256)
	Iterations     int    // pbkdf2 iterations (default 1000)
	ArgonTime      int
	ArgonMemoryKiB int
	ArgonThreads   int
	DataOffset     int64 // bytes; default 16 MiB, multiple of 4096
	Label          string
	VolumeKey      []byte                     // optional; random when nil
	Tokens         map[string]json.RawMessage // extra LUKS2 tokens, id "0".."31" -> object
}

func (o FormatOptions) withDefaults() (FormatOptions, error) {
	if o.SectorSize == 0 {
		o.SectorSize = DefaultSectorSize
	}
	if !validSectorSize(o.SectorSize) {
		return o, fmt.Errorf("luks: format: sector size %d must be 512, 1024, 2048 or 4096", o.SectorSize)
	}
	if o.VolumeKey != nil && o.KeyBytes == 0 {
		o.KeyBytes = len(o.VolumeKey)
	}
	if o.KeyBytes == 0 {
		o.KeyBytes = DefaultKeyBytes
	}
	if o.KeyBytes != 32 && o.KeyBytes != 64 {
		return o, fmt.Errorf("luks: format: key size %d bytes; aes-xts-plain64 needs 32 or 64", o.KeyBytes)
	}
	if o.VolumeKey != nil && len(o.VolumeKey) != o.KeyBytes {
		return o, fmt.Errorf("luks: format: the given volume key is %d bytes but KeyBytes is %d", len(o.VolumeKey), o.KeyBytes)
	}
	if o.PBKDF == "" {
		o.PBKDF = DefaultPBKDF
	}
	if o.Hash == "" {
		o.Hash = DefaultHash
	}
	if _, err := hashByName(o.Hash); err != nil {
		return o, fmt.Errorf("luks: format: %w", err)
	}
	switch o.PBKDF {
	case "pbkdf2":
		if o.Iterations == 0 {
			o.Iterations = DefaultIterations
		}
		if o.Iterations < 1000 || o.Iterations > DefaultMaxIterations {
			return o, fmt.Errorf("luks: format: pbkdf2 iterations %d out of range 1000..%d (cryptsetup refuses fewer than 1000; more would exceed what a mount accepts by default)", o.Iterations, DefaultMaxIterations)
		}
	case "argon2i", "argon2id":
		if o.ArgonTime == 0 {
			o.ArgonTime = DefaultArgonTime
		}
		if o.ArgonMemoryKiB == 0 {
			o.ArgonMemoryKiB = DefaultArgonMemoryKiB
		}
		if o.ArgonThreads == 0 {
			o.ArgonThreads = DefaultArgonThreads
		}
		// cryptsetup's own bounds for argon2 parameters.
		if o.ArgonTime < 4 || o.ArgonTime > DefaultMaxArgonTime {
			return o, fmt.Errorf("luks: format: argon2 time %d out of range 4..%d", o.ArgonTime, DefaultMaxArgonTime)
		}
		if o.ArgonMemoryKiB < 32 || o.ArgonMemoryKiB > DefaultMaxArgonMemoryKiB {
			return o, fmt.Errorf("luks: format: argon2 memory %d KiB out of range 32..%d", o.ArgonMemoryKiB, DefaultMaxArgonMemoryKiB)
		}
		if o.ArgonThreads < 1 || o.ArgonThreads > 16 {
			return o, fmt.Errorf("luks: format: argon2 threads %d out of range 1..16", o.ArgonThreads)
		}
	default:
		return o, fmt.Errorf("luks: format: PBKDF %q must be pbkdf2, argon2id or argon2i", o.PBKDF)
	}
	if o.DataOffset == 0 {
		o.DataOffset = DefaultDataOffset
	}
	if o.DataOffset < 0 || o.DataOffset%4096 != 0 {
		return o, fmt.Errorf("luks: format: data offset %d must be a positive multiple of 4096", o.DataOffset)
	}
	if len(o.Label) >= lenLabel {
		return o, fmt.Errorf("luks: format: label is %d bytes; at most %d fit", len(o.Label), lenLabel-1)
	}
	if bytes.IndexByte([]byte(o.Label), 0) >= 0 {
		return o, errors.New("luks: format: label contains a NUL byte")
	}
	for id, tok := range o.Tokens {
		if _, err := parseID("token", id, maxTokens); err != nil {
			return o, fmt.Errorf("luks: format: %w", err)
		}
		if err := checkToken(tok); err != nil {
			return o, fmt.Errorf("luks: format: token %s: %w", id, err)
		}
	}
	return o, nil
}

// JSON shapes written by Format, in cryptsetup's field order.
type (
	outKeyslot struct {
		Type    string  `json:"type"`
		KeySize int     `json:"key_size"`
		AF      outAF   `json:"af"`
		Area    outArea `json:"area"`
		KDF     outKDF  `json:"kdf"`
	}
	outAF struct {
		Type    string `json:"type"`
		Stripes int    `json:"stripes"`
		Hash    string `json:"hash"`
	}
	outArea struct {
		Type       string `json:"type"`
		Offset     string `json:"offset"`
		Size       string `json:"size"`
		Encryption string `json:"encryption"`
		KeySize    int    `json:"key_size"`
	}
	outKDF struct {
		Type       string `json:"type"`
		Hash       string `json:"hash,omitempty"`
		Iterations int    `json:"iterations,omitempty"`
		Time       int    `json:"time,omitempty"`
		Memory     int    `json:"memory,omitempty"`
		CPUs       int    `json:"cpus,omitempty"`
		Salt       []byte `json:"salt"`
	}
	outSegment struct {
		Type       string `json:"type"`
		Offset     string `json:"offset"`
		Size       string `json:"size"`
		IVTweak    string `json:"iv_tweak"`
		Encryption string `json:"encryption"`
		SectorSize int    `json:"sector_size"`
	}
	outDigest struct {
		Type       string   `json:"type"`
		Keyslots   []string `json:"keyslots"`
		Segments   []string `json:"segments"`
		Hash       string   `json:"hash"`
		Iterations int      `json:"iterations"`
		Salt       []byte   `json:"salt"`
		Digest     []byte   `json:"digest"`
	}
	outConfig struct {
		JSONSize     string `json:"json_size"`
		KeyslotsSize string `json:"keyslots_size"`
	}
	outMetadata struct {
		Keyslots map[string]outKeyslot      `json:"keyslots"`
		Tokens   map[string]json.RawMessage `json:"tokens"`
		Segments map[string]outSegment      `json:"segments"`
		Digests  map[string]outDigest       `json:"digests"`
		Config   outConfig                  `json:"config"`
	}
)

// Format writes both LUKS2 header copies and the keyslot area to w (the data
// area is untouched) and returns the Unlocked description of the new volume
// (VolumeKey included). The rest of the keyslots area is zeroed so that no
// stale header copy of an earlier format survives there.
func Format(w io.WriterAt, passphrase []byte, opts FormatOptions) (*Unlocked, error) {
	if w == nil {
		return nil, errors.New("luks: format: nil writer")
	}
	if len(passphrase) == 0 {
		return nil, errors.New("luks: format: empty passphrase")
	}
	o, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	afHash, _ := hashByName(o.Hash)

	vk := make([]byte, o.KeyBytes)
	if o.VolumeKey != nil {
		copy(vk, o.VolumeKey)
	} else if _, err := rand.Read(vk); err != nil {
		return nil, fmt.Errorf("luks: format: random volume key: %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			secret.Wipe(vk)
		}
	}()

	kdf := KDF{Type: o.PBKDF, Salt: make([]byte, saltBytes)}
	if o.PBKDF == "pbkdf2" {
		kdf.Hash, kdf.Iterations = o.Hash, o.Iterations
	} else {
		kdf.Time, kdf.MemoryKiB, kdf.CPUs = o.ArgonTime, o.ArgonMemoryKiB, o.ArgonThreads
	}
	digestSalt := make([]byte, saltBytes)
	random := make([]byte, (afStripes-1)*o.KeyBytes)
	defer secret.Wipe(random)
	for _, b := range [][]byte{kdf.Salt, digestSalt, random} {
		if _, err := rand.Read(b); err != nil {
			return nil, fmt.Errorf("luks: format: random bytes: %w", err)
		}
	}

	// Key material: AF split, then encrypted with the KDF-derived area key.
	material := afSplit(vk, afStripes, random, afHash)
	defer secret.Wipe(material)
	areaKey, err := deriveKey(kdf, passphrase, o.KeyBytes)
	if err != nil {
		return nil, fmt.Errorf("luks: format: %w", err)
	}
	c, err := xts.New(areaKey, keyslotSectorSize)
	secret.Wipe(areaKey)
	if err != nil {
		return nil, fmt.Errorf("luks: format: %w", err)
	}
	err = c.Encrypt(material, material, 0, 1)
	c.Close()
	if err != nil {
		return nil, fmt.Errorf("luks: format: %w", err)
	}
	dgHash, _ := hashByName(DefaultHash)
	digest := pbkdf2.Key(vk, digestSalt, digestIterations, sha256.Size, dgHash)

	areaSize := (int64(len(material)) + 4095) / 4096 * 4096
	md := outMetadata{
		Keyslots: map[string]outKeyslot{"0": {
			Type: "luks2", KeySize: o.KeyBytes,
			AF: outAF{Type: "luks1", Stripes: afStripes, Hash: o.Hash},
			Area: outArea{Type: "raw", Size: strconv.FormatInt(areaSize, 10),
				Encryption: CipherAESXTSPlain64, KeySize: o.KeyBytes},
			KDF: outKDF{Type: kdf.Type, Hash: kdf.Hash, Iterations: kdf.Iterations, Time: kdf.Time,
				Memory: kdf.MemoryKiB, CPUs: kdf.CPUs, Salt: kdf.Salt},
		}},
		Tokens: map[string]json.RawMessage{},
		Segments: map[string]outSegment{"0": {
			Type: "crypt", Offset: strconv.FormatInt(o.DataOffset, 10), Size: "dynamic", IVTweak: "0",
			Encryption: CipherAESXTSPlain64, SectorSize: o.SectorSize,
		}},
		Digests: map[string]outDigest{"0": {
			Type: "pbkdf2", Keyslots: []string{"0"}, Segments: []string{"0"}, Hash: DefaultHash,
			Iterations: digestIterations, Salt: digestSalt, Digest: digest,
		}},
	}
	for id, tok := range o.Tokens {
		md.Tokens[id] = tok
	}

	// Pick the smallest metadata size whose JSON area holds the JSON; the
	// sizes written into the JSON do not change its length class.
	var hdrSize, keyslotsSize int64
	var js []byte
	for size := int64(minMetadataSize); size <= maxMetadataSize; size *= 2 {
		md.Config = outConfig{JSONSize: strconv.FormatInt(size-binHeaderSize, 10)}
		keyslotsSize = min(o.DataOffset-2*size, maxKeyslotsSize)
		md.Config.KeyslotsSize = strconv.FormatInt(keyslotsSize, 10)
		slot := md.Keyslots["0"]
		slot.Area.Offset = strconv.FormatInt(2*size, 10)
		md.Keyslots["0"] = slot
		js, err = json.Marshal(md)
		if err != nil {
			return nil, fmt.Errorf("luks: format: encoding JSON metadata: %w", err)
		}
		if int64(len(js)) < size-binHeaderSize { // room for the terminating NUL
			if keyslotsSize < areaSize {
				return nil, fmt.Errorf("luks: format: data offset %d leaves %d bytes for keyslots after two %d-byte header copies; need %d (raise DataOffset)",
					o.DataOffset, max(keyslotsSize, 0), size, areaSize)
			}
			hdrSize = size
			break
		}
	}
	if hdrSize == 0 {
		return nil, fmt.Errorf("luks: format: JSON metadata is %d bytes, more than the largest LUKS2 JSON area (%d bytes); shrink the tokens", len(js), maxMetadataSize-binHeaderSize)
	}

	uuid, err := newUUID()
	if err != nil {
		return nil, fmt.Errorf("luks: format: %w", err)
	}
	for _, off := range []int64{0, hdrSize} {
		buf, err := buildHeaderCopy(off, hdrSize, o.Label, uuid, js)
		if err != nil {
			return nil, err
		}
		if _, err := w.WriteAt(buf, off); err != nil {
			return nil, fmt.Errorf("luks: format: writing header copy at %d: %w", off, err)
		}
	}
	if _, err := w.WriteAt(material, 2*hdrSize); err != nil {
		return nil, fmt.Errorf("luks: format: writing keyslot area: %w", err)
	}
	if err := writeZeros(w, 2*hdrSize+int64(len(material)), 2*hdrSize+keyslotsSize); err != nil {
		return nil, fmt.Errorf("luks: format: wiping keyslots area: %w", err)
	}
	ok = true
	return &Unlocked{
		VolumeKey:  secret.Bytes(vk),
		Cipher:     CipherAESXTSPlain64,
		SectorSize: o.SectorSize,
		Offset:     o.DataOffset,
		Size:       -1,
		Keyslot:    0,
	}, nil
}

// buildHeaderCopy lays out one header copy with its checksum.
func buildHeaderCopy(off, hdrSize int64, label, uuid string, js []byte) ([]byte, error) {
	buf := make([]byte, hdrSize)
	if off == 0 {
		copy(buf, magicPrimary)
	} else {
		copy(buf, magicSecondary)
	}
	binary.BigEndian.PutUint16(buf[offVersion:], 2)
	binary.BigEndian.PutUint64(buf[offHdrSize:], uint64(hdrSize))
	binary.BigEndian.PutUint64(buf[offSeqID:], formatSeqID)
	copy(buf[offLabel:offLabel+lenLabel-1], label)
	copy(buf[offCsumAlg:], "sha256")
	if _, err := rand.Read(buf[offSalt : offSalt+lenSalt]); err != nil {
		return nil, fmt.Errorf("luks: format: random header salt: %w", err)
	}
	copy(buf[offUUID:offUUID+lenUUID-1], uuid)
	binary.BigEndian.PutUint64(buf[offHdrOffset:], uint64(off))
	copy(buf[binHeaderSize:], js)
	copy(buf[offCsum:], headerChecksum(buf, sha256.New))
	return buf, nil
}

func writeZeros(w io.WriterAt, from, to int64) error {
	zero := make([]byte, 1<<20)
	for off := from; off < to; {
		n := min(int64(len(zero)), to-off)
		if _, err := w.WriteAt(zero[:n], off); err != nil {
			return err
		}
		off += n
	}
	return nil
}

// newUUID returns a random (version 4) UUID string.
func newUUID() (string, error) {
	var u [16]byte
	if _, err := rand.Read(u[:]); err != nil {
		return "", fmt.Errorf("random UUID: %w", err)
	}
	u[6] = u[6]&0x0f | 0x40
	u[8] = u[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16]), nil
}
