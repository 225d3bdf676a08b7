package sidecar_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"

	"github.com/blobseal/blobseal/image"
	"github.com/blobseal/blobseal/internal/secret"
	"github.com/blobseal/blobseal/internal/testenv"
	"github.com/blobseal/blobseal/keyrelease/evidence"
	"github.com/blobseal/blobseal/keyrelease/localstack"
	"github.com/blobseal/blobseal/sidecar"
)

// TestOneSidecarForBoth runs one sidecar that mounts an encrypted image
// (key released through the local attestation and key services, FUSE
// mount, atomic publish) and serves the Azure SKR sidecar's API to the
// application at the same time: what users ran two Azure sidecars for.
func TestOneSidecarForBoth(t *testing.T) {
	testenv.RequireFUSE(t)
	testenv.RequireTools(t, "mkfs.ext4")
	dir := t.TempDir()
	hostData := sha256.Sum256([]byte("package policy\n# one sidecar for both\n"))
	st, err := localstack.Start(localstack.Options{SignerDir: filepath.Join(dir, "signer"), Simulated: evidence.SimulatedConfig{HostData: hostData}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(st.Close)
	files, err := st.WriteStackFile(dir)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	fsKey := make(secret.Bytes, 32)
	appKey := make(secret.Bytes, 32)
	rand.Read(fsKey)
	rand.Read(appKey)
	img := filepath.Join(dir, "demo.img")
	res, err := image.Create(ctx, image.CreateOptions{From: demoData, Out: img, Key: fsKey})
	if err != nil {
		t.Fatal(err)
	}
	for name, k := range map[string]secret.Bytes{"fs-key": fsKey, "app-key": appKey, "not-for-apps": appKey} {
		if err := st.ImportOctKey(ctx, name, k, hostData); err != nil {
			t.Fatal(err)
		}
	}
	mp := filepath.Join(dir, "mnt", "data")
	cfgJSON, _ := json.Marshal(map[string]any{
		"health": map[string]any{"address": "127.0.0.1:0"},
		"attestation": map[string]any{"provider": "simulated", "simulated_dir": dir, "ca_file": files.CAPEMFile,
			"simulated_host_data": hex.EncodeToString(hostData[:])},
		"skr": map[string]any{"address": "127.0.0.1:0", "allowed_keys": []string{"app-key"}},
		"filesystems": []any{map[string]any{"name": "data", "mount_point": mp, "source": img, "verity_root_hash": res.Verity.RootHash,
			"key": map[string]any{"release": map[string]any{"maa_endpoint": st.MAAEndpoint, "vault": st.VaultURL, "key_name": "fs-key",
				"bearer_token_file": files.BearerTokenFile}}}},
	})
	cfg, err := sidecar.Parse(cfgJSON)
	if err != nil {
		t.Fatal(err)
	}
	var logs syncBuffer
	sc := sidecar.New(cfg, slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug})), nil)
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- sc.Run(runCtx) }()
	t.Cleanup(func() {
		stop()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("sidecar: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Error("sidecar did not stop")
		}
		if _, err := os.Lstat(mp); !os.IsNotExist(err) {
			t.Errorf("mount point still published after stop: %v", err)
		}
	})

	want, err := os.ReadFile(filepath.Join(demoData, "README.txt"))
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(time.Minute)
	for {
		got, err := os.ReadFile(filepath.Join(mp, "README.txt"))
		if err == nil && sc.SKRAddr() != "" {
			if !bytes.Equal(got, want) {
				t.Fatal("README.txt through the mount differs from the source")
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("not ready after a minute (read: %v, SKR address %q); logs:\n%s", err, sc.SKRAddr(), logs.String())
		}
		time.Sleep(100 * time.Millisecond)
	}

	api := "http://" + sc.SKRAddr()
	vault := strings.TrimPrefix(st.VaultURL, "https://")
	maaHost := strings.TrimPrefix(st.MAAEndpoint, "https://")
	post := func(path, body string) (int, map[string]any) {
		t.Helper()
		resp, err := http.Post(api+path, "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		raw, _ := io.ReadAll(resp.Body)
		var m map[string]any
		if err := json.Unmarshal(raw, &m); err != nil {
			t.Fatalf("%s: %q: %v", path, raw, err)
		}
		return resp.StatusCode, m
	}
	release := func(kid string) (int, map[string]any) {
		return post("/key/release", `{"maa_endpoint": "`+maaHost+`", "akv_endpoint": "`+vault+`", "kid": "`+kid+`", "access_token": "`+st.Bearer.Reveal()+`"}`)
	}
	code, m := release("app-key")
	if code != 200 {
		t.Fatalf("key/release: %d %v", code, m)
	}
	var jk jose.JSONWebKey
	if err := jk.UnmarshalJSON([]byte(m["key"].(string))); err != nil || !bytes.Equal(jk.Key.([]byte), appKey) {
		t.Fatalf("released app key differs: %v", err)
	}
	if code, m := release("not-for-apps"); code != http.StatusForbidden || !strings.Contains(m["error"].(string), "allowed keys") {
		t.Fatalf("key outside allowed_keys: %d %v", code, m)
	}
	if code, m := release("fs-key"); code != http.StatusForbidden {
		t.Fatalf("the filesystem's own key through the API: %d %v", code, m)
	}
	if code, m := post("/attest/raw", `{"runtime_data": "aGVsbG8="}`); code != 200 || len(m["report"].(string)) != 2*evidence.ReportSize {
		t.Fatalf("attest/raw: %d %v", code, m)
	}
	// Per-endpoint counters reach the sidecar's Prometheus endpoint.
	resp, err := http.Get("http://" + sc.HealthAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	metrics, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{`blobseal_skr_requests_total{endpoint="POST /key/release"} 3`, `blobseal_skr_errors_total{endpoint="POST /key/release"} 2`, `blobseal_skr_requests_total{endpoint="POST /attest/raw"} 1`} {
		if !strings.Contains(string(metrics), want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	if strings.Contains(logs.String(), st.Bearer.Reveal()) || strings.Contains(logs.String(), hex.EncodeToString(appKey)) {
		t.Fatal("logs hold the bearer token or the released key")
	}
}
