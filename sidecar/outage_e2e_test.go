package sidecar_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/lease"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/pageblob"

	"github.com/blobseal/blobseal/blob"
	"github.com/blobseal/blobseal/crypto"
	"github.com/blobseal/blobseal/fs/ext4"
	"github.com/blobseal/blobseal/image"
	"github.com/blobseal/blobseal/internal/testenv"
)

// TestReadWriteOutageLeaseLossAndCrash runs a read_write filesystem with
// flush_timeout 2s and a 15s lease through the sidecar binary, its storage
// (Azurite) behind a proxy. During an outage fsync fails with EIO within
// the flush timeout; once storage answers the next fsync succeeds and
// /metrics counts the failure. A lease broken from outside makes /readyz
// report the mount not ready, saying why, and /metrics count the loss.
// Then the process is killed: the blob, downloaded and decrypted, replays
// its journal with e2fsck, is e2fsck -fn clean, and holds every fsynced
// byte.
func TestReadWriteOutageLeaseLossAndCrash(t *testing.T) {
	e := setup(t)
	tools := testenv.RequireTools(t, "e2fsck", "debugfs")
	ctx := t.Context()
	img := filepath.Join(e.dir, "outage.img")
	if _, err := image.Create(ctx, image.CreateOptions{From: demoData, Out: img, Key: e.key, ReadWrite: true}); err != nil {
		t.Fatal(err)
	}
	bo := blob.Options{ConnectionString: e.azurite.ConnectionString()}
	direct := e.azurite.Endpoint() + "/images/outage.img"
	if _, err := blob.Upload(ctx, img, direct, blob.UploadOptions{Options: bo, Type: "page", CreateContainer: true}); err != nil {
		t.Fatal(err)
	}
	srv := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(prometheus.NewRegistry()), zerolog.Nop())
	proxy := toxiproxy.NewProxy(srv, "azurite", "127.0.0.1:0", "127.0.0.1:"+strconv.Itoa(e.azurite.Port))
	if err := proxy.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(proxy.Stop)
	source := strings.Replace(direct, "127.0.0.1:"+strconv.Itoa(e.azurite.Port), proxy.Listen, 1)

	const flushTimeout = 2 * time.Second
	mnt := t.TempDir()
	mp := filepath.Join(mnt, "rw")
	addr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	cfg := map[string]any{
		"health": map[string]any{"address": addr, "ready_file": filepath.Join(mnt, "ready")},
		"attestation": map[string]any{"provider": "simulated", "simulated_dir": filepath.Join(e.dir, "signer"),
			"simulated_host_data": hex.EncodeToString(e.hostData[:]), "ca_file": filepath.Join(e.dir, "ca.pem")},
		"filesystems": []any{map[string]any{"name": "rw", "mount_point": mp, "source": source, "read_write": true,
			"flush_timeout": flushTimeout.String(), "lease_duration": "15s", "dirty_memory": "16Mi",
			"key": map[string]any{"release": map[string]any{"maa_endpoint": e.stack.MAAEndpoint, "vault": e.stack.VaultURL,
				"key_name": "fs-key", "bearer_token_file": filepath.Join(e.dir, "bearer-token")}}}},
	}
	cmd, exited, stderr := startSidecarCmd(t, e, cfg, "outage.json", mnt)
	waitFile(t, filepath.Join(mnt, "ready"), exited, stderr)

	before := make([]byte, 1<<20)
	during := make([]byte, 300_000)
	rand.Read(before)
	rand.Read(during)
	writeSynced(t, filepath.Join(mp, "before.bin"), before)

	down, err := proxy.Toxics.AddToxicJson(strings.NewReader(`{"type":"timeout","attributes":{"timeout":0}}`))
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(filepath.Join(mp, "during.bin"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Write(during); err != nil {
		t.Fatalf("write during the outage (within dirty_memory): %v", err)
	}
	// Data that reaches the write-back cache without an fsync (a closed
	// file) is flushed in the background (every 5s): that fails too, and
	// /metrics counts it before any fsync failed.
	if err := os.WriteFile(filepath.Join(mp, "background.bin"), during[:64<<10], 0o644); err != nil {
		t.Fatalf("write and close during the outage: %v", err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for m := scrape(t, addr); m["blobseal_writeback_flush_failures_total"] < 1; m = scrape(t, addr) {
		if m["blobseal_flush_failures_total"] != 0 {
			t.Fatalf("an fsync failed before any was called: %v", m["blobseal_flush_failures_total"])
		}
		if time.Now().After(deadline) {
			t.Fatalf("no background flush failure counted within 20s of the outage: %v", m)
		}
		time.Sleep(200 * time.Millisecond)
	}
	start := time.Now()
	err = f.Sync()
	took := time.Since(start)
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("fsync during the outage: %v, want EIO\n%s", err, stderr)
	}
	if took < flushTimeout*3/4 || took > flushTimeout+5*time.Second {
		t.Errorf("fsync failed after %s; flush_timeout is %s", took, flushTimeout)
	}
	t.Logf("fsync during the outage: EIO after %s", took.Round(time.Millisecond))
	if err := proxy.Toxics.RemoveToxic(ctx, down.Name); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatalf("fsync after storage came back: %v\n%s", err, stderr)
	}
	if m := scrape(t, addr); m["blobseal_flush_failures_total"] < 1 || m["blobseal_lease_losses_total"] != 0 ||
		m["blobseal_writeback_flush_failures_total"] < 2 || m["blobseal_uploaded_bytes_total"] < float64(len(during)) {
		t.Errorf("after the outage: fsync failures %v (want ≥ 1), lease losses %v (want 0), flush failures %v (want ≥ 2: background and fsync), uploaded %v bytes (want ≥ %d)",
			m["blobseal_flush_failures_total"], m["blobseal_lease_losses_total"], m["blobseal_writeback_flush_failures_total"], m["blobseal_uploaded_bytes_total"], len(during))
	}

	// Another party breaks the lease: the mount is no longer ready.
	pb, err := pageblob.NewClientFromConnectionString(e.azurite.ConnectionString(), "images", "outage.img", nil)
	if err != nil {
		t.Fatal(err)
	}
	lc, err := lease.NewBlobClient(pb, nil)
	if err != nil {
		t.Fatal(err)
	}
	zero := int32(0)
	if _, err := lc.BreakLease(ctx, &lease.BlobBreakOptions{BreakPeriod: &zero}); err != nil {
		t.Fatal(err)
	}
	body := waitNotReady(t, addr, 20*time.Second)
	if !strings.Contains(body, "write lease lost") {
		t.Errorf("/readyz after the lease was broken does not say why:\n%s", body)
	}
	if _, err := os.Stat(filepath.Join(mnt, "ready")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the ready file is still there after the lease was lost (stat: %v)", err)
	}
	if m := scrape(t, addr); m["blobseal_lease_losses_total"] != 1 {
		t.Errorf("blobseal_lease_losses_total = %v after one loss", m["blobseal_lease_losses_total"])
	}

	// A crash: nothing is flushed or released at exit.
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-exited
	if out, err := exec.Command("umount", "-l", filepath.Join(mnt, ".blobseal-rw")).CombinedOutput(); err != nil {
		t.Fatalf("detach the killed sidecar's mount: %v: %s", err, out)
	}

	plain := decryptDownload(t, direct, bo, e.key)
	if out, err := exec.Command(tools[0], "-E", "journal_only", "-p", plain).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -E journal_only (journal replay): %v\n%s", err, out)
	}
	if out, err := exec.Command(tools[0], "-fn", plain).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -fn after the crash: %v\n%s", err, out)
	}
	// blobseal's own reopen (the lease was broken above) replays the same
	// journal and reads the same bytes.
	rw, err := image.OpenWritable(ctx, image.Spec{Location: direct, Key: e.key, Blob: bo})
	if err != nil {
		t.Fatalf("reopen after the crash: %v", err)
	}
	defer rw.Close()
	fsys := rw.Writer.FS()
	root, err := fsys.Inode(ext4.RootIno)
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string][]byte{"before.bin": before, "during.bin": during} {
		ino, err := fsys.Lookup(root, name)
		if err != nil {
			t.Fatalf("%s after reopening: %v", name, err)
		}
		in, err := fsys.Inode(ino)
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, in.Size)
		if _, err := fsys.ReadAt(in, got, 0); err != nil || !bytes.Equal(got, want) {
			t.Errorf("%s after reopening: %d bytes (%v), want the %d fsynced", name, len(got), err, len(want))
		}
	}
	for name, want := range map[string][]byte{"before.bin": before, "during.bin": during} {
		out := filepath.Join(t.TempDir(), name)
		if b, err := exec.Command(tools[1], "-R", "dump /"+name+" "+out, plain).CombinedOutput(); err != nil {
			t.Fatalf("debugfs dump %s: %v\n%s", name, err, b)
		}
		got, err := os.ReadFile(out)
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("%s after the crash: %d bytes (%v), want the %d fsynced", name, len(got), err, len(want))
		}
	}
}

func writeSynced(t *testing.T, path string, data []byte) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatalf("fsync %s: %v", path, err)
	}
}

// waitNotReady polls /readyz until it answers 503 and returns the body.
func waitNotReady(t *testing.T, addr string, within time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		resp, err := (&http.Client{Timeout: 5 * time.Second}).Get("http://" + addr + "/readyz")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == http.StatusServiceUnavailable {
			return string(body)
		}
		if time.Now().After(deadline) {
			t.Fatalf("/readyz still answers %d after %s: %s", resp.StatusCode, within, body)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// decryptDownload downloads the blob and writes its decrypted filesystem
// to a file, for the reference tools.
func decryptDownload(t *testing.T, url string, bo blob.Options, key []byte) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	src, err := blob.Open(ctx, url, bo)
	if err != nil {
		t.Fatal(err)
	}
	vol, err := crypto.OpenContext(ctx, blob.ReaderAt(ctx, src), src.Size(), key, crypto.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer vol.Close()
	out := filepath.Join(t.TempDir(), "plain.ext4")
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := io.Copy(f, io.NewSectionReader(vol, 0, vol.Size())); err != nil {
		t.Fatalf("decrypt the download: %v", err)
	}
	return out
}
