package fs

import (
	"context"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/blobseal/blobseal/fs/ext4"
)

// Defaults chosen for an immutable image read over a network.
const (
	// DefaultCacheTimeout is how long the kernel may trust entries,
	// attributes and negative lookups: forever, in practice.
	DefaultCacheTimeout = time.Hour
	// DefaultMaxRead is the largest FUSE read request (and read-ahead).
	DefaultMaxRead = 1 << 20
	// DefaultUnmountGrace is how long Unmount retries a busy mount before
	// detaching it lazily.
	DefaultUnmountGrace = 5 * time.Second
	// DefaultInterruptGrace is how long an interrupted read keeps waiting
	// before it answers EINTR. The kernel interrupts a FUSE read for any
	// signal its reader takes, including the Go runtime's preemption
	// signal (SIGURG) and other handled, harmless ones; for a page fault
	// of an mmap reader EINTR becomes SIGBUS, so an instant EINTR would
	// kill readers that were never meant to stop. Half a second ends a
	// Ctrl-C'd read quickly and lets a fetch in flight land meanwhile.
	DefaultInterruptGrace = 500 * time.Millisecond
	// readyTimeout bounds the readiness stat of a fresh mount.
	readyTimeout = 30 * time.Second
	// fuseSuperMagic is statfs(2)'s f_type of a FUSE mount.
	fuseSuperMagic = 0x65735546
)

// Options tune a mount. The zero value is valid.
type Options struct {
	// AllowOther lets users other than the mounter read the tree (shared
	// volumes between containers); needs user_allow_other or root.
	AllowOther bool
	// Logger receives operation failures; nil discards them.
	Logger *slog.Logger
	// Source names the image in the mount table (the "Filesystem" column).
	// It must not carry credentials.
	Source string
	// CacheTimeout overrides DefaultCacheTimeout.
	CacheTimeout time.Duration
	// MaxRead overrides DefaultMaxRead (bytes, at most 1 MiB).
	MaxRead int
	// UnmountGrace overrides DefaultUnmountGrace.
	UnmountGrace time.Duration
	// InterruptGrace overrides DefaultInterruptGrace.
	InterruptGrace time.Duration
	// Debug logs every FUSE request and reply at debug level.
	Debug bool
	// DirectIO says which files are read without the kernel page cache
	// (see DirectIOMode); the zero value is DirectIOAuto.
	DirectIO DirectIOMode
	// Observe, when set, is called once per answered FUSE operation with
	// its name (lookup, getattr, readdir, open, read, readlink, listxattr,
	// getxattr, statfs, or the refused write's name), how long it took and
	// the errno answered (0 for success). It runs on the request's
	// goroutine, so it must be quick and safe for concurrent use. Nil
	// turns it off at no cost (not even a clock read).
	Observe func(op string, d time.Duration, errno syscall.Errno)
	// ReadOnlyAfter, on a writable mount, turns it read-only when it
	// closes (a lost write lease: nothing more may reach storage): later
	// write operations get EROFS and fsync EIO, since what was not yet
	// stored never will be.
	ReadOnlyAfter <-chan struct{}
	// DirtyLimit bounds the written data a writable mount holds in memory
	// before it reaches the filesystem (bytes; 0 means DefaultDirtyLimit,
	// at least 4 MiB). Writers wait while it is full.
	DirtyLimit int64
}

// DirectIOMode chooses which regular files are opened with FOPEN_DIRECT_IO:
// reads answered straight into the reader's buffer, without the kernel page
// cache. For large files read once (model weights) that is one copy and the
// page-cache upkeep fewer: a cold 1 GiB read from Azurite was 16 % faster
// with a quarter less CPU (docs/PERFORMANCE.md). Small files read again and
// again are better served by the page cache, and mmap of a direct-I/O file
// needs FUSE_DIRECT_IO_ALLOW_MMAP (Linux 6.6+).
type DirectIOMode int

const (
	// DirectIOAuto: files of at least DirectIOMinSize, and only when the
	// kernel keeps mmap working for them.
	DirectIOAuto DirectIOMode = iota
	// DirectIOOff: every file through the page cache.
	DirectIOOff
	// DirectIOOn: every regular file, even where the kernel then refuses
	// mmap of it.
	DirectIOOn
)

// String returns the name ParseDirectIO reads.
func (m DirectIOMode) String() string {
	switch m {
	case DirectIOOff:
		return "off"
	case DirectIOOn:
		return "on"
	}
	return "auto"
}

// DirectIOMinSize is the smallest file DirectIOAuto reads directly.
const DirectIOMinSize = 32 << 20

// ParseDirectIO reads "auto", "on" or "off".
func ParseDirectIO(s string) (DirectIOMode, error) {
	switch s {
	case "auto", "":
		return DirectIOAuto, nil
	case "off":
		return DirectIOOff, nil
	case "on":
		return DirectIOOn, nil
	}
	return DirectIOAuto, fmt.Errorf("direct I/O mode %q: want auto, on or off", s)
}

// What node.Open does, once the kernel's capabilities are known.
const (
	directNone  int32 = iota // page cache for every file
	directLarge              // direct I/O from DirectIOMinSize up
	directAll                // direct I/O for every regular file
)

func (m DirectIOMode) effective(mmapAllowed bool) int32 {
	switch {
	case m == DirectIOOn:
		return directAll
	case m == DirectIOAuto && mmapAllowed:
		return directLarge
	}
	return directNone
}

// Server is one live mount.
type Server struct {
	fuse       *fuse.Server
	mountpoint string
	log        *slog.Logger
	grace      time.Duration
	done       chan struct{}

	once sync.Once
	err  error

	flushErr error // closing the writer at the end; read after done
}

// Mount serves tree read-only at mountpoint. It returns only once the
// kernel answers a stat of the mount's root through FUSE, so the caller may
// announce readiness. The tree must stay open until Wait returns.
func Mount(ctx context.Context, mountpoint string, tree Tree, opts Options) (*Server, error) {
	return mount(ctx, mountpoint, tree, nil, opts)
}

// MountWritable serves the filesystem w changes, read-write, at mountpoint
// (see write.go). When the mount ends — Unmount, fusermount3 -u, or the
// kernel's abort — the writer is closed (Sync, Checkpoint: an image that
// needs no journal replay) before Done is closed; Err reports how that
// went. The writer's device must stay open until then.
func MountWritable(ctx context.Context, mountpoint string, w *ext4.Writer, opts Options) (*Server, error) {
	if w == nil {
		return nil, errors.New("mount read-write: no writer")
	}
	return mount(ctx, mountpoint, writerTree{w: w}, w, opts)
}

func mount(ctx context.Context, mountpoint string, tree Tree, w *ext4.Writer, opts Options) (*Server, error) {
	logger := opts.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	if opts.CacheTimeout <= 0 {
		opts.CacheTimeout = DefaultCacheTimeout
	}
	if opts.MaxRead <= 0 || opts.MaxRead > DefaultMaxRead {
		opts.MaxRead = DefaultMaxRead
	}
	if opts.UnmountGrace <= 0 {
		opts.UnmountGrace = DefaultUnmountGrace
	}
	if opts.InterruptGrace <= 0 {
		opts.InterruptGrace = DefaultInterruptGrace
	}
	if opts.Source == "" {
		opts.Source = "blobseal"
	}
	abs, err := filepath.Abs(mountpoint)
	if err != nil {
		return nil, fmt.Errorf("mount point %q: %w", mountpoint, err)
	}
	if st, err := os.Stat(abs); err != nil {
		return nil, fmt.Errorf("mount point: %w (create the directory first)", err)
	} else if !st.IsDir() {
		return nil, fmt.Errorf("mount point %s is not a directory", abs)
	}

	var dirty *dirtyCache
	var holds *nodeHolds
	// life is the mount's lifetime, for the work no request owns
	// (background flushes).
	life, endLife := context.WithCancel(context.WithoutCancel(ctx))
	if w != nil {
		dirty = newDirtyCache(life, w, opts.DirtyLimit, tree.StatFS().BlockSize, logger)
		holds = newNodeHolds()
		tree = writerTree{w: w, dirty: dirty, holds: holds}
	}
	started := false
	defer func() {
		if !started {
			if dirty != nil {
				dirty.close()
			}
			endLife()
		}
	}()
	root, err := tree.Inode(ext4.RootIno)
	if err != nil {
		return nil, fmt.Errorf("read the root directory of the image: %w", err)
	}
	if !root.IsDir() {
		return nil, fmt.Errorf("root inode %d of the image is not a directory (mode %#o): %w",
			ext4.RootIno, root.Mode, ext4.ErrCorrupt)
	}
	vol := &volume{
		tree:      tree,
		log:       logger,
		blockSize: tree.StatFS().BlockSize,
		timeout:   opts.CacheTimeout,
		observer:  opts.Observe,

		interruptGrace: opts.InterruptGrace,
		w:              w,
		readOnlyAfter:  opts.ReadOnlyAfter,
	}

	timeout := opts.CacheTimeout
	goLog := slog.NewLogLogger(logger.Handler(), slog.LevelWarn)
	mo := fuse.MountOptions{
		AllowOther: opts.AllowOther,
		// The kernel enforces modes (shared volumes) and refuses writes
		// before they reach us.
		Options:      []string{"ro", "default_permissions"},
		MaxWrite:     opts.MaxRead,
		MaxReadAhead: opts.MaxRead,
		FsName:       opts.Source,
		Name:         "blobseal",
		Debug:        opts.Debug,
		// Link targets never change either.
		EnableSymlinkCaching: true,
		// More concurrent read-ahead requests hide storage latency
		// (go-fuse's default is 12).
		MaxBackground: 64,
		// mmap of direct-I/O files (kernel 6.6+; ignored by older ones).
		ExtraCapabilities: fuse.CAP_DIRECT_IO_ALLOW_MMAP,
		Logger:            log.New(logWriter{logger}, "", 0),
		// mount(2) directly when allowed (root, CAP_SYS_ADMIN): a minimal
		// image has no fusermount3. Unprivileged, go-fuse falls back to
		// fusermount3; Unmount tries umount2 first, then fusermount3 -u.
		DirectMount: true,
	}
	if w != nil {
		// The kernel still enforces modes; writes now reach us.
		mo.Options = []string{"default_permissions"}
	}
	server, err := gofs.Mount(abs, &node{vol: vol, ino: root}, &gofs.Options{
		MountOptions:    mo,
		EntryTimeout:    &timeout,
		AttrTimeout:     &timeout,
		NegativeTimeout: &timeout,
		// The kernel's node ids are the ext4 inode numbers, so st_ino and
		// hard-link identity match a kernel mount of the same image.
		ExternalNodeID: true,
		RootStableAttr: &gofs.StableAttr{Ino: ext4.RootIno, Gen: uint64(root.Generation)},
		Logger:         goLog,
	})
	if err != nil {
		hint := "is /dev/fuse available and fusermount3 installed?"
		if opts.AllowOther {
			hint = "allow-other needs root or user_allow_other in /etc/fuse.conf; " + hint
		}
		return nil, fmt.Errorf("mount FUSE at %s: %w (%s)", abs, err, hint)
	}
	vol.directIO.Store(int32(opts.DirectIO.effective(server.KernelSettings().Flags64()&fuse.CAP_DIRECT_IO_ALLOW_MMAP != 0)))
	s := &Server{fuse: server, mountpoint: abs, log: logger, grace: opts.UnmountGrace, done: make(chan struct{})}
	stopCommits := make(chan struct{})
	if w != nil {
		go s.commitEvery(w, dirty, commitInterval, stopCommits, opts.ReadOnlyAfter)
	}
	started = true // from here the closing goroutine owns the cache
	go func() {
		server.Wait()
		close(stopCommits)
		if w != nil {
			s.closeWriter(w, dirty, holds)
		}
		endLife()
		close(s.done)
	}()
	if err := s.checkServing(ctx); err != nil {
		_ = s.Unmount()
		return nil, err
	}
	s.raiseReadAhead(opts.MaxRead)
	logger.Info("mounted", "mountpoint", abs, "source", opts.Source)
	return s, nil
}

// checkServing stats the mount root through the kernel, the proof that
// requests reach this process.
func (s *Server) checkServing(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, readyTimeout)
	defer cancel()
	result := make(chan error, 1)
	go func() {
		var st unix.Stat_t
		var sfs unix.Statfs_t
		if err := unix.Stat(s.mountpoint, &st); err != nil {
			result <- err
			return
		}
		if err := unix.Statfs(s.mountpoint, &sfs); err != nil {
			result <- err
			return
		}
		if sfs.Type != fuseSuperMagic || st.Ino != ext4.RootIno {
			result <- fmt.Errorf("%s does not show the FUSE root (fs type %#x, inode %d)", s.mountpoint, sfs.Type, st.Ino)
			return
		}
		result <- nil
	}()
	select {
	case err := <-result:
		if err != nil {
			return fmt.Errorf("mount at %s is not serving: %w", s.mountpoint, err)
		}
		return nil
	case <-ctx.Done():
		return fmt.Errorf("mount at %s did not answer a stat: %w", s.mountpoint, ctx.Err())
	}
}

// raiseReadAhead sets the mount's backing-device read-ahead to maxRead: the
// kernel caps FUSE read-ahead at 128 KiB during INIT, and only the sysfs
// knob (root) raises it. Failure only costs throughput, so it is logged.
func (s *Server) raiseReadAhead(maxRead int) {
	var st unix.Stat_t
	if err := unix.Stat(s.mountpoint, &st); err != nil {
		return
	}
	path := fmt.Sprintf("/sys/class/bdi/%d:%d/read_ahead_kb", unix.Major(st.Dev), unix.Minor(st.Dev))
	if err := os.WriteFile(path, []byte(strconv.Itoa(maxRead>>10)), 0); err != nil {
		s.log.Debug("could not raise read-ahead (needs root)", "path", path, "err", err)
		return
	}
	s.log.Debug("read-ahead raised", "path", path, "kib", maxRead>>10)
}

// Mountpoint returns the absolute mount path.
func (s *Server) Mountpoint() string { return s.mountpoint }

// Done is closed when the mount has ended (unmounted here or elsewhere).
func (s *Server) Done() <-chan struct{} { return s.done }

// Wait blocks until the mount ends.
func (s *Server) Wait() { <-s.done }

// Unmount unmounts and waits for the request loops to stop. While files are
// still open it retries for the grace period, then detaches the mount
// lazily and reports that; the kernel releases it once the last file closes.
func (s *Server) Unmount() error {
	s.once.Do(func() { s.err = s.unmount() })
	return s.err
}

func (s *Server) unmount() error {
	deadline := time.Now().Add(s.grace)
	var err error
	for {
		select {
		case <-s.done: // unmounted from outside
			return nil
		default:
		}
		if err = s.fuse.Unmount(); err == nil {
			<-s.done
			s.log.Info("unmounted", "mountpoint", s.mountpoint)
			return nil
		}
		if time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	s.log.Warn("mount still busy after grace period; detaching lazily", "mountpoint", s.mountpoint, "err", err)
	if lerr := lazyUnmount(s.mountpoint); lerr != nil {
		return fmt.Errorf("unmount %s: %w; lazy detach also failed: %w", s.mountpoint, err, lerr)
	}
	select {
	case <-s.done:
		return nil
	case <-time.After(s.grace):
		return fmt.Errorf("unmount %s: busy (%w); detached lazily, released when the last open file closes", s.mountpoint, err)
	}
}

// lazyUnmount detaches a busy mount (MNT_DETACH), directly as root, else
// through fusermount3.
func lazyUnmount(mountpoint string) error {
	err := unix.Unmount(mountpoint, unix.MNT_DETACH)
	if err == nil || !errors.Is(err, syscall.EPERM) {
		return err
	}
	out, err := exec.Command("fusermount3", "-u", "-z", mountpoint).CombinedOutput()
	if err != nil {
		return fmt.Errorf("fusermount3 -u -z: %w: %s", err, out)
	}
	return nil
}

// logWriter feeds go-fuse's line logger (request traces) into slog.
type logWriter struct{ log *slog.Logger }

func (w logWriter) Write(p []byte) (int, error) {
	w.log.Debug("fuse", "trace", string(trimNewline(p)))
	return len(p), nil
}

func trimNewline(p []byte) []byte {
	for len(p) > 0 && p[len(p)-1] == '\n' {
		p = p[:len(p)-1]
	}
	return p
}
