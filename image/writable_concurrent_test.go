package image

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	mrand "math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/blobseal/blobseal/blob"
	"github.com/blobseal/blobseal/blockcache"
	"github.com/blobseal/blobseal/fs/ext4"
	"github.com/blobseal/blobseal/internal/testenv"
)

// TestWritableBlobConcurrentOverwrites: the page blob's device reports
// the volume's sector size, so the Writer overwrites file data outside its
// metadata lock; four writers overwrite their own files at once (through
// the volume and the write-back cache, with a background flush every
// 10ms) while syncs run (run with -race). After Close a cold read-only
// open reads every file as the model says, and e2fsck -fn is clean.
func TestWritableBlobConcurrentOverwrites(t *testing.T) {
	testenv.RequireTools(t, "mkfs.ext4", "debugfs", "e2fsck")
	az := testenv.StartAzurite(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	_, key, out := makeWritableImage(ctx, t)
	bo := blob.Options{ConnectionString: az.ConnectionString(), RetryDelay: 20 * time.Millisecond}
	url := az.Endpoint() + "/img/concurrent.img"
	if _, err := blob.Upload(ctx, out, url, blob.UploadOptions{Options: bo, Type: "page", CreateContainer: true}); err != nil {
		t.Fatal(err)
	}
	w, err := OpenWritable(ctx, Spec{Location: url, Key: key, Blob: bo, Cache: blockcache.Options{BlockSize: 64 << 10},
		Write: WriteOptions{WriteBack: blockcache.WriteBackOptions{DirtyBytes: 2 << 20, FlushInterval: 10 * time.Millisecond}}})
	if err != nil {
		t.Fatal(err)
	}
	dev := flushedVolume{Volume: w.Volume}
	if got, want := dev.SectorSize(), w.Volume.Info().SectorSize; got != want || 4096%got != 0 {
		t.Fatalf("the Writer's device reports sector size %d; the volume's is %d (and must divide the 4096-byte block)", got, want)
	}

	const writers, size = 4, 1 << 20
	models := make([][]byte, writers)
	inos := make([]uint32, writers)
	for g := range writers {
		in, err := w.Writer.Create(ext4.RootIno, fmt.Sprintf("w%d", g), 0o644, 0, 0)
		if err != nil {
			t.Fatal(err)
		}
		inos[g], models[g] = in.Ino, make([]byte, size)
		rand.Read(models[g])
		if _, err := w.Writer.WriteAt(in.Ino, models[g], 0); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Writer.Sync(); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, writers+1)
	for g := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := mrand.New(mrand.NewPCG(uint64(g), 5))
			for range 60 {
				n := 1 + r.IntN(40000)
				off := r.IntN(size - n)
				p := make([]byte, n)
				rand.Read(p)
				if _, err := w.Writer.WriteAt(inos[g], p, int64(off)); err != nil {
					errs <- err
					return
				}
				copy(models[g][off:], p) // each writer owns its model
			}
		}()
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range 10 {
			if err := w.Writer.Sync(); err != nil {
				errs <- fmt.Errorf("sync %d: %w", i, err)
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	wg.Wait()
	<-done
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}

	img, err := Open(ctx, Spec{Location: url, Key: key, Blob: bo})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	for g, want := range models {
		in, err := lookup(img.FS, fmt.Sprintf("w%d", g))
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, in.Size)
		if _, err := img.FS.ReadAt(in, got, 0); err != nil || !bytes.Equal(got, want) {
			t.Errorf("w%d after concurrent overwrites: %d bytes (%v), differs from the model", g, len(got), err)
		}
	}
	e2fsckDecrypted(t, img)
}
