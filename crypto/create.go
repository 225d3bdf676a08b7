package crypto

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"runtime"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/blobseal/blobseal/crypto/luks"
)

// FormatOptions control how CreateImage encrypts a plaintext image.
type FormatOptions struct {
	Format     string // "luks2" (default) or "plain"
	SectorSize int    // encryption sector, default 4096; must not exceed the filesystem block size
	KeyBytes   int    // XTS key: 64 (AES-256-XTS, default) or 32 (AES-128-XTS)

	// Keyslot KDF (LUKS2). The passphrase blobseal uses is 32 random bytes,
	// so a cheap KDF loses nothing; see DESIGN.md.
	PBKDF          string // "pbkdf2" (default), "argon2id" or "argon2i"
	Iterations     int    // pbkdf2 iterations or argon2 time cost; 0 = luks default
	ArgonMemoryKiB int
	ArgonThreads   int
	DataOffset     int64 // default 16 MiB
	Label          string

	// NoHoles encrypts every sector. By default all-zero runs of at least
	// HoleUnit bytes are left out of the image (never encrypted or stored)
	// and the header marks the image sparse (LUKS2 only; plain images have
	// no metadata). See sparse.go.
	NoHoles  bool
	HoleUnit int64 // default 64 KiB, a multiple of SectorSize

	Concurrency int                     // default GOMAXPROCS
	Progress    func(done, total int64) // called from one goroutine at a time
}

func (o FormatOptions) withDefaults() FormatOptions {
	if o.Format == "" {
		o.Format = "luks2"
	}
	if o.SectorSize == 0 {
		o.SectorSize = 4096
	}
	if o.KeyBytes == 0 {
		o.KeyBytes = 64
	}
	if o.PBKDF == "" {
		o.PBKDF = "pbkdf2"
	}
	if o.DataOffset == 0 {
		o.DataOffset = 16 << 20
	}
	if o.HoleUnit == 0 {
		o.HoleUnit = 64 << 10
	}
	if o.Concurrency <= 0 {
		o.Concurrency = runtime.GOMAXPROCS(0)
	}
	if o.Format == "plain" {
		o.NoHoles = true
		o.DataOffset = 0
	}
	return o
}

// chunkSize is the unit of work of the encrypting workers.
const chunkSize = 4 << 20

// Created describes what CreateImage wrote.
type Created struct {
	// Holes are the byte ranges of the data area left unwritten (all
	// zeros; image file offsets), sorted; HoleBytes is their total.
	Holes     []Run
	HoleBytes int64
	// Size is the size of the image file.
	Size int64
}

// CreateImage encrypts size bytes of plaintext into dst, which is truncated
// first. For "luks2" the passphrase unlocks the new keyslot (the key file's
// bytes); for "plain" it is the raw 32- or 64-byte XTS key. dst is left
// sparse where the plaintext had holes, and synced before return.
func CreateImage(ctx context.Context, dst *os.File, plaintext io.ReaderAt, size int64, passphrase []byte, opts FormatOptions) (*Created, error) {
	opts = opts.withDefaults()
	if err := checkGeometry(opts.SectorSize, size); err != nil {
		return nil, fmt.Errorf("plaintext image: %w", err)
	}
	if opts.HoleUnit%int64(opts.SectorSize) != 0 {
		return nil, fmt.Errorf("hole unit %d is not a multiple of the %d-byte sector", opts.HoleUnit, opts.SectorSize)
	}
	var key []byte
	switch opts.Format {
	case "luks2":
		if opts.KeyBytes != 32 && opts.KeyBytes != 64 {
			return nil, fmt.Errorf("key size must be 32 or 64 bytes (AES-128/256-XTS), not %d", opts.KeyBytes)
		}
		key = make([]byte, opts.KeyBytes)
		if _, err := rand.Read(key); err != nil {
			return nil, err
		}
		defer wipe(key)
	case "plain":
		if len(passphrase) != 32 && len(passphrase) != 64 {
			return nil, fmt.Errorf("a plain image needs a raw key of 32 or 64 bytes; the key file has %d bytes", len(passphrase))
		}
		key = passphrase
	default:
		return nil, fmt.Errorf("unknown image format %q (use luks2 or plain)", opts.Format)
	}

	if err := dst.Truncate(0); err != nil {
		return nil, err
	}
	if err := dst.Truncate(opts.DataOffset + size); err != nil {
		return nil, fmt.Errorf("size output image: %w", err)
	}
	vol, err := newVolume(dst, volumeParams{
		key: key, devSize: opts.DataOffset + size, sectorSize: opts.SectorSize, offset: opts.DataOffset, size: size, ivUnit: 512,
		info: Info{Format: opts.Format, Cipher: "aes-xts-plain64"},
	})
	if err != nil {
		return nil, err
	}
	defer vol.Close()

	holes, err := encryptAll(ctx, vol, dst, plaintext, size, opts)
	if err != nil {
		return nil, err
	}
	res := &Created{Size: opts.DataOffset + size}
	for _, h := range holes {
		res.Holes = append(res.Holes, Run{Off: opts.DataOffset + h.Off, Len: h.Len})
		res.HoleBytes += h.Len
	}
	if opts.Format == "luks2" {
		lo := luks.FormatOptions{
			SectorSize: opts.SectorSize, KeyBytes: opts.KeyBytes, PBKDF: opts.PBKDF,
			Iterations: opts.Iterations, ArgonTime: opts.Iterations, ArgonMemoryKiB: opts.ArgonMemoryKiB,
			ArgonThreads: opts.ArgonThreads, DataOffset: opts.DataOffset, Label: opts.Label, VolumeKey: key,
		}
		if len(holes) > 0 {
			lo.Tokens = map[string]json.RawMessage{"0": sparseToken()}
		}
		u, err := luks.Format(dst, passphrase, lo)
		if err != nil {
			return nil, fmt.Errorf("write LUKS2 header: %w", err)
		}
		u.Wipe()
	}
	if err := dst.Sync(); err != nil {
		return nil, fmt.Errorf("sync output image: %w", err)
	}
	return res, nil
}

// encryptAll encrypts the plaintext chunk by chunk on opts.Concurrency
// workers and returns the all-zero units it skipped (plaintext offsets).
func encryptAll(ctx context.Context, vol *Volume, dst io.WriterAt, plaintext io.ReaderAt, size int64, opts FormatOptions) ([]Run, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	chunks := make(chan int64)
	var (
		mu       sync.Mutex
		zeroUnit []int64 // offsets of all-zero hole units
		firstErr error
		done     atomic.Int64
		wg       sync.WaitGroup
	)
	fail := func(err error) {
		mu.Lock()
		if firstErr == nil {
			firstErr = err
		}
		mu.Unlock()
		cancel()
	}
	for range opts.Concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, chunkSize)
			for off := range chunks {
				n := min(int64(chunkSize), size-off)
				zeros, err := encryptChunk(vol, dst, plaintext, buf[:n], off, opts)
				if err != nil {
					fail(err)
					continue
				}
				mu.Lock()
				zeroUnit = append(zeroUnit, zeros...)
				mu.Unlock()
				done.Add(n)
			}
		}()
	}
	progressDone := make(chan struct{})
	go reportProgress(ctx, &done, size, opts.Progress, progressDone)
feed:
	for off := int64(0); off < size; off += chunkSize {
		select {
		case chunks <- off:
		case <-ctx.Done():
			break feed
		}
	}
	close(chunks)
	wg.Wait()
	cancel()
	<-progressDone
	if firstErr != nil {
		return nil, firstErr
	}
	if err := ctx.Err(); err != nil && done.Load() != size {
		return nil, err
	}
	if opts.Progress != nil {
		opts.Progress(size, size)
	}
	sort.Slice(zeroUnit, func(i, j int) bool { return zeroUnit[i] < zeroUnit[j] })
	var runs []Run
	for _, off := range zeroUnit {
		n := min(opts.HoleUnit, size-off)
		if k := len(runs) - 1; k >= 0 && runs[k].End() == off {
			runs[k].Len += n
			continue
		}
		runs = append(runs, Run{Off: off, Len: n})
	}
	return runs, nil
}

// encryptChunk encrypts buf's worth of plaintext at off, skipping (and
// returning) the hole units that are all zeros.
func encryptChunk(vol *Volume, dst io.WriterAt, plaintext io.ReaderAt, buf []byte, off int64, opts FormatOptions) ([]int64, error) {
	if n, err := plaintext.ReadAt(buf, off); n != len(buf) {
		return nil, fmt.Errorf("read plaintext at %d: %d of %d bytes: %v", off, n, len(buf), err)
	}
	var zeros []int64
	unit := opts.HoleUnit
	if opts.NoHoles {
		unit = int64(len(buf))
	}
	// Encrypt maximal runs of non-hole units with one call and one write.
	runStart := int64(-1)
	flush := func(end int64) error {
		if runStart < 0 {
			return nil
		}
		p := buf[runStart:end]
		if err := vol.encrypt(p, p, off+runStart); err != nil {
			return err
		}
		if _, err := dst.WriteAt(p, vol.offset+off+runStart); err != nil {
			return fmt.Errorf("write image at %d: %w", vol.offset+off+runStart, err)
		}
		runStart = -1
		return nil
	}
	for u := int64(0); u < int64(len(buf)); u += unit {
		end := min(u+unit, int64(len(buf)))
		if !opts.NoHoles && isZero(buf[u:end]) {
			if err := flush(u); err != nil {
				return nil, err
			}
			zeros = append(zeros, off+u)
			continue
		}
		if runStart < 0 {
			runStart = u
		}
	}
	return zeros, flush(int64(len(buf)))
}

func reportProgress(ctx context.Context, done *atomic.Int64, total int64, fn func(done, total int64), finished chan<- struct{}) {
	defer close(finished)
	if fn == nil {
		<-ctx.Done()
		return
	}
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			fn(done.Load(), total)
		}
	}
}
