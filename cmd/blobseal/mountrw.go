package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/blobseal/blobseal/fs"
	"github.com/blobseal/blobseal/image"
	"github.com/blobseal/blobseal/internal/secret"
	"github.com/blobseal/blobseal/sidecar"
)

// checkReadWrite refuses, before any key is fetched, what --read-write
// cannot serve, and parses the write settings with the sidecar
// configuration's rules (the same limits for lease_duration,
// flush_timeout and dirty_memory).
func checkReadWrite(o *mountFlags, integrity image.Integrity) error {
	switch {
	case integrity.RootHash != nil || integrity.Require:
		return usageErrorf("--read-write cannot keep a verity tree valid: drop --verity-root-hash/--require-integrity, or mount read-only")
	case o.cacheDir != "":
		return usageErrorf("--read-write cannot keep a disk cache in step with writes: drop --cache-dir")
	}
	d, err := sidecar.ParseLeaseDuration(o.lease)
	if err != nil {
		return usageErrorf("--lease-duration %v", err)
	}
	o.leaseDuration = d
	if err := sidecar.CheckFlushTimeout(o.flushTimeout); err != nil {
		return usageErrorf("--flush-timeout %v", err)
	}
	n, err := sidecar.ParseByteSize(o.dirtyMemory)
	if err != nil {
		return usageErrorf("--dirty-memory: %v", err)
	}
	if err := sidecar.CheckDirtyMemory(n, 0); err != nil { // the mount uses the default cache block
		return usageErrorf("--dirty-memory %v", err)
	}
	o.dirtyBytes = n
	if o.writeCacheBytes, err = sidecar.ParseByteSize(o.writeCache); err != nil {
		return usageErrorf("--write-cache: %v", err)
	}
	if err := sidecar.CheckWriteCache(o.writeCacheBytes); err != nil {
		return usageErrorf("--write-cache %v", err)
	}
	return nil
}

// runMountWritable is runMount for --read-write: the image file opened for
// writing, served until a signal or an external unmount, then flushed
// (journal committed and checkpointed) before the process exits.
func runMountWritable(cmd *cobra.Command, o *mountFlags, spec image.Spec, key secret.Bytes, mountpoint string) (err error) {
	ctx := cmd.Context()
	img, err := image.OpenWritable(ctx, spec)
	key.Wipe()
	if err != nil {
		return err
	}
	defer func() {
		if cerr := img.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("close %s: %w", img.Name, cerr)
		}
	}()
	logger := spec.Logger
	directMode, _ := fs.ParseDirectIO(o.directIO) // validated by runMount
	opts := o.fuseOptions(logger, img.Name, directMode)
	opts.ReadOnlyAfter = img.WatchLease(logger)
	opts.DirtyLimit = o.writeCacheBytes
	srv, err := fs.MountWritable(ctx, mountpoint, img.Writer, opts)
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
		if err := srv.Unmount(); err != nil {
			// Detached lazily: files still open keep sending writes, so
			// the writer must live until the last one closes (a SIGKILL
			// meanwhile loses only what was not committed: the journal
			// keeps the image consistent).
			logger.Warn("waiting for the last open file to close before flushing", "err", err)
			<-srv.Done()
		}
	case <-srv.Done():
		logger.Info("unmounted from outside", "mountpoint", srv.Mountpoint())
	}
	return srv.Err()
}
