package sidecar_test

import (
	"bytes"
	"context"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/blobseal/blobseal/blob"
)

// TestRetryUntilBlobExists: with on_failure retry, the first attempt fails
// because the blob is not there yet; once it is uploaded, the same process
// mounts it.
func TestRetryUntilBlobExists(t *testing.T) {
	e := setup(t)
	mnt := t.TempDir()
	mp := filepath.Join(mnt, "late")
	ready := filepath.Join(mnt, "ready")
	late := e.azurite.Endpoint() + "/images/late.img"
	cfg := map[string]any{
		"on_failure": "retry", "retry_max_delay": "1s",
		"health": map[string]any{"address": "off", "ready_file": ready},
		"attestation": map[string]any{"provider": "simulated", "simulated_dir": filepath.Join(e.dir, "signer"),
			"simulated_host_data": hex.EncodeToString(e.hostData[:]), "ca_file": filepath.Join(e.dir, "ca.pem")},
		"filesystems": []any{map[string]any{"name": "late", "mount_point": mp, "source": late, "verity_root_hash": e.root,
			"key": map[string]any{"release": map[string]any{"maa_endpoint": e.stack.MAAEndpoint, "vault": e.stack.VaultURL,
				"key_name": "fs-key", "bearer_token_file": filepath.Join(e.dir, "bearer-token")}}}},
	}
	exited, stderr := startSidecarJSON(t, e, cfg, "sidecar.json", mnt)
	// Wait for the first failed attempt to be reported.
	for deadline := time.Now().Add(60 * time.Second); !strings.Contains(stderr.String(), "not mounted"); {
		if time.Now().After(deadline) {
			t.Fatalf("no failed attempt reported within 60s:\n%s", stderr.String())
		}
		select {
		case err := <-exited:
			t.Fatalf("sidecar exited instead of retrying: %v\n%s", err, stderr.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
	if _, err := os.Lstat(mp); err == nil {
		t.Fatal("mount point published although the blob does not exist")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := blob.Upload(ctx, filepath.Join(e.dir, "demo.img"), late, blob.UploadOptions{
		Options: blob.Options{ConnectionString: e.azurite.ConnectionString()}, Type: "block"}); err != nil {
		t.Fatal(err)
	}
	waitFile(t, ready, exited, stderr)
	sameTree(t, demoData, mp)
}

// syncBuffer is a bytes.Buffer safe for the exec copier and the test.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
