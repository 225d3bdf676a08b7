package blockcache

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blobseal/blobseal/blob"
)

const diskBS = 64 << 10

func diskOpts(dir string) Options {
	// A quarter of the memory bound (what may wait for the disk writer) holds
	// every test image, so no write is skipped.
	return Options{BlockSize: diskBS, MemoryBytes: 64 << 20, DiskDir: dir, DiskBytes: 64 << 20}
}

// runOnce opens a cache over src, reads all of it, checks the bytes and closes
// it (which flushes queued disk writes).
func runOnce(t *testing.T, src blob.Source, ref []byte, o Options) Stats {
	t.Helper()
	c, err := New(src, o)
	if err != nil {
		t.Fatal(err)
	}
	if err := readExpect(c, ref, 0, len(ref)); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	return c.Stats()
}

func blockFiles(t *testing.T, root string) []string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(root, "*", "*"+blockSuffix))
	if err != nil {
		t.Fatal(err)
	}
	return files
}

func TestDiskTierReusedWhileVersionUnchanged(t *testing.T) {
	checkNoLeak(t)
	dir := t.TempDir()
	ref := randomBytes(10, 2<<20+5000) // short last block
	src := versionedSource{newTestSource(ref, diskBS), `"0x8DC1"`}

	st := runOnce(t, src, ref, diskOpts(dir))
	nblocks := uint64((len(ref) + diskBS - 1) / diskBS)
	if st.DiskWrites != nblocks {
		t.Fatalf("first run wrote %d blocks to disk, want %d", st.DiskWrites, nblocks)
	}
	if got := len(blockFiles(t, dir)); got != int(nblocks) {
		t.Fatalf("%d block files on disk, want %d", got, nblocks)
	}

	// Restart, same version: no requests at all.
	src.resetRequests()
	st = runOnce(t, src, ref, diskOpts(dir))
	if n := len(src.requests()); n != 0 || st.Requests != 0 {
		t.Errorf("restart with the same ETag made %d requests, want 0", n)
	}
	if st.DiskHits != nblocks {
		t.Errorf("DiskHits = %d, want %d", st.DiskHits, nblocks)
	}

	// New content under a new ETag: nothing stale is served.
	ref2 := randomBytes(11, len(ref))
	src2 := versionedSource{newTestSource(ref2, diskBS), `"0x8DC2"`}
	st = runOnce(t, src2, ref2, diskOpts(dir))
	if st.DiskHits != 0 || st.BytesFetched != uint64(len(ref2)) {
		t.Errorf("after an ETag change: %d disk hits, %d bytes fetched; want 0 and %d", st.DiskHits, st.BytesFetched, len(ref2))
	}
}

func TestDiskTierDetectsCorruptAndTornBlocks(t *testing.T) {
	dir := t.TempDir()
	ref := randomBytes(12, 1<<20)
	src := versionedSource{newTestSource(ref, diskBS), "v1"}
	runOnce(t, src, ref, diskOpts(dir))
	files := blockFiles(t, dir)
	if len(files) != 16 {
		t.Fatalf("%d block files, want 16", len(files))
	}
	// Flip one data byte in one file; truncate another (a torn write).
	raw, err := os.ReadFile(files[3])
	if err != nil {
		t.Fatal(err)
	}
	raw[blockHeaderSize+1000] ^= 0x40
	if err := os.WriteFile(files[3], raw, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(files[7], blockHeaderSize+diskBS/2); err != nil {
		t.Fatal(err)
	}
	// A stray temporary file from a crash is cleaned up at start.
	stray := filepath.Join(filepath.Dir(files[0]), "123"+tempSuffix)
	if err := os.WriteFile(stray, []byte("partial"), 0o600); err != nil {
		t.Fatal(err)
	}

	src.resetRequests()
	st := runOnce(t, src, ref, diskOpts(dir))
	if st.DiskCorrupt != 2 || st.Requests != 2 || st.DiskHits != 14 {
		t.Errorf("corrupt %d, requests %d, disk hits %d; want 2, 2, 14", st.DiskCorrupt, st.Requests, st.DiskHits)
	}
	if _, err := os.Stat(stray); !os.IsNotExist(err) {
		t.Errorf("stray temporary file survived a restart: %v", err)
	}
	// The refetched blocks were rewritten: a third run is all disk.
	src.resetRequests()
	if st := runOnce(t, src, ref, diskOpts(dir)); st.Requests != 0 {
		t.Errorf("third run made %d requests", st.Requests)
	}
}

func TestDiskTierRespectsDiskBytes(t *testing.T) {
	dir := t.TempDir()
	ref := randomBytes(13, 4<<20)
	src := versionedSource{newTestSource(ref, diskBS), "v1"}
	o := diskOpts(dir)
	o.DiskBytes = 10 * (diskBS + blockHeaderSize)
	st := runOnce(t, src, ref, o)
	var total int64
	for _, f := range blockFiles(t, dir) {
		fi, err := os.Stat(f)
		if err != nil {
			t.Fatal(err)
		}
		total += fi.Size()
	}
	if total > o.DiskBytes || st.DiskBytes > o.DiskBytes {
		t.Errorf("disk tier holds %d bytes (stats %d), bound %d", total, st.DiskBytes, o.DiskBytes)
	}
	if st.DiskEvictions != 64-10 {
		t.Errorf("DiskEvictions = %d, want %d", st.DiskEvictions, 64-10)
	}
	// A smaller bound at restart trims what is there.
	o.DiskBytes = 3 * (diskBS + blockHeaderSize)
	c, err := New(src, o)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if n := len(blockFiles(t, dir)); n != 3 {
		t.Errorf("%d block files after restarting with room for 3", n)
	}
}

func TestDiskTierUnversionedSourceStartsEmpty(t *testing.T) {
	dir := t.TempDir()
	ref := randomBytes(14, 512<<10)
	src := newTestSource(ref, diskBS)
	runOnce(t, src, ref, diskOpts(dir))
	src.resetRequests()
	st := runOnce(t, src, ref, diskOpts(dir))
	if st.DiskHits != 0 || st.Requests == 0 {
		t.Errorf("unversioned source reused disk blocks across restarts (%d hits)", st.DiskHits)
	}
}

func TestDiskTierBadDirectory(t *testing.T) {
	file := filepath.Join(t.TempDir(), "not-a-dir")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := New(newTestSource(make([]byte, 1<<20), diskBS), diskOpts(file))
	if err == nil || !strings.Contains(err.Error(), "DiskDir") {
		t.Errorf("New with a file as DiskDir: err = %v, want one naming DiskDir", err)
	}
}
