package sidecar

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
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

// publish makes mountPoint a symlink to target (a sibling path). It never
// destroys what it did not create: an empty directory (pre-created by the
// platform for the volume) and a stale symlink to target (from a previous
// run) are replaced; a regular file, a non-empty directory or a symlink
// elsewhere is the operator's and makes publish fail.
func publish(mountPoint, target string) error {
	parent := filepath.Dir(mountPoint)
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return fmt.Errorf("create the parent of mount point %s: %w", mountPoint, err)
	}
	replaceOwn := false
	if st, err := os.Lstat(mountPoint); err == nil {
		switch {
		case st.IsDir():
			if err := os.Remove(mountPoint); err != nil {
				return fmt.Errorf("mount point %s exists and is not an empty directory; remove it or choose another mount_point: %w", mountPoint, err)
			}
		case st.Mode()&os.ModeSymlink != 0:
			dest, err := os.Readlink(mountPoint)
			if err != nil || dest != filepath.Base(target) {
				return fmt.Errorf("mount point %s is a symlink to %q that blobseal did not create; remove it or choose another mount_point", mountPoint, dest)
			}
			replaceOwn = true
		default:
			return fmt.Errorf("mount point %s exists and is a %s, not a directory; remove it or choose another mount_point", mountPoint, kind(st.Mode()))
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("mount point %s: %w", mountPoint, err)
	}
	var rnd [6]byte
	rand.Read(rnd[:])
	tmp := filepath.Join(parent, ".blobseal-link-"+hex.EncodeToString(rnd[:]))
	if err := os.Symlink(filepath.Base(target), tmp); err != nil {
		return fmt.Errorf("publish %s: %w", mountPoint, err)
	}
	var err error
	if replaceOwn {
		err = os.Rename(tmp, mountPoint)
	} else {
		// NOREPLACE: whatever appeared at the mount point since the check
		// (a file written by another container) is kept, not clobbered.
		err = unix.Renameat2(unix.AT_FDCWD, tmp, unix.AT_FDCWD, mountPoint, unix.RENAME_NOREPLACE)
	}
	if err != nil {
		os.Remove(tmp)
		if errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("publish %s: something was created there meanwhile; it is kept: %w", mountPoint, err)
		}
		return fmt.Errorf("publish %s: %w", mountPoint, err)
	}
	return nil
}

func kind(m os.FileMode) string {
	switch {
	case m.IsRegular():
		return "regular file"
	case m&os.ModeNamedPipe != 0:
		return "named pipe"
	case m&os.ModeSocket != 0:
		return "socket"
	case m&os.ModeDevice != 0:
		return "device"
	}
	return "special file"
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
