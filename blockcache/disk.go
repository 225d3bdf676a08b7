package blockcache

import (
	"bytes"
	"container/list"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// The disk tier keeps source bytes (ciphertext: the cache sits below the
// decrypting volume) in one file per block under
// DiskDir/<sha256(source name)[:16]>/, next to a meta file naming the source
// version and block size. A block file is
//
//	magic[8] "BSBLK\x00\x00\x01" | tag[32] | index u64 | length u64 | sha256[32] | data
//
// where tag = sha256(source name, version, block size) and the checksum covers
// everything before it plus the data, so a torn or corrupted file, or one left
// by another version, is never served. Files are written to a temporary name
// and renamed into place. A source without a version cannot be revalidated
// across restarts, so its directory is emptied at start.
//
// The checksum detects corruption, not tampering: whoever can write this
// directory can forge it, just as the storage operator can rewrite the blob.

const (
	blockMagic      = "BSBLK\x00\x00\x01"
	blockHeaderSize = 8 + 32 + 8 + 8 + 32
	metaName        = "meta"
	blockSuffix     = ".blk"
	tempSuffix      = ".tmp"
)

// errCorrupt marks a disk block that failed verification.
var errCorrupt = errors.New("disk cache block failed verification")

type diskEntry struct {
	index int64
	size  int64 // file size
}

type diskTier struct {
	dir   string
	bs    int64
	tag   [32]byte
	limit int64
	log   *slog.Logger
	st    *counters

	mu      sync.Mutex
	entries map[int64]*list.Element // of diskEntry; front = most recently used
	lru     list.List
	used    int64
}

// versionTag binds disk blocks to one source, version and block size.
func versionTag(name, version string, bs int64) [32]byte {
	h := sha256.New()
	fmt.Fprintf(h, "blobseal-blockcache\x00%s\x00%s\x00%d", name, version, bs)
	var t [32]byte
	h.Sum(t[:0])
	return t
}

// openDiskTier prepares the directory for src, keeping blocks from an earlier
// run only when the meta file matches (same version and block size).
func openDiskTier(root, name, version string, versioned bool, bs, limit int64, log *slog.Logger, st *counters) (*diskTier, error) {
	nameSum := sha256.Sum256([]byte(name))
	dir := filepath.Join(root, hex.EncodeToString(nameSum[:16]))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("blockcache: creating disk cache directory (check DiskDir): %w", err)
	}
	d := &diskTier{
		dir: dir, bs: bs, tag: versionTag(name, version, bs), limit: limit,
		log: log, st: st, entries: make(map[int64]*list.Element),
	}
	want := fmt.Sprintf("blobseal blockcache v1\ntag %x\n", d.tag)
	got, err := os.ReadFile(filepath.Join(dir, metaName))
	reuse := versioned && err == nil && string(got) == want
	if err := d.scan(reuse); err != nil {
		return nil, err
	}
	if !reuse {
		if err := writeFileAtomic(dir, metaName, []byte(want)); err != nil {
			return nil, err
		}
		if versioned {
			log.Info("blockcache: disk tier starts empty (new source version or block size)", "source", name)
		} else {
			log.Info("blockcache: source has no version; disk tier is used for this run only", "source", name)
		}
	} else {
		log.Info("blockcache: reusing disk tier", "source", name, "blocks", d.lru.Len(), "bytes", d.used)
	}
	st.diskBytes.Store(d.used)
	return d, nil
}

// scan indexes existing block files (oldest first in LRU order) or, when
// they cannot be reused, deletes them; it always deletes temporary files.
func (d *diskTier) scan(reuse bool) error {
	des, err := os.ReadDir(d.dir)
	if err != nil {
		return fmt.Errorf("blockcache: reading disk cache directory: %w", err)
	}
	type found struct {
		e     diskEntry
		mtime time.Time
	}
	var keep []found
	for _, de := range des {
		name := de.Name()
		path := filepath.Join(d.dir, name)
		switch {
		case strings.HasSuffix(name, tempSuffix):
			_ = os.Remove(path)
		case strings.HasSuffix(name, blockSuffix):
			idx, perr := strconv.ParseInt(strings.TrimSuffix(name, blockSuffix), 16, 64)
			info, ierr := de.Info()
			if !reuse || perr != nil || ierr != nil || !info.Mode().IsRegular() || idx < 0 ||
				info.Size() <= blockHeaderSize || info.Size() > blockHeaderSize+d.bs {
				_ = os.Remove(path)
				continue
			}
			keep = append(keep, found{diskEntry{idx, info.Size()}, info.ModTime()})
		}
	}
	sort.Slice(keep, func(i, j int) bool { return keep[i].mtime.Before(keep[j].mtime) })
	for _, f := range keep {
		d.entries[f.e.index] = d.lru.PushFront(f.e)
		d.used += f.e.size
	}
	for _, victim := range d.trimLocked() {
		_ = os.Remove(victim)
	}
	return nil
}

func (d *diskTier) blockPath(idx int64) string {
	return filepath.Join(d.dir, fmt.Sprintf("%016x%s", idx, blockSuffix))
}

// has reports whether block idx is on disk (it may still fail verification).
func (d *diskTier) has(idx int64) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	_, ok := d.entries[idx]
	return ok
}

// read fills dst (the block's exact length) from disk and verifies it. On any
// failure the file is dropped so the block is refetched.
func (d *diskTier) read(idx int64, dst []byte) error {
	err := d.readFile(idx, dst)
	if err == nil {
		d.mu.Lock()
		if el, ok := d.entries[idx]; ok {
			d.lru.MoveToFront(el)
		}
		d.mu.Unlock()
		d.st.diskHits.Add(1)
		return nil
	}
	if errors.Is(err, errCorrupt) {
		d.st.diskCorrupt.Add(1)
		d.log.Warn("blockcache: disk cache block is corrupt; refetching", "block", idx, "err", err)
	}
	d.drop(idx)
	return err
}

func (d *diskTier) readFile(idx int64, dst []byte) error {
	f, err := os.Open(d.blockPath(idx))
	if err != nil {
		return err
	}
	defer f.Close()
	var hdr [blockHeaderSize]byte
	if _, err := io.ReadFull(f, hdr[:]); err != nil {
		return fmt.Errorf("%w: header: %v", errCorrupt, err)
	}
	if _, err := io.ReadFull(f, dst); err != nil {
		return fmt.Errorf("%w: data: %v", errCorrupt, err)
	}
	var extra [1]byte
	if n, _ := f.Read(extra[:]); n != 0 {
		return fmt.Errorf("%w: trailing bytes", errCorrupt)
	}
	return verifyBlock(hdr[:], dst, d.tag, idx)
}

// encodeHeader builds the header for data of block idx.
func encodeHeader(hdr []byte, tag [32]byte, idx int64, data []byte) {
	copy(hdr[0:8], blockMagic)
	copy(hdr[8:40], tag[:])
	binary.LittleEndian.PutUint64(hdr[40:48], uint64(idx))
	binary.LittleEndian.PutUint64(hdr[48:56], uint64(len(data)))
	h := sha256.New()
	h.Write(hdr[:56])
	h.Write(data)
	h.Sum(hdr[56:56])
}

// verifyBlock checks a header read from disk against the data, the expected
// tag and block index.
func verifyBlock(hdr, data []byte, tag [32]byte, idx int64) error {
	if len(hdr) != blockHeaderSize {
		return fmt.Errorf("%w: header is %d bytes, want %d", errCorrupt, len(hdr), blockHeaderSize)
	}
	if string(hdr[0:8]) != blockMagic {
		return fmt.Errorf("%w: bad magic", errCorrupt)
	}
	if !bytes.Equal(hdr[8:40], tag[:]) {
		return fmt.Errorf("%w: written for another source version or block size", errCorrupt)
	}
	if got := binary.LittleEndian.Uint64(hdr[40:48]); got != uint64(idx) {
		return fmt.Errorf("%w: holds block %d, want %d", errCorrupt, got, idx)
	}
	if got := binary.LittleEndian.Uint64(hdr[48:56]); got != uint64(len(data)) {
		return fmt.Errorf("%w: holds %d bytes, want %d", errCorrupt, got, len(data))
	}
	h := sha256.New()
	h.Write(hdr[:56])
	h.Write(data)
	var sum [32]byte
	if !bytes.Equal(h.Sum(sum[:0]), hdr[56:88]) {
		return fmt.Errorf("%w: checksum mismatch", errCorrupt)
	}
	return nil
}

// write stores block idx unless it is already present or cannot fit, then
// deletes the least recently used blocks beyond the bound.
func (d *diskTier) write(idx int64, data []byte) error {
	size := blockHeaderSize + int64(len(data))
	if size > d.limit || d.has(idx) {
		return nil
	}
	var hdr [blockHeaderSize]byte
	encodeHeader(hdr[:], d.tag, idx, data)
	f, err := os.CreateTemp(d.dir, "*"+tempSuffix)
	if err != nil {
		return fmt.Errorf("blockcache: disk tier: %w", err)
	}
	tmp := f.Name()
	_, err = f.Write(hdr[:])
	if err == nil {
		_, err = f.Write(data)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, d.blockPath(idx))
	}
	if err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("blockcache: disk tier: writing block %d: %w", idx, err)
	}
	d.mu.Lock()
	if el, ok := d.entries[idx]; ok { // raced with another writer of the same block
		d.used -= el.Value.(diskEntry).size
		d.lru.Remove(el)
	}
	d.entries[idx] = d.lru.PushFront(diskEntry{idx, size})
	d.used += size
	victims := d.trimLocked()
	d.st.diskBytes.Store(d.used)
	d.mu.Unlock()
	d.st.diskWrites.Add(1)
	for _, v := range victims {
		if err := os.Remove(v); err != nil && !errors.Is(err, fs.ErrNotExist) {
			d.log.Warn("blockcache: disk tier: removing evicted block", "err", err)
		}
	}
	return nil
}

// trimLocked forgets least recently used blocks until the bound holds and
// returns the files to delete (outside the lock).
func (d *diskTier) trimLocked() []string {
	var victims []string
	for d.used > d.limit {
		el := d.lru.Back()
		if el == nil {
			break
		}
		e := d.lru.Remove(el).(diskEntry)
		delete(d.entries, e.index)
		d.used -= e.size
		d.st.diskEvict.Add(1)
		victims = append(victims, d.blockPath(e.index))
	}
	return victims
}

// drop forgets and deletes block idx.
func (d *diskTier) drop(idx int64) {
	d.mu.Lock()
	if el, ok := d.entries[idx]; ok {
		d.used -= el.Value.(diskEntry).size
		d.lru.Remove(el)
		delete(d.entries, idx)
		d.st.diskBytes.Store(d.used)
	}
	d.mu.Unlock()
	_ = os.Remove(d.blockPath(idx))
}

// writeFileAtomic writes name in dir via a temporary file and rename.
func writeFileAtomic(dir, name string, data []byte) error {
	f, err := os.CreateTemp(dir, "*"+tempSuffix)
	if err != nil {
		return fmt.Errorf("blockcache: disk tier: %w", err)
	}
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), filepath.Join(dir, name))
	}
	if err != nil {
		_ = os.Remove(f.Name())
		return fmt.Errorf("blockcache: disk tier: writing %s: %w", name, err)
	}
	return nil
}
