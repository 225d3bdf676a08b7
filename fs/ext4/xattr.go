package ext4

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
)

const (
	xattrMagic      = 0xEA020000
	xattrMaxValue   = 65536 // Linux XATTR_SIZE_MAX
	xattrBlockHdr   = 32
	xattrEntryFixed = 16

	xattrIndexUser       = 1
	xattrIndexACLAccess  = 2
	xattrIndexACLDefault = 3
	xattrIndexTrusted    = 4
	xattrIndexSecurity   = 6
	xattrIndexSystem     = 7
	xattrIndexHurd       = 10
)

// xattrPrefixes are the name spaces the kernel lists, by on-disk index.
var xattrPrefixes = []struct {
	index  uint8
	prefix string
}{
	{xattrIndexACLAccess, "system.posix_acl_access"},
	{xattrIndexACLDefault, "system.posix_acl_default"},
	{xattrIndexUser, "user."},
	{xattrIndexTrusted, "trusted."},
	{xattrIndexSecurity, "security."},
	{xattrIndexHurd, "gnu."},
}

// xattrEntry is one decoded attribute; value is nil when it lives in an EA inode.
type xattrEntry struct {
	index     uint8
	name      string
	value     []byte
	valueInum uint32
	valueSize uint32
}

// parseXattrEntries decodes the entry list starting at entries. Values are
// found at valueBase+e_value_offs and must lie inside valueBase.
func parseXattrEntries(entries, valueBase []byte) ([]xattrEntry, error) {
	le := binary.LittleEndian
	var out []xattrEntry
	for off := 0; ; {
		if off+4 > len(entries) {
			return nil, fmt.Errorf("xattr entry list runs off the end of its area: %w", ErrCorrupt)
		}
		if le.Uint32(entries[off:]) == 0 {
			return out, nil
		}
		if off+xattrEntryFixed > len(entries) {
			return nil, fmt.Errorf("xattr entry at offset %d is truncated: %w", off, ErrCorrupt)
		}
		e := entries[off:]
		nameLen := int(e[0])
		size := (xattrEntryFixed + nameLen + 3) &^ 3
		if off+size > len(entries) {
			return nil, fmt.Errorf("xattr entry name at offset %d is truncated: %w", off, ErrCorrupt)
		}
		x := xattrEntry{
			index:     e[1],
			name:      string(e[xattrEntryFixed : xattrEntryFixed+nameLen]),
			valueInum: le.Uint32(e[4:]),
			valueSize: le.Uint32(e[8:]),
		}
		if x.valueSize > xattrMaxValue {
			return nil, fmt.Errorf("xattr %q claims a %d-byte value: %w", x.name, x.valueSize, ErrCorrupt)
		}
		if x.valueInum == 0 {
			vo := int(le.Uint16(e[2:]))
			if vo+int(x.valueSize) > len(valueBase) {
				return nil, fmt.Errorf("xattr %q value at %d+%d lies outside its %d-byte area: %w", x.name, vo, x.valueSize, len(valueBase), ErrCorrupt)
			}
			x.value = valueBase[vo : vo+int(x.valueSize) : vo+int(x.valueSize)]
		}
		out = append(out, x)
		off += size
	}
}

// parseXattrBlock checks an xattr block's header and returns its entries.
func parseXattrBlock(b []byte) ([]xattrEntry, error) {
	le := binary.LittleEndian
	if len(b) < xattrBlockHdr+4 {
		return nil, fmt.Errorf("xattr block too short: %w", ErrCorrupt)
	}
	if m := le.Uint32(b[0:]); m != xattrMagic {
		return nil, fmt.Errorf("xattr block has bad magic %#08x: %w", m, ErrCorrupt)
	}
	if n := le.Uint32(b[8:]); n != 1 {
		return nil, fmt.Errorf("xattr block spans %d blocks (want 1): %w", n, ErrCorrupt)
	}
	return parseXattrEntries(b[xattrBlockHdr:], b)
}

// inodeXattrs returns the attributes stored inside the inode body.
func (f *FS) inodeXattrs(in *Inode) ([]xattrEntry, error) {
	start := 128 + int(in.extra)
	if len(in.raw) <= 128 || start+4 > len(in.raw) {
		return nil, nil
	}
	if binary.LittleEndian.Uint32(in.raw[start:]) != xattrMagic {
		return nil, nil
	}
	area := in.raw[start+4:]
	return parseXattrEntries(area, area)
}

// blockXattrs returns the attributes in the inode's xattr block, if any.
func (f *FS) blockXattrs(in *Inode) ([]xattrEntry, error) {
	if in.fileACL == 0 {
		return nil, nil
	}
	if err := f.checkPhys(in, in.fileACL, 1, "xattr block"); err != nil {
		return nil, err
	}
	b, err := f.readBlock(in.fileACL)
	if err != nil {
		return nil, fmt.Errorf("ext4: inode %d: xattr block: %w", in.Ino, err)
	}
	if f.hasCsum() {
		stored := binary.LittleEndian.Uint32(b[0x10:])
		if c := f.xattrBlockCsum(in.fileACL, b); c != stored {
			return nil, fmt.Errorf("ext4: inode %d: xattr block %d checksum mismatch (stored %#x, computed %#x): %w", in.Ino, in.fileACL, stored, c, ErrCorrupt)
		}
	}
	es, err := parseXattrBlock(b)
	if err != nil {
		return nil, fmt.Errorf("ext4: inode %d: xattr block %d: %w", in.Ino, in.fileACL, err)
	}
	return es, nil
}

func (f *FS) allXattrs(in *Inode) ([]xattrEntry, error) {
	if err := checkInode(in); err != nil {
		return nil, err
	}
	a, err := f.inodeXattrs(in)
	if err != nil {
		return nil, fmt.Errorf("ext4: inode %d: in-inode xattrs: %w", in.Ino, err)
	}
	b, err := f.blockXattrs(in)
	if err != nil {
		return nil, err
	}
	return append(a, b...), nil
}

// ListXattr lists the full names of the inode's extended attributes, as the
// kernel does (system.data, the inline-data store, is hidden).
func (f *FS) ListXattr(in *Inode) ([]string, error) {
	es, err := f.allXattrs(in)
	if err != nil {
		return nil, err
	}
	var names []string
	for _, e := range es {
		for _, p := range xattrPrefixes {
			if p.index == e.index {
				names = append(names, p.prefix+e.name)
				break
			}
		}
	}
	return names, nil
}

// GetXattr returns the value of the named attribute, or an error wrapping
// ErrNoXattr. POSIX ACLs are converted to the Linux xattr wire format.
func (f *FS) GetXattr(in *Inode, name string) ([]byte, error) {
	idx, suffix, ok := splitXattrName(name)
	if !ok {
		if err := checkInode(in); err != nil {
			return nil, err
		}
		return nil, fmt.Errorf("ext4: inode %d: xattr %q: %w", in.Ino, name, ErrNoXattr)
	}
	v, err := f.getXattrRaw(in, idx, suffix)
	if err != nil {
		return nil, err
	}
	if idx == xattrIndexACLAccess || idx == xattrIndexACLDefault {
		acl, err := aclToXattr(v)
		if err != nil {
			return nil, fmt.Errorf("ext4: inode %d: xattr %q: %w", in.Ino, name, err)
		}
		return acl, nil
	}
	return v, nil
}

func splitXattrName(name string) (uint8, string, bool) {
	for _, p := range xattrPrefixes {
		if p.index == xattrIndexACLAccess || p.index == xattrIndexACLDefault {
			if name == p.prefix {
				return p.index, "", true
			}
			continue
		}
		if rest, ok := strings.CutPrefix(name, p.prefix); ok && rest != "" {
			return p.index, rest, true
		}
	}
	return 0, "", false
}

// getXattrRaw returns a copy of the stored value of attribute (index,
// name).
func (f *FS) getXattrRaw(in *Inode, index uint8, name string) ([]byte, error) {
	es, err := f.allXattrs(in)
	if err != nil {
		return nil, err
	}
	for _, e := range es {
		if e.index != index || e.name != name {
			continue
		}
		if e.valueInum == 0 {
			// A copy: the block may be the writer's open transaction
			// buffer, which changes in place after the caller's View.
			return bytes.Clone(e.value), nil
		}
		return f.eaInodeValue(in, e)
	}
	return nil, fmt.Errorf("ext4: inode %d: xattr index %d name %q: %w", in.Ino, index, name, ErrNoXattr)
}

// eaInodeValue reads a large value kept in its own inode (ea_inode feature).
func (f *FS) eaInodeValue(owner *Inode, e xattrEntry) ([]byte, error) {
	if !f.incompat(incompatEAInode) || e.valueInum == owner.Ino {
		return nil, fmt.Errorf("ext4: inode %d: xattr %q refers to value inode %d without the ea_inode feature: %w", owner.Ino, e.name, e.valueInum, ErrCorrupt)
	}
	vi, err := f.Inode(e.valueInum)
	if err != nil {
		return nil, fmt.Errorf("ext4: inode %d: xattr %q value: %w", owner.Ino, e.name, err)
	}
	if !vi.hasFlag(flagEAInode) || vi.hasFlag(flagInlineData) || vi.Size != uint64(e.valueSize) {
		return nil, fmt.Errorf("ext4: inode %d: xattr %q value inode %d is not a matching EA inode: %w", owner.Ino, e.name, e.valueInum, ErrCorrupt)
	}
	v := make([]byte, e.valueSize)
	if err := f.readData(context.Background(), vi, v, 0); err != nil {
		return nil, fmt.Errorf("ext4: inode %d: xattr %q value: %w", owner.Ino, e.name, err)
	}
	return v, nil
}

// POSIX ACL tags.
const (
	aclUserObj  = 0x01
	aclUser     = 0x02
	aclGroupObj = 0x04
	aclGroup    = 0x08
	aclMask     = 0x10
	aclOther    = 0x20
)

var errBadACL = errors.New("malformed POSIX ACL")

// aclToXattr converts ext4's compact ACL (version 1, 4-byte entries for the
// *_OBJ/MASK/OTHER tags) to the Linux xattr format (version 2, 8-byte entries).
func aclToXattr(d []byte) ([]byte, error) {
	le := binary.LittleEndian
	if len(d) < 4 || le.Uint32(d) != 1 {
		return nil, fmt.Errorf("%w: bad header: %w", errBadACL, ErrCorrupt)
	}
	out := make([]byte, 4, 4+2*len(d))
	le.PutUint32(out, 2)
	for p := d[4:]; len(p) > 0; {
		if len(p) < 4 {
			return nil, fmt.Errorf("%w: truncated entry: %w", errBadACL, ErrCorrupt)
		}
		tag, perm := le.Uint16(p), le.Uint16(p[2:])
		id := uint32(0xFFFFFFFF)
		switch tag {
		case aclUser, aclGroup:
			if len(p) < 8 {
				return nil, fmt.Errorf("%w: truncated entry: %w", errBadACL, ErrCorrupt)
			}
			id = le.Uint32(p[4:])
			p = p[8:]
		case aclUserObj, aclGroupObj, aclMask, aclOther:
			p = p[4:]
		default:
			return nil, fmt.Errorf("%w: unknown tag %#x: %w", errBadACL, tag, ErrCorrupt)
		}
		out = le.AppendUint16(out, tag)
		out = le.AppendUint16(out, perm)
		out = le.AppendUint32(out, id)
	}
	return out, nil
}

// xattrBlockCsum is the metadata_csum checksum of xattr block blk: over the
// block number and the block with its checksum field as zero.
func (f *FS) xattrBlockCsum(blk uint64, b []byte) uint32 {
	var nr [8]byte
	binary.LittleEndian.PutUint64(nr[:], blk)
	c := crc32cRaw(f.csumSeed, nr[:])
	c = crc32cRaw(c, b[:0x10])
	c = crc32cRaw(c, []byte{0, 0, 0, 0})
	return crc32cRaw(c, b[0x14:])
}
