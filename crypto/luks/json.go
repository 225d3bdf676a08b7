package luks

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"sort"
	"strconv"
)

// Limits from cryptsetup's LUKS2 implementation.
const (
	maxKeyslots = 32
	maxTokens   = 32
	maxSegments = 32
	maxDigests  = 8
	maxKeySize  = 512 // bytes; aes-xts uses 32 or 64
	maxStripes  = 65536
	maxSaltLen  = 1024
)

// metadata is the parsed LUKS2 JSON area.
type metadata struct {
	Keyslots []Keyslot
	Segments []Segment
	Digests  []Digest
	Config   Config
	Tokens   map[string]json.RawMessage
}

// u64String is a LUKS2 number stored as a decimal JSON string.
type u64String struct {
	v       int64
	dynamic bool
}

func (u *u64String) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("want a decimal number in a JSON string, got %.40s", b)
	}
	if s == "dynamic" {
		u.dynamic = true
		return nil
	}
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil || n > math.MaxInt64 {
		return fmt.Errorf("want a decimal number in a JSON string, got %q", truncate(s, 40))
	}
	u.v = int64(n)
	return nil
}

type jsonKeyslot struct {
	Type     string `json:"type"`
	KeySize  int    `json:"key_size"`
	Priority *int   `json:"priority"`
	AF       struct {
		Type    string `json:"type"`
		Stripes int    `json:"stripes"`
		Hash    string `json:"hash"`
	} `json:"af"`
	Area struct {
		Type       string    `json:"type"`
		Offset     u64String `json:"offset"`
		Size       u64String `json:"size"`
		Encryption string    `json:"encryption"`
		KeySize    int       `json:"key_size"`
	} `json:"area"`
	KDF struct {
		Type       string `json:"type"`
		Hash       string `json:"hash"`
		Iterations int    `json:"iterations"`
		Time       int    `json:"time"`
		Memory     int    `json:"memory"`
		CPUs       int    `json:"cpus"`
		Salt       []byte `json:"salt"`
	} `json:"kdf"`
}

type jsonSegment struct {
	Type       string     `json:"type"`
	Offset     *u64String `json:"offset"`
	Size       *u64String `json:"size"`
	IVTweak    *u64String `json:"iv_tweak"`
	Encryption string     `json:"encryption"`
	SectorSize int        `json:"sector_size"`
	Flags      []string   `json:"flags"`
}

type jsonDigest struct {
	Type       string   `json:"type"`
	Keyslots   []string `json:"keyslots"`
	Segments   []string `json:"segments"`
	Hash       string   `json:"hash"`
	Iterations int      `json:"iterations"`
	Salt       []byte   `json:"salt"`
	Digest     []byte   `json:"digest"`
}

type jsonConfig struct {
	JSONSize     *u64String `json:"json_size"`
	KeyslotsSize *u64String `json:"keyslots_size"`
	Flags        []string   `json:"flags"`
	Requirements struct {
		Mandatory []string `json:"mandatory"`
	} `json:"requirements"`
}

// parseJSON parses and structurally validates a LUKS2 JSON metadata object
// (without the trailing NUL padding). It checks types, ranges and references,
// not policy.
func parseJSON(data []byte) (*metadata, error) {
	var top map[string]json.RawMessage
	if err := json.Unmarshal(data, &top); err != nil {
		return nil, fmt.Errorf("JSON metadata is not a valid JSON object: %v", err)
	}
	for _, k := range []string{"keyslots", "tokens", "segments", "digests", "config"} {
		if v, ok := top[k]; !ok || bytes.Equal(bytes.TrimSpace(v), []byte("null")) {
			return nil, fmt.Errorf("JSON metadata has no %q object", k)
		}
	}
	var (
		rawKeyslots map[string]jsonKeyslot
		rawSegments map[string]jsonSegment
		rawDigests  map[string]jsonDigest
		rawTokens   map[string]json.RawMessage
		cfg         jsonConfig
	)
	for _, f := range []struct {
		name string
		dst  any
	}{{"keyslots", &rawKeyslots}, {"segments", &rawSegments}, {"digests", &rawDigests}, {"tokens", &rawTokens}, {"config", &cfg}} {
		if err := json.Unmarshal(top[f.name], f.dst); err != nil {
			return nil, fmt.Errorf("JSON metadata %q: %v", f.name, err)
		}
	}
	if len(rawKeyslots) > maxKeyslots || len(rawTokens) > maxTokens || len(rawSegments) > maxSegments || len(rawDigests) > maxDigests {
		return nil, fmt.Errorf("JSON metadata has too many objects (%d keyslots, %d tokens, %d segments, %d digests; limits %d, %d, %d, %d)",
			len(rawKeyslots), len(rawTokens), len(rawSegments), len(rawDigests), maxKeyslots, maxTokens, maxSegments, maxDigests)
	}

	md := &metadata{Tokens: map[string]json.RawMessage{}}
	for id, ks := range rawKeyslots {
		n, err := parseID("keyslot", id, maxKeyslots)
		if err != nil {
			return nil, err
		}
		k, err := convertKeyslot(n, ks)
		if err != nil {
			return nil, err
		}
		md.Keyslots = append(md.Keyslots, k)
	}
	sort.Slice(md.Keyslots, func(i, j int) bool { return md.Keyslots[i].ID < md.Keyslots[j].ID })

	for id, sg := range rawSegments {
		n, err := parseID("segment", id, maxSegments)
		if err != nil {
			return nil, err
		}
		s, err := convertSegment(n, sg)
		if err != nil {
			return nil, err
		}
		md.Segments = append(md.Segments, s)
	}
	sort.Slice(md.Segments, func(i, j int) bool { return md.Segments[i].ID < md.Segments[j].ID })

	for id, dg := range rawDigests {
		n, err := parseID("digest", id, maxDigests)
		if err != nil {
			return nil, err
		}
		d, err := convertDigest(n, dg, rawKeyslots, rawSegments)
		if err != nil {
			return nil, err
		}
		md.Digests = append(md.Digests, d)
	}
	sort.Slice(md.Digests, func(i, j int) bool { return md.Digests[i].ID < md.Digests[j].ID })

	for id, tok := range rawTokens {
		if _, err := parseID("token", id, maxTokens); err != nil {
			return nil, err
		}
		if err := checkToken(tok); err != nil {
			return nil, fmt.Errorf("token %s: %v", id, err)
		}
		md.Tokens[id] = tok
	}

	if cfg.JSONSize == nil || cfg.KeyslotsSize == nil || cfg.JSONSize.dynamic || cfg.KeyslotsSize.dynamic {
		return nil, errors.New(`JSON metadata "config" needs numeric "json_size" and "keyslots_size" strings`)
	}
	if cfg.KeyslotsSize.v%4096 != 0 {
		return nil, fmt.Errorf("config keyslots_size %d is not a multiple of 4096", cfg.KeyslotsSize.v)
	}
	md.Config = Config{JSONSize: cfg.JSONSize.v, KeyslotsSize: cfg.KeyslotsSize.v, Flags: cfg.Flags, Requirements: cfg.Requirements.Mandatory}
	return md, nil
}

// checkToken enforces what cryptsetup requires of a token: an object with a
// string "type" and a "keyslots" array of keyslot id strings.
func checkToken(tok json.RawMessage) error {
	var t struct {
		Type     *string  `json:"type"`
		Keyslots []string `json:"keyslots"`
	}
	if err := json.Unmarshal(tok, &t); err != nil {
		return fmt.Errorf("not a token object: %v", err)
	}
	if t.Type == nil || *t.Type == "" {
		return errors.New(`token has no "type" string`)
	}
	if t.Keyslots == nil {
		return errors.New(`token has no "keyslots" array`)
	}
	for _, k := range t.Keyslots {
		if _, err := parseID("token keyslot reference", k, maxKeyslots); err != nil {
			return err
		}
	}
	return nil
}

func parseID(kind, id string, limit int) (int, error) {
	n, err := strconv.Atoi(id)
	if err != nil || n < 0 || n >= limit || strconv.Itoa(n) != id {
		return 0, fmt.Errorf("%s id %q is not a number from 0 to %d", kind, truncate(id, 20), limit-1)
	}
	return n, nil
}

func convertKeyslot(id int, ks jsonKeyslot) (Keyslot, error) {
	k := Keyslot{ID: id, Type: ks.Type, KeySize: ks.KeySize, Priority: 1}
	if ks.Priority != nil {
		k.Priority = *ks.Priority
	}
	k.Area = KeyslotArea{Type: ks.Area.Type, Offset: ks.Area.Offset.v, Size: ks.Area.Size.v, Encryption: ks.Area.Encryption, KeySize: ks.Area.KeySize}
	k.KDF = KDF{Type: ks.KDF.Type, Hash: ks.KDF.Hash, Iterations: ks.KDF.Iterations, Time: ks.KDF.Time, MemoryKiB: ks.KDF.Memory, CPUs: ks.KDF.CPUs, Salt: ks.KDF.Salt}
	k.AF = AntiForensic{Type: ks.AF.Type, Stripes: ks.AF.Stripes, Hash: ks.AF.Hash}
	if ks.Type != "luks2" {
		// Reencryption and other keyslot types are listed but never unlocked.
		return k, nil
	}
	return k, validateKeyslot(k)
}

// validateKeyslot checks the shape of an unlockable keyslot (LUKS1 or LUKS2).
func validateKeyslot(k Keyslot) error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("keyslot %d: "+format, append([]any{k.ID}, a...)...)
	}
	if k.KeySize <= 0 || k.KeySize > maxKeySize {
		return bad("key_size %d out of range 1..%d", k.KeySize, maxKeySize)
	}
	if k.Priority < 0 || k.Priority > 2 {
		return bad("priority %d is not 0, 1 or 2", k.Priority)
	}
	if k.Area.Type != "raw" {
		return bad("area type %q is not \"raw\"", truncate(k.Area.Type, 20))
	}
	if k.Area.KeySize <= 0 || k.Area.KeySize > maxKeySize {
		return bad("area key_size %d out of range 1..%d", k.Area.KeySize, maxKeySize)
	}
	if k.Area.Encryption == "" {
		return bad("area has no encryption")
	}
	if k.AF.Type != "luks1" {
		return bad("anti-forensic splitter %q is not \"luks1\"", truncate(k.AF.Type, 20))
	}
	if k.AF.Stripes <= 0 || k.AF.Stripes > maxStripes {
		return bad("af stripes %d out of range 1..%d", k.AF.Stripes, maxStripes)
	}
	if _, err := hashByName(k.AF.Hash); err != nil {
		return bad("af %v", err)
	}
	if need := afSectors(k.KeySize, k.AF.Stripes); need > k.Area.Size {
		return bad("area size %d is smaller than the %d bytes of key material", k.Area.Size, need)
	}
	if len(k.KDF.Salt) == 0 || len(k.KDF.Salt) > maxSaltLen {
		return bad("kdf salt length %d out of range 1..%d", len(k.KDF.Salt), maxSaltLen)
	}
	switch k.KDF.Type {
	case "pbkdf2":
		if _, err := hashByName(k.KDF.Hash); err != nil {
			return bad("kdf %v", err)
		}
		if k.KDF.Iterations <= 0 {
			return bad("pbkdf2 iterations %d must be positive", k.KDF.Iterations)
		}
	case "argon2i", "argon2id":
		if k.KDF.Time <= 0 || k.KDF.MemoryKiB <= 0 || k.KDF.CPUs <= 0 {
			return bad("%s needs positive time, memory and cpus (got %d, %d, %d)", k.KDF.Type, k.KDF.Time, k.KDF.MemoryKiB, k.KDF.CPUs)
		}
	default:
		return bad("kdf type %q is not pbkdf2, argon2i or argon2id", truncate(k.KDF.Type, 20))
	}
	return nil
}

func convertSegment(id int, sg jsonSegment) (Segment, error) {
	s := Segment{ID: id, Type: sg.Type, Encryption: sg.Encryption, SectorSize: sg.SectorSize, Flags: sg.Flags}
	if sg.Offset == nil || sg.Offset.dynamic {
		return s, fmt.Errorf("segment %d has no numeric offset", id)
	}
	s.Offset = sg.Offset.v
	if sg.Size == nil {
		return s, fmt.Errorf("segment %d has no size", id)
	}
	s.Size = sg.Size.v
	if sg.Size.dynamic {
		s.Size = -1
	}
	if sg.Type != "crypt" {
		return s, nil
	}
	if sg.IVTweak == nil || sg.IVTweak.dynamic {
		return s, fmt.Errorf("segment %d has no numeric iv_tweak", id)
	}
	s.IVTweak = uint64(sg.IVTweak.v)
	if sg.Encryption == "" {
		return s, fmt.Errorf("segment %d has no encryption", id)
	}
	if sg.SectorSize <= 0 || sg.SectorSize > 1<<20 {
		return s, fmt.Errorf("segment %d sector_size %d out of range", id, sg.SectorSize)
	}
	return s, nil
}

func convertDigest(id int, dg jsonDigest, keyslots map[string]jsonKeyslot, segments map[string]jsonSegment) (Digest, error) {
	d := Digest{ID: id, Type: dg.Type, Hash: dg.Hash, Iterations: dg.Iterations, Salt: dg.Salt, Value: dg.Digest}
	if dg.Type != "pbkdf2" {
		return d, fmt.Errorf("digest %d type %q is not pbkdf2", id, truncate(dg.Type, 20))
	}
	if _, err := hashByName(dg.Hash); err != nil {
		return d, fmt.Errorf("digest %d: %v", id, err)
	}
	if dg.Iterations <= 0 {
		return d, fmt.Errorf("digest %d iterations %d must be positive", id, dg.Iterations)
	}
	if len(dg.Salt) == 0 || len(dg.Salt) > maxSaltLen {
		return d, fmt.Errorf("digest %d salt length %d out of range 1..%d", id, len(dg.Salt), maxSaltLen)
	}
	// A short digest would let a wrong key pass by chance.
	if len(dg.Digest) < 16 || len(dg.Digest) > 64 {
		return d, fmt.Errorf("digest %d length %d out of range 16..64", id, len(dg.Digest))
	}
	for _, ref := range dg.Keyslots {
		n, err := parseID("digest keyslot reference", ref, maxKeyslots)
		if err != nil {
			return d, fmt.Errorf("digest %d: %v", id, err)
		}
		if _, ok := keyslots[ref]; !ok {
			return d, fmt.Errorf("digest %d names keyslot %s, which does not exist", id, ref)
		}
		d.Keyslots = append(d.Keyslots, n)
	}
	for _, ref := range dg.Segments {
		n, err := parseID("digest segment reference", ref, maxSegments)
		if err != nil {
			return d, fmt.Errorf("digest %d: %v", id, err)
		}
		if _, ok := segments[ref]; !ok {
			return d, fmt.Errorf("digest %d names segment %s, which does not exist", id, ref)
		}
		d.Segments = append(d.Segments, n)
	}
	return d, nil
}

// afSectors is the size of AF-split key material rounded up to 512-byte
// sectors, as cryptsetup stores it.
func afSectors(keySize, stripes int) int64 {
	n := int64(keySize) * int64(stripes)
	return (n + 511) / 512 * 512
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
