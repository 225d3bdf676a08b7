package ext4

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"slices"
	"syscall"
)

// Flags of SetXattr, with the values of setxattr(2).
const (
	XattrCreate  = 1 // fail with EEXIST if the attribute exists
	XattrReplace = 2 // fail with ENODATA unless it exists
)

// xattrCmp orders entries as the kernel keeps them sorted in a block: by
// name index, then name length, then name bytes.
func xattrCmp(a, b xattrEntry) int {
	if a.index != b.index {
		return int(a.index) - int(b.index)
	}
	if len(a.name) != len(b.name) {
		return len(a.name) - len(b.name)
	}
	return bytes.Compare([]byte(a.name), []byte(b.name))
}

// xattrEntryHash is the kernel's ext4_xattr_hash_entry (unsigned name bytes).
func xattrEntryHash(name string, value []byte) uint32 {
	var h uint32
	for i := 0; i < len(name); i++ {
		h = h<<5 ^ h>>27 ^ uint32(name[i])
	}
	padded := make([]byte, (len(value)+3)&^3)
	copy(padded, value)
	for i := 0; i < len(padded); i += 4 {
		h = h<<16 ^ h>>16 ^ binary.LittleEndian.Uint32(padded[i:])
	}
	return h
}

func xattrEntrySize(name string) int { return (xattrEntryFixed + len(name) + 3) &^ 3 }
func xattrValueSize(v []byte) int    { return (len(v) + 3) &^ 3 }

// encodeXattrs lays entries out in area: entries from entryOff, values
// packed down from the end, value offsets relative to base (the area start
// for a block, the first entry for the inode body). It reports false when
// they do not fit.
func encodeXattrs(area []byte, entryOff, base int, es []xattrEntry) bool {
	le := binary.LittleEndian
	clear(area[entryOff:])
	off, vend := entryOff, len(area)
	for _, e := range es {
		vend -= xattrValueSize(e.value)
		if off+xattrEntrySize(e.name)+4 > vend {
			return false
		}
		d := area[off:]
		d[0] = byte(len(e.name))
		d[1] = e.index
		le.PutUint16(d[2:], uint16(vend-base))
		if len(e.value) == 0 {
			le.PutUint16(d[2:], 0)
		}
		le.PutUint32(d[8:], uint32(len(e.value)))
		le.PutUint32(d[12:], xattrEntryHash(e.name, e.value))
		copy(d[xattrEntryFixed:], e.name)
		copy(area[vend:], e.value)
		off += xattrEntrySize(e.name)
	}
	return true
}

// SetXattr sets attribute name of inode ino (flags: XattrCreate,
// XattrReplace). POSIX ACLs are given in the Linux xattr format.
func (w *Writer) SetXattr(ino uint32, name string, value []byte, flags int) error {
	return w.SetXattrContext(context.Background(), ino, name, value, flags)
}

// SetXattrContext is SetXattr for ctx: it gives up when ctx ends before the
// change starts (see lockChangeContext).
func (w *Writer) SetXattrContext(ctx context.Context, ino uint32, name string, value []byte, flags int) error {
	idx, suffix, err := w.xattrName(name)
	if err != nil {
		return err
	}
	if len(value) > xattrMaxValue {
		return errno(syscall.E2BIG, "xattr %q: value of %d bytes", name, len(value))
	}
	if idx == xattrIndexACLAccess || idx == xattrIndexACLDefault {
		if value, err = aclFromXattr(value); err != nil {
			return err
		}
	}
	unlock, cerr := w.lockChangeContext(ctx, "setxattr")
	if cerr != nil {
		return cerr
	}
	defer unlock()
	return w.changeXattrs(ino, name, func(es []xattrEntry, at int) ([]xattrEntry, error) {
		switch {
		case at >= 0 && flags&XattrCreate != 0:
			return nil, errno(syscall.EEXIST, "inode %d: xattr %q exists", ino, name)
		case at < 0 && flags&XattrReplace != 0:
			return nil, errno(syscall.ENODATA, "inode %d: xattr %q", ino, name)
		case at >= 0:
			es[at].value = bytes.Clone(value)
			return es, nil
		}
		return append(es, xattrEntry{index: idx, name: suffix, value: bytes.Clone(value)}), nil
	}, idx, suffix)
}

// RemoveXattr removes attribute name of inode ino.
func (w *Writer) RemoveXattr(ino uint32, name string) error {
	return w.RemoveXattrContext(context.Background(), ino, name)
}

// RemoveXattrContext is RemoveXattr for ctx: it gives up when ctx ends
// before the change starts (see lockChangeContext).
func (w *Writer) RemoveXattrContext(ctx context.Context, ino uint32, name string) error {
	idx, suffix, err := w.xattrName(name)
	if err != nil {
		return err
	}
	unlock, cerr := w.lockChangeContext(ctx, "removexattr")
	if cerr != nil {
		return cerr
	}
	defer unlock()
	return w.changeXattrs(ino, name, func(es []xattrEntry, at int) ([]xattrEntry, error) {
		if at < 0 {
			return nil, errno(syscall.ENODATA, "inode %d: xattr %q", ino, name)
		}
		return slices.Delete(es, at, at+1), nil
	}, idx, suffix)
}

func (w *Writer) xattrName(name string) (uint8, string, error) {
	idx, suffix, ok := splitXattrName(name)
	if !ok {
		return 0, "", errno(syscall.EOPNOTSUPP, "xattr %q: unknown name space", name)
	}
	if len(suffix) > 255 {
		return 0, "", errno(syscall.ERANGE, "xattr name of %d bytes", len(name))
	}
	return idx, suffix, nil
}

// changeXattrs loads all of the inode's attributes, lets change edit the
// list (at is the index of (idx, suffix) or -1), and stores the result:
// what fits in the inode body there, the rest in an xattr block of its own
// (a shared block is copied, not changed).
func (w *Writer) changeXattrs(ino uint32, name string, change func([]xattrEntry, int) ([]xattrEntry, error), idx uint8, suffix string) error {
	in, err := w.loadInode(ino)
	if err != nil {
		return err
	}
	if idx == xattrIndexUser && !in.IsRegular() && !in.IsDir() {
		return errno(syscall.EPERM, "inode %d: user xattrs only on files and directories", ino)
	}
	es, err := w.f.allXattrs(in.Inode)
	if err != nil {
		return err
	}
	for i, e := range es {
		if e.valueInum != 0 {
			return fmt.Errorf("ext4: inode %d: xattr %q lives in an EA inode, which the writer does not change: %w", ino, e.name, ErrUnsupported)
		}
		es[i].value = bytes.Clone(e.value) // in-body values alias the area rewritten below
	}
	at := slices.IndexFunc(es, func(e xattrEntry) bool { return e.index == idx && e.name == suffix })
	if es, err = change(es, at); err != nil {
		return err
	}
	slices.SortFunc(es, xattrCmp)

	// The inode body first, in order, while entries fit; the rest to a block.
	le := binary.LittleEndian
	var inBody, inBlock []xattrEntry
	start := 128 + int(in.extra)
	room := len(in.raw) - start - 4 // after the body's magic
	used := 4                       // the list terminator
	for _, e := range es {
		if n := xattrEntrySize(e.name) + xattrValueSize(e.value); len(in.raw) > 128 && used+n <= room && inBlock == nil {
			inBody = append(inBody, e)
			used += n
			continue
		}
		inBlock = append(inBlock, e)
	}
	var block []byte
	if len(inBlock) > 0 {
		block = make([]byte, w.f.blockSize)
		le.PutUint32(block, xattrMagic)
		le.PutUint32(block[4:], 1) // refcount
		le.PutUint32(block[8:], 1) // blocks
		if !encodeXattrs(block, xattrBlockHdr, 0, inBlock) {
			return errno(syscall.ENOSPC, "inode %d: xattr %q: the attributes do not fit the inode and one block", ino, name)
		}
		var h uint32 // the kernel's ext4_xattr_rehash
		for _, e := range inBlock {
			h = h<<16 ^ h>>16 ^ xattrEntryHash(e.name, e.value)
		}
		le.PutUint32(block[12:], h)
	}
	if len(in.raw) > 128 && start+4 <= len(in.raw) {
		body := in.raw[start:]
		clear(body)
		if len(inBody) > 0 {
			le.PutUint32(body, xattrMagic)
			encodeXattrs(body, 4, 4, inBody)
		}
	}

	// The block: rewrite our own in place, else drop the old reference and
	// take a new block.
	bs := uint64(w.f.blockSize)
	old := in.fileACL
	if old != 0 && len(inBlock) > 0 {
		ob, err := w.block(old)
		if err != nil {
			return err
		}
		if le.Uint32(ob[4:]) == 1 {
			if w.f.hasCsum() {
				le.PutUint32(block[0x10:], w.f.xattrBlockCsum(old, block))
			}
			if err := w.writeBlock(old, block); err != nil {
				return err
			}
			block = nil
		}
	}
	if block != nil || old != 0 && len(inBlock) == 0 {
		// The new block first: on ENOSPC nothing has changed yet.
		var blk uint64
		if block != nil {
			if blk, _, err = w.allocBlocks(w.inodeGoal(ino), 1); err != nil {
				return err
			}
		}
		if old != 0 {
			if err := w.dropXattrBlock(in); err != nil {
				return err
			}
			in.setBlocks(in.Blocks>>(w.f.blockLog-9)-1, w.f.blockLog)
		}
		if block != nil {
			if w.f.hasCsum() {
				le.PutUint32(block[0x10:], w.f.xattrBlockCsum(blk, block))
			}
			if err := w.writeBlock(blk, block); err != nil {
				return err
			}
			le.PutUint32(in.raw[inoFileACLLo:], uint32(blk))
			le.PutUint16(in.raw[0x76:], uint16(blk>>32))
			in.fileACL = blk
			in.setBlocks(in.Blocks/(bs/512)+1, w.f.blockLog)
		}
	}
	if !w.f.compat(compatExtAttr) {
		w.f.sb.featureCompat |= compatExtAttr
		le.PutUint32(w.sb[0x5C:], w.f.sb.featureCompat)
		w.sbD = true
	}
	w.touch(in, false)
	if err := w.storeInode(in); err != nil {
		return err
	}
	return w.endOp()
}

// aclFromXattr converts a POSIX ACL from the Linux xattr format (version 2,
// 8-byte entries) to ext4's compact on-disk format (version 1).
func aclFromXattr(v []byte) ([]byte, error) {
	le := binary.LittleEndian
	if len(v) < 4 || le.Uint32(v) != 2 || (len(v)-4)%8 != 0 {
		return nil, errno(syscall.EINVAL, "POSIX ACL of %d bytes is not in the version 2 xattr format", len(v))
	}
	out := le.AppendUint32(make([]byte, 0, len(v)), 1)
	for p := v[4:]; len(p) > 0; p = p[8:] {
		tag, perm, id := le.Uint16(p), le.Uint16(p[2:]), le.Uint32(p[4:])
		out = le.AppendUint16(out, tag)
		out = le.AppendUint16(out, perm)
		switch tag {
		case aclUser, aclGroup:
			out = le.AppendUint32(out, id)
		case aclUserObj, aclGroupObj, aclMask, aclOther:
		default:
			return nil, errno(syscall.EINVAL, "POSIX ACL entry with unknown tag %#x", tag)
		}
	}
	return out, nil
}
