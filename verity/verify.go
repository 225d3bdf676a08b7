package verity

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash"
	"math/bits"

	"github.com/blobseal/blobseal/blob"
)

// Verify checks data, the image's bytes at off (whole data blocks), against
// the tree. It returns the ranges whose blocks do not match, which no
// reader may see (a block under a corrupt tree node counts as not
// matching), or an error when the tree could not be read (a storage fault
// worth retrying). Blocks whose digest is that of a zero block must be all
// zeros; they are checked without hashing.
func (t *Tree) Verify(ctx context.Context, off int64, data []byte) ([]blob.Range, error) {
	g := t.g
	if err := t.checkRange(off, int64(len(data))); err != nil {
		return nil, err
	}
	if len(data) == 0 {
		return nil, nil
	}
	b0, nb := off/g.dbs, int64(len(data))/g.dbs
	var bad []blob.Range
	mark := func(b int64) {
		if k := len(bad) - 1; k >= 0 && bad[k].End() == b*g.dbs {
			bad[k].Len += g.dbs
			return
		}
		bad = append(bad, blob.Range{Off: b * g.dbs, Len: g.dbs})
	}
	if g.levels() == 0 { // a single data block: the root is its digest
		if !t.matches(data[:g.dbs], t.root) {
			t.mismatch(&MismatchError{Level: -1, Block: 0, Offset: 0})
			mark(0)
		} else {
			t.st.verified.Add(1)
		}
		return bad, nil
	}
	nodes, err := t.bottom(ctx, b0, nb)
	if err != nil {
		return nil, err
	}
	h := t.hashers.Get().(hash.Hash)
	defer t.hashers.Put(h)
	var ph *pairHasher
	if t.p.usePairs() {
		ph = t.pairs.Get().(*pairHasher)
		defer t.pairs.Put(ph)
	}
	var sum, sumB [64]byte
	n0 := b0 >> g.shift
	block := func(b int64) []byte { return data[(b-b0)*g.dbs : (b-b0+1)*g.dbs] }
	want := func(b int64) []byte { return t.slot(nodes[(b>>g.shift)-n0].data, b) }
	var verified, zero uint64
	check := func(b int64, got []byte) {
		if bytes.Equal(got, want(b)) {
			verified++
			return
		}
		t.mismatch(&MismatchError{Level: -1, Block: b, Offset: b * g.dbs})
		mark(b)
	}
	// Blocks to hash are taken two at a time when the paired hasher
	// applies; pending is the one waiting for a partner.
	pending := int64(-1)
	for b := b0; b < b0+nb; b++ {
		if nodes[(b>>g.shift)-n0].err != nil {
			mark(b) // its node failed: nothing vouches for it
			continue
		}
		if bytes.Equal(want(b), t.zt.data) && isZero(block(b)) {
			zero++
			continue
		}
		switch {
		case ph == nil:
			check(b, hashBlock(h, t.p.Salt, block(b), sum[:0]))
		case pending < 0:
			pending = b
		default:
			ph.pair(block(pending), block(b), sum[:32], sumB[:32])
			check(pending, sum[:32])
			check(b, sumB[:32])
			pending = -1
		}
	}
	if pending >= 0 {
		check(pending, hashBlock(h, t.p.Salt, block(pending), sum[:0]))
	}
	t.st.verified.Add(verified)
	t.st.zero.Add(zero)
	return bad, nil
}

// Zeros returns the parts of [off, end) (whole data blocks) whose digest is
// that of a zero block: their verified content is zeros, so they need not
// be fetched. It reads the bottom-level nodes the range needs.
func (t *Tree) Zeros(ctx context.Context, off, end int64) ([]blob.Range, error) {
	g := t.g
	if err := t.checkRange(off, end-off); err != nil {
		return nil, err
	}
	if end == off {
		return nil, nil
	}
	if g.levels() == 0 {
		if bytes.Equal(t.root, t.zt.data) {
			return []blob.Range{{Off: 0, Len: g.dbs}}, nil
		}
		return nil, nil
	}
	b0, nb := off/g.dbs, (end-off)/g.dbs
	nodes, err := t.bottom(ctx, b0, nb)
	if err != nil {
		return nil, err
	}
	var out []blob.Range
	n0 := b0 >> g.shift
	for b := b0; b < b0+nb; b++ {
		nd := nodes[(b>>g.shift)-n0]
		if nd.err != nil || !bytes.Equal(t.slot(nd.data, b), t.zt.data) {
			continue
		}
		if k := len(out) - 1; k >= 0 && out[k].End() == b*g.dbs {
			out[k].Len += g.dbs
			continue
		}
		out = append(out, blob.Range{Off: b * g.dbs, Len: g.dbs})
	}
	return out, nil
}

// Prefetch starts reading the bottom-level nodes that [off, end) needs,
// without waiting, so that a data fetch and its nodes' fetch overlap.
func (t *Tree) Prefetch(off, end int64) {
	g := t.g
	if g.levels() == 0 || t.checkRange(off, end-off) != nil || end == off {
		return
	}
	b0, b1 := off/g.dbs, (end-1)/g.dbs
	t.request(0, b0>>g.shift, (b1>>g.shift)+1)
}

func (t *Tree) checkRange(off, n int64) error {
	if off < 0 || n < 0 || off%t.g.dbs != 0 || n%t.g.dbs != 0 || off > t.DataSize() || n > t.DataSize()-off {
		return fmt.Errorf("verity: range [%d, +%d) is not whole %d-byte blocks within the %d bytes the tree covers", off, n, t.g.dbs, t.DataSize())
	}
	return nil
}

// bottom returns the finished bottom-level nodes covering nb data blocks
// from b0. A node that could not be read (not a mismatch) is an error.
func (t *Tree) bottom(ctx context.Context, b0, nb int64) ([]*node, error) {
	n0, n1 := b0>>t.g.shift, (b0+nb-1)>>t.g.shift
	nodes, err := t.get(ctx, 0, n0, n1+1)
	if err != nil {
		return nil, err
	}
	for _, nd := range nodes {
		if nd.err != nil && !errors.Is(nd.err, ErrMismatch) {
			return nil, fmt.Errorf("verity: reading the hash tree: %w", nd.err)
		}
	}
	return nodes, nil
}

// get returns the nodes [lo, hi) of level (indices within the level), each
// finished (verified, or failed), starting reads for missing ones. It
// returns an error only when ctx ends first.
func (t *Tree) get(ctx context.Context, level int, lo, hi int64) ([]*node, error) {
	out := t.request(level, lo, hi)
	for _, nd := range out {
		select {
		case <-nd.done:
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-t.ctx.Done():
			return nil, errors.New("verity: tree is closed")
		}
	}
	return out, nil
}

// request registers the nodes [lo, hi) of level and starts one loader for
// those not cached or in flight; bottom-level requests are widened to
// whole aligned groups of GroupNodes so that sequential readers need few
// requests. It returns the nodes [lo, hi), possibly still pending.
func (t *Tree) request(level int, lo, hi int64) []*node {
	g := t.g
	glo, ghi := lo, hi
	if level == 0 {
		// A sequential reader asks for many nodes at once (a 16 MiB
		// read-ahead needs 32): give it eight times as many per request,
		// so the tree costs few requests; a random reader gets a group.
		grp := int64(t.o.GroupNodes)
		if hi-lo > 1 {
			grp = max(grp, min(8*(hi-lo), t.o.CacheBytes/g.hbs/4))
			grp = int64(1) << (63 - bits.LeadingZeros64(uint64(grp))) // aligned groups
		}
		glo = lo - lo%grp
		ghi = min((hi+grp-1)/grp*grp, g.count[0])
	}
	out := make([]*node, 0, hi-lo)
	var missing []*node
	t.mu.Lock()
	for j := glo; j < ghi; j++ {
		abs := g.start[level] + j
		nd := t.nodes[abs]
		switch {
		case nd == nil:
			nd = &node{abs: abs, level: level, done: make(chan struct{})}
			t.nodes[abs] = nd
			missing = append(missing, nd)
		case nd.elem != nil:
			t.lru.MoveToFront(nd.elem)
		}
		if j >= lo && j < hi {
			out = append(out, nd)
		}
	}
	t.mu.Unlock()
	if len(missing) > 0 {
		t.wg.Add(1)
		go t.load(level, missing)
	}
	return out
}

// load fills pending nodes of one level (sorted): it obtains their
// parents' digests (recursively, up to the pinned root), derives zero
// subtrees without reading, reads the rest in one request per contiguous
// run, and checks each against its parent.
func (t *Tree) load(level int, nodes []*node) {
	defer t.wg.Done()
	g := t.g
	want := make([][]byte, len(nodes))
	if level == g.levels()-1 {
		for i := range nodes {
			want[i] = t.root
		}
	} else {
		p0 := (nodes[0].abs - g.start[level]) >> g.shift
		p1 := (nodes[len(nodes)-1].abs - g.start[level]) >> g.shift
		parents, err := t.get(t.ctx, level+1, p0, p1+1)
		if err != nil {
			for _, nd := range nodes {
				t.finish(nd, nil, err, 0)
			}
			return
		}
		for i, nd := range nodes {
			j := nd.abs - g.start[level]
			p := parents[(j>>g.shift)-p0]
			if p.err != nil {
				t.finish(nd, nil, p.err, 0) // cannot be verified: fails like its parent
				continue
			}
			want[i] = t.slot(p.data, j)
		}
	}
	var fetch []int
	for i, nd := range nodes {
		if want[i] == nil {
			continue
		}
		content, digest := t.zt.node(g, level, nd.abs-g.start[level])
		if bytes.Equal(want[i], digest) {
			t.st.synth.Add(1)
			t.finish(nd, content, nil, 64)
			continue
		}
		fetch = append(fetch, i)
	}
	for len(fetch) > 0 {
		run := 1
		for run < len(fetch) && nodes[fetch[run]].abs == nodes[fetch[0]].abs+int64(run) {
			run++
		}
		t.fetchRun(level, nodes, want, fetch[:run])
		fetch = fetch[run:]
	}
}

// fetchRun reads contiguous nodes with one request and verifies each.
func (t *Tree) fetchRun(level int, nodes []*node, want [][]byte, idx []int) {
	g := t.g
	first := nodes[idx[0]].abs
	buf := make([]byte, int64(len(idx))*g.hbs)
	err := func() error {
		select {
		case t.sem <- struct{}{}:
		case <-t.ctx.Done():
			return errors.New("verity: tree is closed")
		}
		defer func() { <-t.sem }()
		ctx, cancel := context.WithTimeout(t.ctx, t.o.FetchTimeout)
		defer cancel()
		return t.read(ctx, buf, first*g.hbs)
	}()
	for k, i := range idx {
		nd := nodes[i]
		if err != nil {
			t.finish(nd, nil, fmt.Errorf("read hash block at %d: %w", nd.abs*g.hbs, err), 0)
			continue
		}
		t.st.fetched.Add(1)
		b := buf[int64(k)*g.hbs : int64(k+1)*g.hbs : int64(k+1)*g.hbs]
		if !t.matches(b, want[i]) {
			e := &MismatchError{Level: level, Block: nd.abs - g.start[level], Offset: nd.abs * g.hbs}
			t.mismatch(e)
			t.finish(nd, nil, e, 64)
			continue
		}
		t.finish(nd, b, nil, g.hbs)
	}
}

// finish publishes a loaded node. Verified nodes and mismatches are cached
// (a mismatch is permanent); any other failure leaves the cache so the
// next reader tries again.
func (t *Tree) finish(nd *node, data []byte, err error, mem int64) {
	t.mu.Lock()
	nd.data, nd.err = data, err
	if err != nil && !errors.Is(err, ErrMismatch) {
		if t.nodes[nd.abs] == nd {
			delete(t.nodes, nd.abs)
		}
	} else {
		t.addLocked(nd, mem)
	}
	t.mu.Unlock()
	close(nd.done)
}

// maxLogged bounds how many distinct blocks are reported in the log.
const maxLogged = 1000

// mismatch counts a failed block and logs it the first time.
func (t *Tree) mismatch(e *MismatchError) {
	if e.Level < 0 {
		t.st.dataBad.Add(1)
	} else {
		t.st.nodeBad.Add(1)
	}
	key := [2]int64{int64(e.Level), e.Block}
	t.mu.Lock()
	first := !t.logged[key] && len(t.logged) < maxLogged
	if first {
		t.logged[key] = true
	}
	last := len(t.logged) == maxLogged && first
	t.mu.Unlock()
	if first {
		t.log.Error("verity: integrity check failed; reads of this block fail with EIO", "image", t.src.String(),
			"where", levelName(e.Level), "block", e.Block, "offset", e.Offset, "err", e.Error())
	}
	if last {
		t.log.Error("verity: more blocks failed; further ones are counted but not logged", "image", t.src.String())
	}
}

func levelName(level int) string {
	if level < 0 {
		return "data"
	}
	return fmt.Sprintf("tree level %d", level)
}
