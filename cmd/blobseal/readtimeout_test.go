package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/blobseal/blobseal/internal/fusetest"
	"github.com/blobseal/blobseal/internal/testenv"
)

// TestMountReadTimeoutAgainstStalledStorage: with the blob's storage
// stalled (Azurite behind a toxiproxy that stops passing bytes), `cat` of a
// file through `blobseal mount --read-timeout 1s` fails with EIO after about
// a second; the mount stays up, and the same file reads once storage answers.
func TestMountReadTimeoutAgainstStalledStorage(t *testing.T) {
	testenv.RequireTools(t, "mkfs.ext4", "debugfs", "cat")
	az := testenv.StartAzurite(t)
	dir := t.TempDir()
	data := random(t, 8<<20)
	writeTestFile(t, filepath.Join(dir, "src", "weights.bin"), data, 0o644)
	key := filepath.Join(dir, "key")
	if err := os.WriteFile(key, random(t, 32), 0o600); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "image.luks")
	if _, stderr, code := blobseal(t, "image", "create", "--from", filepath.Join(dir, "src"), "--key-file", key, img); code != 0 {
		t.Fatalf("image create: %s", stderr)
	}
	t.Setenv("AZURE_STORAGE_CONNECTION_STRING", az.ConnectionString())
	direct := az.Endpoint() + "/images/stall.img"
	if _, stderr, code := blobseal(t, "image", "upload", "--type", "block", "--create-container", img, direct); code != 0 {
		t.Fatalf("image upload: %s", stderr)
	}

	srv := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(prometheus.NewRegistry()), zerolog.Nop())
	proxy := toxiproxy.NewProxy(srv, "azurite", "127.0.0.1:0", "127.0.0.1:"+strconv.Itoa(az.Port))
	if err := proxy.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(proxy.Stop)
	proxied := strings.Replace(direct, "127.0.0.1:"+strconv.Itoa(az.Port), proxy.Listen, 1)

	const timeout = time.Second
	for _, c := range []struct {
		directIO string
		// most is the longest the failing cat may take. Through the page
		// cache the kernel retries a page its read-ahead failed with
		// synchronous reads, each waiting out the read timeout (about 2.8s
		// measured here); direct I/O fails at the first.
		most time.Duration
	}{{"on", 2 * timeout}, {"off", 4 * timeout}} {
		t.Run("direct-io="+c.directIO, func(t *testing.T) {
			proc, mnt := startMount(t, "--key-file", key, "--read-timeout", timeout.String(), "--request-timeout", "300ms",
				"--direct-io", c.directIO, proxied, filepath.Join(t.TempDir(), "mnt"))
			file := filepath.Join(mnt, "weights.bin")

			stall, err := proxy.Toxics.AddToxicJson(strings.NewReader(`{"type":"timeout","attributes":{"timeout":0}}`))
			if err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			out, err := exec.Command("cat", file).CombinedOutput()
			took := time.Since(start)
			if err == nil {
				t.Fatal("cat through stalled storage succeeded")
			}
			msg := out[max(0, len(out)-200):]
			if !bytes.Contains(msg, []byte("Input/output error")) {
				t.Errorf("cat failed with %v: %q; want EIO", err, msg)
			}
			if took < timeout*3/4 || took > c.most {
				t.Errorf("cat failed after %v; the read timeout is %v, want at most %v", took, timeout, c.most)
			}
			t.Logf("cat failed with EIO after %v", took.Round(time.Millisecond))
			if !fusetest.IsMounted(t, mnt) {
				t.Fatalf("the mount went away after a timed-out read; stderr:\n%s", proc.stderr)
			}

			if err := proxy.Toxics.RemoveToxic(t.Context(), stall.Name); err != nil {
				t.Fatal(err)
			}
			got, err := os.ReadFile(file)
			if err != nil {
				t.Fatalf("read after storage recovered: %v", err)
			}
			if !bytes.Equal(got, data) {
				t.Fatal("wrong bytes after storage recovered")
			}
			proc.stop(t)
		})
	}
}
