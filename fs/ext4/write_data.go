package ext4

import (
	"context"
	"os"
	"sync"
)

// Overwrites of a file's initialized blocks (no allocation, no size
// change) write their data without the change lock, so other changes and
// readers go on meanwhile. That is safe because:
//   - each inode's data changes are serialized (inodeLocks, the kernel's
//     i_rwsem for writes): writes of one file never meet in a block;
//   - blocks a concurrent change frees stay unusable until the open
//     transaction commits (pendingFree), and every commit first waits for
//     the writes in flight (dataInFlight): an overwrite never lands in a
//     block that has become someone else's;
//   - different files never share a block, and the volume's write unit
//     divides the block (see concurrentData): no read-modify-write of one
//     sector for two writers.
// Times change under the lock before the data goes out, as the kernel's
// file_modified comes before its copy, and ordered mode needs nothing
// more: no metadata waits for overwritten data.

// sectorSizer is the volume's optional report of its write unit: a write
// of part of a sector reads, changes and rewrites the whole sector
// (crypto.Volume's XTS sectors).
type sectorSizer interface {
	SectorSize() int
}

// concurrentData reports whether writes to distinct blocks of dev may run
// in parallel: an *os.File writes bytes, a volume that reports a write
// unit dividing the block is fine, anything else is assumed to have
// sectors that might span blocks.
func concurrentData(dev Device, blockSize uint32) bool {
	switch d := dev.(type) {
	case *os.File:
		return true
	case sectorSizer:
		s := d.SectorSize()
		return s > 0 && int(blockSize)%s == 0
	}
	return false
}

// inodeLocks serializes the data changes (writes, truncates) of each
// inode; entries live while someone holds or waits, and are reused.
type inodeLocks struct {
	mu    sync.Mutex
	m     map[uint32]*inodeLock
	spare []*inodeLock
}

type inodeLock struct {
	l    changeLock
	refs int
}

// lock takes ino's data lock unless ctx ends first; it comes before the
// change lock, never after it. The caller passes the entry to unlock.
func (il *inodeLocks) lock(ctx context.Context, ino uint32) (*inodeLock, error) {
	il.mu.Lock()
	if il.m == nil {
		il.m = map[uint32]*inodeLock{}
	}
	e := il.m[ino]
	if e == nil {
		if n := len(il.spare); n > 0 {
			e, il.spare = il.spare[n-1], il.spare[:n-1]
		} else {
			e = &inodeLock{l: make(changeLock, 1)}
		}
		il.m[ino] = e
	}
	e.refs++
	il.mu.Unlock()
	if err := e.l.LockContext(ctx); err != nil {
		il.drop(ino, e)
		return nil, err
	}
	return e, nil
}

func (il *inodeLocks) unlock(ino uint32, e *inodeLock) {
	e.l.Unlock()
	il.drop(ino, e)
}

func (il *inodeLocks) drop(ino uint32, e *inodeLock) {
	il.mu.Lock()
	defer il.mu.Unlock()
	if e.refs--; e.refs == 0 {
		delete(il.m, ino)
		if len(il.spare) < 64 {
			il.spare = append(il.spare, e)
		}
	}
}

// overwritePlan maps [off, off+len(p)) onto the file's blocks if every one
// is allocated and initialized, so the write needs no metadata but times.
func (w *Writer) overwritePlan(m *extentMap, p []byte, off uint64) ([]dataWrite, bool) {
	bs := uint64(w.f.blockSize)
	end := off + uint64(len(p))
	var plan []dataWrite
	for pos := off; pos < end; {
		i, found := m.find(uint32(pos / bs))
		if !found || m.exts[i].unwritten {
			return nil, false
		}
		x := m.exts[i]
		segEnd := min(end, (uint64(x.lblk)+uint64(x.len))*bs)
		phys := (x.pblk+(pos/bs-uint64(x.lblk)))*bs + pos%bs
		plan = append(plan, dataWrite{b: p[pos-off : segEnd-off], off: int64(phys)})
		pos = segEnd
	}
	return plan, true
}
