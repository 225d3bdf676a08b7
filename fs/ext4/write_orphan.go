package ext4

import (
	"context"
	"encoding/binary"
	"fmt"
)

// Files unlinked while open stay allocated, with no links, on the orphan
// list (superblock s_last_orphan, chained through each inode's i_dtime, as
// the kernel keeps it) until their last holder lets go. After a crash,
// OpenWritable frees what the list holds, as the kernel does at mount.

const sbLastOrphan = 0xE8

// Hold records that a file handle refers to inode ino, so unlinking its
// last name keeps it readable and writable until Release.
func (w *Writer) Hold(ino uint32) {
	defer w.lockChange()()
	w.holds[ino]++
}

// Release drops a hold; an inode left without links and holds is freed.
func (w *Writer) Release(ino uint32) error {
	return w.ReleaseContext(context.Background(), ino)
}

// ReleaseContext is Release for ctx: it gives up when ctx ends before the
// change starts (see lockChangeContext).
func (w *Writer) ReleaseContext(ctx context.Context, ino uint32) error {
	unlock, cerr := w.lockChangeContext(ctx, "release")
	if cerr != nil {
		return cerr
	}
	defer unlock()
	if w.holds[ino] == 0 {
		return fmt.Errorf("ext4: release of inode %d, which is not held", ino)
	}
	if w.holds[ino]--; w.holds[ino] > 0 {
		return nil
	}
	delete(w.holds, ino)
	in, err := w.f.Inode(ino)
	if err != nil {
		return err
	}
	if in.Links > 0 {
		return nil
	}
	if err := w.removeOrphan(ino); err != nil {
		return err
	}
	if err := w.release(ino, in.IsDir()); err != nil {
		return err
	}
	return w.endOp()
}

// lastLinkGone frees an inode that lost its last link, or puts it on the
// orphan list while it is held.
func (w *Writer) lastLinkGone(ino uint32, dir bool) error {
	if w.holds[ino] == 0 {
		return w.release(ino, dir)
	}
	in, err := w.loadInode(ino)
	if err != nil {
		return err
	}
	le := binary.LittleEndian
	in.setLinks(0)
	le.PutUint32(in.raw[inoDtime:], le.Uint32(w.sb[sbLastOrphan:]))
	w.touch(in, false)
	if err := w.storeInode(in); err != nil {
		return err
	}
	le.PutUint32(w.sb[sbLastOrphan:], ino)
	w.sbD = true
	return nil
}

// removeOrphan unchains ino from the orphan list.
func (w *Writer) removeOrphan(ino uint32) error {
	le := binary.LittleEndian
	prev, cur := uint32(0), le.Uint32(w.sb[sbLastOrphan:])
	for n := uint32(0); cur != 0; n++ {
		if n > w.f.sb.inodesCount {
			return fmt.Errorf("ext4: the orphan list loops: %w", ErrCorrupt)
		}
		in, err := w.loadInode(cur)
		if err != nil {
			return fmt.Errorf("ext4: orphan list: %w", err)
		}
		next := le.Uint32(in.raw[inoDtime:])
		if cur != ino {
			prev, cur = cur, next
			continue
		}
		if prev == 0 {
			le.PutUint32(w.sb[sbLastOrphan:], next)
			w.sbD = true
			return nil
		}
		p, err := w.loadInode(prev)
		if err != nil {
			return err
		}
		le.PutUint32(p.raw[inoDtime:], next)
		return w.storeInode(p)
	}
	return fmt.Errorf("ext4: inode %d is not on the orphan list: %w", ino, ErrCorrupt)
}

// processOrphans empties the orphan list left by a crash: inodes without
// links are freed, others (an interrupted truncate) lose the blocks past
// their size.
func (w *Writer) processOrphans() error {
	le := binary.LittleEndian
	cur := le.Uint32(w.sb[sbLastOrphan:])
	for n := uint32(0); cur != 0; n++ {
		if n > w.f.sb.inodesCount || cur < w.f.sb.firstIno && cur != RootIno || cur > w.f.sb.inodesCount {
			return fmt.Errorf("ext4: the orphan list is damaged at inode %d (run e2fsck -f on the image): %w", cur, ErrCorrupt)
		}
		in, err := w.loadInode(cur)
		if err != nil {
			return fmt.Errorf("ext4: orphan list: %w", err)
		}
		next := le.Uint32(in.raw[inoDtime:])
		if in.Links == 0 {
			if err := w.release(cur, in.IsDir()); err != nil {
				return err
			}
		} else {
			if in.IsRegular() || in.IsDir() {
				m, err := w.loadExtents(in)
				if err != nil {
					return err
				}
				bs := uint64(w.f.blockSize)
				for _, x := range m.punch((in.Size+bs-1)/bs, maxLogicalBlk) {
					if err := w.freeBlocks(x.pblk, uint64(x.len)); err != nil {
						return err
					}
				}
				le.PutUint32(in.raw[inoDtime:], 0)
				if err := w.storeExtents(in, m); err != nil {
					return err
				}
			}
		}
		cur = next
	}
	le.PutUint32(w.sb[sbLastOrphan:], 0)
	w.sbD = true
	if err := w.commit(); err != nil {
		return err
	}
	return w.checkpoint() // home, like the journal's own recovery
}
