package main

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime/pprof"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/blobseal/blobseal/blob"
	"github.com/blobseal/blobseal/blockcache"
	"github.com/blobseal/blobseal/crypto"
	"github.com/blobseal/blobseal/crypto/luks"
	"github.com/blobseal/blobseal/fs"
	"github.com/blobseal/blobseal/image"
	"github.com/blobseal/blobseal/internal/secret"
	"github.com/blobseal/blobseal/keyrelease"
)

// volumeFlags are the flags that say how to unlock an image.
type volumeFlags struct {
	keyFile       string
	format        string
	sectorSize    int
	kdfIterations int
	kdfMemoryMiB  int
}

func (v *volumeFlags) register(f *pflag.FlagSet) {
	f.StringVar(&v.keyFile, "key-file", "", "file whose bytes are the LUKS passphrase (or the raw XTS key with --format plain), used like cryptsetup --key-file")
	f.StringVar(&v.format, "format", "auto", "image format: auto (LUKS header), luks, or plain (headerless AES-XTS)")
	f.IntVar(&v.sectorSize, "sector-size", 4096, "encryption sector size of a plain image")
	f.IntVar(&v.kdfIterations, "kdf-max-iterations", luks.DefaultMaxIterations, "most pbkdf2 iterations a LUKS keyslot may ask for (a forged header must not buy minutes of CPU)")
	f.IntVar(&v.kdfMemoryMiB, "kdf-max-memory", luks.DefaultMaxArgonMemoryKiB>>10, "most argon2 memory a LUKS keyslot may ask for, MiB")
}

func (v *volumeFlags) validateFormat() error {
	switch v.format {
	case "auto", "luks", "plain":
	default:
		return usageErrorf("--format %q: use auto, luks or plain", v.format)
	}
	if v.kdfIterations < 1 || v.kdfMemoryMiB < 1 || v.kdfMemoryMiB > 64<<10 {
		return usageErrorf("--kdf-max-iterations must be positive and --kdf-max-memory between 1 and 65536 MiB")
	}
	return nil
}

// integrityFlags pin the image's verity tree.
type integrityFlags struct {
	rootHash   string
	hashOffset int64
	require    bool
}

func (i *integrityFlags) register(f *pflag.FlagSet) {
	f.StringVar(&i.rootHash, "verity-root-hash", "", "the image's dm-verity root hash in hex, as blobseal image create or veritysetup printed it: every block read is verified against it")
	f.Int64Var(&i.hashOffset, "verity-hash-offset", 0, "byte offset of the verity superblock; default: found at the end of the image (blobseal's layout)")
	f.BoolVar(&i.require, "require-integrity", false, "refuse to open the image without --verity-root-hash")
}

func (i *integrityFlags) integrity() (image.Integrity, error) {
	in := image.Integrity{HashOffset: i.hashOffset, Require: i.require}
	if i.hashOffset < 0 || i.hashOffset%4096 != 0 {
		return in, usageErrorf("--verity-hash-offset %d must be a non-negative multiple of 4096", i.hashOffset)
	}
	if i.rootHash == "" {
		if i.hashOffset != 0 {
			return in, usageErrorf("--verity-hash-offset needs --verity-root-hash")
		}
		return in, nil
	}
	root, err := image.ParseRootHash(i.rootHash)
	if err != nil {
		return in, usageErrorf("--verity-root-hash: %v", err)
	}
	in.RootHash = root
	return in, nil
}

// readImageKeyFile returns all bytes of the key file, exactly as cryptsetup
// --key-file reads them (no newline trimming).
func readImageKeyFile(path string) (secret.Bytes, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("key file: %w", err)
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("key file %s is not a regular file", path)
	}
	if st.Size() > 8<<20 {
		return nil, fmt.Errorf("key file %s is %d bytes; cryptsetup's limit is 8 MiB", path, st.Size())
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("key file: %w", err)
	}
	if len(b) == 0 {
		return nil, fmt.Errorf("key file %s is empty", path)
	}
	return secret.Bytes(b), nil
}

// imageSpec is the image.Spec for loc and key under the format flags.
func (v *volumeFlags) imageSpec(loc string, key secret.Bytes) image.Spec {
	spec := image.Spec{Location: loc, Key: key}
	spec.Crypto.KDF = luks.Policy{MaxIterations: v.kdfIterations, MaxArgonMemoryKiB: v.kdfMemoryMiB << 10}
	if v.format == "plain" {
		spec.Crypto.Format = "plain"
		spec.Crypto.Plain = crypto.PlainOptions{SectorSize: v.sectorSize}
	}
	return spec
}

// mountLogger builds the slog logger for --log-level and --log-format.
func mountLogger(level, format string, w io.Writer) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, usageErrorf("--log-level %q: use debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: l}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, usageErrorf("--log-format %q: use text or json", format)
}

// writeReadyFile writes data to path through a temporary file and a
// rename, so readers see all of it or nothing.
func writeReadyFile(path string, data []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

type mountFlags struct {
	vol                         volumeFlags
	rel                         releaseFlags
	integ                       integrityFlags
	allowOther, debugFUSE       bool
	cacheLocal                  bool
	readyFile, logLevel, logFmt string
	cacheDir, directIO, cpuProf string
	grace                       time.Duration
	cacheMiB                    int64
	storage                     storageFlags
	readWrite                   bool
	flushTimeout                time.Duration
	lease, dirtyMemory          string        // --lease-duration, --dirty-memory as given
	writeCache                  string        // --write-cache as given
	leaseDuration               time.Duration // parsed by checkReadWrite
	dirtyBytes                  int64         // parsed by checkReadWrite; 0: the default
	writeCacheBytes             int64         // --write-cache, parsed by checkReadWrite
}

// storageFlags bound how long reads wait for storage.
type storageFlags struct {
	readTimeout, requestTimeout, interruptGrace time.Duration
	retries                                     int
}

// maxRetries bounds --retries: more consecutive failures than this is a
// stuck storage account, which the read timeout handles anyway.
const maxRetries = 1000

func (s *storageFlags) register(f *pflag.FlagSet) {
	f.DurationVar(&s.readTimeout, "read-timeout", blockcache.DefaultReadDeadline, "how long one read may wait for storage, retries included, before it fails with EIO (the mount stays up)")
	f.IntVar(&s.retries, "retries", blob.DefaultMaxRetries, "consecutive failed storage requests without progress before a fetch gives up (blob URLs)")
	f.DurationVar(&s.requestTimeout, "request-timeout", blob.DefaultRequestTimeout, "bound on one storage request including its body (blob URLs)")
	f.DurationVar(&s.interruptGrace, "interrupt-grace", fs.DefaultInterruptGrace, "how long a read the kernel interrupts (a signal to the reader) keeps waiting before it answers EINTR")
}

func (s *storageFlags) validate() error {
	for _, d := range []struct {
		name string
		v    time.Duration
	}{{"--read-timeout", s.readTimeout}, {"--request-timeout", s.requestTimeout}, {"--interrupt-grace", s.interruptGrace}} {
		if d.v <= 0 {
			return usageErrorf("%s %v: must be a positive duration such as 30s or 2m", d.name, d.v)
		}
	}
	if s.retries < 1 || s.retries > maxRetries {
		return usageErrorf("--retries %d: must be between 1 and %d", s.retries, maxRetries)
	}
	return nil
}

func newMountCmd() *cobra.Command {
	var o mountFlags
	cmd := &cobra.Command{
		Use:   "mount (--key-file KEY | --key-name NAME --vault URL --maa-endpoint URL) [flags] IMAGE MOUNTPOINT",
		Short: "Mount an encrypted image (file or blob URL) with FUSE; key from a file or a secure key release",
		Long: "Serves IMAGE (a file or a blob URL) read-only at MOUNTPOINT in the foreground until\n" +
			"SIGINT/SIGTERM or an external unmount. Prints \"ready\" once the tree is servable.\n" +
			"The key comes from --key-file or from a secure key release (attestation, MAA, vault);\n" +
			"a released key stays in memory only. With --verity-root-hash every block is verified\n" +
			"against the image's hash tree before use; a tampered block reads as EIO.\n" +
			"With --read-write an image made by image create --read-write is served writable: a\n" +
			"local file, or a page blob (image upload --type page) held under a renewed write lease.",
		Example: "  blobseal mount --key-file key.bin --verity-root-hash ROOT data.img /mnt/data",
		Args:    positional("IMAGE", "MOUNTPOINT"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runMount(cmd, &o, args[0], args[1])
		},
	}
	f := cmd.Flags()
	o.vol.register(f)
	o.rel.register(f)
	o.integ.register(f)
	o.storage.register(f)
	f.BoolVar(&o.allowOther, "allow-other", false, "let other users (other containers) read the mount; needs root or user_allow_other")
	f.StringVar(&o.readyFile, "ready-file", "", "write this file (atomically) once the mount is servable")
	f.StringVar(&o.logLevel, "log-level", "info", "debug, info, warn or error")
	f.StringVar(&o.logFmt, "log-format", "text", "text or json (to stderr)")
	f.BoolVar(&o.debugFUSE, "debug-fuse", false, "log every FUSE request (with --log-level debug)")
	f.DurationVar(&o.grace, "unmount-grace", fs.DefaultUnmountGrace, "on SIGINT/SIGTERM, how long to retry a busy unmount before detaching lazily")
	f.Int64Var(&o.cacheMiB, "cache-memory", 256, "block cache memory for blob URLs, MiB")
	f.StringVar(&o.cacheDir, "cache-dir", "", "disk cache directory for blob URLs (ciphertext only)")
	// Default true: see image.Spec.DirectLocal for the measurement.
	f.BoolVar(&o.cacheLocal, "cache-local", true, "read a local image through the block cache (parallel read-ahead); false reads the file directly")
	f.StringVar(&o.directIO, "direct-io", "auto", "read files without the kernel page cache: auto (files of 32 MiB and more, when the kernel keeps mmap working: Linux 6.6+), on (every file) or off")
	f.StringVar(&o.cpuProf, "cpuprofile", "", "write a Go CPU profile of the whole mount to this file (for go tool pprof)")
	f.BoolVar(&o.readWrite, "read-write", false, "mount read-write an image made by image create --read-write (journal, no verity tree): a local file, or a page blob under a write lease; writes are encrypted, fsync commits the journal and returns once storage has it, unmount leaves a clean filesystem")
	f.StringVar(&o.lease, "lease-duration", fmt.Sprintf("%ds", blob.DefaultLeaseDuration/time.Second), "--read-write on a blob: the write lease, whole seconds from 15s to 60s, renewed at a third; after a crash the blob stays locked this long. infinite: a lease that never lapses (after a crash, break it to write again)")
	f.DurationVar(&o.flushTimeout, "flush-timeout", blockcache.DefaultFlushTimeout, "--read-write on a blob: how long an fsync may wait for storage before it fails with EIO (the data stays dirty for the next one), 1s to 1h")
	f.StringVar(&o.dirtyMemory, "dirty-memory", "64Mi", "--read-write on a blob: memory for written data not yet stored (on top of --cache-memory); when full, writes wait for storage up to --flush-timeout, then fail with EIO. Units Ki, Mi, Gi (or K, M, G)")
	f.StringVar(&o.writeCache, "write-cache", "64Mi", "--read-write: file data held in memory before it reaches the filesystem, so small writes leave as large runs; fsync, close and the 5 s commit flush it; when full, writers wait. 4Mi to 64Gi")
	// One key source: a file, or a release (whose flags key-name stands for).
	for _, rel := range releaseFlagNames() {
		cmd.MarkFlagsMutuallyExclusive("key-file", rel)
	}
	cmd.MarkFlagsOneRequired("key-file", "key-name")
	o.rel.declare(cmd)
	completeValues(cmd, "format", "auto", "luks", "plain")
	completeValues(cmd, "log-level", "debug", "info", "warn", "error")
	completeValues(cmd, "log-format", "text", "json")
	completeValues(cmd, "direct-io", "auto", "on", "off")
	return cmd
}

func runMount(cmd *cobra.Command, o *mountFlags, location, mountpoint string) error {
	ctx := cmd.Context()
	vf, rf := &o.vol, &o.rel
	release := vf.keyFile == ""
	if err := vf.validateFormat(); err != nil {
		return err
	}
	directMode, err := fs.ParseDirectIO(o.directIO)
	if err != nil {
		return usageErrorf("--direct-io: %v", err)
	}
	integrity, err := o.integ.integrity()
	if err != nil {
		return err
	}
	if err := o.storage.validate(); err != nil {
		return err
	}
	if o.readWrite {
		if err := checkReadWrite(o, integrity); err != nil {
			return err
		}
	}
	if release {
		if err := rf.prepare(); err != nil {
			return err
		}
	}
	logger, err := mountLogger(o.logLevel, o.logFmt, cmd.ErrOrStderr())
	if err != nil {
		return err
	}
	if o.cpuProf != "" {
		stop, err := startCPUProfile(o.cpuProf)
		if err != nil {
			return err
		}
		defer stop()
	}

	var key secret.Bytes
	if release {
		var rel keyrelease.Released
		rel, err = rf.release(ctx, logger)
		key = rel.Secret
	} else {
		key, err = readImageKeyFile(vf.keyFile)
	}
	if err != nil {
		return err
	}
	spec := vf.imageSpec(location, key)
	spec.Cache = blockcache.Options{MemoryBytes: o.cacheMiB << 20, DiskDir: o.cacheDir, ReadDeadline: o.storage.readTimeout}
	spec.Blob.MaxRetries = o.storage.retries
	spec.Blob.RequestTimeout = o.storage.requestTimeout
	spec.DirectLocal = !o.cacheLocal
	spec.Logger = logger
	spec.Integrity = integrity
	if o.readWrite {
		spec.Write.Lease.Duration = o.leaseDuration
		spec.Write.WriteBack.FlushTimeout = o.flushTimeout
		spec.Write.WriteBack.DirtyBytes = o.dirtyBytes
		return runMountWritable(cmd, o, spec, key, mountpoint)
	}
	img, err := image.Open(ctx, spec)
	key.Wipe()
	if err != nil {
		return err
	}
	defer img.Close()
	defer logImageStats(logger, img)
	srv, err := fs.Mount(ctx, mountpoint, img.FS, o.fuseOptions(logger, img.Name, directMode))
	if err != nil {
		return err
	}
	if err := o.announceReady(cmd, srv); err != nil {
		return err
	}
	if o.readyFile != "" {
		defer os.Remove(o.readyFile)
	}

	select {
	case <-ctx.Done():
		logger.Info("signal received; unmounting", "mountpoint", srv.Mountpoint())
		return srv.Unmount()
	case <-srv.Done():
		logger.Info("unmounted from outside", "mountpoint", srv.Mountpoint())
		return nil
	}
}

// startCPUProfile profiles the process into path until the returned stop.
func startCPUProfile(path string) (stop func(), err error) {
	fh, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("--cpuprofile: %w", err)
	}
	if err := pprof.StartCPUProfile(fh); err != nil {
		fh.Close()
		return nil, fmt.Errorf("--cpuprofile: %w", err)
	}
	return func() {
		pprof.StopCPUProfile()
		fh.Close()
	}, nil
}

// logImageStats logs what serving the image cost: requests and bytes sent
// to storage, cache effectiveness, and decryption work. Benchmarks read the
// request and byte counts from this line.
func logImageStats(logger *slog.Logger, img *image.Image) {
	attrs := []any{}
	if img.Cache != nil {
		st := img.Cache.Stats()
		attrs = append(attrs,
			"requests", st.Requests, "bytes_fetched", st.BytesFetched,
			"zero_filled_bytes", st.ZeroFilled, "hits", st.Hits, "pending_hits", st.PendingHits,
			"misses", st.Misses, "read_ahead", st.ReadAhead, "fetch_errors", st.FetchErrors,
			"evictions", st.Evictions, "peak_memory_bytes", st.PeakMemoryBytes, "mapped_bytes", st.MappedBytes,
			"fetch_p50", st.FetchLatency.Quantile(0.5), "fetch_p99", st.FetchLatency.Quantile(0.99))
	}
	vs := img.Volume.Stats()
	attrs = append(attrs, "bytes_decrypted", vs.BytesDecrypted, "decrypt_time", vs.DecryptTime)
	if img.Tree != nil {
		ts := img.Tree.Stats()
		attrs = append(attrs, "verified_blocks", ts.BlocksVerified, "verified_zero_blocks", ts.ZeroBlocks,
			"integrity_failures", ts.DataMismatches+ts.NodeMismatches, "tree_requests", ts.NodeRequests, "tree_bytes", ts.NodeBytes)
	}
	logger.Info("image statistics", attrs...)
}

// mountSourceName is the mount table's source column: short, no spaces or
// commas (fusermount option syntax), never a credential.
func mountSourceName(name string) string {
	name = strings.Map(func(r rune) rune {
		if r == ',' || r == ' ' || r == '\t' || r == '\n' || r == '\\' {
			return '_'
		}
		return r
	}, name)
	if len(name) > 200 {
		name = "…" + name[len(name)-200:]
	}
	return "blobseal:" + name
}

// fuseOptions are the mount options the flags give, read-only or
// read-write.
func (o *mountFlags) fuseOptions(logger *slog.Logger, name string, direct fs.DirectIOMode) fs.Options {
	return fs.Options{
		AllowOther:     o.allowOther,
		Logger:         logger,
		Source:         mountSourceName(name),
		Debug:          o.debugFUSE,
		UnmountGrace:   o.grace,
		DirectIO:       direct,
		InterruptGrace: o.storage.interruptGrace,
	}
}

// announceReady writes --ready-file and prints "ready": the tree is
// servable. On failure the mount is undone.
func (o *mountFlags) announceReady(cmd *cobra.Command, srv *fs.Server) error {
	if o.readyFile != "" {
		if err := writeReadyFile(o.readyFile, []byte(srv.Mountpoint()+"\n")); err != nil {
			_ = srv.Unmount()
			return fmt.Errorf("--ready-file: %w", err)
		}
	}
	fmt.Fprintln(cmd.OutOrStdout(), "ready")
	return nil
}
