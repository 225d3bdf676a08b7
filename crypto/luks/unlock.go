package luks

import (
	"context"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
	"slices"
	"sort"
	"strings"

	"golang.org/x/crypto/argon2"
	"golang.org/x/crypto/pbkdf2"

	"github.com/blobseal/blobseal/crypto/xts"
	"github.com/blobseal/blobseal/internal/secret"
)

// keyslotSectorSize is the sector size cryptsetup uses to encrypt keyslot
// areas; their IVs count from 0 at the area start.
const keyslotSectorSize = 512

// Unlock is UnlockContext without cancellation.
func (h *Header) Unlock(r io.ReaderAt, passphrase []byte, pol Policy) (*Unlocked, error) {
	return h.UnlockContext(context.Background(), r, passphrase, pol)
}

// UnlockContext derives the volume key of the data segment from passphrase,
// trying every keyslot bound to that segment (high priority first,
// "ignore" priority never, as cryptsetup does). The header's ciphers and
// sector sizes are checked against pol before any key is derived, and the
// KDF work is bounded per keyslot and in total (pol's limits). Cancelling
// ctx stops between keyslots and abandons a derivation in progress. r must
// be the device the header was read from.
func (h *Header) UnlockContext(ctx context.Context, r io.ReaderAt, passphrase []byte, pol Policy) (*Unlocked, error) {
	if h == nil || r == nil {
		return nil, errors.New("luks: Unlock needs a header and a reader")
	}
	pol, err := pol.withDefaults()
	if err != nil {
		return nil, err
	}
	if len(h.Config.Requirements) > 0 {
		return nil, fmt.Errorf("luks: header has mandatory requirements %q (e.g. an unfinished reencryption); finish it with cryptsetup first: %w",
			h.Config.Requirements, ErrUnsupported)
	}
	seg, err := h.dataSegment()
	if err != nil {
		return nil, err
	}
	if err := pol.checkCipher(fmt.Sprintf("data segment %d", seg.ID), seg.Encryption); err != nil {
		return nil, err
	}
	if err := pol.checkSectorSize(fmt.Sprintf("data segment %d", seg.ID), seg.SectorSize); err != nil {
		return nil, err
	}
	if seg.Offset%512 != 0 || (seg.Size > 0 && seg.Size%int64(seg.SectorSize) != 0) {
		return nil, fmt.Errorf("luks: %w: data segment %d offset %d or size %d is not sector aligned", ErrCorruptHeader, seg.ID, seg.Offset, seg.Size)
	}
	dg, err := h.segmentDigest(seg.ID)
	if err != nil {
		return nil, err
	}
	if dg.Iterations > pol.MaxIterations {
		return nil, fmt.Errorf("luks: digest %d asks for %d pbkdf2 iterations, more than the limit %d: %w", dg.ID, dg.Iterations, pol.MaxIterations, ErrKDFLimit)
	}

	// Every keyslot that could unlock the segment must pass the policy:
	// a forged slot is refused outright, not skipped.
	var slots []Keyslot
	for _, k := range h.Keyslots {
		if !slices.Contains(dg.Keyslots, k.ID) || (k.Type != "luks2" && k.Type != "luks1") {
			continue
		}
		if err := pol.checkCipher(fmt.Sprintf("keyslot %d area", k.ID), k.Area.Encryption); err != nil {
			return nil, err
		}
		if err := checkXTSKey(fmt.Sprintf("keyslot %d area", k.ID), k.Area.KeySize); err != nil {
			return nil, err
		}
		if err := checkXTSKey(fmt.Sprintf("keyslot %d volume", k.ID), k.KeySize); err != nil {
			return nil, err
		}
		if k.Priority == 0 {
			continue
		}
		slots = append(slots, k)
	}
	if len(slots) == 0 {
		return nil, fmt.Errorf("luks: no usable keyslot is bound to data segment %d (none, or all have priority \"ignore\"): %w", seg.ID, ErrWrongKey)
	}
	sort.SliceStable(slots, func(i, j int) bool { return slots[i].Priority > slots[j].Priority })

	var tried []string
	var limitErrs []error
	var b budget
	for _, k := range slots {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("luks: unlock interrupted: %w", err)
		}
		if err := checkKDFLimits(k, pol); err != nil {
			limitErrs = append(limitErrs, err)
			continue
		}
		if err := b.spend(k, dg, pol); err != nil {
			limitErrs = append(limitErrs, err)
			continue
		}
		key, err := derive(ctx, func() ([]byte, error) { return unlockKeyslot(r, k, passphrase) })
		if err != nil {
			return nil, fmt.Errorf("luks: keyslot %d: %w", k.ID, err)
		}
		tried = append(tried, fmt.Sprint(k.ID))
		ok, err := checkDigest(dg, key)
		if err != nil {
			secret.Wipe(key)
			return nil, err
		}
		if ok {
			return &Unlocked{
				VolumeKey:  secret.Bytes(key),
				Cipher:     seg.Encryption,
				SectorSize: seg.SectorSize,
				Offset:     seg.Offset,
				Size:       seg.Size,
				IVTweak:    seg.IVTweak,
				Keyslot:    k.ID,
			}, nil
		}
		secret.Wipe(key)
	}
	if len(tried) == 0 {
		return nil, fmt.Errorf("luks: every keyslot exceeds the KDF limits: %w", errors.Join(limitErrs...))
	}
	err = fmt.Errorf("luks: %w (tried keyslot %s)", ErrWrongKey, strings.Join(tried, ", "))
	if len(limitErrs) > 0 {
		err = fmt.Errorf("%w; skipped: %w", err, errors.Join(limitErrs...))
	}
	return nil, err
}

// budget accounts the KDF work of one Unlock against the policy's totals.
type budget struct {
	iterations int64 // pbkdf2, keyslots and digest checks
	argonWork  int64 // KiB × passes
}

// spend charges keyslot k and the digest check after it, or refuses.
func (b *budget) spend(k Keyslot, dg Digest, pol Policy) error {
	iters, work := int64(dg.Iterations), int64(0)
	switch k.KDF.Type {
	case "pbkdf2":
		iters += int64(k.KDF.Iterations)
	default: // argon2i, argon2id: checkKDFLimits admitted nothing else
		work = int64(k.KDF.MemoryKiB) * int64(k.KDF.Time)
	}
	if b.iterations+iters > pol.MaxTotalIterations {
		return fmt.Errorf("keyslot %d would bring this unlock to %d pbkdf2 iterations, more than the total limit %d: %w", k.ID, b.iterations+iters, pol.MaxTotalIterations, ErrKDFLimit)
	}
	if b.argonWork+work > pol.MaxTotalArgonWork {
		return fmt.Errorf("keyslot %d would bring this unlock to %d KiB-passes of argon2, more than the total limit %d: %w", k.ID, b.argonWork+work, pol.MaxTotalArgonWork, ErrKDFLimit)
	}
	b.iterations += iters
	b.argonWork += work
	return nil
}

// derive runs a key derivation that cannot be interrupted, returning early
// when ctx ends; the abandoned result is wiped when it arrives.
func derive(ctx context.Context, fn func() ([]byte, error)) ([]byte, error) {
	type result struct {
		key []byte
		err error
	}
	done := make(chan result, 1)
	go func() {
		k, err := fn()
		done <- result{k, err}
	}()
	select {
	case r := <-done:
		return r.key, r.err
	case <-ctx.Done():
		go func() { secret.Wipe((<-done).key) }()
		return nil, fmt.Errorf("unlock interrupted: %w", ctx.Err())
	}
}

// dataSegment returns the single crypt segment.
func (h *Header) dataSegment() (Segment, error) {
	if len(h.Segments) != 1 {
		return Segment{}, fmt.Errorf("luks: header has %d segments; only a single data segment is supported (reencryption in progress?): %w", len(h.Segments), ErrUnsupported)
	}
	s := h.Segments[0]
	if s.Type != "crypt" {
		return s, fmt.Errorf("luks: segment %d has type %q, not \"crypt\": %w", s.ID, truncate(s.Type, 20), ErrUnsupported)
	}
	return s, nil
}

func (h *Header) segmentDigest(seg int) (Digest, error) {
	for _, d := range h.Digests {
		if slices.Contains(d.Segments, seg) {
			return d, nil
		}
	}
	return Digest{}, fmt.Errorf("luks: %w: no digest is bound to data segment %d", ErrCorruptHeader, seg)
}

func checkXTSKey(what string, n int) error {
	if n != 32 && n != 64 {
		return fmt.Errorf("luks: %s key is %d bytes; aes-xts-plain64 needs 32 or 64: %w", what, n, ErrCorruptHeader)
	}
	return nil
}

func checkKDFLimits(k Keyslot, pol Policy) error {
	switch k.KDF.Type {
	case "pbkdf2":
		if k.KDF.Iterations > pol.MaxIterations {
			return fmt.Errorf("keyslot %d asks for %d pbkdf2 iterations, more than the limit %d: %w", k.ID, k.KDF.Iterations, pol.MaxIterations, ErrKDFLimit)
		}
	case "argon2i", "argon2id":
		if k.KDF.MemoryKiB > pol.MaxArgonMemoryKiB {
			return fmt.Errorf("keyslot %d asks for %d KiB of argon2 memory, more than the limit %d KiB: %w", k.ID, k.KDF.MemoryKiB, pol.MaxArgonMemoryKiB, ErrKDFLimit)
		}
		if k.KDF.Time > pol.MaxArgonTime {
			return fmt.Errorf("keyslot %d asks for argon2 time cost %d, more than the limit %d: %w", k.ID, k.KDF.Time, pol.MaxArgonTime, ErrKDFLimit)
		}
		if k.KDF.CPUs > pol.MaxArgonThreads {
			return fmt.Errorf("keyslot %d asks for %d argon2 threads, more than the limit %d: %w", k.ID, k.KDF.CPUs, pol.MaxArgonThreads, ErrKDFLimit)
		}
	default:
		return fmt.Errorf("keyslot %d kdf %q is not supported: %w", k.ID, truncate(k.KDF.Type, 20), ErrUnsupported)
	}
	return nil
}

// deriveKey runs the keyslot KDF. The caller wipes the result.
func deriveKey(kdf KDF, passphrase []byte, keyLen int) ([]byte, error) {
	switch kdf.Type {
	case "pbkdf2":
		h, err := hashByName(kdf.Hash)
		if err != nil {
			return nil, err
		}
		return pbkdf2.Key(passphrase, kdf.Salt, kdf.Iterations, keyLen, h), nil
	case "argon2i":
		return argon2.Key(passphrase, kdf.Salt, uint32(kdf.Time), uint32(kdf.MemoryKiB), uint8(kdf.CPUs), uint32(keyLen)), nil
	case "argon2id":
		return argon2.IDKey(passphrase, kdf.Salt, uint32(kdf.Time), uint32(kdf.MemoryKiB), uint8(kdf.CPUs), uint32(keyLen)), nil
	}
	return nil, fmt.Errorf("kdf %q is not supported", truncate(kdf.Type, 20))
}

// unlockKeyslot returns the candidate volume key of keyslot k.
func unlockKeyslot(r io.ReaderAt, k Keyslot, passphrase []byte) ([]byte, error) {
	afHash, err := hashByName(k.AF.Hash)
	if err != nil {
		return nil, err
	}
	n := afSectors(k.KeySize, k.AF.Stripes)
	material := make([]byte, n)
	defer secret.Wipe(material)
	if err := readAtFull(r, material, k.Area.Offset); err != nil {
		return nil, fmt.Errorf("key material: %w", err)
	}
	areaKey, err := deriveKey(k.KDF, passphrase, k.Area.KeySize)
	if err != nil {
		return nil, err
	}
	c, err := xts.New(areaKey, keyslotSectorSize)
	secret.Wipe(areaKey)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	if err := c.Decrypt(material, material, 0, 1); err != nil {
		return nil, err
	}
	return afMerge(material, k.KeySize, k.AF.Stripes, afHash), nil
}

// checkDigest reports whether key matches the pbkdf2 digest.
func checkDigest(d Digest, key []byte) (bool, error) {
	h, err := hashByName(d.Hash)
	if err != nil {
		return false, fmt.Errorf("luks: digest %d: %w", d.ID, err)
	}
	got := pbkdf2.Key(key, d.Salt, d.Iterations, len(d.Value), h)
	return subtle.ConstantTimeCompare(got, d.Value) == 1, nil
}

// afMerge reverses the LUKS anti-forensic split: stripes blocks of keySize
// bytes, each XORed into a running buffer that is diffused with the hash.
func afMerge(material []byte, keySize, stripes int, newHash func() hash.Hash) []byte {
	d := make([]byte, keySize)
	for i := 0; i < stripes-1; i++ {
		subtle.XORBytes(d, d, material[i*keySize:(i+1)*keySize])
		diffuse(d, newHash)
	}
	subtle.XORBytes(d, d, material[(stripes-1)*keySize:stripes*keySize])
	return d
}

// afSplit is the inverse of afMerge; random supplies stripes-1 blocks.
func afSplit(key []byte, stripes int, random []byte, newHash func() hash.Hash) []byte {
	keySize := len(key)
	out := make([]byte, afSectors(keySize, stripes))
	copy(out, random[:(stripes-1)*keySize])
	d := make([]byte, keySize)
	defer secret.Wipe(d)
	for i := 0; i < stripes-1; i++ {
		subtle.XORBytes(d, d, out[i*keySize:(i+1)*keySize])
		diffuse(d, newHash)
	}
	subtle.XORBytes(out[(stripes-1)*keySize:stripes*keySize], d, key)
	return out
}

// diffuse hashes buf in place in digest-sized chunks, each prefixed by its
// big-endian 32-bit index; a final partial chunk keeps its length.
func diffuse(buf []byte, newHash func() hash.Hash) {
	h := newHash()
	ds := h.Size()
	var idx [4]byte
	var sum []byte
	for i, off := 0, 0; off < len(buf); i, off = i+1, off+ds {
		end := min(off+ds, len(buf))
		h.Reset()
		binary.BigEndian.PutUint32(idx[:], uint32(i))
		h.Write(idx[:])
		h.Write(buf[off:end])
		sum = h.Sum(sum[:0])
		copy(buf[off:end], sum)
	}
	secret.Wipe(sum)
}
