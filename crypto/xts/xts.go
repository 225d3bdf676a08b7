// Package xts implements the aes-xts-plain64 sector cipher used by dm-crypt,
// cryptsetup LUKS1/LUKS2 and plain mode.
//
// A Cipher encrypts or decrypts runs of whole sectors. The IV ("plain64") of a
// sector is a little-endian 64-bit number padded to 16 bytes; the caller gives
// the IV of the first sector and how much it advances per sector, because
// LUKS2 counts IVs in 512-byte units even with 4096-byte sectors (step 8)
// while plain mode with --iv-large-sectors counts whole sectors (step 1).
//
// On amd64 the bulk work runs in assembly, best first: VAES on 512-bit
// registers when the CPU has AVX-512 with VAES and VPCLMULQDQ (AMD Zen 4,
// Intel Ice Lake and later); VAES on 256-bit registers with AVX2 (AMD Zen 3,
// e.g. Azure DCasv5/ECasv5 confidential VMs); else AES-NI with 8 blocks
// interleaved. Both VAES paths keep 16 blocks in flight, do a whole run of
// sectors per call and step the tweaks with vector carry-less multiplies.
// Elsewhere, or with the purego build tag, a portable table-driven AES is
// used. The AES key schedules live inside the Cipher so that Close can wipe
// them.
package xts

import (
	"encoding/binary"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"unsafe"
)

// Cipher is an AES-XTS sector cipher. It is safe for concurrent use until
// Close is called.
type Cipher struct {
	sectorSize int
	keyBytes   int
	impl       impl
	closed     atomic.Bool
	ks         keySchedules
}

// keySchedules holds every copy of key material a Cipher keeps. Round keys
// are stored as bytes in the order AES-NI loads them (FIPS-197 words,
// big-endian within the word), 16 bytes per round.
type keySchedules struct {
	rounds int              // 10 for AES-128, 14 for AES-256
	enc    [maxRKBytes]byte // data key, encryption round keys
	dec    [maxRKBytes]byte // data key, equivalent-inverse-cipher round keys
	tweak  [maxRKBytes]byte // tweak key, encryption round keys

	// Each data round key twice over (32 bytes a round), filled only for
	// the 256-bit VAES code, which reads round keys from memory.
	encWide, decWide [2 * maxRKBytes]byte
}

const maxRKBytes = 15 * 16

// parallelMin is the smallest run DecryptParallel/EncryptParallel spreads
// over goroutines; below it the goroutine start-up costs more than it saves.
const parallelMin = 256 << 10

// parallelChunk is the piece of work a goroutine takes at a time: about
// 5µs with VAES, large enough to amortise the hand-out.
const parallelChunk = 64 << 10

// ErrPartialSector reports a buffer that is not a whole number of sectors.
var ErrPartialSector = errors.New("xts: buffer is not a whole number of sectors")

// ErrClosed reports use of a Cipher after Close.
var ErrClosed = errors.New("xts: cipher used after Close")

// New returns a Cipher for a 32-byte (AES-128-XTS) or 64-byte (AES-256-XTS)
// key and a sector size that is a power of two between 512 and 4096.
func New(key []byte, sectorSize int) (*Cipher, error) {
	return newWithImpl(key, sectorSize, bestImpl())
}

func newWithImpl(key []byte, sectorSize int, im impl) (*Cipher, error) {
	if len(key) != 32 && len(key) != 64 {
		return nil, fmt.Errorf("xts: key must be 32 or 64 bytes, got %d", len(key))
	}
	if sectorSize < 512 || sectorSize > 4096 || sectorSize&(sectorSize-1) != 0 {
		return nil, fmt.Errorf("xts: sector size must be 512, 1024, 2048 or 4096, got %d", sectorSize)
	}
	if !im.available() {
		return nil, fmt.Errorf("xts: implementation %s is not available on this CPU/build", im)
	}
	half := len(key) / 2
	c := &Cipher{sectorSize: sectorSize, keyBytes: len(key), impl: im}
	c.ks.rounds = half/4 + 6
	expandKey(c.ks.enc[:], key[:half])
	expandKey(c.ks.tweak[:], key[half:])
	invertKeySchedule(c.ks.dec[:], c.ks.enc[:], c.ks.rounds)
	if im == implVAESYMM {
		widen(c.ks.encWide[:], c.ks.enc[:])
		widen(c.ks.decWide[:], c.ks.dec[:])
	}
	return c, nil
}

// SectorSize returns the encryption sector size in bytes.
func (c *Cipher) SectorSize() int { return c.sectorSize }

// KeySize returns the key length in bytes (32 or 64).
func (c *Cipher) KeySize() int { return c.keyBytes }

// Encrypt encrypts len(src)/SectorSize() sectors from src into dst. The first
// sector uses IV number iv, each following one iv advanced by ivStep.
// dst and src may overlap entirely or not at all.
func (c *Cipher) Encrypt(dst, src []byte, iv, ivStep uint64) error {
	if err := c.check(dst, src); err != nil {
		return err
	}
	c.crypt(false, dst, src, iv, ivStep)
	return nil
}

// Decrypt is the inverse of Encrypt.
func (c *Cipher) Decrypt(dst, src []byte, iv, ivStep uint64) error {
	if err := c.check(dst, src); err != nil {
		return err
	}
	c.crypt(true, dst, src, iv, ivStep)
	return nil
}

// EncryptParallel is Encrypt spread over up to GOMAXPROCS goroutines when src
// is at least 256 KiB; smaller runs are done inline.
func (c *Cipher) EncryptParallel(dst, src []byte, iv, ivStep uint64) error {
	if err := c.check(dst, src); err != nil {
		return err
	}
	c.cryptParallel(false, dst, src, iv, ivStep)
	return nil
}

// DecryptParallel is Decrypt spread over up to GOMAXPROCS goroutines when src
// is at least 256 KiB; smaller runs are done inline.
func (c *Cipher) DecryptParallel(dst, src []byte, iv, ivStep uint64) error {
	if err := c.check(dst, src); err != nil {
		return err
	}
	c.cryptParallel(true, dst, src, iv, ivStep)
	return nil
}

// cryptParallel hands out parallelChunk-sized pieces from a shared counter
// to the calling goroutine and up to GOMAXPROCS-1 helpers. Pulling work
// rather than pre-splitting it means a helper that is slow to be scheduled
// (a busy machine) costs at most the piece it holds, not a fixed share.
func (c *Cipher) cryptParallel(decrypt bool, dst, src []byte, iv, ivStep uint64) {
	workers := runtime.GOMAXPROCS(0)
	if len(src) < parallelMin || workers < 2 {
		c.crypt(decrypt, dst, src, iv, ivStep)
		return
	}
	// parallelChunk is a multiple of every sector size, so pieces are
	// whole sectors.
	pieces := (len(src) + parallelChunk - 1) / parallelChunk
	var next atomic.Int64
	work := func() {
		for {
			i := int(next.Add(1) - 1)
			if i >= pieces {
				return
			}
			lo := i * parallelChunk
			hi := min(lo+parallelChunk, len(src))
			c.crypt(decrypt, dst[lo:hi], src[lo:hi], iv+uint64(lo/c.sectorSize)*ivStep, ivStep)
		}
	}
	var wg sync.WaitGroup
	for range min(workers, pieces) - 1 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			work()
		}()
	}
	work()
	wg.Wait()
}

// crypt transforms whole sectors; arguments are already checked.
func (c *Cipher) crypt(decrypt bool, dst, src []byte, iv, ivStep uint64) {
	if cryptSectorsAsm(c.impl, &c.ks, decrypt, dst, src, c.sectorSize, iv, ivStep) {
		return
	}
	var ivBlock, tweak [16]byte
	ss := c.sectorSize
	for off := 0; off < len(src); off += ss {
		binary.LittleEndian.PutUint64(ivBlock[:8], iv)
		c.impl.encryptBlock(&c.ks, &tweak, &ivBlock)
		c.impl.cryptBlocks(&c.ks, decrypt, dst[off:off+ss], src[off:off+ss], &tweak)
		iv += ivStep
	}
	clear(tweak[:])
}

// cryptUnit runs XTS over one data unit of any whole number of blocks; the
// known-answer tests use it for IEEE 1619's 32-byte units.
func (c *Cipher) cryptUnit(decrypt bool, dst, src []byte, iv uint64) {
	var ivBlock, tweak [16]byte
	binary.LittleEndian.PutUint64(ivBlock[:8], iv)
	c.impl.encryptBlock(&c.ks, &tweak, &ivBlock)
	c.impl.cryptBlocks(&c.ks, decrypt, dst[:len(src)], src, &tweak)
}

func (c *Cipher) check(dst, src []byte) error {
	if c.closed.Load() {
		return ErrClosed
	}
	if len(src)%c.sectorSize != 0 {
		return ErrPartialSector
	}
	if len(dst) < len(src) {
		return fmt.Errorf("xts: output buffer (%d bytes) smaller than input (%d bytes)", len(dst), len(src))
	}
	if inexactOverlap(dst[:len(src)], src) {
		return errors.New("xts: dst and src overlap partially; use the same buffer or separate ones")
	}
	return nil
}

// inexactOverlap reports whether x and y share memory at different offsets,
// which would make in-place block processing read already-written output.
func inexactOverlap(x, y []byte) bool {
	if len(x) == 0 || len(y) == 0 || &x[0] == &y[0] {
		return false
	}
	xs, ys := uintptr(unsafe.Pointer(&x[0])), uintptr(unsafe.Pointer(&y[0]))
	return xs < ys+uintptr(len(y)) && ys < xs+uintptr(len(x))
}

// String never reveals key material.
func (c *Cipher) String() string {
	return fmt.Sprintf("aes-xts-plain64(%d-bit, %d-byte sectors)", c.keyBytes*4, c.sectorSize)
}

// Close wipes the key schedules. The Cipher must not be used afterwards;
// Encrypt and Decrypt then return ErrClosed.
func (c *Cipher) Close() {
	c.closed.Store(true)
	clear(c.ks.enc[:])
	clear(c.ks.dec[:])
	clear(c.ks.tweak[:])
	clear(c.ks.encWide[:])
	clear(c.ks.decWide[:])
}

// impl selects the code that does the block work.
type impl int

const (
	implGeneric impl = iota // portable Go
	implAESNI               // amd64 AES-NI, 8 blocks interleaved
	implVAES                // amd64 AVX-512 VAES, 16 blocks in flight
	implVAESYMM             // amd64 AVX2 VAES without AVX-512, 16 blocks in flight
)

func (im impl) String() string {
	switch im {
	case implGeneric:
		return "purego"
	case implAESNI:
		return "aesni"
	case implVAES:
		return "vaes"
	case implVAESYMM:
		return "vaes-ymm"
	}
	return fmt.Sprintf("impl(%d)", int(im))
}

// bestImpl is the fastest implementation this CPU and build support.
func bestImpl() impl {
	for _, im := range []impl{implVAES, implVAESYMM, implAESNI} {
		if im.available() {
			return im
		}
	}
	return implGeneric
}

// availableImpls lists every implementation usable here, for tests.
func availableImpls() []impl {
	var out []impl
	for _, im := range []impl{implVAES, implVAESYMM, implAESNI, implGeneric} {
		if im.available() {
			out = append(out, im)
		}
	}
	return out
}

func (im impl) available() bool {
	switch im {
	case implGeneric:
		return true
	case implAESNI:
		return haveAESNI()
	case implVAES:
		return haveVAES()
	case implVAESYMM:
		return haveVAESYMM()
	}
	return false
}

// encryptBlock encrypts one block with the tweak key.
func (im impl) encryptBlock(ks *keySchedules, dst, src *[16]byte) {
	if im == implGeneric {
		encryptBlockGeneric(ks.rounds, ks.tweak[:], dst[:], src[:])
		return
	}
	encryptTweakAsm(ks, dst, src)
}

// cryptBlocks runs XTS over len(src)/16 blocks starting from tweak, which it
// advances past the last block.
func (im impl) cryptBlocks(ks *keySchedules, decrypt bool, dst, src []byte, tweak *[16]byte) {
	if im == implGeneric {
		cryptBlocksGeneric(ks, decrypt, dst, src, tweak)
		return
	}
	cryptBlocksAsm(im == implVAES, ks, decrypt, dst, src, tweak)
}

func cryptBlocksGeneric(ks *keySchedules, decrypt bool, dst, src []byte, tweak *[16]byte) {
	rk := ks.enc[:]
	if decrypt {
		rk = ks.dec[:]
	}
	xtsGeneric(ks.rounds, rk, decrypt, dst, src, tweak)
}
