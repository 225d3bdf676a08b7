package ext4

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"syscall"
	"time"
)

// linkMax is the kernel's EXT4_LINK_MAX; with dir_nlink a directory past it
// counts 1 ("many").
const linkMax = 65000

// Create makes a regular file (mode holds the permission bits) and returns
// its attributes as of the change.
func (w *Writer) Create(dir uint32, name string, perm uint32, uid, gid uint32) (*Inode, error) {
	return w.mknod(context.Background(), dir, name, sIFREG|perm&0o7777, 0, uid, gid, false)
}

// CreateContext is Create for ctx: it gives up when ctx ends before the
// change starts (see lockChangeContext).
func (w *Writer) CreateContext(ctx context.Context, dir uint32, name string, perm uint32, uid, gid uint32) (*Inode, error) {
	return w.mknod(ctx, dir, name, sIFREG|perm&0o7777, 0, uid, gid, false)
}

// CreateHeld is CreateContext that also holds the new file (Hold) in the
// same change, for a caller that opens it: an unlink racing the open
// cannot free it before the handle exists. The caller Releases it. This,
// and the other *Held operations, are what a FUSE layer calls: the
// returned attributes are the ones of the change, and the inode stays
// until Release.
func (w *Writer) CreateHeld(ctx context.Context, dir uint32, name string, perm uint32, uid, gid uint32) (*Inode, error) {
	return w.mknod(ctx, dir, name, sIFREG|perm&0o7777, 0, uid, gid, true)
}

// Mknod makes a regular file, FIFO, socket or device node; mode includes
// the S_IFMT type, rdev is the device number in Linux's new_encode_dev form.
func (w *Writer) Mknod(dir uint32, name string, mode uint32, rdev uint32, uid, gid uint32) (*Inode, error) {
	return w.mknod(context.Background(), dir, name, mode, rdev, uid, gid, false)
}

// MknodContext is Mknod for ctx (see CreateContext).
func (w *Writer) MknodContext(ctx context.Context, dir uint32, name string, mode uint32, rdev uint32, uid, gid uint32) (*Inode, error) {
	return w.mknod(ctx, dir, name, mode, rdev, uid, gid, false)
}

// MknodHeld is MknodContext that also holds the new inode (see CreateHeld).
func (w *Writer) MknodHeld(ctx context.Context, dir uint32, name string, mode uint32, rdev uint32, uid, gid uint32) (*Inode, error) {
	return w.mknod(ctx, dir, name, mode, rdev, uid, gid, true)
}

func (w *Writer) mknod(ctx context.Context, dir uint32, name string, mode uint32, rdev uint32, uid, gid uint32, hold bool) (*Inode, error) {
	switch uint16(mode) & sIFMT {
	case sIFREG, sIFIFO, sIFSOCK, sIFCHR, sIFBLK:
	default:
		return nil, errno(syscall.EINVAL, "mknod %q: mode %#o is not a file, FIFO, socket or device", name, mode)
	}
	unlock, cerr := w.lockChangeContext(ctx, "mknod")
	if cerr != nil {
		return nil, cerr
	}
	defer unlock()
	in, err := w.create(dir, name, uint16(mode), uid, gid, func(in wInode) error {
		switch in.Mode & sIFMT {
		case sIFREG:
			return w.storeExtents(in, &extentMap{})
		case sIFCHR, sIFBLK:
			ib := in.iblock()
			major, minor := (rdev&0xfff00)>>8, rdev&0xff|(rdev>>12)&0xfff00
			if major < 256 && minor < 256 {
				binary.LittleEndian.PutUint32(ib[0:], major<<8|minor)
			} else {
				binary.LittleEndian.PutUint32(ib[4:], rdev)
			}
		}
		return w.storeInode(in)
	})
	if err == nil && hold {
		w.holds[in.Ino]++ // in the change that made it: no unlink comes between
	}
	return in, err
}

// Mkdir makes a directory with "." and ".." in one block.
func (w *Writer) Mkdir(dir uint32, name string, perm uint32, uid, gid uint32) (*Inode, error) {
	return w.mkdir(context.Background(), dir, name, perm, uid, gid, false)
}

// MkdirContext is Mkdir for ctx (see CreateContext).
func (w *Writer) MkdirContext(ctx context.Context, dir uint32, name string, perm uint32, uid, gid uint32) (*Inode, error) {
	return w.mkdir(ctx, dir, name, perm, uid, gid, false)
}

// MkdirHeld is MkdirContext that also holds the new directory (see
// CreateHeld).
func (w *Writer) MkdirHeld(ctx context.Context, dir uint32, name string, perm uint32, uid, gid uint32) (*Inode, error) {
	return w.mkdir(ctx, dir, name, perm, uid, gid, true)
}

func (w *Writer) mkdir(ctx context.Context, dir uint32, name string, perm uint32, uid, gid uint32, hold bool) (*Inode, error) {
	unlock, cerr := w.lockChangeContext(ctx, "mkdir")
	if cerr != nil {
		return nil, cerr
	}
	defer unlock()
	parent, err := w.f.Inode(dir)
	if err != nil {
		return nil, err
	}
	if parent.Links >= linkMax-1 && !w.f.roCompat(roCompatDirNlink) {
		return nil, errno(syscall.EMLINK, "mkdir %q: directory %d has %d links", name, dir, parent.Links)
	}
	in, err := w.create(dir, name, sIFDIR|uint16(perm&0o7777), uid, gid, func(in wInode) error {
		in.setLinks(2)
		blk, _, err := w.allocBlocks(w.inodeGoal(in.Ino), 1)
		if err != nil {
			return err
		}
		if err := w.writeBlock(blk, w.newDirBlock(in, dir)); err != nil {
			return err
		}
		in.setSize(uint64(w.f.blockSize))
		m := &extentMap{}
		m.insert(extent{lblk: 0, len: 1, pblk: blk})
		return w.storeExtents(in, m)
	})
	if err != nil {
		return nil, err
	}
	if err := w.addLinks(dir, 1); err != nil {
		return nil, err
	}
	if err := w.endOp(); err != nil {
		return nil, err
	}
	if hold {
		w.holds[in.Ino]++
	}
	return in, nil
}

// Symlink makes a symbolic link: a fast one (target in i_block) below 60
// bytes, else one data block, as the kernel does.
func (w *Writer) Symlink(dir uint32, name, target string, uid, gid uint32) (*Inode, error) {
	return w.symlink(context.Background(), dir, name, target, uid, gid, false)
}

// SymlinkContext is Symlink for ctx (see CreateContext).
func (w *Writer) SymlinkContext(ctx context.Context, dir uint32, name, target string, uid, gid uint32) (*Inode, error) {
	return w.symlink(ctx, dir, name, target, uid, gid, false)
}

// SymlinkHeld is SymlinkContext that also holds the new link (see
// CreateHeld).
func (w *Writer) SymlinkHeld(ctx context.Context, dir uint32, name, target string, uid, gid uint32) (*Inode, error) {
	return w.symlink(ctx, dir, name, target, uid, gid, true)
}

func (w *Writer) symlink(ctx context.Context, dir uint32, name, target string, uid, gid uint32, hold bool) (*Inode, error) {
	if len(target) == 0 {
		return nil, errno(syscall.ENOENT, "symlink %q: empty target", name)
	}
	if len(target) >= maxSymlinkLen || len(target) > int(w.f.blockSize) {
		return nil, errno(syscall.ENAMETOOLONG, "symlink %q: target of %d bytes", name, len(target))
	}
	unlock, cerr := w.lockChangeContext(ctx, "symlink")
	if cerr != nil {
		return nil, cerr
	}
	defer unlock()
	in, err := w.create(dir, name, sIFLNK|0o777, uid, gid, func(in wInode) error {
		in.setSize(uint64(len(target)))
		if len(target) < 60 {
			copy(in.iblock(), target)
			return w.storeInode(in)
		}
		blk, _, err := w.allocData(w.inodeGoal(in.Ino), 1)
		if err != nil {
			return err
		}
		b := make([]byte, w.f.blockSize)
		copy(b, target)
		if _, err := w.dev.WriteAt(b, int64(blk)<<w.f.blockLog); err != nil {
			return fmt.Errorf("ext4: inode %d: writing symlink target: %w", in.Ino, err)
		}
		m := &extentMap{}
		m.insert(extent{lblk: 0, len: 1, pblk: blk})
		return w.storeExtents(in, m)
	})
	if err == nil && hold {
		w.holds[in.Ino]++
	}
	return in, err
}

// create allocates an inode of the given mode, lets fill give it content
// and store it, then links it into dir as name. On failure the inode and
// its blocks are released again.
func (w *Writer) create(dir uint32, name string, mode uint16, uid, gid uint32, fill func(wInode) error) (*Inode, error) {
	if err := checkName(name); err != nil {
		return nil, err
	}
	if err := w.checkAbsent(dir, name); err != nil {
		return nil, err
	}
	isDir := mode&sIFMT == sIFDIR
	ino, err := w.allocInode((dir-1)/w.f.sb.inodesPerGroup, isDir)
	if err != nil {
		return nil, err
	}
	in := w.newInode(ino, mode, uid, gid)
	err = fill(in)
	if err == nil {
		err = w.addEntry(dir, name, ino, w.fileType(mode))
	}
	if err != nil {
		// Undo: release what fill stored, or just the inode number.
		var rerr error
		if got, gerr := w.f.Inode(ino); gerr == nil && got.Generation == in.Generation && got.Mode == mode {
			rerr = w.release(ino, isDir)
		} else {
			rerr = w.freeInode(ino, isDir)
		}
		if rerr == nil {
			rerr = w.endOp()
		}
		if rerr != nil {
			err = fmt.Errorf("%w (and releasing inode %d failed: %v)", err, ino, rerr)
		}
		return nil, err
	}
	if err := w.endOp(); err != nil {
		return nil, err
	}
	return w.f.Inode(ino)
}

// checkAbsent fails with EEXIST when dir already holds name.
func (w *Writer) checkAbsent(dir uint32, name string) error {
	ino, err := w.find(dir, name)
	switch {
	case err != nil:
		return err
	case ino != 0 || name == "." || name == "..":
		return errno(syscall.EEXIST, "inode %d: %q", dir, name)
	}
	return nil
}

func isErrno(err error, e syscall.Errno) bool {
	var got syscall.Errno
	return errors.As(err, &got) && got == e
}

// Link adds name in dir for the existing non-directory ino.
func (w *Writer) Link(ino, dir uint32, name string) error {
	return w.LinkContext(context.Background(), ino, dir, name)
}

// LinkContext is Link for ctx (see CreateContext).
func (w *Writer) LinkContext(ctx context.Context, ino, dir uint32, name string) error {
	_, err := w.link(ctx, ino, dir, name, false)
	return err
}

// LinkHeld is LinkContext that returns the inode's attributes as of the
// change (the new link count) and holds it (see CreateHeld).
func (w *Writer) LinkHeld(ctx context.Context, ino, dir uint32, name string) (*Inode, error) {
	return w.link(ctx, ino, dir, name, true)
}

func (w *Writer) link(ctx context.Context, ino, dir uint32, name string, hold bool) (*Inode, error) {
	if err := checkName(name); err != nil {
		return nil, err
	}
	unlock, cerr := w.lockChangeContext(ctx, "link")
	if cerr != nil {
		return nil, cerr
	}
	defer unlock()
	in, err := w.loadInode(ino)
	if err != nil {
		return nil, err
	}
	// The kernel checks the new name before the source's type.
	if err := w.checkAbsent(dir, name); err != nil {
		return nil, err
	}
	if in.IsDir() {
		return nil, errno(syscall.EPERM, "link to directory inode %d", ino)
	}
	if in.Links >= linkMax {
		return nil, errno(syscall.EMLINK, "inode %d has %d links", ino, in.Links)
	}
	if err := w.addEntry(dir, name, ino, w.fileType(in.Mode)); err != nil {
		return nil, err
	}
	in.setLinks(in.Links + 1)
	w.touch(in, false)
	if err := w.storeInode(in); err != nil {
		return nil, err
	}
	if err := w.endOp(); err != nil {
		return nil, err
	}
	if !hold {
		return nil, nil
	}
	got, err := w.f.Inode(ino)
	if err == nil {
		w.holds[ino]++
	}
	return got, err
}

// Unlink removes name, a non-directory, from dir; the inode and its blocks
// are freed with its last link. (Orphan handling for files still open comes
// with the journal.)
func (w *Writer) Unlink(dir uint32, name string) error {
	return w.UnlinkContext(context.Background(), dir, name)
}

// UnlinkContext is Unlink for ctx: it gives up when ctx ends before the
// change starts (see lockChangeContext).
func (w *Writer) UnlinkContext(ctx context.Context, dir uint32, name string) error {
	if name == "." || name == ".." {
		return errno(syscall.EISDIR, "unlink %q", name)
	}
	unlock, cerr := w.lockChangeContext(ctx, "unlink")
	if cerr != nil {
		return cerr
	}
	defer unlock()
	ino, err := w.lookup(dir, name)
	if err != nil {
		return err
	}
	in, err := w.f.Inode(ino)
	if err != nil {
		return err
	}
	if in.IsDir() {
		return errno(syscall.EISDIR, "unlink of directory %q (inode %d)", name, ino)
	}
	if _, err := w.removeEntry(dir, name); err != nil {
		return err
	}
	if err := w.dropLink(ino); err != nil {
		return err
	}
	return w.endOp()
}

// dropLink removes one link of a non-directory, releasing it at zero.
func (w *Writer) dropLink(ino uint32) error {
	in, err := w.loadInode(ino)
	if err != nil {
		return err
	}
	if in.Links <= 1 {
		return w.lastLinkGone(ino, false)
	}
	in.setLinks(in.Links - 1)
	w.touch(in, false)
	return w.storeInode(in)
}

// Rmdir removes the empty directory name from dir.
func (w *Writer) Rmdir(dir uint32, name string) error {
	return w.RmdirContext(context.Background(), dir, name)
}

// RmdirContext is Rmdir for ctx: it gives up when ctx ends before the
// change starts (see lockChangeContext).
func (w *Writer) RmdirContext(ctx context.Context, dir uint32, name string) error {
	switch name {
	case ".":
		return errno(syscall.EINVAL, "rmdir %q", name)
	case "..":
		return errno(syscall.ENOTEMPTY, "rmdir %q", name)
	}
	unlock, cerr := w.lockChangeContext(ctx, "rmdir")
	if cerr != nil {
		return cerr
	}
	defer unlock()
	ino, err := w.lookup(dir, name)
	if err != nil {
		return err
	}
	if err := w.checkRemovableDir(ino, name); err != nil {
		return err
	}
	if _, err := w.removeEntry(dir, name); err != nil {
		return err
	}
	if err := w.lastLinkGone(ino, true); err != nil {
		return err
	}
	if err := w.addLinks(dir, -1); err != nil {
		return err
	}
	return w.endOp()
}

func (w *Writer) checkRemovableDir(ino uint32, name string) error {
	in, err := w.f.Inode(ino)
	if err != nil {
		return err
	}
	if !in.IsDir() {
		return errno(syscall.ENOTDIR, "%q (inode %d)", name, ino)
	}
	if ino == RootIno {
		return errno(syscall.EBUSY, "removing the root directory")
	}
	empty, err := w.isEmptyDir(ino)
	if err != nil {
		return err
	}
	if !empty {
		return errno(syscall.ENOTEMPTY, "directory %q (inode %d)", name, ino)
	}
	return nil
}

// addLinks changes directory ino's link count by delta (subdirectories come
// and go), following dir_nlink past linkMax.
func (w *Writer) addLinks(ino uint32, delta int) error {
	in, err := w.loadInode(ino)
	if err != nil {
		return err
	}
	n := int(in.Links)
	if n != 1 || !in.IsDir() { // 1 on a directory means "too many to count"
		n += delta
		if n >= linkMax && in.IsDir() {
			n = 1
		}
	}
	in.setLinks(uint16(n))
	w.touch(in, false)
	return w.storeInode(in)
}

// release frees an inode with no more links: its blocks, its xattr block
// reference, and the inode itself (dtime set, as the kernel leaves it).
func (w *Writer) release(ino uint32, dir bool) error {
	in, err := w.loadInode(ino)
	if err != nil {
		return err
	}
	m, err := w.loadExtents(in)
	if err != nil {
		return err
	}
	for _, x := range m.punch(0, maxLogicalBlk) {
		if err := w.freeBlocks(x.pblk, uint64(x.len)); err != nil {
			return err
		}
	}
	for _, b := range m.treeBlks {
		w.f.blocks.remove(b)
		if err := w.freeBlocks(b, 1); err != nil {
			return err
		}
	}
	if err := w.dropXattrBlock(in); err != nil {
		return err
	}
	clear(in.iblock())
	if in.hasFlag(flagExtents) {
		ib := in.iblock()
		binary.LittleEndian.PutUint16(ib[0:], extentMagic)
		binary.LittleEndian.PutUint16(ib[4:], 4)
	}
	in.setLinks(0)
	in.setSize(0)
	in.setBlocks(0, w.f.blockLog)
	now := w.now()
	binary.LittleEndian.PutUint32(in.raw[inoDtime:], uint32(now.Unix()))
	w.touch(in, true)
	if err := w.storeInode(in); err != nil {
		return err
	}
	return w.freeInode(ino, dir)
}

// dropXattrBlock releases the inode's reference to its shared xattr block.
func (w *Writer) dropXattrBlock(in wInode) error {
	blk := in.fileACL
	if blk == 0 {
		return nil
	}
	if err := w.f.checkPhys(in.Inode, blk, 1, "xattr block"); err != nil {
		return err
	}
	b, err := w.block(blk)
	if err != nil {
		return err
	}
	le := binary.LittleEndian
	if le.Uint32(b) != xattrMagic {
		return fmt.Errorf("ext4: inode %d: xattr block %d has a bad magic: %w", in.Ino, blk, ErrCorrupt)
	}
	le.PutUint32(in.raw[inoFileACLLo:], 0)
	le.PutUint16(in.raw[0x76:], 0)
	in.fileACL = 0
	if refs := le.Uint32(b[4:]); refs > 1 {
		le.PutUint32(b[4:], refs-1)
		if w.f.hasCsum() {
			le.PutUint32(b[0x10:], w.f.xattrBlockCsum(blk, b))
		}
		return w.writeBlock(blk, b)
	}
	w.f.blocks.remove(blk)
	return w.freeBlocks(blk, 1)
}

// Flags of Rename, with the values of renameat2(2).
const (
	RenameNoReplace = 1 // fail with EEXIST if newname exists
	RenameExchange  = 2 // swap the two names, which must both exist
)

// Rename moves oldname in olddir to newname in newdir, replacing a target
// as rename(2) does (a non-directory by a non-directory, an empty directory
// by a directory), or as renameat2(2) does with flags.
func (w *Writer) Rename(olddir uint32, oldname string, newdir uint32, newname string, flags uint32) error {
	return w.RenameContext(context.Background(), olddir, oldname, newdir, newname, flags)
}

// RenameContext is Rename for ctx: it gives up when ctx ends before the
// change starts (see lockChangeContext).
func (w *Writer) RenameContext(ctx context.Context, olddir uint32, oldname string, newdir uint32, newname string, flags uint32) error {
	if flags&^(RenameNoReplace|RenameExchange) != 0 || flags == RenameNoReplace|RenameExchange {
		return errno(syscall.EINVAL, "rename flags %#x", flags)
	}
	for _, n := range []string{oldname, newname} {
		if n == "." || n == ".." {
			return errno(syscall.EBUSY, "rename of %q", n)
		}
	}
	if err := checkName(newname); err != nil {
		return err
	}
	unlock, cerr := w.lockChangeContext(ctx, "rename")
	if cerr != nil {
		return cerr
	}
	defer unlock()
	src, err := w.lookup(olddir, oldname)
	if err != nil {
		return err
	}
	srcIn, err := w.f.Inode(src)
	if err != nil {
		return err
	}
	srcDir := srcIn.IsDir()
	dst, err := w.lookup(newdir, newname)
	if err != nil && !isErrno(err, syscall.ENOENT) {
		return err
	}
	switch {
	case flags == RenameNoReplace && dst != 0:
		return errno(syscall.EEXIST, "rename to %q, which exists", newname)
	case flags == RenameExchange && dst == 0:
		return errno(syscall.ENOENT, "exchange with %q, which does not exist", newname)
	case flags == RenameExchange:
		return w.exchange(olddir, oldname, src, newdir, newname, dst)
	}
	if dst == src {
		return nil // the same file: rename(2) does nothing
	}
	if srcDir {
		if err := w.checkNotAncestor(src, newdir); err != nil {
			return err
		}
	}
	ft := w.fileType(srcIn.Mode)
	if dst != 0 {
		dstIn, err := w.f.Inode(dst)
		if err != nil {
			return err
		}
		if dstIn.IsDir() {
			// A target that contains the source is never empty (the
			// kernel's rename trap check).
			if err := w.checkNotAncestor(dst, olddir); isErrno(err, syscall.EINVAL) {
				return errno(syscall.ENOTEMPTY, "rename %q over %q, a directory above it", oldname, newname)
			} else if err != nil {
				return err
			}
		}
		switch {
		case srcDir && !dstIn.IsDir():
			return errno(syscall.ENOTDIR, "rename directory %q over non-directory %q", oldname, newname)
		case !srcDir && dstIn.IsDir():
			return errno(syscall.EISDIR, "rename %q over directory %q", oldname, newname)
		case srcDir:
			if err := w.checkRemovableDir(dst, newname); err != nil {
				return err
			}
		}
		if err := w.replaceEntry(newdir, newname, src, ft); err != nil {
			return err
		}
		if dstIn.IsDir() {
			if err := w.lastLinkGone(dst, true); err != nil {
				return err
			}
			if err := w.addLinks(newdir, -1); err != nil {
				return err
			}
		} else if err := w.dropLink(dst); err != nil {
			return err
		}
	} else if err := w.addEntry(newdir, newname, src, ft); err != nil {
		return err
	}
	if _, err := w.removeEntry(olddir, oldname); err != nil {
		return err
	}
	if srcDir && olddir != newdir {
		if err := w.setDotDot(src, newdir); err != nil {
			return err
		}
		if err := w.addLinks(olddir, -1); err != nil {
			return err
		}
		if err := w.addLinks(newdir, 1); err != nil {
			return err
		}
	}
	in, err := w.loadInode(src)
	if err != nil {
		return err
	}
	w.touch(in, false)
	if err := w.storeInode(in); err != nil {
		return err
	}
	return w.endOp()
}

// exchange swaps two existing names (RENAME_EXCHANGE), fixing ".." and
// the parents' link counts when directories change parent.
func (w *Writer) exchange(olddir uint32, oldname string, a, newdir uint32, newname string, b uint32) error {
	if a == b {
		return nil
	}
	aIn, err := w.f.Inode(a)
	if err != nil {
		return err
	}
	bIn, err := w.f.Inode(b)
	if err != nil {
		return err
	}
	if aIn.IsDir() {
		if err := w.checkNotAncestor(a, newdir); err != nil {
			return err
		}
	}
	if bIn.IsDir() {
		if err := w.checkNotAncestor(b, olddir); err != nil {
			return err
		}
	}
	if err := w.replaceEntry(olddir, oldname, b, w.fileType(bIn.Mode)); err != nil {
		return err
	}
	if err := w.replaceEntry(newdir, newname, a, w.fileType(aIn.Mode)); err != nil {
		return err
	}
	if olddir != newdir {
		for _, m := range []struct {
			in       *Inode
			from, to uint32
		}{{aIn, olddir, newdir}, {bIn, newdir, olddir}} {
			if !m.in.IsDir() {
				continue
			}
			if err := w.setDotDot(m.in.Ino, m.to); err != nil {
				return err
			}
			if err := w.addLinks(m.from, -1); err != nil {
				return err
			}
			if err := w.addLinks(m.to, 1); err != nil {
				return err
			}
		}
	}
	for _, ino := range []uint32{a, b} {
		in, err := w.loadInode(ino)
		if err != nil {
			return err
		}
		w.touch(in, false)
		if err := w.storeInode(in); err != nil {
			return err
		}
	}
	return w.endOp()
}

// checkNotAncestor refuses moving directory src into itself or below it.
func (w *Writer) checkNotAncestor(src, dir uint32) error {
	for i := uint32(0); ; i++ {
		if dir == src {
			return errno(syscall.EINVAL, "moving directory inode %d into its own subtree", src)
		}
		if dir == RootIno {
			return nil
		}
		if i > w.f.sb.inodesCount {
			return fmt.Errorf("ext4: directory loop above inode %d: %w", dir, ErrCorrupt)
		}
		parent, err := w.lookup(dir, "..")
		if err != nil {
			return err
		}
		dir = parent
	}
}

// SetAttr changes the attributes that are set in a (chmod, chown,
// utimens); ctime becomes now, as for every attribute change.
type SetAttr struct {
	Mode         *uint32 // permission bits (07777); the file type is kept
	UID, GID     *uint32
	Atime, Mtime *time.Time
}

// Setattr applies a to inode ino.
func (w *Writer) Setattr(ino uint32, a SetAttr) (*Inode, error) {
	return w.SetattrContext(context.Background(), ino, a)
}

// SetattrContext is Setattr for ctx: it gives up when ctx ends before the
// change starts (see lockChangeContext).
func (w *Writer) SetattrContext(ctx context.Context, ino uint32, a SetAttr) (*Inode, error) {
	unlock, cerr := w.lockChangeContext(ctx, "setattr")
	if cerr != nil {
		return nil, cerr
	}
	defer unlock()
	in, err := w.loadInode(ino)
	if err != nil {
		return nil, err
	}
	if a.Mode != nil {
		in.setMode(in.Mode&sIFMT | uint16(*a.Mode&0o7777))
	}
	if a.UID != nil || a.GID != nil {
		// As the kernel does on chown: a regular file loses set-user-ID,
		// and set-group-ID when it is group-executable (else it marks
		// mandatory locking).
		if in.IsRegular() {
			m := in.Mode &^ 0o4000
			if m&0o010 != 0 {
				m &^= 0o2000
			}
			in.setMode(m)
		}
		uid, gid := in.UID, in.GID
		if a.UID != nil {
			uid = *a.UID
		}
		if a.GID != nil {
			gid = *a.GID
		}
		in.setOwner(uid, gid)
	}
	if a.Atime != nil {
		in.setTime(inoAtime, inoAtimeExtra, *a.Atime)
	}
	if a.Mtime != nil {
		in.setTime(inoMtime, inoMtimeExtra, *a.Mtime)
	}
	w.touch(in, false)
	if err := w.storeInode(in); err != nil {
		return nil, err
	}
	if err := w.endOp(); err != nil {
		return nil, err
	}
	return w.f.Inode(ino)
}
