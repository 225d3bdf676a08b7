package ext4

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"syscall"
)

// WriteAt writes p at byte offset off of regular file ino, allocating
// blocks near the file's existing ones so it stays contiguous, and extends
// the size if needed. On ENOSPC it returns the bytes written before it.
func (w *Writer) WriteAt(ino uint32, p []byte, off int64) (int, error) {
	return w.WriteAtContext(context.Background(), ino, p, off)
}

// WriteAtContext is WriteAt for ctx: ctx also reaches the volume's
// WriteAtContext with the file data; a write it interrupts frees the blocks
// it took and changes no metadata.
func (w *Writer) WriteAtContext(ctx context.Context, ino uint32, p []byte, off int64) (int, error) {
	dataLock, err := w.dataLocks.lock(ctx, ino)
	if err != nil {
		return 0, cancelled("write", err)
	}
	defer w.dataLocks.unlock(ino, dataLock)
	unlock, cerr := w.lockChangeContext(ctx, "write")
	if cerr != nil {
		return 0, cerr
	}
	locked := true
	defer func() {
		if locked {
			unlock()
		}
	}()
	in, err := w.loadInode(ino)
	if err != nil {
		return 0, err
	}
	if err := w.checkRegular(in, "write"); err != nil {
		return 0, err
	}
	if off < 0 {
		return 0, errno(syscall.EINVAL, "inode %d: write at negative offset %d", ino, off)
	}
	end := uint64(off) + uint64(len(p))
	if end > w.maxFileSize() {
		return 0, errno(syscall.EFBIG, "inode %d: a write ending at byte %d exceeds the largest file (%d bytes)", ino, end, w.maxFileSize())
	}
	if len(p) == 0 {
		return 0, nil
	}
	m, err := w.loadExtents(in)
	if err != nil {
		return 0, err
	}
	if plan, ok := w.overwritePlan(m, p, uint64(off)); ok && w.concurrentData && w.jw != nil && uint64(off)+uint64(len(p)) <= in.Size {
		// Only the times change: they go first, then the data without
		// the change lock (write_data.go).
		w.touch(in, true)
		if err := w.storeInode(in); err != nil {
			return 0, err
		}
		if err := w.endOp(); err != nil {
			return 0, err
		}
		w.dataInFlight.Add(1)
		locked = false
		unlock()
		err := w.writeOut(ctx, in, plan)
		w.dataInFlight.Done()
		if err != nil && ctx.Err() != nil && errors.Is(err, ctx.Err()) {
			return 0, cancelled("write", err)
		}
		if err != nil {
			return 0, retryableEIO(err)
		}
		return len(p), nil
	}
	var plan []dataWrite
	if uint64(off) > in.Size {
		if z, ok := w.tailZero(m, in.Size); ok {
			plan = append(plan, z)
		}
	}
	writes, n, werr := w.planData(in, m, p, uint64(off))
	plan = append(plan, writes...)
	// The data goes out with the reader lock released (changes stay
	// serialized): readers see the file as it was until its inode is
	// stored below.
	w.mu.Unlock()
	ioErr := w.writeOut(ctx, in, plan)
	w.mu.Lock()
	if ioErr != nil && undoable(ctx, ioErr) {
		// Interrupted, or storage is unavailable for now (not a device
		// failure): the blocks taken go back and no metadata changes.
		// Bytes already written over the file's own blocks stay, as after
		// an interrupted write(2).
		for _, d := range plan {
			if d.fresh {
				if err := w.freeBlocks(uint64(d.off)>>w.f.blockLog, uint64(len(d.b))>>w.f.blockLog); err != nil {
					return 0, err
				}
			}
		}
		if err := w.endOp(); err != nil {
			return 0, err
		}
		if errors.Is(ioErr, ErrWriteRetryable) {
			return 0, retryableEIO(ioErr)
		}
		return 0, cancelled("write", ioErr)
	}
	if ioErr != nil {
		return 0, ioErr // the device failed: nothing more is committed
	}
	if n > 0 {
		if e := uint64(off) + uint64(n); e > in.Size {
			w.setSize(in, e)
		}
		w.touch(in, true)
	}
	if err := w.storeExtents(in, m); err != nil {
		return 0, err
	}
	if err := w.endOp(); err != nil {
		return 0, err
	}
	return n, werr
}

// Truncate sets regular file ino's size, freeing blocks past the end when
// it shrinks; when it grows the new range is a hole.
func (w *Writer) Truncate(ino uint32, size uint64) error {
	return w.TruncateContext(context.Background(), ino, size)
}

// TruncateContext is Truncate for ctx: it gives up when ctx ends before the
// change starts (see lockChangeContext).
func (w *Writer) TruncateContext(ctx context.Context, ino uint32, size uint64) error {
	dataLock, err := w.dataLocks.lock(ctx, ino)
	if err != nil {
		return cancelled("truncate", err)
	}
	defer w.dataLocks.unlock(ino, dataLock)
	unlock, cerr := w.lockChangeContext(ctx, "truncate")
	if cerr != nil {
		return cerr
	}
	defer unlock()
	in, err := w.loadInode(ino)
	if err != nil {
		return err
	}
	if err := w.checkRegular(in, "truncate"); err != nil {
		return err
	}
	if size > w.maxFileSize() {
		return errno(syscall.EFBIG, "inode %d: size %d exceeds the largest file (%d bytes)", ino, size, w.maxFileSize())
	}
	m, err := w.loadExtents(in)
	if err != nil {
		return err
	}
	if err := w.truncate(in, m, size); err != nil {
		return err
	}
	w.touch(in, true)
	if err := w.storeExtents(in, m); err != nil {
		return err
	}
	return w.endOp()
}

func (w *Writer) truncate(in wInode, m *extentMap, size uint64) error {
	bs := uint64(w.f.blockSize)
	if size < in.Size {
		keep := (size + bs - 1) / bs
		for _, x := range m.punch(keep, maxLogicalBlk) {
			if err := w.freeBlocks(x.pblk, uint64(x.len)); err != nil {
				return err
			}
		}
	}
	// Bytes past EOF in the last block must read as zeros once the file
	// grows again.
	if err := w.zeroTail(in, m, min(size, in.Size)); err != nil {
		return err
	}
	w.setSize(in, size)
	return nil
}

func (w *Writer) checkRegular(in wInode, op string) error {
	switch {
	case in.IsDir():
		return errno(syscall.EISDIR, "%s of inode %d: is a directory", op, in.Ino)
	case !in.IsRegular():
		return errno(syscall.EINVAL, "%s of inode %d: not a regular file (mode %#o)", op, in.Ino, in.Mode)
	}
	return nil
}

// maxFileSize is the extent format's limit: 2^32 logical blocks.
func (w *Writer) maxFileSize() uint64 { return maxLogicalBlk << w.f.blockLog }

func (w *Writer) setSize(in wInode, size uint64) {
	in.setSize(size)
	if size > 1<<31-1 && !w.f.roCompat(roCompatLargeFile) {
		w.f.sb.featureRoCompat |= roCompatLargeFile
		binary.LittleEndian.PutUint32(w.sb[0x64:], w.f.sb.featureRoCompat)
		w.sbD = true
	}
}

// dataWrite is file data (or zeros) for the device at a volume offset.
type dataWrite struct {
	b     []byte
	off   int64
	fresh bool // to blocks allocated for it, whole blocks
}

// writeOut writes planned data in order, on behalf of ctx.
func (w *Writer) writeOut(ctx context.Context, in wInode, plan []dataWrite) error {
	for _, d := range plan {
		if _, err := w.dev.writeAtContext(ctx, d.b, d.off); err != nil {
			return fmt.Errorf("ext4: inode %d: writing data: %w", in.Ino, err)
		}
	}
	return nil
}

// tailZero plans clearing the bytes after size in size's block, if it is
// mapped.
func (w *Writer) tailZero(m *extentMap, size uint64) (dataWrite, bool) {
	bs := uint64(w.f.blockSize)
	if size%bs == 0 {
		return dataWrite{}, false
	}
	lblk := uint32(size / bs)
	i, ok := m.find(lblk)
	if !ok || m.exts[i].unwritten {
		return dataWrite{}, false
	}
	phys := (m.exts[i].pblk+uint64(lblk-m.exts[i].lblk))*bs + size%bs
	return dataWrite{b: make([]byte, bs-size%bs), off: int64(phys)}, true
}

// zeroTail clears the bytes after size in size's block now. Its caller
// has changed metadata already and cannot undo it, so any failure here is
// the device's.
func (w *Writer) zeroTail(in wInode, m *extentMap, size uint64) error {
	if z, ok := w.tailZero(m, size); ok {
		return w.dev.note(w.writeOut(context.Background(), in, []dataWrite{z}))
	}
	return nil
}

// retryableEIO is the error of a data write that failed retryably: EIO for
// this write, while the writer goes on.
func retryableEIO(err error) error {
	if !errors.Is(err, ErrWriteRetryable) {
		return err
	}
	return asEIO(err)
}

// planData maps p at off through m: in place over initialized extents,
// into fresh zero-padded blocks over holes (allocated now), and over
// unwritten extents it covers, which become initialized. It returns the
// device writes and how many bytes of p they cover (short on ENOSPC).
func (w *Writer) planData(in wInode, m *extentMap, p []byte, off uint64) ([]dataWrite, int, error) {
	bs := uint64(w.f.blockSize)
	end := off + uint64(len(p))
	lastBlk := (end + bs - 1) / bs // exclusive
	var plan []dataWrite
	for pos := off; pos < end; {
		lblk := uint32(pos / bs)
		i, found := m.find(lblk)
		if found && !m.exts[i].unwritten {
			x := m.exts[i]
			segEnd := min(end, (uint64(x.lblk)+uint64(x.len))*bs)
			phys := (x.pblk+uint64(lblk-x.lblk))*bs + pos%bs
			plan = append(plan, dataWrite{b: p[pos-off : segEnd-off], off: int64(phys)})
			pos = segEnd
			continue
		}
		var pblk uint64
		var count uint32
		if found { // unwritten: write over its blocks, then mark them initialized
			x := m.exts[i]
			count = uint32(min(uint64(x.lblk)+uint64(x.len), lastBlk) - uint64(lblk))
			pblk = x.pblk + uint64(lblk-x.lblk)
			m.punch(uint64(lblk), uint64(lblk)+uint64(count))
		} else {
			next := lastBlk
			if i < len(m.exts) {
				next = min(next, uint64(m.exts[i].lblk))
			}
			want := uint32(min(next-uint64(lblk), maxInitExtent))
			goal := m.goalFor(lblk)
			if goal == 0 {
				goal = w.inodeGoal(in.Ino)
			}
			var err error
			pblk, count, err = w.allocData(goal, want)
			if err != nil {
				return plan, int(pos - off), err
			}
		}
		buf := make([]byte, uint64(count)*bs)
		base := uint64(lblk) * bs
		segEnd := min(end, base+uint64(len(buf)))
		copy(buf[pos-base:], p[pos-off:segEnd-off])
		plan = append(plan, dataWrite{b: buf, off: int64(pblk * bs), fresh: !found})
		m.insert(extent{lblk: lblk, len: count, pblk: pblk})
		pos = segEnd
	}
	return plan, len(p), nil
}

// inodeGoal is where a file without blocks starts: its inode's group (the
// flex group's data area follows that group's metadata).
func (w *Writer) inodeGoal(ino uint32) uint64 {
	return w.f.groupFirstBlock((ino - 1) / w.f.sb.inodesPerGroup)
}

// Fallocate reserves blocks for the holes in [off, off+length) of regular
// file ino as unwritten extents, which read as zeros (fallocate(2) mode 0,
// or FALLOC_FL_KEEP_SIZE with keepSize). Blocks already mapped stay.
func (w *Writer) Fallocate(ino uint32, off, length uint64, keepSize bool) error {
	return w.FallocateContext(context.Background(), ino, off, length, keepSize)
}

// FallocateContext is Fallocate for ctx: it gives up when ctx ends before
// the change starts (see lockChangeContext).
func (w *Writer) FallocateContext(ctx context.Context, ino uint32, off, length uint64, keepSize bool) error {
	unlock, cerr := w.lockChangeContext(ctx, "fallocate")
	if cerr != nil {
		return cerr
	}
	defer unlock()
	in, err := w.loadInode(ino)
	if err != nil {
		return err
	}
	if err := w.checkRegular(in, "fallocate"); err != nil {
		return err
	}
	if length == 0 {
		return errno(syscall.EINVAL, "fallocate of inode %d: zero length", ino)
	}
	end := off + length
	if end < off || end > w.maxFileSize() {
		return errno(syscall.EFBIG, "fallocate of inode %d: range ends past the largest file (%d bytes)", ino, w.maxFileSize())
	}
	m, err := w.loadExtents(in)
	if err != nil {
		return err
	}
	bs := uint64(w.f.blockSize)
	last := (end + bs - 1) / bs
	var allocErr error
	for l := off / bs; l < last; {
		i, found := m.find(uint32(l))
		if found {
			l = uint64(m.exts[i].lblk) + uint64(m.exts[i].len)
			continue
		}
		next := last
		if i < len(m.exts) {
			next = min(next, uint64(m.exts[i].lblk))
		}
		goal := m.goalFor(uint32(l))
		if goal == 0 {
			goal = w.inodeGoal(in.Ino)
		}
		pblk, n, err := w.allocData(goal, uint32(min(next-l, maxUnwrittenExtent)))
		if err != nil {
			allocErr = err // keep what was reserved, as the kernel does
			break
		}
		m.insert(extent{lblk: uint32(l), len: n, pblk: pblk, unwritten: true})
		l += uint64(n)
	}
	if allocErr == nil && !keepSize && end > in.Size {
		w.setSize(in, end)
	}
	w.touch(in, true)
	if err := w.storeExtents(in, m); err != nil {
		return err
	}
	if err := w.endOp(); err != nil {
		return err
	}
	return allocErr
}
