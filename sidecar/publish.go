package sidecar

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// The application must never see a half-ready mount point, and creating a
// FUSE mount at the final path is not atomic. So the image is mounted at a
// hidden directory next to the mount point, in the same shared volume, and
// the mount point is then published as a relative symlink with one
// rename(2): it either does not exist or shows the whole tree.

// hiddenDir returns where the mount of mountPoint really lives.
func hiddenDir(mountPoint string) string {
	return filepath.Join(filepath.Dir(mountPoint), ".blobseal-"+filepath.Base(mountPoint))
}

// publish makes mountPoint a symlink to target (a sibling path).
func publish(mountPoint, target string) error {
	parent := filepath.Dir(mountPoint)
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return fmt.Errorf("create the parent of mount point %s: %w", mountPoint, err)
	}
	// An empty directory (pre-created by the platform for the volume) may
	// be replaced; anything else is the operator's data and stays.
	if st, err := os.Lstat(mountPoint); err == nil && st.IsDir() {
		if err := os.Remove(mountPoint); err != nil {
			return fmt.Errorf("mount point %s exists and is not an empty directory; remove it or choose another mount_point: %w", mountPoint, err)
		}
	}
	var rnd [6]byte
	rand.Read(rnd[:])
	tmp := filepath.Join(parent, ".blobseal-link-"+hex.EncodeToString(rnd[:]))
	if err := os.Symlink(filepath.Base(target), tmp); err != nil {
		return fmt.Errorf("publish %s: %w", mountPoint, err)
	}
	if err := os.Rename(tmp, mountPoint); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("publish %s: %w", mountPoint, err)
	}
	return nil
}

// unpublish removes the symlink if it is still ours.
func unpublish(mountPoint, target string) error {
	dest, err := os.Readlink(mountPoint)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil || dest != filepath.Base(target) {
		return nil // not ours any more; leave it
	}
	return os.Remove(mountPoint)
}
