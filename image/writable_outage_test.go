package image

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/blobseal/blobseal/blob"
	"github.com/blobseal/blobseal/blockcache"
	"github.com/blobseal/blobseal/fs/ext4"
	"github.com/blobseal/blobseal/internal/testenv"
)

// TestWritableBlobResumesAfterOutage: a page blob opened for writing, its
// storage (Azurite) behind a proxy that stops answering. Writes fill the
// dirty memory until one fails with EIO after the flush timeout, and
// fsync fails with EIO; once storage answers again the failed write, new
// writes and fsync succeed through the same Writer, the write-back stats
// count the failed flushes, and after Close the decrypted blob is e2fsck
// -fn clean and holds every fsynced byte.
func TestWritableBlobResumesAfterOutage(t *testing.T) {
	testenv.RequireTools(t, "mkfs.ext4", "debugfs", "e2fsck")
	az := testenv.StartAzurite(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	_, key, out := makeWritableImage(ctx, t)
	bo := blob.Options{ConnectionString: az.ConnectionString(), RetryDelay: 20 * time.Millisecond, RequestTimeout: 500 * time.Millisecond}
	direct := az.Endpoint() + "/img/outage.img"
	if _, err := blob.Upload(ctx, out, direct, blob.UploadOptions{Options: bo, Type: "page", CreateContainer: true}); err != nil {
		t.Fatal(err)
	}
	srv := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(prometheus.NewRegistry()), zerolog.Nop())
	proxy := toxiproxy.NewProxy(srv, "azurite", "127.0.0.1:0", "127.0.0.1:"+strconv.Itoa(az.Port))
	if err := proxy.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(proxy.Stop)
	proxied := strings.Replace(direct, "127.0.0.1:"+strconv.Itoa(az.Port), proxy.Listen, 1)

	const flushTimeout = time.Second
	w, err := OpenWritable(ctx, Spec{Location: proxied, Key: key, Blob: bo,
		Cache: blockcache.Options{BlockSize: 64 << 10},
		Write: WriteOptions{Lease: blob.LeaseOptions{Duration: 30 * time.Second},
			WriteBack: blockcache.WriteBackOptions{DirtyBytes: 1 << 20, FlushTimeout: flushTimeout}}})
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			w.Close()
		}
	})
	model := map[string][]byte{}
	create := func(name string) uint32 {
		t.Helper()
		in, err := w.Writer.Create(ext4.RootIno, name, 0o644, 0, 0)
		if err != nil {
			t.Fatal(err)
		}
		model[name] = nil
		return in.Ino
	}
	write := func(name string, ino uint32, p []byte, off int64) error {
		if _, err := w.Writer.WriteAt(ino, p, off); err != nil {
			return err
		}
		m := model[name]
		if e := int(off) + len(p); e > len(m) {
			m = append(m, make([]byte, e-len(m))...)
		}
		copy(m[off:], p)
		model[name] = m
		return nil
	}
	chunk := func() []byte {
		b := make([]byte, 256<<10)
		rand.Read(b)
		return b
	}

	before := create("before")
	if err := write("before", before, chunk(), 0); err != nil {
		t.Fatal(err)
	}
	if err := w.Writer.Sync(); err != nil {
		t.Fatal(err)
	}

	down, err := proxy.Toxics.AddToxicJson(strings.NewReader(`{"type":"timeout","attributes":{"timeout":0}}`))
	if err != nil {
		t.Fatal(err)
	}
	during := create("during")
	var failedAt int64 = -1
	var failed []byte
	for i := range 16 { // 4 MiB, four times the dirty memory
		p, off := chunk(), int64(i)*(256<<10)
		start := time.Now()
		err := write("during", during, p, off)
		if err == nil {
			continue
		}
		if !errors.Is(err, syscall.EIO) {
			t.Fatalf("write %d during the outage: %v, want EIO", i, err)
		}
		if took := time.Since(start); took < flushTimeout/2 {
			t.Errorf("the write failed after %s, before the flush timeout (%s)", took, flushTimeout)
		}
		failedAt, failed = off, p
		break
	}
	if failed == nil {
		t.Fatal("no write failed during the outage: dirty memory never filled")
	}
	if err := w.Writer.Sync(); !errors.Is(err, syscall.EIO) {
		t.Fatalf("Sync during the outage: %v, want EIO", err)
	}
	if err := proxy.Toxics.RemoveToxic(ctx, down.Name); err != nil {
		t.Fatal(err)
	}

	// Storage is back: the same Writer goes on.
	if err := write("during", during, failed, failedAt); err != nil {
		t.Fatalf("the failed write again, storage back: %v", err)
	}
	after := create("after")
	for i := range 6 {
		if err := write("after", after, chunk(), int64(i)*(256<<10)); err != nil {
			t.Fatalf("write %d after the outage: %v", i, err)
		}
	}
	if err := write("before", before, chunk(), 4096); err != nil { // an overwrite
		t.Fatal(err)
	}
	if err := w.Writer.Sync(); err != nil {
		t.Fatalf("Sync after the outage: %v", err)
	}
	st, ok := w.WriteBackStats()
	if !ok || st.FlushFailures == 0 {
		t.Errorf("write-back stats after the outage: %+v (%v), want failed flushes counted", st, ok)
	}
	if st.PeakDirtyBytes > 1<<20 {
		t.Errorf("peak dirty memory %d exceeds the 1 MiB bound", st.PeakDirtyBytes)
	}
	closed = true
	if err := w.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}

	img, err := Open(ctx, Spec{Location: direct, Key: key, Blob: bo})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	for name, want := range model {
		in, err := lookup(img.FS, name)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		got := make([]byte, in.Size)
		if _, err := img.FS.ReadAt(in, got, 0); err != nil || !bytes.Equal(got, want) {
			t.Errorf("%s: %d bytes (%v), want the %d fsynced", name, len(got), err, len(want))
		}
	}
	e2fsckDecrypted(t, img)
}
