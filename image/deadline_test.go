package image

import (
	"context"
	"crypto/rand"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
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

// TestReadTimeoutAgainstStalledStorage: with storage stalled (a proxy that
// stops passing bytes), a read through the opened image fails after the
// configured read timeout, the source's retries included, with an error
// naming the blob; once storage answers again the same image reads.
func TestReadTimeoutAgainstStalledStorage(t *testing.T) {
	testenv.RequireTools(t, "mkfs.ext4", "debugfs")
	az := testenv.StartAzurite(t)
	ctx := t.Context()
	src := filepath.Join(t.TempDir(), "src")
	if err := os.MkdirAll(src, 0o755); err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 8<<20)
	rand.Read(data)
	if err := os.WriteFile(filepath.Join(src, "weights.bin"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	key := make([]byte, 32)
	rand.Read(key)
	img := filepath.Join(t.TempDir(), "img")
	res, err := Create(ctx, CreateOptions{From: src, Out: img, Key: key})
	if err != nil {
		t.Fatal(err)
	}
	direct := az.Endpoint() + "/img/data.img"
	if _, err := blob.Upload(ctx, img, direct, blob.UploadOptions{Options: blob.Options{ConnectionString: az.ConnectionString()}, Type: "block", CreateContainer: true}); err != nil {
		t.Fatal(err)
	}

	srv := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(prometheus.NewRegistry()), zerolog.Nop())
	proxy := toxiproxy.NewProxy(srv, "azurite", "127.0.0.1:0", "127.0.0.1:"+strconv.Itoa(az.Port))
	if err := proxy.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(proxy.Stop)
	proxied := strings.Replace(direct, "127.0.0.1:"+strconv.Itoa(az.Port), proxy.Listen, 1)

	root, err := ParseRootHash(res.Verity.RootHash)
	if err != nil {
		t.Fatal(err)
	}
	const timeout = time.Second
	im, err := Open(ctx, Spec{Location: proxied, Key: key,
		Blob:      blob.Options{ConnectionString: az.ConnectionString(), RequestTimeout: 300 * time.Millisecond, RetryDelay: 20 * time.Millisecond},
		Cache:     blockcache.Options{ReadDeadline: timeout, MaxReadAhead: -1},
		Integrity: Integrity{RootHash: root}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { im.Close() })
	ino, err := im.FS.Lookup(mustInode(t, im, ext4.RootIno), "weights.bin")
	if err != nil {
		t.Fatal(err)
	}
	file := mustInode(t, im, ino)

	stall, err := proxy.Toxics.AddToxicJson(strings.NewReader(`{"type":"timeout","attributes":{"timeout":0}}`))
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, err = im.FS.ReadAt(file, make([]byte, 4096), 6<<20)
	took := time.Since(start)
	if err == nil {
		t.Fatal("read through stalled storage succeeded")
	}
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "data.img") {
		t.Errorf("err = %v, want the deadline and the blob's name", err)
	}
	if took < timeout*3/4 || took > 3*timeout {
		t.Errorf("the read failed after %v; the read timeout is %v", took, timeout)
	}
	t.Logf("after %v: %v", took.Round(time.Millisecond), err)

	if err := proxy.Toxics.RemoveToxic(context.Background(), stall.Name); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4096)
	if _, err := im.FS.ReadAt(file, got, 6<<20); err != nil {
		t.Fatalf("read after storage recovered: %v", err)
	}
	if string(got) != string(data[6<<20:6<<20+4096]) {
		t.Fatal("wrong bytes after recovery")
	}
}

func mustInode(t *testing.T, im *Image, ino uint32) *ext4.Inode {
	t.Helper()
	in, err := im.FS.Inode(ino)
	if err != nil {
		t.Fatal(err)
	}
	return in
}
