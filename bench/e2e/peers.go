package main

// blobfuse2, Azure's own FUSE driver, as a peer (issue 16), and storage
// that behaves like Azure: a per-connection bandwidth cap and latency in
// front of Azurite. Also the model loaders' access patterns: mmap touched
// in shuffled page order, and safetensors-style header-then-large-ranges.

import (
	"context"
	"fmt"
	"hash/crc32"
	mrand "math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"github.com/blobseal/blobseal/blob"
)

// plainContainer holds the plaintext file blobfuse2 serves (it mounts a
// container; the file is CONTAINER/data.bin).
const plainContainer = "plain"

// setupBlobfuse2 uploads the plaintext as a block blob and writes two
// blobfuse2 configurations, straight to Azurite and through the proxy.
// Its block cache gets the same memory as blobseal's (its default would be
// 60 % of RAM).
func (h *harness) setupBlobfuse2(ctx context.Context) error {
	loc := strings.TrimSuffix(h.cfg.Endpoint, "/") + "/" + plainContainer + "/" + dataFileName
	h.logf("uploading the plaintext as a block blob for blobfuse2")
	r, err := blob.Upload(ctx, h.dataPath, loc, blob.UploadOptions{
		Options: blob.Options{ConnectionString: h.connString}, Type: "block", CreateContainer: true})
	if err != nil {
		return fmt.Errorf("upload the plaintext for blobfuse2: %w", err)
	}
	h.setupCmds = append(h.setupCmds, fmt.Sprintf("blob.Upload(%s, Type=block) → %d MiB plaintext for blobfuse2, %.1fs",
		loc, r.Uploaded>>20, r.Elapsed.Seconds()))
	// The README's configuration: 16 MiB blocks, 12 of them prefetched.
	// blobfuse2 wants a prefetch of at least 11 and memory for prefetch+1
	// blocks, so smaller caches (the CI run's) get smaller blocks.
	const prefetch = 12
	blockMiB := min(16, h.cfg.CacheMiB/(prefetch+1))
	if blockMiB < 1 {
		return fmt.Errorf("-cache-mib %d: blobfuse2 needs at least %d MiB (%d prefetched 1 MiB blocks and one more)", h.cfg.CacheMiB, prefetch+1, prefetch)
	}
	for _, c := range []struct {
		path     *string
		endpoint string
	}{{&h.bf2Conf, h.cfg.Endpoint}, {&h.bf2ProxyConf, h.proxyEnd}} {
		*c.path = filepath.Join(h.work, fmt.Sprintf("bf2-%d.yaml", len(h.setupCmds)))
		conf := fmt.Sprintf(`logging:
  type: silent
components: [libfuse, block_cache, attr_cache, azstorage]
libfuse:
  attribute-expiration-sec: 120
  entry-expiration-sec: 120
block_cache:
  block-size-mb: %d
  mem-size-mb: %d
  prefetch: %d
  parallelism: 16
azstorage:
  type: block
  account-name: %s
  account-key: %s
  endpoint: %s
  use-http: true
  mode: key
  container: %s
`, blockMiB, h.cfg.CacheMiB, prefetch, azuriteAcct, azuriteKey, strings.TrimSuffix(c.endpoint, "/"), plainContainer)
		if err := os.WriteFile(*c.path, []byte(conf), 0o600); err != nil {
			return err
		}
		h.setupCmds = append(h.setupCmds, "blobfuse2 config "+*c.path+fmt.Sprintf(" (block_cache: %d MiB blocks, mem %d MiB, prefetch %d, parallelism 16)", blockMiB, h.cfg.CacheMiB, prefetch))
	}
	return nil
}

// startBlobfuse2 mounts the plaintext container with blobfuse2 in the
// foreground and waits until the file is visible.
func (h *harness) startBlobfuse2(ctx context.Context, conf string) (*mountProc, error) {
	mnt, err := os.MkdirTemp(h.work, "mnt-blobfuse2-")
	if err != nil {
		return nil, err
	}
	args := []string{"mount", mnt, "--config-file=" + conf, "--foreground", "--disable-version-check"}
	cmd := exec.Command(h.cfg.Blobfuse2, args...)
	// Its block cache and logs need a writable HOME; keep them in the run.
	cmd.Env = append(os.Environ(), "HOME="+h.work)
	p := &mountProc{name: "blobfuse2", mountpoint: mnt, cmd: cmd, argv: h.cfg.Blobfuse2 + " " + strings.Join(args, " ")}
	if err := p.start(); err != nil {
		return nil, err
	}
	if err := p.waitForData(ctx); err != nil {
		return nil, err
	}
	return p, nil
}

func (h *harness) blobfuse2Mount(conf string) mountFn {
	return func(ctx context.Context) (*mountProc, error) { return h.startBlobfuse2(ctx, conf) }
}

// mmapShuffled maps the file and touches one byte of every page in a
// shuffled order, the way a model loader's mmap is faulted in by scattered
// tensor accesses: the time to all bytes. The mount's server is another
// process, so faulting here cannot deadlock with it.
//
// A page the mount fails to read is a SIGBUS; here it becomes this case's
// failure instead of killing the whole run (a peer answers EIO).
func (h *harness) mmapShuffled(path string) (_ measurement, err error) {
	f, err := os.Open(path)
	if err != nil {
		return measurement{}, err
	}
	defer f.Close()
	size := int(h.cfg.Size)
	t0 := time.Now()
	m, err := syscall.Mmap(int(f.Fd()), 0, size, syscall.PROT_READ, syscall.MAP_SHARED)
	if err != nil {
		return measurement{}, fmt.Errorf("mmap: %w", err)
	}
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			syscall.Munmap(m)
			err = fmt.Errorf("a mapped page could not be read (SIGBUS: the mount answered an error): %v", r)
		}
	}()
	pages := mrand.Perm(size / 4096)
	var sum byte
	for _, p := range pages {
		sum ^= m[p*4096]
	}
	el := time.Since(t0)
	runtime.KeepAlive(sum) // keeps the compiler from dropping the loads
	verify := func() (err error) {
		defer syscall.Munmap(m)
		defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
		defer func() {
			if r := recover(); r != nil {
				err = fmt.Errorf("a mapped page could not be read while verifying (SIGBUS): %v", r)
			}
		}()
		if got := crc32.Checksum(m, crcTable); got != h.dataCRC {
			return fmt.Errorf("the mapped file reads differently (CRC-32C %08x, want %08x)", got, h.dataCRC)
		}
		return nil
	}
	return measurement{Bytes: int64(size), Elapsed: el, verify: verify}, nil
}

// safetensorsRead reads like a safetensors loader: the 8-byte header
// length and a 64 KiB header, then the tensors in order as single large
// preads of 1, 4, 16 and 64 MiB in turn (which the kernel splits into
// concurrent 1 MiB FUSE reads): the time to all bytes.
func (h *harness) safetensorsRead(path string) (measurement, error) {
	f, err := os.Open(path)
	if err != nil {
		return measurement{}, err
	}
	defer f.Close()
	buf := make([]byte, 64<<20)
	crc := uint32(0)
	t0 := time.Now()
	if _, err := f.ReadAt(buf[:8], 0); err != nil {
		return measurement{}, err
	}
	if _, err := f.ReadAt(buf[:64<<10], 8); err != nil {
		return measurement{}, err
	}
	sizes := []int64{1 << 20, 4 << 20, 16 << 20, 64 << 20}
	var off int64
	for i := 0; off < h.cfg.Size; i++ {
		n := min(sizes[i%len(sizes)], h.cfg.Size-off)
		if _, err := f.ReadAt(buf[:n], off); err != nil {
			return measurement{}, fmt.Errorf("pread %d bytes at %d: %w", n, off, err)
		}
		crc = crc32.Update(crc, crcTable, buf[:n])
		off += n
	}
	el := time.Since(t0)
	if crc != h.dataCRC {
		return measurement{}, fmt.Errorf("the tensors read differently (CRC-32C %08x, want %08x)", crc, h.dataCRC)
	}
	return measurement{Bytes: off, Elapsed: el}, nil
}

// measurePeers runs the blobfuse2 comparison: the sequential read of the
// same bytes through blobseal (encrypted, verified), blobfuse2 and rclone
// crypt (plaintext peers) and the raw download, cold, alternating run by
// run so all meet Azurite in the same state; then random, parallel, mmap
// and safetensors reads of blobseal and blobfuse2. With proxied set, the
// same sequential comparison through the Azure-like proxy.
func (h *harness) measurePeers(ctx context.Context, step stepFn, best rawVariant, proxied bool) error {
	seqBudget := time.Minute + time.Duration(h.cfg.Size/10e6)*time.Second
	prefix, blockURL, bf2, cr := "peers/", h.blockURL, h.bf2Conf, "cr"
	what := "loopback"
	if proxied {
		prefix, bf2, cr = "azure/", h.bf2ProxyConf, "crp"
		blockURL = strings.Replace(h.blockURL, strings.TrimSuffix(h.cfg.Endpoint, "/"), strings.TrimSuffix(h.proxyEnd, "/"), 1)
		what = h.azureLabel()
	}
	// The raw download uses 16 connections, the fixed baseline: a
	// blobseal stream keeps up to 18 requests in flight on slow connections
	// (three quarters of blockcache.DefaultMaxFetches) and 8 on fast ones.
	raw := rawVariant{best.rangeSize, 16}
	for r := range h.cfg.Runs {
		h.logf("%s alternating run %d of %d", what, r+1, h.cfg.Runs)
		if err := step(prefix+"seq/blobseal", what+": blobseal mount (encrypted, verified), sequential", h.blobsealMount(blockURL), seqBudget, h.seqFile, nil); err != nil {
			return err
		}
		if h.cfg.Blobfuse2 != "" {
			if err := step(prefix+"seq/blobfuse2", what+": blobfuse2 mount (plaintext, block cache), sequential", h.blobfuse2Mount(bf2), seqBudget, h.seqFile, nil); err != nil {
				return err
			}
		}
		if err := step(prefix+"seq/rclone", what+": rclone crypt mount, sequential", h.rcloneMount(cr), seqBudget, h.seqFile, nil); err != nil {
			return err
		}
		m, err := h.rawDownload(ctx, prefix+"raw", blockURL, raw)
		if err != nil {
			return err
		}
		m.Label = what + ": raw SDK download, " + m.Label
		h.add(m)
	}
	for _, k := range []string{"seq/blobseal", "seq/blobfuse2", "seq/rclone", "raw"} {
		h.mergeRuns(prefix + k)
	}
	if proxied || h.cfg.Blobfuse2 == "" {
		return nil
	}
	randBudget := time.Minute + h.cfg.RandomFor
	for _, c := range []struct {
		key, label string
		budget     time.Duration
		read       func(string) (measurement, error)
	}{
		{"rand1", "random 4 KiB, 1 thread", randBudget, h.randomFile(1)},
		{"rand16", "random 4 KiB, 16 threads", randBudget, h.randomFile(16)},
		{"par16", "16 parallel readers", seqBudget, h.parallelFile(16)},
		{"mmap", "mmap, pages touched in shuffled order", seqBudget, h.mmapShuffled},
		{"safetensors", "safetensors-style: header, then 1-64 MiB preads", seqBudget, h.safetensorsRead},
	} {
		if err := step(prefix+c.key+"/blobseal", "blobseal mount, "+c.label, h.blobsealMount(h.blockURL), c.budget, c.read, nil); err != nil {
			return err
		}
		if err := step(prefix+c.key+"/blobfuse2", "blobfuse2 mount, "+c.label, h.blobfuse2Mount(h.bf2Conf), c.budget, c.read, nil); err != nil {
			return err
		}
	}
	return nil
}

// peerRows adds the blobfuse2 and Azure-like rows to the report.
func (h *harness) peerRows(add addFn) {
	get := func(k string) measurement { m, _ := h.find(k); return m }
	mbps := func(m measurement) string { return fmt.Sprintf("%.1f MB/s", m.MBps()) }
	cpu := func(m measurement) string { return fmt.Sprintf("%.2f s/GiB", m.perGiB(m.ClientCPU)) }
	rss := func(m measurement) string { return fmt.Sprintf("%.0f MiB", float64(m.PeakRSS)/(1<<20)) }
	iops := func(m measurement) string {
		if m.Latency == nil {
			return "—"
		}
		return fmt.Sprintf("%.0f IOPS", m.Latency.IOPS)
	}
	iopsOf := func(m measurement) float64 {
		if m.Latency == nil {
			return 0
		}
		return m.Latency.IOPS
	}
	secs := func(m measurement) string { return fmt.Sprintf("%.2f s", m.Elapsed.Seconds()) }

	b, f, r, raw := get("peers/seq/blobseal"), get("peers/seq/blobfuse2"), get("peers/seq/rclone"), get("peers/raw")
	add("loopback, alternating: seq read, blobseal vs blobfuse2", b, f, mbps, mbps, b.MBps(), f.MBps(), goal{atLeast: 1.5})
	add("  client CPU per GiB (server + reader), blobseal vs blobfuse2", b, f, cpu, cpu, b.perGiB(b.ClientCPU), f.perGiB(f.ClientCPU), goal{atMost: 0.5})
	add("  peak RSS, blobseal vs blobfuse2 (both given the same cache memory)", b, f, rss, rss, float64(b.PeakRSS), float64(f.PeakRSS), goal{})
	add("  seq read, blobseal vs rclone crypt", b, r, mbps, mbps, b.MBps(), r.MBps(), goal{})
	add("  seq read, blobseal vs raw SDK download ("+raw.Label+")", b, raw, mbps, mbps, b.MBps(), raw.MBps(), goal{})
	for _, k := range []struct {
		key, fig string
		g        goal
	}{{"rand1", "random 4 KiB, 1 thread: IOPS", goal{atLeast: 2}}, {"rand16", "random 4 KiB, 16 threads: IOPS", goal{atLeast: 2}}} {
		bb, ff := get("peers/"+k.key+"/blobseal"), get("peers/"+k.key+"/blobfuse2")
		add("loopback: "+k.fig+", blobseal vs blobfuse2", bb, ff, iops, iops, iopsOf(bb), iopsOf(ff), k.g)
	}
	pb, pf := get("peers/par16/blobseal"), get("peers/par16/blobfuse2")
	add("loopback: 16 parallel readers, blobseal vs blobfuse2", pb, pf, mbps, mbps, pb.MBps(), pf.MBps(), goal{})
	add("  peak RSS, blobseal vs blobfuse2", pb, pf, rss, rss, float64(pb.PeakRSS), float64(pf.PeakRSS), goal{})
	for _, k := range []struct{ key, fig string }{{"mmap", "mmap in shuffled page order"}, {"safetensors", "safetensors-style reads"}} {
		bb, ff := get("peers/"+k.key+"/blobseal"), get("peers/"+k.key+"/blobfuse2")
		// Time to all bytes: lower is better, so the ratio is peer ÷ ours.
		add("loopback: "+k.fig+", time to all bytes, blobfuse2 ÷ blobseal (speed-up)", bb, ff, secs, secs, ff.Elapsed.Seconds(), bb.Elapsed.Seconds(), goal{})
	}

	ab, af, ar, araw := get("azure/seq/blobseal"), get("azure/seq/blobfuse2"), get("azure/seq/rclone"), get("azure/raw")
	lbl := h.azureLabel() + ", alternating: "
	add(lbl+"seq read, blobseal vs raw SDK on the same connections ("+araw.Label+")", ab, araw, mbps, mbps, ab.MBps(), araw.MBps(), goal{atLeast: 0.95})
	add(lbl+"seq read, blobseal vs blobfuse2", ab, af, mbps, mbps, ab.MBps(), af.MBps(), goal{atLeast: 2})
	add(lbl+"seq read, blobseal vs rclone crypt", ab, ar, mbps, mbps, ab.MBps(), ar.MBps(), goal{atLeast: 2})
}

// peerVersions names the peers' versions for the report header.
func (h *harness) peerVersions() string {
	v := func(bin string, args ...string) string {
		if bin == "" {
			return "not run"
		}
		out, err := exec.Command(bin, args...).Output()
		if err != nil {
			return "version unknown"
		}
		// blobfuse2 prints log lines before its version.
		for _, l := range strings.Split(string(out), "\n") {
			if strings.Contains(l, "version") && !strings.Contains(l, "LOG_") {
				return strings.TrimSpace(l)
			}
		}
		return "version unknown"
	}
	return "rclone " + v(h.cfg.Rclone, "version") + "; blobfuse2 " + v(h.cfg.Blobfuse2, "--version", "--disable-version-check")
}

// azureLabel names the Azure-like storage the proxy simulates.
func (h *harness) azureLabel() string {
	return fmt.Sprintf("Azure-like (%d MB/s per connection, +%v each way)", h.cfg.BandwidthKBps/1000, h.cfg.Latency)
}
