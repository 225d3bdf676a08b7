package ext4

import (
	"encoding/binary"
	"fmt"
	"slices"
	"syscall"
)

// Indexed (htree) directories keep their index: a new name goes to the
// leaf its hash selects; a full leaf is split at the median hash, adding an
// index entry; a full index grows a level (the root's entries move to a
// new node) or splits a node, as the kernel's ext4_dx_add_entry does.

const (
	dxRootCountOff = 0x20 // count/limit in the root, after its info
	dxNodeCountOff = 8    // in an interior node, after the fake empty entry
)

// dxNode is one index node on the path to a leaf.
type dxNode struct {
	blk int // index into the directory's blocks
	off int // of the count/limit header
	at  int // entry taken
}

func (w *Writer) dxLimit(bs, off int) int {
	n := (bs - off) / 8
	if w.f.hasCsum() {
		n--
	}
	return n
}

// sealDx checksums an index node (root or interior) in its dx tail.
func (w *Writer) sealDx(dir wInode, b []byte, off int) {
	if !w.f.hasCsum() {
		return
	}
	le := binary.LittleEndian
	limit, count := int(le.Uint16(b[off:])), int(le.Uint16(b[off+2:]))
	tail := off + 8*limit
	c := crc32cRaw(dir.csumSeed, b[:off+8*count])
	c = crc32cRaw(c, b[tail:tail+4])
	c = crc32cRaw(c, []byte{0, 0, 0, 0})
	le.PutUint32(b[tail+4:], c)
}

// dxAdd inserts name → ino into an indexed directory.
// dxTree is an indexed directory being searched or changed.
type dxTree struct {
	w      *Writer
	dir    wInode
	blocks *dirBlocks
	hv     uint8
	levels int
}

func (w *Writer) dxOpen(dir wInode, blocks *dirBlocks) (*dxTree, error) {
	root, err := w.dirData(dir, blocks, 0)
	if err != nil {
		return nil, err
	}
	hv, levels, _, err := w.f.dxRootInfo(dir.Inode, root)
	if err != nil {
		return nil, err
	}
	return &dxTree{w: w, dir: dir, blocks: blocks, hv: hv, levels: levels}, nil
}

func (t *dxTree) hash(name []byte) (uint32, error) {
	h, ok := dirHash(name, t.hv, t.w.f.hashSeed)
	if !ok {
		return 0, fmt.Errorf("ext4: inode %d: htree hash version %d: %w", t.dir.Ino, t.hv, ErrUnsupported)
	}
	return h, nil
}

func (t *dxTree) count(n dxNode) int {
	return int(binary.LittleEndian.Uint16(t.blocks.at(n.blk).b[n.off+2:]))
}
func (t *dxTree) entry(n dxNode, i int) []byte {
	return t.blocks.at(n.blk).b[n.off+8*i:]
}
func (t *dxTree) hashAt(n dxNode, i int) uint32 { return binary.LittleEndian.Uint32(t.entry(n, i)) }
func (t *dxTree) blockAt(n dxNode, i int) (int, error) {
	l := uint64(binary.LittleEndian.Uint32(t.entry(n, i)[4:]) & 0x0fffffff)
	if l >= uint64(t.blocks.len()) {
		return 0, fmt.Errorf("ext4: inode %d: htree points at block %d of %d: %w", t.dir.Ino, l, t.blocks.len(), ErrCorrupt)
	}
	return int(l), nil
}

// descend completes path down to a leaf and returns it. With byHash each
// node takes the entry covering hash; without, the last node keeps its
// entry and the ones below take their first (the walk to the next leaf).
func (t *dxTree) descend(path []dxNode, hash uint32, byHash bool) ([]dxNode, int, error) {
	f := t.w.f
	for {
		n := &path[len(path)-1]
		if byHash {
			c := t.count(*n)
			n.at = 0
			for i := 1; i < c && t.hashAt(*n, i) <= hash; i++ {
				n.at = i
			}
		}
		child, err := t.blockAt(*n, n.at)
		if err != nil {
			return nil, 0, err
		}
		b, err := t.w.dirData(t.dir, t.blocks, child)
		if err != nil {
			return nil, 0, err
		}
		if len(path) == t.levels+1 {
			return path, child, nil
		}
		if !f.isDxNode(b) {
			return nil, 0, fmt.Errorf("ext4: inode %d: htree interior block %d is not an index node: %w", t.dir.Ino, child, ErrCorrupt)
		}
		if _, err := f.dxEntries(t.dir.Inode, b, dxNodeCountOff, fmt.Sprintf("node %d", child)); err != nil {
			return nil, 0, err // count, limit and checksum checked before use
		}
		path = append(path, dxNode{blk: child, off: dxNodeCountOff})
	}
}

// dxFind locates name through the index, following a hash collision into
// the next leaves as the kernel does.
func (w *Writer) dxFind(dir wInode, blocks *dirBlocks, name string) (direntAt, error) {
	t, err := w.dxOpen(dir, blocks)
	if err != nil {
		return direntAt{}, err
	}
	hash, err := t.hash([]byte(name))
	if err != nil {
		return direntAt{}, err
	}
	path, leaf, err := t.descend([]dxNode{{blk: 0, off: dxRootCountOff}}, hash, true)
	for err == nil {
		at, ok, ferr := w.findInBlock(dir, blocks, leaf, name)
		if ferr != nil || ok {
			return at, ferr
		}
		// The next leaf continues this hash only if its index entry says so.
		i := len(path) - 1
		for i >= 0 && path[i].at+1 >= t.count(path[i]) {
			i--
		}
		if i < 0 {
			break
		}
		path = path[:i+1]
		path[i].at++
		if t.hashAt(path[i], path[i].at)&^1 != hash {
			break
		}
		path, leaf, err = t.descend(path, hash, false)
	}
	if err != nil {
		return direntAt{}, err
	}
	return direntAt{}, errno(syscall.ENOENT, "inode %d: %q", dir.Ino, name)
}

func (w *Writer) dxAdd(dir wInode, m *extentMap, blocks *dirBlocks, name string, ino uint32, ft uint8) error {
	le := binary.LittleEndian
	f := w.f
	bs := int(f.blockSize)
	t, err := w.dxOpen(dir, blocks)
	if err != nil {
		return err
	}
	root := blocks.at(0).b
	hv, levels := t.hv, t.levels
	hash, err := t.hash([]byte(name))
	if err != nil {
		return err
	}
	count := func(n dxNode) int { return int(le.Uint16(blocks.at(n.blk).b[n.off+2:])) }
	path, leafIdx, err := t.descend([]dxNode{{blk: 0, off: dxRootCountOff}}, hash, true)
	if err != nil {
		return err
	}
	changed := map[int]bool{}
	if done, err := w.insertInBlock(dir, *blocks.at(leafIdx), name, ino, ft); err != nil {
		return err
	} else if done {
		w.sealDirBlock(dir, blocks.at(leafIdx).b)
		return w.finishDx(dir, m, blocks, map[int]bool{leafIdx: true})
	}

	// The leaf is full: its parent needs room for one more index entry.
	// As the kernel's ext4_dx_add_entry: full index nodes split, from the
	// lowest one on the path with room downward; when every node up to the
	// root is full, the tree grows a level (the root's entries move to a
	// new node under it), up to 2 levels below the root with large_dir and
	// 1 without; past that the directory is full (ENOSPC).
	limit := func(n dxNode) int { return int(le.Uint16(blocks.at(n.blk).b[n.off:])) }
	k := len(path) - 1 // the lowest node with room
	for k >= 0 && count(path[k]) == limit(path[k]) {
		k--
	}
	grow := k < 0
	maxLevels := 1
	if f.incompat(incompatLargeDir) {
		maxLevels = 2
	}
	if grow && levels >= maxLevels {
		hint := ""
		if maxLevels < 2 {
			hint = " (the large_dir feature allows one more level)"
		}
		return errno(syscall.ENOSPC, "inode %d: directory index full at %d levels%s", dir.Ino, levels+1, hint)
	}
	// Every block this takes comes first: on ENOSPC nothing has changed.
	need := len(path) - 1 - k + 1 // split index nodes and the new leaf
	if grow {
		need = 1 + len(path) - 1 + 1 // the new node, every node below the root, the leaf
	}
	fresh := make([]uint64, 0, need)
	for range need {
		lblk := uint32(blocks.len() + len(fresh))
		goal := m.goalFor(lblk)
		if goal == 0 {
			goal = w.inodeGoal(dir.Ino)
		}
		p, _, err := w.allocBlocks(goal, 1)
		if err != nil {
			for _, p := range fresh {
				if ferr := w.freeBlocks(p, 1); ferr != nil {
					return fmt.Errorf("%w (and freeing block %d again: %v)", err, p, ferr)
				}
			}
			return err
		}
		fresh = append(fresh, p)
		m.insert(extent{lblk: lblk, len: 1, pblk: p})
	}
	newBlock := func() int {
		i := blocks.add(dirBlock{lblk: uint64(blocks.len()), pblk: fresh[0], b: make([]byte, bs)})
		fresh = fresh[1:]
		dir.setSize(uint64(blocks.len()) * uint64(bs))
		return i
	}
	newIndexNode := func() int {
		i := newBlock()
		b := blocks.at(i).b
		le.PutUint16(b[4:], uint16(bs)) // a fake empty entry spanning the block
		le.PutUint16(b[dxNodeCountOff:], uint16(w.dxLimit(bs, dxNodeCountOff)))
		return i
	}
	if grow {
		ni := newIndexNode()
		c := count(path[0])
		copy(blocks.at(ni).b[dxNodeCountOff+4:], root[dxRootCountOff+4:dxRootCountOff+8*c])
		le.PutUint16(blocks.at(ni).b[dxNodeCountOff+2:], uint16(c))
		le.PutUint16(root[dxRootCountOff+2:], 1)
		le.PutUint32(root[dxRootCountOff+4:], uint32(ni))
		levels++
		root[0x1E] = byte(levels)
		child := dxNode{blk: ni, off: dxNodeCountOff, at: path[0].at}
		path = append([]dxNode{{blk: 0, off: dxRootCountOff, at: 0}, child}, path[1:]...)
		changed[0], changed[ni] = true, true
		k = 1 // the new node has room: a node holds more entries than the root
	}
	for i := k + 1; i < len(path); i++ {
		// Split full node path[i]; its upper half goes to a new node that
		// its parent, which has room by now, indexes after it.
		up, n := &path[i-1], path[i]
		ni := newIndexNode()
		c := count(n)
		half := c / 2
		moved := blocks.at(n.blk).b[n.off+8*half : n.off+8*c]
		splitHash := le.Uint32(moved)
		// Entry 0 of the new node holds count/limit, then its block.
		nb := blocks.at(ni).b
		le.PutUint32(nb[dxNodeCountOff+4:], le.Uint32(moved[4:]))
		copy(nb[dxNodeCountOff+8:], moved[8:])
		le.PutUint16(nb[dxNodeCountOff+2:], uint16(c-half))
		le.PutUint16(blocks.at(n.blk).b[n.off+2:], uint16(half))
		w.dxInsert(blocks.at(up.blk).b, up.off, up.at+1, splitHash, uint32(ni))
		changed[up.blk], changed[n.blk], changed[ni] = true, true, true
		if n.at >= half {
			path[i] = dxNode{blk: ni, off: dxNodeCountOff, at: n.at - half}
			up.at++
		}
	}
	parent := path[len(path)-1]

	// Split the leaf at the median hash.
	type named struct {
		hash  uint32
		bytes []byte
	}
	var ents []named
	lb := blocks.at(leafIdx).b
	err = w.forEachDirent(dir, blocks.at(leafIdx).lblk, lb, func(off, _, rec int) bool {
		if le.Uint32(lb[off:]) == 0 {
			return true
		}
		nl := int(lb[off+6])
		h, _ := dirHash(lb[off+8:off+8+nl], hv, f.hashSeed)
		ents = append(ents, named{h, append([]byte(nil), lb[off:off+8+nl]...)})
		return true
	})
	if err != nil {
		return err
	}
	slices.SortStableFunc(ents, func(a, b named) int {
		switch {
		case a.hash < b.hash:
			return -1
		case a.hash > b.hash:
			return 1
		}
		return 0
	})
	mid := len(ents) / 2
	splitHash := ents[mid].hash
	continued := uint32(0)
	if mid > 0 && ents[mid-1].hash == splitHash {
		continued = 1 // the same hash continues in the new leaf
	}
	ni := newBlock()
	fillLeaf := func(b []byte, es []named) {
		clear(b)
		region := w.dirRegion()
		off := 0
		for i, e := range es {
			rec := direntSize(int(e.bytes[6]))
			if i == len(es)-1 {
				rec = region - off
			}
			copy(b[off:], e.bytes)
			le.PutUint16(b[off+4:], uint16(rec))
			off += direntSize(int(e.bytes[6]))
		}
		if len(es) == 0 {
			putDirent(b, 0, region, "", 0)
		}
	}
	fillLeaf(blocks.at(leafIdx).b, ents[:mid])
	fillLeaf(blocks.at(ni).b, ents[mid:])
	w.dxInsert(blocks.at(parent.blk).b, parent.off, parent.at+1, splitHash|continued, uint32(ni))
	changed[parent.blk] = true
	target := leafIdx
	if hash >= splitHash {
		target = ni
	}
	if done, err := w.insertInBlock(dir, *blocks.at(target), name, ino, ft); err != nil {
		return err
	} else if !done {
		return errno(syscall.ENOSPC, "inode %d: no room for %q after splitting a directory leaf", dir.Ino, name)
	}
	w.sealDirBlock(dir, blocks.at(leafIdx).b)
	w.sealDirBlock(dir, blocks.at(ni).b)
	changed[leafIdx], changed[ni] = true, true
	return w.finishDx(dir, m, blocks, changed)
}

// dxInsert puts index entry (hash, blk) at position at of the node whose
// count/limit header is at off, shifting the later entries.
func (w *Writer) dxInsert(b []byte, off, at int, hash, blk uint32) {
	le := binary.LittleEndian
	c := int(le.Uint16(b[off+2:]))
	e := b[off+8*at:]
	copy(b[off+8*(at+1):off+8*(c+1)], b[off+8*at:off+8*c])
	le.PutUint32(e, hash)
	le.PutUint32(e[4:], blk)
	le.PutUint16(b[off+2:], uint16(c+1))
}

// finishDx seals and writes the changed blocks and stores the directory.
func (w *Writer) finishDx(dir wInode, m *extentMap, blocks *dirBlocks, changed map[int]bool) error {
	for i := range changed {
		b := blocks.at(i).b
		switch {
		case i == 0:
			w.sealDx(dir, b, dxRootCountOff)
		case w.f.isDxNode(b) && binary.LittleEndian.Uint16(b[dxNodeCountOff:]) == uint16(w.dxLimit(len(b), dxNodeCountOff)):
			w.sealDx(dir, b, dxNodeCountOff)
		}
		if err := w.writeBlock(blocks.at(i).pblk, b); err != nil {
			return err
		}
	}
	w.touch(dir, true)
	return w.storeExtents(dir, m)
}

// makeIndexed turns a full one-block directory into an indexed one, as the
// kernel's make_indexed_dir: block 0 keeps "." and ".." and becomes the
// index root; the other entries move to a new leaf, block 1; then the name
// is added through the index.
func (w *Writer) makeIndexed(dir wInode, m *extentMap, blocks *dirBlocks, name string, ino uint32, ft uint8) error {
	le := binary.LittleEndian
	bs := int(w.f.blockSize)
	b0 := blocks.at(0).b
	if le.Uint16(b0[4:]) != 12 || b0[8] != '.' || b0[12+6] != 2 || b0[12+8] != '.' || b0[12+9] != '.' {
		return fmt.Errorf("ext4: inode %d: directory does not start with . and ..: %w", dir.Ino, ErrCorrupt)
	}
	dotdotRec := decodeRecLen(le.Uint16(b0[12+4:]), bs)
	if 12+dotdotRec > w.dirRegion() || dotdotRec < 12 {
		return fmt.Errorf("ext4: inode %d: \"..\" entry has record length %d: %w", dir.Ino, dotdotRec, ErrCorrupt)
	}
	// The entries after "..", as they are, fill the new leaf.
	leaf := make([]byte, bs)
	rest := b0[24:w.dirRegion()]
	copy(leaf, rest)
	if dotdotRec > 12 { // ".." had slack: the leaf starts with an empty entry covering it
		putDirent(leaf, 0, dotdotRec-12, "", 0)
	}
	// The last entry also takes the 24 bytes "." and ".." leave free.
	for off := 0; off < len(rest); {
		rec := decodeRecLen(le.Uint16(leaf[off+4:]), bs)
		if rec < dirRecMinSize || off+rec > len(rest) {
			return fmt.Errorf("ext4: inode %d: directory block 0 has an entry of record length %d at %d: %w", dir.Ino, rec, 24+off, ErrCorrupt)
		}
		if off+rec == len(rest) {
			le.PutUint16(leaf[off+4:], uint16(rec+24))
			break
		}
		off += rec
	}
	lblk := uint32(1)
	goal := m.goalFor(lblk)
	if goal == 0 {
		goal = w.inodeGoal(dir.Ino)
	}
	p, _, err := w.allocBlocks(goal, 1)
	if err != nil {
		return err
	}
	m.insert(extent{lblk: lblk, len: 1, pblk: p})
	w.sealDirBlock(dir, leaf)
	blocks.add(dirBlock{lblk: 1, pblk: p, b: leaf})
	dir.setSize(2 * uint64(bs))

	root := make([]byte, bs)
	copy(root, b0[:24])
	le.PutUint16(root[12+4:], uint16(bs-12))
	root[0x1C] = w.f.sb.defHashVersion
	root[0x1D] = 8 // info length
	le.PutUint16(root[dxRootCountOff:], uint16(w.dxLimit(bs, dxRootCountOff)))
	le.PutUint16(root[dxRootCountOff+2:], 1)
	le.PutUint32(root[dxRootCountOff+4:], 1)
	blocks.at(0).b = root
	dir.setFlags(dir.Flags | flagIndex)
	w.sealDx(dir, root, dxRootCountOff)
	if err := w.writeBlock(blocks.at(0).pblk, root); err != nil {
		return err
	}
	if err := w.writeBlock(p, leaf); err != nil {
		return err
	}
	return w.dxAdd(dir, m, blocks, name, ino, ft)
}
