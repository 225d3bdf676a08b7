package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/blobseal/blobseal/internal/testenv"
)

// TestHarnessQuick runs the whole harness at 32 MiB with -quick against a
// private Azurite, real FUSE mounts of blobseal and rclone, and checks that
// every case produced a plausible figure. It proves the harness works; the
// figures themselves are not asserted (that is what the full run is for).
func TestHarnessQuick(t *testing.T) {
	tools := testenv.RequireTools(t, "rclone", "fusermount3", "mkfs.ext4", "azurite-blob")
	testenv.RequireFUSE(t)
	testenv.RequireRoot(t) // drop_caches and FUSE mounts of other processes' servers
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	bin := filepath.Join(t.TempDir(), "blobseal")
	build := exec.CommandContext(ctx, "go", "build", "-o", bin, "github.com/blobseal/blobseal/cmd/blobseal")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build blobseal: %v\n%s", err, out)
	}
	az := testenv.StartAzurite(t)

	// blobfuse2 is not packaged; the peers' README says how it was built.
	// Its cases run when the binary is there (BLOBFUSE2 or ../shared/peers).
	bf2 := os.Getenv("BLOBFUSE2")
	if bf2 == "" {
		if p, err := filepath.Abs("../../../shared/peers/blobfuse2"); err == nil {
			if _, err := os.Stat(p); err == nil {
				bf2 = p
			}
		}
	}
	if bf2 == "" {
		t.Log("no blobfuse2 binary (set BLOBFUSE2): its cases are left out")
	}
	var log bytes.Buffer
	cfg := config{Size: 32 << 20, Quick: true, Runs: 1, Blobseal: bin, Rclone: tools[0], Blobfuse2: bf2, BandwidthKBps: 50000, Endpoint: az.Endpoint(),
		AzuritePID: az.PID(), CacheMiB: 64, RandomFor: time.Second, Latency: 2 * time.Millisecond,
		WorkDir: t.TempDir(), Command: "test", Log: &log}
	rep, err := run(ctx, cfg)
	if err != nil {
		t.Fatalf("harness: %v\nlog:\n%s", err, log.String())
	}

	byKey := map[string]measurement{}
	for _, m := range rep.Details {
		byKey[m.Key] = m
		switch {
		case m.Failed == "":
		case m.Key == "peers/par16/blobfuse2":
			// blobfuse2's block cache answers EIO to 16 parallel readers
			// (every run here so far): the peer's failure, which the
			// report shows; the harness did its part.
			t.Logf("peer failure, reported: %s: %s", m.Label, m.Failed)
		default:
			t.Errorf("%s failed: %s", m.Label, m.Failed)
		}
	}
	for _, k := range []string{"raw/block/best", "raw/block/paired", "raw/page/best", "cache/cipher", "cache/volume",
		"seq/blobseal/block", "seq/blobseal/page", "seq/rclone", "par16/blobseal", "par16/rclone",
		"proxy/raw/best", "proxy/seq/blobseal", "proxy/seq/rclone"} {
		m, ok := byKey[k]
		if !ok {
			t.Errorf("no measurement %q", k)
			continue
		}
		if m.Bytes < cfg.Size || m.Elapsed <= 0 || m.MBps() <= 0 {
			t.Errorf("%s: %d bytes in %v", k, m.Bytes, m.Elapsed)
		}
		if m.AzuriteCPU <= 0 {
			t.Errorf("%s: Azurite CPU %v, want > 0 (it served %d bytes)", k, m.AzuriteCPU, m.Bytes)
		}
		if m.AzuriteMainCPU <= 0 || m.AzuriteMainCPU > m.AzuriteCPU {
			t.Errorf("%s: Azurite main thread CPU %v of %v in all", k, m.AzuriteMainCPU, m.AzuriteCPU)
		}
	}
	peerKeys := []string{"peers/seq/blobseal", "peers/seq/rclone", "peers/raw", "azure/seq/blobseal", "azure/seq/rclone", "azure/raw",
		"peers/mmap/blobseal", "peers/safetensors/blobseal"}
	if bf2 != "" {
		peerKeys = append(peerKeys, "peers/seq/blobfuse2", "azure/seq/blobfuse2", "peers/mmap/blobfuse2", "peers/safetensors/blobfuse2")
	}
	for _, k := range peerKeys {
		m, ok := byKey[k]
		if !ok && (bf2 != "" || !strings.Contains(k, "mmap") && !strings.Contains(k, "safetensors")) {
			t.Errorf("no measurement %q", k)
			continue
		}
		if ok && (m.Bytes < cfg.Size || m.Elapsed <= 0) {
			t.Errorf("%s: %d bytes in %v", k, m.Bytes, m.Elapsed)
		}
	}
	for _, k := range []string{"seq/blobseal/block", "seq/rclone", "par16/blobseal"} {
		if m := byKey[k]; m.ClientCPU <= 0 || m.PeakRSS <= 0 || m.Cmd == "" {
			t.Errorf("%s: client CPU %v, peak RSS %d, command %q: want all set", k, m.ClientCPU, m.PeakRSS, m.Cmd)
		}
	}
	for _, k := range []string{"rand1/blobseal", "rand16/blobseal", "rand1/rclone", "rand16/rclone"} {
		m := byKey[k]
		if m.Latency == nil || m.Latency.Reads == 0 || m.Latency.P50 <= 0 || m.Latency.P99 < m.Latency.P50 {
			t.Errorf("%s: latency %+v", k, m.Latency)
		}
	}
	// The proxy must really add latency: a 1-thread 16 MiB GET sweep is not
	// run in quick mode, so compare the blobseal mount's time instead with
	// the minimum the added round trips imply (at least one per request).
	if m := byKey["proxy/seq/blobseal"]; m.Elapsed < 4*time.Millisecond {
		t.Errorf("read through the latency proxy took %v, less than one 2+2 ms round trip", m.Elapsed)
	}
	for _, k := range []string{"sparse", "sparse/block"} {
		sp := byKey[k]
		if sp.Bytes <= 0 || sp.Bytes >= sparseImageBytes/2 || sp.Requests <= 0 {
			t.Errorf("%s image: %d bytes in %d requests fetched; want some, and far less than the %d-byte image", k, sp.Bytes, sp.Requests, sparseImageBytes)
		}
	}
	for _, k := range []string{"verity/on", "verity/off"} {
		if m := byKey[k]; m.Bytes != cfg.Size || m.Failed != "" {
			t.Errorf("%s: %d bytes read (want %d), failed %q", k, m.Bytes, cfg.Size, m.Failed)
		}
	}
	if !strings.Contains(byKey["verity/on"].Cmd, "--verity-root-hash") || strings.Contains(byKey["verity/off"].Cmd, "--verity-root-hash") {
		t.Errorf("verified/unverified commands: %q / %q", byKey["verity/on"].Cmd, byKey["verity/off"].Cmd)
	}

	var out bytes.Buffer
	if err := rep.write(&out); err != nil {
		t.Fatal(err)
	}
	text := out.String()
	for _, want := range []string{"| figure | blobseal | peer | ratio | goal | met? |", "vs rclone crypt mount",
		"best raw SDK", "alternating with the mount reads", "peak RSS", "bytes fetched", "+2ms each way", "machine: ",
		"verified mount vs unverified mount"} {
		if !strings.Contains(text, want) {
			t.Errorf("report lacks %q:\n%s", want, text)
		}
	}
	// Nothing may stay mounted under the work directory.
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(mi), cfg.WorkDir) {
		t.Errorf("a mount under %s survived the run:\n%s", cfg.WorkDir, mi)
	}
	if testing.Verbose() {
		t.Log("\n" + text)
	}
}

// TestMainThreadCPU: the main thread's share comes from its own stat file
// and cannot exceed the whole process's.
func TestMainThreadCPU(t *testing.T) {
	pid := os.Getpid()
	// Spin on this goroutine until the process has used at least one clock
	// tick, so that there is something to split.
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); {
		if d, err := cpuOf(pid); err != nil || d > 0 {
			break
		}
	}
	main, err := cpuOf(-pid)
	if err != nil {
		t.Fatal(err)
	}
	all, err := cpuOf(pid)
	if err != nil {
		t.Fatal(err)
	}
	if all <= 0 || main > all {
		t.Errorf("main thread %v, process %v: want 0 < main thread <= process", main, all)
	}
	if _, err := cpuOf(-(1 << 30)); err == nil || !strings.Contains(err.Error(), "main thread") {
		t.Errorf("missing process: err %v, want one naming the main thread", err)
	}
}

func TestParseStatCPU(t *testing.T) {
	// A comm with spaces and parentheses; utime 250 and stime 50 ticks.
	line := []byte("1234 (a (b) c) S 1 1234 1234 0 -1 4194304 100 0 0 0 250 50 0 0 20 0 8 0 100 1000000 200 18446744073709551615")
	got, err := parseStatCPU(line)
	if err != nil {
		t.Fatal(err)
	}
	if want := 3 * time.Second; got != want {
		t.Errorf("parseStatCPU = %v, want %v", got, want)
	}
	for _, bad := range []string{"", "1234 (x S 1", "1234 (x) S 1 2 3", "1234 (x) S 1 1 1 0 -1 0 0 0 0 0 zz 50 0"} {
		if _, err := parseStatCPU([]byte(bad)); err == nil {
			t.Errorf("parseStatCPU(%q) succeeded, want an error", bad)
		}
	}
	// Our own process has used some CPU and has a peak RSS.
	if d, err := procCPU(os.Getpid()); err != nil || d < 0 {
		t.Errorf("procCPU(self) = %v, %v", d, err)
	}
	if rss, err := procPeakRSS(os.Getpid()); err != nil || rss < 1<<20 {
		t.Errorf("procPeakRSS(self) = %d, %v", rss, err)
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"1G": 1 << 30, "256M": 256 << 20, "256MiB": 256 << 20, "32m": 32 << 20, "4096": 4096, "512K": 512 << 10} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "G", "-1G", "1T", "abc", "0"} {
		if _, err := parseSize(bad); err == nil {
			t.Errorf("parseSize(%q) succeeded, want an error", bad)
		}
	}
}

func TestMountinfoHas(t *testing.T) {
	mi := []byte("36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw\n" +
		"40 35 0:50 / /tmp/m fuse rw - fuse.blobseal blobseal:x rw\n")
	for dir, want := range map[string]bool{"/mnt/with space": true, "/tmp/m": true, "/tmp/m/": true, "/tmp": false, "/mnt1": false} {
		if got := mountinfoHas(mi, dir); got != want {
			t.Errorf("mountinfoHas(%q) = %v, want %v", dir, got, want)
		}
	}
}

func TestConfigValidate(t *testing.T) {
	good := config{Size: 32 << 20, Blobseal: os.Args[0], Rclone: "rclone", Endpoint: "http://127.0.0.1:1/devstoreaccount1",
		AzuritePID: 1, Runs: 1, CacheMiB: 64, RandomFor: time.Second}
	if err := good.validate(); err != nil {
		t.Fatalf("valid config rejected: %v", err)
	}
	for name, mut := range map[string]func(*config){
		"size":     func(c *config) { c.Size = 1000 },
		"blobseal": func(c *config) { c.Blobseal = "" },
		"missing":  func(c *config) { c.Blobseal = "/nonexistent/blobseal" },
		"endpoint": func(c *config) { c.Endpoint = "127.0.0.1:1" },
		"pid":      func(c *config) { c.AzuritePID = 0 },
		"cache":    func(c *config) { c.CacheMiB = 0 },
		"runs":     func(c *config) { c.Runs = 0 },
		"random":   func(c *config) { c.RandomFor = 0 },
	} {
		c := good
		mut(&c)
		if err := c.validate(); err == nil {
			t.Errorf("%s: invalid config accepted", name)
		}
	}
}
