package sidecar_test

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
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
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/rs/zerolog"

	"github.com/blobseal/blobseal/blob"
	"github.com/blobseal/blobseal/image"
	"github.com/blobseal/blobseal/internal/secret"
	"github.com/blobseal/blobseal/internal/testenv"
)

// TestReadTimeoutAgainstFailingStorage: a filesystem configured with
// read_timeout 1s, its storage (Azurite) behind a proxy that resets every
// connection: the source retries until the read timeout, the read fails
// with EIO, the mount stays published, /metrics counts the retries and the
// failed fetches, and the file reads again once storage answers.
func TestReadTimeoutAgainstFailingStorage(t *testing.T) {
	e := setup(t)
	// An image of its own, with a file large enough that opening and
	// mounting the image does not fetch it.
	ctx := t.Context()
	src := filepath.Join(t.TempDir(), "src")
	data := make([]byte, 8<<20)
	rand.Read(data)
	if err := os.MkdirAll(src, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(src, "weights.bin"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	key := make(secret.Bytes, 32)
	rand.Read(key)
	img := filepath.Join(t.TempDir(), "stall.img")
	res, err := image.Create(ctx, image.CreateOptions{From: src, Out: img, Key: key})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.stack.ImportOctKey(ctx, "stall-key", key, e.hostData); err != nil {
		t.Fatal(err)
	}
	direct := e.azurite.Endpoint() + "/images/stall.img"
	if _, err := blob.Upload(ctx, img, direct, blob.UploadOptions{Options: blob.Options{ConnectionString: e.azurite.ConnectionString()}, Type: "block"}); err != nil {
		t.Fatal(err)
	}

	srv := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(prometheus.NewRegistry()), zerolog.Nop())
	proxy := toxiproxy.NewProxy(srv, "azurite", "127.0.0.1:0", "127.0.0.1:"+strconv.Itoa(e.azurite.Port))
	if err := proxy.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(proxy.Stop)
	source := strings.Replace(direct, "127.0.0.1:"+strconv.Itoa(e.azurite.Port), proxy.Listen, 1)

	const timeout = time.Second
	mnt := t.TempDir()
	mp := filepath.Join(mnt, "stall")
	addr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	cfg := map[string]any{
		"health": map[string]any{"address": addr, "ready_file": filepath.Join(mnt, "ready")},
		"attestation": map[string]any{"provider": "simulated", "simulated_dir": filepath.Join(e.dir, "signer"),
			"simulated_host_data": hex.EncodeToString(e.hostData[:]), "ca_file": filepath.Join(e.dir, "ca.pem")},
		"filesystems": []any{map[string]any{"name": "stall", "mount_point": mp, "source": source, "verity_root_hash": res.Verity.RootHash,
			"read_timeout": timeout.String(), "direct_io": "on",
			"key": map[string]any{"release": map[string]any{"maa_endpoint": e.stack.MAAEndpoint, "vault": e.stack.VaultURL,
				"key_name": "stall-key", "bearer_token_file": filepath.Join(e.dir, "bearer-token")}}}},
	}
	exited, stderr := startSidecarJSON(t, e, cfg, "stall.json", mnt)
	waitFile(t, filepath.Join(mnt, "ready"), exited, stderr)

	file := filepath.Join(mp, "weights.bin")
	stall, err := proxy.Toxics.AddToxicJson(strings.NewReader(`{"type":"reset_peer","attributes":{"timeout":0}}`))
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, err = os.ReadFile(file)
	took := time.Since(start)
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("read through stalled storage: %v, want EIO", err)
	}
	if took < timeout*3/4 || took > 2*timeout {
		t.Errorf("the read failed after %v; read_timeout is %v", took, timeout)
	}
	t.Logf("read failed with EIO after %v", took.Round(time.Millisecond))

	metrics := scrape(t, addr)
	if v, ok := metrics["blobseal_storage_retries_total"]; !ok || v < 1 {
		t.Errorf("blobseal_storage_retries_total = %v (present %v) after reset connections, want at least 1", v, ok)
	}
	if metrics["blobseal_fetch_errors_total"]+metrics["blobseal_fetches_abandoned_total"] < 1 {
		t.Errorf("neither a failed nor an abandoned fetch counted after a timed-out read: %v", metrics)
	}
	t.Logf("after the stall: %v", metrics)

	if err := proxy.Toxics.RemoveToxic(t.Context(), stall.Name); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(file)
	if err != nil {
		t.Fatalf("read after storage recovered: %v\n%s", err, stderr.String())
	}
	if !bytes.Equal(got, data) {
		t.Fatal("wrong bytes after storage recovered")
	}
}

// scrape sums each counter family on /metrics over its series.
func scrape(t *testing.T, addr string) map[string]float64 {
	t.Helper()
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for name, f := range families {
		if !strings.HasPrefix(name, "blobseal_") {
			continue
		}
		for _, m := range f.GetMetric() {
			out[name] += m.GetCounter().GetValue()
		}
	}
	return out
}

// startSidecarJSON runs the sidecar binary on cfg (written as name in the
// test's directory) against the test's Azurite; at cleanup it is sent
// SIGTERM (killed after 30 s) and mnt must be left unmounted.
func startSidecarJSON(t *testing.T, e *env, cfg map[string]any, name, mnt string) (exited <-chan error, stderr *syncBuffer) {
	t.Helper()
	_, exited, stderr = startSidecarCmd(t, e, cfg, name, mnt)
	return exited, stderr
}

// startSidecarCmd is startSidecarJSON that also returns the process, for
// tests that kill it; exited yields its end to any number of readers.
func startSidecarCmd(t *testing.T, e *env, cfg map[string]any, name, mnt string) (cmd *exec.Cmd, exited <-chan error, stderr *syncBuffer) {
	t.Helper()
	js, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	cfgFile := filepath.Join(e.dir, name)
	if err := os.WriteFile(cfgFile, js, 0o600); err != nil {
		t.Fatal(err)
	}
	cmd = exec.Command(binary, "sidecar", "--config", cfgFile)
	cmd.Env = append(os.Environ(), "AZURE_STORAGE_CONNECTION_STRING="+e.azurite.ConnectionString())
	stderr = new(syncBuffer)
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		done <- cmd.Wait()
		close(done)
	}()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
		}
		notMounted(t, mnt)
	})
	return cmd, done, stderr
}
