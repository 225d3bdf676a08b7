package luks

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
)

// LUKS1 header layout (LUKS On-Disk Format Specification 1.2.3).
const (
	luks1HeaderSize    = 592
	l1OffCipherName    = 8
	l1OffCipherMode    = 40
	l1OffHashSpec      = 72
	l1OffPayloadOffset = 104
	l1OffKeyBytes      = 108
	l1OffMKDigest      = 112
	l1OffMKDigestSalt  = 132
	l1OffMKDigestIter  = 164
	l1OffUUID          = 168
	l1OffKeyslots      = 208
	l1KeyslotSize      = 48
	l1NumKeyslots      = 8
	l1DigestSize       = 20
	l1SaltSize         = 32
	l1KeyEnabled       = 0x00AC71F3
	l1KeyDisabled      = 0x0000DEAD
	luks1SectorSize    = 512
)

// parseLUKS1 converts a LUKS1 header into the LUKS2-shaped Header.
func parseLUKS1(b []byte, deviceSize int64) (*Header, error) {
	if len(b) < luks1HeaderSize {
		return nil, fmt.Errorf("header is %d bytes, shorter than the %d-byte LUKS1 header (truncated device?)", len(b), luks1HeaderSize)
	}
	cipher := cString(b[l1OffCipherName:l1OffCipherMode]) + "-" + cString(b[l1OffCipherMode:l1OffHashSpec])
	hashName := cString(b[l1OffHashSpec:l1OffPayloadOffset])
	if _, err := hashByName(hashName); err != nil {
		return nil, err
	}
	payload := int64(binary.BigEndian.Uint32(b[l1OffPayloadOffset:]))
	keyBytes := int(binary.BigEndian.Uint32(b[l1OffKeyBytes:]))
	if keyBytes <= 0 || keyBytes > maxKeySize {
		return nil, fmt.Errorf("key-bytes %d out of range 1..%d", keyBytes, maxKeySize)
	}
	iter := binary.BigEndian.Uint32(b[l1OffMKDigestIter:])
	if iter == 0 || iter > 1<<31-1 {
		return nil, fmt.Errorf("mk-digest-iter %d out of range", iter)
	}
	h := &Header{
		Version:    1,
		UUID:       cString(b[l1OffUUID:l1OffKeyslots]),
		Tokens:     map[string]json.RawMessage{},
		deviceSize: deviceSize,
	}
	h.Segments = []Segment{{
		ID: 0, Type: "crypt", Offset: payload * luks1SectorSize, Size: -1,
		Encryption: cipher, SectorSize: luks1SectorSize,
	}}
	dg := Digest{
		ID: 0, Type: "pbkdf2", Hash: hashName, Iterations: int(iter),
		Salt:     append([]byte(nil), b[l1OffMKDigestSalt:l1OffMKDigestSalt+l1SaltSize]...),
		Value:    append([]byte(nil), b[l1OffMKDigest:l1OffMKDigest+l1DigestSize]...),
		Segments: []int{0},
	}
	for i := 0; i < l1NumKeyslots; i++ {
		ks := b[l1OffKeyslots+i*l1KeyslotSize:]
		switch active := binary.BigEndian.Uint32(ks); active {
		case l1KeyDisabled:
			continue
		case l1KeyEnabled:
		default:
			return nil, fmt.Errorf("keyslot %d state 0x%08x is neither enabled nor disabled", i, active)
		}
		iters := binary.BigEndian.Uint32(ks[4:])
		if iters > 1<<31-1 {
			return nil, fmt.Errorf("keyslot %d iterations %d out of range", i, iters)
		}
		start := int64(binary.BigEndian.Uint32(ks[40:])) * luks1SectorSize
		stripes := int(binary.BigEndian.Uint32(ks[44:]))
		k := Keyslot{
			ID: i, Type: "luks1", KeySize: keyBytes, Priority: 1,
			Area: KeyslotArea{Type: "raw", Offset: start, Encryption: cipher, KeySize: keyBytes},
			KDF:  KDF{Type: "pbkdf2", Hash: hashName, Iterations: int(iters), Salt: append([]byte(nil), ks[8:8+l1SaltSize]...)},
			AF:   AntiForensic{Type: "luks1", Stripes: stripes, Hash: hashName},
		}
		if stripes > 0 && stripes <= maxStripes {
			k.Area.Size = afSectors(keyBytes, stripes)
		}
		if err := validateKeyslot(k); err != nil {
			return nil, err
		}
		if start < luks1SectorSize || (payload > 0 && start+k.Area.Size > payload*luks1SectorSize) {
			return nil, fmt.Errorf("keyslot %d key material at %d..%d overlaps the header or the payload at %d", i, start, start+k.Area.Size, payload*luks1SectorSize)
		}
		h.Keyslots = append(h.Keyslots, k)
		dg.Keyslots = append(dg.Keyslots, i)
	}
	h.Digests = []Digest{dg}
	if err := h.checkLayout(); err != nil {
		return nil, err
	}
	return h, nil
}
