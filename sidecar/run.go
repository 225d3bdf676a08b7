package sidecar

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/blobseal/blobseal/blob"
	"github.com/blobseal/blobseal/blockcache"
	"github.com/blobseal/blobseal/crypto"
	"github.com/blobseal/blobseal/crypto/luks"
	"github.com/blobseal/blobseal/fs"
	"github.com/blobseal/blobseal/image"
	"github.com/blobseal/blobseal/internal/secret"
	"github.com/blobseal/blobseal/skr"
)

// KeySource obtains the key of one filesystem. The default is
// Sidecar.obtainKey; tests may substitute one.
type KeySource func(ctx context.Context, f *Filesystem) (secret.Bytes, error)

// Sidecar serves every configured filesystem.
type Sidecar struct {
	cfg     *Config
	log     *slog.Logger
	keys    KeySource
	metrics *Metrics

	healthAddr string
	keyEnv     keyEnv

	mu      sync.Mutex
	states  map[string]*fsState
	skrAddr string
	skrSrv  *skr.Server
}

// fsState is one filesystem's published status, for /readyz.
type fsState struct {
	Name       string `json:"name"`
	MountPoint string `json:"mount_point"`
	Ready      bool   `json:"ready"`
	Attempts   int    `json:"attempts"`
	LastError  string `json:"last_error,omitempty"`
	img        *image.Image
	rw         *image.Writable // read_write mounts: write-back counters
}

// New prepares a sidecar. keys may be nil for the default key sources.
func New(cfg *Config, log *slog.Logger, keys KeySource) *Sidecar {
	s := &Sidecar{cfg: cfg, log: log, states: map[string]*fsState{}}
	if keys == nil {
		keys = s.obtainKey
	}
	s.keys = keys
	for _, f := range cfg.Filesystems {
		s.states[f.Name] = &fsState{Name: f.Name, MountPoint: f.MountPoint}
	}
	s.metrics = newMetrics(s)
	return s
}

// Run mounts everything concurrently, serves until ctx ends, then unmounts.
// It returns an error when a filesystem fails and on_failure is "exit".
func (s *Sidecar) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)

	stopHealth, err := s.startHealth(ctx)
	if err != nil {
		return err
	}
	defer stopHealth()

	defer s.cfg.Wipe()

	var wg sync.WaitGroup
	if s.cfg.SKR.Address != "" {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := s.runSKR(ctx); err != nil {
				cancel(err)
			}
		}()
	}
	for _, f := range s.cfg.Filesystems {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := s.serve(ctx, f); err != nil {
				cancel(err)
			}
		}()
	}
	wg.Wait()
	if err := context.Cause(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}

// serve keeps one filesystem mounted until ctx ends.
func (s *Sidecar) serve(ctx context.Context, f *Filesystem) error {
	log := s.log.With("fs", f.Name, "mount_point", f.MountPoint)
	for attempt := 1; ; attempt++ {
		m, err := s.mountOnce(ctx, f, log)
		if err != nil {
			s.setState(f.Name, func(st *fsState) { st.Attempts = attempt; st.LastError = err.Error() })
			if ctx.Err() != nil {
				return nil
			}
			log.Error("filesystem not mounted", "attempt", attempt, "err", err)
			if s.cfg.OnFailure != "retry" {
				return fmt.Errorf("filesystem %s (%s): %w", f.Name, f.MountPoint, err)
			}
			if !sleep(ctx, backoff(attempt, time.Duration(s.cfg.RetryMaxDelay))) {
				return nil
			}
			continue
		}
		s.setState(f.Name, func(st *fsState) {
			st.Attempts, st.Ready, st.LastError, st.img, st.rw = attempt, true, "", m.img, m.rw
		})
		s.checkAllReady(log)
		go s.watchLease(ctx, f, m)
		select {
		case <-ctx.Done():
			s.setState(f.Name, func(st *fsState) { st.Ready = false; st.img, st.rw = nil, nil })
			m.stop(log, time.Duration(s.cfg.UnmountGrace))
			return nil
		case <-m.server.Done():
			// Unmounted behind our back (fusermount -u, a crash of the
			// kernel connection): report, then mount again or fail.
			s.setState(f.Name, func(st *fsState) {
				st.Ready, st.img, st.rw, st.LastError = false, nil, nil, "unmounted externally"
			})
			m.stop(log, 0)
			log.Error("mount ended unexpectedly")
			if s.cfg.OnFailure != "retry" {
				return fmt.Errorf("filesystem %s (%s) was unmounted externally", f.Name, f.MountPoint)
			}
		}
	}
}

type mounted struct {
	f      *Filesystem
	img    *image.Image    // read-only mounts
	rw     *image.Writable // read_write mounts
	server *fs.Server
	hidden string
}

// watchLease marks a read-write mount whose lease is lost as not ready,
// saying why, and counts the loss: the mount stays up read-only, but
// writes are refused and what was not stored is lost.
func (s *Sidecar) watchLease(ctx context.Context, f *Filesystem, m *mounted) {
	select {
	case <-m.leaseLost():
	case <-m.server.Done():
		return
	case <-ctx.Done():
		return
	}
	s.metrics.leaseLosses.WithLabelValues(f.Name).Inc()
	reason := fmt.Sprintf("write lease lost, the mount is read-only (restart the sidecar to write again): %v", m.rw.Lease.Err())
	// The ready file says "every filesystem serves"; no longer true. It
	// goes first, so that whoever sees /readyz fail finds it gone.
	if p := s.cfg.Health.ReadyFile; p != "" {
		if err := os.Remove(p); err != nil && !os.IsNotExist(err) {
			s.log.Warn("remove ready file", "path", p, "err", err)
		}
	}
	s.setState(f.Name, func(st *fsState) { st.Ready = false; st.LastError = reason })
}

// leaseLost is closed when a read-write mount's lease is lost; nil (never)
// otherwise.
func (m *mounted) leaseLost() <-chan struct{} {
	if m.rw == nil || m.rw.Lease == nil {
		return nil
	}
	return m.rw.Lease.Lost()
}

func (m *mounted) stop(log *slog.Logger, grace time.Duration) {
	if err := unpublish(m.f.MountPoint, m.hidden); err != nil {
		log.Warn("remove published mount point", "err", err)
	}
	if err := m.server.Unmount(); err != nil {
		log.Warn("unmount", "err", err)
	}
	m.server.Wait()
	if m.rw != nil {
		// The writer was flushed at unmount; this uploads what is left
		// and releases the write lease.
		if err := m.rw.Close(); err != nil {
			log.Error("flush the read-write image at unmount", "err", err)
		}
	} else {
		m.img.Close()
	}
	os.Remove(m.hidden)
	log.Info("unmounted")
}

// mountOnce releases the key, opens the image, mounts it hidden, then
// publishes it.
func (s *Sidecar) mountOnce(ctx context.Context, f *Filesystem, log *slog.Logger) (_ *mounted, err error) {
	start := time.Now()
	key, err := s.keys(ctx, f)
	if err != nil {
		s.metrics.errors.WithLabelValues("key_release").Inc()
		return nil, err
	}
	s.metrics.keyRelease.WithLabelValues(f.Name).Observe(time.Since(start).Seconds())
	defer key.Wipe()

	blobOpts, err := s.blobOptions(f)
	if err != nil {
		return nil, err
	}
	if f.ReadWrite {
		return s.mountWritable(ctx, f, log, key, blobOpts, start)
	}
	spec := s.imageSpec(f, log, key, blobOpts)
	spec.Integrity = image.Integrity{RootHash: f.verityRoot, HashOffset: f.VerityHashOffset, Require: *f.RequireIntegrity}
	img, err := image.Open(ctx, spec)
	if err != nil {
		s.metrics.errors.WithLabelValues("open").Inc()
		return nil, err
	}
	defer func() {
		if err != nil {
			img.Close()
		}
	}()
	server, hidden, err := s.mountAndPublish(f, func(hidden string) (*fs.Server, error) {
		return fs.Mount(ctx, hidden, img.FS, s.fuseOptions(f, log))
	})
	if err != nil {
		return nil, err
	}
	info := img.Volume.Info()
	for _, w := range info.Warnings {
		log.Warn("image header needs attention", "warning", w)
	}
	integrity := "none: storage can modify the image undetected"
	if img.Tree != nil {
		integrity = "verity root " + f.VerityRootHash
	}
	log.Info("filesystem ready", "source", img.Source.String(), "format", info.Format,
		"bytes", info.Size, "integrity", integrity, "took", time.Since(start).Round(time.Millisecond))
	return &mounted{f: f, img: img, server: server, hidden: hidden}, nil
}

// mountWritable is mountOnce for read_write: the page blob opened for
// writing under its lease, mounted writable, turned read-only (and logged)
// if the lease is lost.
func (s *Sidecar) mountWritable(ctx context.Context, f *Filesystem, log *slog.Logger, key []byte, blobOpts blob.Options, start time.Time) (_ *mounted, err error) {
	rw, err := image.OpenWritable(ctx, s.imageSpec(f, log, key, blobOpts))
	if err != nil {
		s.metrics.errors.WithLabelValues("open").Inc()
		return nil, err
	}
	defer func() {
		if err != nil {
			rw.Close()
		}
	}()
	opts := s.fuseOptions(f, log)
	opts.ReadOnlyAfter = rw.WatchLease(log)
	opts.DirtyLimit = int64(f.WriteCache)
	server, hidden, err := s.mountAndPublish(f, func(hidden string) (*fs.Server, error) {
		return fs.MountWritable(ctx, hidden, rw.Writer, opts)
	})
	if err != nil {
		return nil, err
	}
	log.Warn("read-write filesystem: encrypted, but storage can modify it undetected (no verity tree on a writable image)")
	log.Info("filesystem ready", "source", rw.Name, "mode", "read-write", "format", rw.Volume.Info().Format,
		"took", time.Since(start).Round(time.Millisecond))
	return &mounted{f: f, rw: rw, server: server, hidden: hidden}, nil
}

// mountAndPublish mounts f with mount at its hidden directory and publishes it at
// f's mount point, read-only or read-write alike; on failure nothing stays
// mounted.
func (s *Sidecar) mountAndPublish(f *Filesystem, mount func(hidden string) (*fs.Server, error)) (_ *fs.Server, hidden string, _ error) {
	hidden = hiddenDir(f.MountPoint)
	if err := os.MkdirAll(hidden, 0o755); err != nil {
		return nil, "", fmt.Errorf("create %s: %w", hidden, err)
	}
	server, err := mount(hidden)
	if err != nil {
		s.metrics.errors.WithLabelValues("mount").Inc()
		return nil, "", fmt.Errorf("mount at %s: %w", hidden, err)
	}
	if err := publish(f.MountPoint, hidden); err != nil {
		server.Unmount()
		server.Wait()
		s.metrics.errors.WithLabelValues("publish").Inc()
		return nil, "", err
	}
	return server, hidden, nil
}

// imageSpec is what opening f's image takes, read-only or read-write.
func (s *Sidecar) imageSpec(f *Filesystem, log *slog.Logger, key []byte, blobOpts blob.Options) image.Spec {
	return image.Spec{
		Location: f.Source,
		Key:      key,
		Crypto: crypto.OpenOptions{Format: f.Format, Ciphers: f.Ciphers, SectorSizes: f.SectorSizes,
			KDF: luks.Policy{MaxIterations: f.KDFMaxIterations, MaxArgonMemoryKiB: int(f.KDFMaxMemory >> 10)}},
		Blob:  blobOpts,
		Cache: s.cacheOptions(f),
		Write: image.WriteOptions{
			Lease:     blob.LeaseOptions{Duration: f.leaseDuration},
			WriteBack: blockcache.WriteBackOptions{DirtyBytes: int64(f.DirtyMemory), FlushTimeout: time.Duration(f.FlushTimeout)},
		},
		Logger: log,
	}
}

// fuseOptions are f's mount options, read-only or read-write.
func (s *Sidecar) fuseOptions(f *Filesystem, log *slog.Logger) fs.Options {
	return fs.Options{
		AllowOther:   *f.AllowOther,
		Logger:       log,
		Source:       "blobseal:" + f.Name,
		UnmountGrace: time.Duration(s.cfg.UnmountGrace),
		Observe:      s.metrics.observer(f.Name),
		DirectIO:     f.directIO,
	}
}

func (s *Sidecar) blobOptions(f *Filesystem) (blob.Options, error) {
	var opts blob.Options
	if f.Identity != "" {
		cred, err := blob.DefaultCredential(blob.CredentialOptions{ManagedIdentityClientID: f.IdentityClientID})
		if err != nil {
			return opts, fmt.Errorf("storage identity: %w", err)
		}
		opts.Credential = cred
	}
	return opts, nil
}

// cacheOptions splits the global memory bound evenly between filesystems.
func (s *Sidecar) cacheOptions(f *Filesystem) blockcache.Options {
	c := s.cfg.Cache
	n := int64(len(s.cfg.Filesystems))
	mem := int64(c.MemoryBytes)
	if mem == 0 {
		mem = 256 << 20
	}
	opts := blockcache.Options{
		MemoryBytes:  mem / n,
		BlockSize:    int64(c.BlockSize),
		MaxFetches:   c.MaxFetches,
		DiskBytes:    int64(c.DiskBytes) / n,
		ReadDeadline: time.Duration(f.ReadTimeout),
	}
	if c.DiskDir != "" {
		opts.DiskDir = filepath.Join(c.DiskDir, f.Name)
	}
	return opts
}

func (s *Sidecar) setState(name string, fn func(*fsState)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	fn(s.states[name])
}

// snapshot returns a copy of every state, for health and metrics.
func (s *Sidecar) snapshot() []fsState {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]fsState, 0, len(s.cfg.Filesystems))
	for _, f := range s.cfg.Filesystems {
		out = append(out, *s.states[f.Name])
	}
	return out
}

func (s *Sidecar) allReady() bool {
	for _, st := range s.snapshot() {
		if !st.Ready {
			return false
		}
	}
	return true
}

func (s *Sidecar) checkAllReady(log *slog.Logger) {
	if !s.allReady() {
		return
	}
	log.Info("all filesystems ready")
	if p := s.cfg.Health.ReadyFile; p != "" {
		tmp := p + ".tmp"
		if err := os.WriteFile(tmp, []byte("ready\n"), 0o644); err == nil {
			err = os.Rename(tmp, p)
			if err != nil {
				log.Warn("write ready file", "path", p, "err", err)
			}
		} else {
			log.Warn("write ready file", "path", p, "err", err)
		}
	}
}

// backoff is exponential with full jitter, capped.
func backoff(attempt int, maxDelay time.Duration) time.Duration {
	d := time.Second << min(attempt-1, 10)
	if d > maxDelay {
		d = maxDelay
	}
	return d/2 + rand.N(d/2+1)
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
