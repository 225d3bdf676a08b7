package sidecar_test

import (
	"bytes"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/blobseal/blobseal/internal/testenv"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// TestReadyzAndMetrics polls /readyz from process start: it must answer 503
// before it answers 200, and the first 200 must mean both filesystems are
// published and readable at that instant. After reading, /metrics parses
// as Prometheus text with the expected families and bytes fetched > 0.
func TestReadyzAndMetrics(t *testing.T) {
	e := setup(t)
	mnt := t.TempDir()
	mounts := map[string]string{"page": filepath.Join(mnt, "a"), "block": filepath.Join(mnt, "b")}
	addr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	cmd := e.command(e.legacyArgs(t, mounts), e.hostData)
	cmd.Args[len(cmd.Args)-1] = addr // replaces --health-address off
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
		}
		notMounted(t, mnt)
	}()
	client := &http.Client{Timeout: 2 * time.Second}
	saw503 := false
	deadline := time.Now().Add(90 * time.Second)
	for {
		if time.Now().After(deadline) {
			t.Fatalf("/readyz not 200 within 90s\n%s", stderr.String())
		}
		select {
		case err := <-exited:
			t.Fatalf("sidecar exited: %v\n%s", err, stderr.String())
		default:
		}
		resp, err := client.Get("http://" + addr + "/readyz")
		if err != nil { // not listening yet
			time.Sleep(5 * time.Millisecond)
			continue
		}
		resp.Body.Close()
		if resp.StatusCode == http.StatusServiceUnavailable {
			saw503 = true
			time.Sleep(5 * time.Millisecond)
			continue
		}
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("/readyz answered %d", resp.StatusCode)
		}
		break
	}
	// Ready must already mean servable: no waiting here.
	for _, mp := range mounts {
		if _, err := os.ReadFile(filepath.Join(mp, "README.txt")); err != nil {
			t.Fatalf("/readyz is 200 but %s is not servable: %v", mp, err)
		}
	}
	if !saw503 {
		t.Error("/readyz never answered 503 before the mounts were ready")
	}
	for _, mp := range mounts {
		sameTree(t, demoData, mp)
	}

	resp, err := client.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for n := range families {
		names = append(names, n)
	}
	sort.Strings(names)
	t.Logf("metric families: %s", strings.Join(names, " "))
	for _, want := range []string{"blobseal_key_release_duration_seconds", "blobseal_errors_total", "blobseal_fetched_bytes_total", "blobseal_fetch_requests_total", "blobseal_cache_misses_total", "blobseal_decrypted_bytes_total", "blobseal_filesystem_ready"} {
		if _, ok := families[want]; !ok {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	if f := families["blobseal_key_release_duration_seconds"]; f != nil {
		var count uint64
		for _, m := range f.Metric {
			count += m.GetHistogram().GetSampleCount()
		}
		if count < 2 {
			t.Errorf("key release histogram counts %d releases, want 2", count)
		}
	}
	sum := func(name string) float64 {
		var v float64
		for _, m := range families[name].GetMetric() {
			v += m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
		return v
	}
	if v := sum("blobseal_fetched_bytes_total"); v <= 0 {
		t.Errorf("blobseal_fetched_bytes_total = %v after reading both trees, want > 0", v)
	}
	if v := sum("blobseal_fetch_requests_total"); v <= 0 {
		t.Errorf("blobseal_fetch_requests_total = %v after reading both trees, want > 0", v)
	}
	if v := sum("blobseal_decrypted_bytes_total"); v <= 0 {
		t.Errorf("blobseal_decrypted_bytes_total = %v after reading both trees, want > 0", v)
	}
	if v := sum("blobseal_filesystem_ready"); v != 2 {
		t.Errorf("blobseal_filesystem_ready sums to %v, want 2 (both filesystems)", v)
	}
	// The read path's failure counters, per filesystem: nothing failed,
	// nothing was retried or abandoned while reading both trees.
	for _, name := range []string{"blobseal_fetch_errors_total", "blobseal_fetches_abandoned_total", "blobseal_storage_retries_total"} {
		if n := len(families[name].GetMetric()); n != 2 {
			t.Errorf("%s has %d series, want one per filesystem", name, n)
		}
		if v := sum(name); v != 0 {
			t.Errorf("%s = %v after reading healthy storage, want 0", name, v)
		}
	}
	if h := families["blobseal_fetch_errors_total"].GetHelp(); !strings.Contains(h, "after the source's own retries") {
		t.Errorf("blobseal_fetch_errors_total help %q does not say the source's retries came first", h)
	}
}
