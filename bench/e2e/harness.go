package main

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	mrand "math/rand/v2"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/Shopify/toxiproxy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/blobseal/blobseal/blob"
	"github.com/blobseal/blobseal/image"
)

const (
	dataFileName  = "data.bin"
	containerName = "bench"
	azuriteKey    = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
	azuriteAcct   = "devstoreaccount1"
	// sparse case (issue 4): a 64 MiB page-blob image holding 1 MiB of files.
	sparseImageBytes = 64 << 20
	sparseFiles      = 16
	sparseFileBytes  = 64 << 10
	luksDataOffset   = 16 << 20 // LUKS2 header area in front of the data
)

var crcTable = crc32.MakeTable(crc32.Castagnoli)

// config is everything one run needs; main fills it from flags, the test
// from internal/testenv.
type config struct {
	Size       int64         // bytes of the plaintext file
	Quick      bool          // fewer raw-download variants, shorter random phases
	Runs       int           // repetitions of raw and sequential cases; the median is reported
	Blobseal   string        // path of the blobseal binary
	Rclone     string        // path of rclone
	Blobfuse2  string        // path of blobfuse2 ("" leaves the peer out)
	Endpoint   string        // Azurite blob endpoint, http://127.0.0.1:PORT/devstoreaccount1
	AzuritePID int           // Azurite's process, for its CPU time
	CacheMiB   int64         // blobseal --cache-memory
	RandomFor  time.Duration // duration of each random-read phase
	Latency    time.Duration // injected each way by the proxy in phase h
	// BandwidthKBps caps each proxied connection, each way (toxiproxy's
	// bandwidth toxic, KB/s): real Blob Storage limits a connection's
	// throughput. 0 leaves it uncapped.
	BandwidthKBps int64
	WorkDir       string          // parent directory for data, images, mount points
	Command       string          // the command line, for the report
	Log           io.Writer       // progress lines
	Only          map[string]bool // phases to run (nil: all)
}

// phases are the parts of a run -only can select.
var phases = []string{"raw", "cache", "headline", "verity", "verity-azure", "seq", "rand", "par", "sparse", "proxy", "peers", "azure", "rclone-late"}

// want reports whether the phase is to run.
func (c config) want(phase string) bool { return c.Only == nil || c.Only[phase] }

func (c config) validate() error {
	switch {
	case c.Size < 16<<20 || c.Size%(1<<20) != 0:
		return fmt.Errorf("-size %d: use a whole number of MiB, at least 16 MiB", c.Size)
	case c.Blobseal == "":
		return errors.New("-blobseal: path of a built blobseal binary is required (go build -o /tmp/blobseal ./cmd/blobseal)")
	case c.Rclone == "":
		return errors.New("-rclone: rclone not found; install the Debian package rclone or pass its path")
	case c.Endpoint == "":
		return errors.New("-azurite: Azurite blob endpoint is required, e.g. http://127.0.0.1:10000/devstoreaccount1 (bench/e2e.sh starts one)")
	case c.AzuritePID <= 0:
		return errors.New("-azurite-pid: Azurite's process id is required for its CPU time")
	case c.Runs < 1 || c.Runs > 9:
		return fmt.Errorf("-runs %d: use 1 to 9", c.Runs)
	case c.CacheMiB <= 0:
		return fmt.Errorf("-cache-mib %d: must be positive", c.CacheMiB)
	case c.RandomFor <= 0:
		return fmt.Errorf("-random-for %v: must be positive", c.RandomFor)
	case c.Latency < 0:
		return fmt.Errorf("-latency %v: must not be negative", c.Latency)
	case c.BandwidthKBps < 0:
		return fmt.Errorf("-bandwidth-kbps %d: must not be negative", c.BandwidthKBps)
	}
	if c.Blobfuse2 != "" {
		if _, err := os.Stat(c.Blobfuse2); err != nil {
			return fmt.Errorf("-blobfuse2: %w", err)
		}
	}
	if _, err := os.Stat(c.Blobseal); err != nil {
		return fmt.Errorf("-blobseal: %w", err)
	}
	u, err := url.Parse(c.Endpoint)
	if err != nil || u.Scheme != "http" || u.Host == "" {
		return fmt.Errorf("-azurite %q: want http://127.0.0.1:PORT/devstoreaccount1", c.Endpoint)
	}
	return nil
}

// harness holds the state of one run.
type harness struct {
	cfg            config
	work           string // private temp dir, removed at the end
	keyFile        string // 32 random bytes: the LUKS passphrase (tmpfs when available)
	key            []byte
	connString     string
	rcloneConf     string
	dataDir        string
	dataPath       string
	dataCRC        uint32
	blockURL       string
	pageURL        string
	sparseURL      string
	sparseBlockURL string // the same sparse image as a block blob
	sparseDir      string
	root           string // verity root hash of the main image
	sparseRoot     string // of the sparse image
	proxy          *toxiproxy.Proxy
	proxyEnd       string // the Azurite endpoint through the latency proxy
	bf2Conf        string // blobfuse2 configuration, straight to Azurite
	bf2ProxyConf   string // and through the proxy
	results        []measurement
	warnings       []string
	setupCmds      []string
}

func (h *harness) logf(format string, args ...any) {
	if h.cfg.Log != nil {
		fmt.Fprintf(h.cfg.Log, "e2e: "+format+"\n", args...)
	}
}

func (h *harness) warn(format string, args ...any) {
	w := fmt.Sprintf(format, args...)
	h.logf("WARNING: %s", w)
	h.warnings = append(h.warnings, w)
}

// run performs the whole benchmark and returns the report.
func run(ctx context.Context, cfg config) (rep *report, err error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	start := time.Now()
	h := &harness{cfg: cfg}
	h.work, err = os.MkdirTemp(cfg.WorkDir, "blobseal-e2e-")
	if err != nil {
		return nil, err
	}
	defer func() { err = errors.Join(err, os.RemoveAll(h.work)) }()
	keyDir := h.work
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		// The key file lives in memory, not on disk.
		if keyDir, err = os.MkdirTemp("/dev/shm", "blobseal-e2e-key-"); err != nil {
			return nil, err
		}
		defer os.RemoveAll(keyDir)
	}
	h.connString = fmt.Sprintf("DefaultEndpointsProtocol=http;AccountName=%s;AccountKey=%s;BlobEndpoint=%s;",
		azuriteAcct, azuriteKey, strings.TrimSuffix(cfg.Endpoint, "/"))
	h.key = make([]byte, 32)
	if _, err := rand.Read(h.key); err != nil {
		return nil, err
	}
	h.keyFile = filepath.Join(keyDir, "key.bin")
	if err := os.WriteFile(h.keyFile, h.key, 0o600); err != nil {
		return nil, err
	}
	if err := h.startProxy(); err != nil {
		return nil, err
	}
	defer h.proxy.Stop()
	if err := h.setup(ctx); err != nil {
		return nil, fmt.Errorf("setup: %w", err)
	}
	if err := h.measureAll(ctx); err != nil {
		return nil, err
	}
	return h.report(time.Since(start)), nil
}

// startProxy puts toxiproxy between clients and Azurite with cfg.Latency
// added in each direction.
func (h *harness) startProxy() error {
	u, err := url.Parse(h.cfg.Endpoint)
	if err != nil {
		return err
	}
	srv := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(prometheus.NewRegistry()), zerolog.Nop())
	h.proxy = toxiproxy.NewProxy(srv, "azurite", "127.0.0.1:0", u.Host)
	if err := h.proxy.Start(); err != nil {
		return fmt.Errorf("toxiproxy: %w", err)
	}
	ms := h.cfg.Latency.Milliseconds()
	for _, dir := range []string{"upstream", "downstream"} {
		js := fmt.Sprintf(`{"name":"latency_%s","type":"latency","stream":%q,"attributes":{"latency":%d}}`, dir, dir, ms)
		if _, err := h.proxy.Toxics.AddToxicJson(strings.NewReader(js)); err != nil {
			h.proxy.Stop()
			return fmt.Errorf("toxiproxy latency toxic: %w", err)
		}
		if h.cfg.BandwidthKBps > 0 {
			// The toxic is per connection: each gets its own rate.
			js := fmt.Sprintf(`{"name":"bandwidth_%s","type":"bandwidth","stream":%q,"attributes":{"rate":%d}}`, dir, dir, h.cfg.BandwidthKBps)
			if _, err := h.proxy.Toxics.AddToxicJson(strings.NewReader(js)); err != nil {
				h.proxy.Stop()
				return fmt.Errorf("toxiproxy bandwidth toxic: %w", err)
			}
		}
	}
	h.proxyEnd = "http://" + h.proxy.Listen + u.Path
	return nil
}

// setup creates the data once: the plaintext file, its encrypted image
// uploaded as a block and a page blob, the same plaintext through an rclone
// crypt remote, and the sparse image.
func (h *harness) setup(ctx context.Context) error {
	h.dataDir = filepath.Join(h.work, "data")
	if err := os.Mkdir(h.dataDir, 0o755); err != nil {
		return err
	}
	h.dataPath = filepath.Join(h.dataDir, dataFileName)
	h.logf("writing %d MiB of random data", h.cfg.Size>>20)
	crc, err := writeRandomFile(h.dataPath, h.cfg.Size)
	if err != nil {
		return err
	}
	h.dataCRC = crc

	img := filepath.Join(h.work, "image.img")
	h.logf("building the encrypted image")
	t0 := time.Now()
	res, err := image.Create(ctx, image.CreateOptions{From: h.dataDir, Out: img, Key: h.key})
	if err != nil {
		return fmt.Errorf("image create: %w", err)
	}
	h.root = res.Verity.RootHash
	h.setupCmds = append(h.setupCmds, fmt.Sprintf("image.Create(From=%s) → %d MiB image, %d MiB of holes, %.1fs",
		h.dataDir, res.ImageBytes>>20, res.HoleBytes>>20, time.Since(t0).Seconds()))

	base := strings.TrimSuffix(h.cfg.Endpoint, "/") + "/" + containerName + "/"
	h.blockURL, h.pageURL, h.sparseURL = base+"image-block.img", base+"image-page.img", base+"sparse-page.img"
	h.sparseBlockURL = base + "sparse-block.img"
	for _, u := range []struct{ loc, typ string }{{h.blockURL, "block"}, {h.pageURL, "page"}} {
		h.logf("uploading the image as a %s blob", u.typ)
		r, err := blob.Upload(ctx, img, u.loc, blob.UploadOptions{
			Options: blob.Options{ConnectionString: h.connString}, Type: u.typ, CreateContainer: true})
		if err != nil {
			return fmt.Errorf("upload %s blob: %w", u.typ, err)
		}
		h.setupCmds = append(h.setupCmds, fmt.Sprintf("blob.Upload(%s, Type=%s) → %d MiB sent in %d requests, %.1fs",
			u.loc, u.typ, r.Uploaded>>20, r.Requests, r.Elapsed.Seconds()))
	}
	if err := os.Remove(img); err != nil {
		return err
	}
	if err := h.setupRclone(ctx); err != nil {
		return err
	}
	if h.cfg.Blobfuse2 != "" && (h.cfg.want("peers") || h.cfg.want("azure")) {
		if err := h.setupBlobfuse2(ctx); err != nil {
			return err
		}
	}
	return h.setupSparse(ctx)
}

// writeRandomFile writes size pseudo-random bytes (ChaCha8, random seed:
// incompressible, fast) and returns their CRC-32C.
func writeRandomFile(path string, size int64) (uint32, error) {
	var seed [32]byte
	if _, err := rand.Read(seed[:]); err != nil {
		return 0, err
	}
	gen := mrand.NewChaCha8(seed)
	f, err := os.Create(path)
	if err != nil {
		return 0, err
	}
	buf := make([]byte, 1<<20)
	var crc uint32
	for done := int64(0); done < size; done += int64(len(buf)) {
		n := int64(len(buf))
		if size-done < n {
			n = size - done
		}
		_, _ = gen.Read(buf[:n])
		crc = crc32.Update(crc, crcTable, buf[:n])
		if _, err := f.Write(buf[:n]); err != nil {
			f.Close()
			return 0, err
		}
	}
	return crc, f.Close()
}

// setupRclone writes a private rclone config (azureblob remote on Azurite,
// direct and through the proxy, each under a crypt remote with the same
// password) and copies the plaintext through crypt.
func (h *harness) setupRclone(ctx context.Context) error {
	var pw [24]byte
	if _, err := rand.Read(pw[:]); err != nil {
		return err
	}
	obscured, err := exec.CommandContext(ctx, h.cfg.Rclone, "obscure", fmt.Sprintf("%x", pw)).Output()
	if err != nil {
		return fmt.Errorf("rclone obscure: %w", err)
	}
	ob := strings.TrimSpace(string(obscured))
	var b strings.Builder
	for _, r := range []struct{ name, endpoint string }{{"az", h.cfg.Endpoint}, {"azp", h.proxyEnd}} {
		fmt.Fprintf(&b, "[%s]\ntype = azureblob\naccount = %s\nkey = %s\nendpoint = %s\nuse_emulator = true\n\n",
			r.name, azuriteAcct, azuriteKey, r.endpoint)
		fmt.Fprintf(&b, "[%s]\ntype = crypt\nremote = %s:rclone\npassword = %s\n\n",
			strings.Replace(r.name, "az", "cr", 1), r.name, ob)
	}
	h.rcloneConf = filepath.Join(h.work, "rclone.conf")
	if err := os.WriteFile(h.rcloneConf, []byte(b.String()), 0o600); err != nil {
		return err
	}
	args := []string{"--config", h.rcloneConf, "copy", h.dataDir, "cr:"}
	h.logf("copying the plaintext through rclone crypt")
	t0 := time.Now()
	if out, err := exec.CommandContext(ctx, h.cfg.Rclone, args...).CombinedOutput(); err != nil {
		return fmt.Errorf("rclone copy: %v: %s", err, strings.TrimSpace(string(out)))
	}
	h.setupCmds = append(h.setupCmds, fmt.Sprintf("%s %s  (%.1fs)", h.cfg.Rclone, strings.Join(args, " "), time.Since(t0).Seconds()))
	return nil
}

// setupSparse builds the issue-4 sparse case: a 64 MiB image holding 1 MiB
// of files, uploaded as a page blob (only written pages are stored) and as
// a block blob (every byte stored; the verity tree says which are zeros).
func (h *harness) setupSparse(ctx context.Context) error {
	h.sparseDir = filepath.Join(h.work, "sparse")
	if err := os.Mkdir(h.sparseDir, 0o755); err != nil {
		return err
	}
	for i := range sparseFiles {
		if _, err := writeRandomFile(filepath.Join(h.sparseDir, fmt.Sprintf("f%02d", i)), sparseFileBytes); err != nil {
			return err
		}
	}
	img := filepath.Join(h.work, "sparse.img")
	res, err := image.Create(ctx, image.CreateOptions{From: h.sparseDir, Out: img, Key: h.key, Size: sparseImageBytes - luksDataOffset})
	if err != nil {
		return fmt.Errorf("sparse image create: %w", err)
	}
	h.sparseRoot = res.Verity.RootHash
	for _, u := range []struct{ loc, typ string }{{h.sparseURL, "page"}, {h.sparseBlockURL, "block"}} {
		if _, err := blob.Upload(ctx, img, u.loc, blob.UploadOptions{
			Options: blob.Options{ConnectionString: h.connString}, Type: u.typ}); err != nil {
			return fmt.Errorf("upload sparse image as a %s blob: %w", u.typ, err)
		}
	}
	return os.Remove(img)
}
