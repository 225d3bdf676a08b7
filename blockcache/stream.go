package blockcache

// Sequential-stream detection. Readers do not identify themselves (FUSE reads
// arrive as bare offsets), so a stream is recognized by its expected next
// offset: a read that starts near where an earlier one ended continues that
// stream. A small table of recent streams lets several sequential readers
// interleave; a random read matches nothing and only displaces the least
// recently used entry, so it never triggers read-ahead.

const maxStreams = 32

type stream struct {
	valid  bool
	next   int64  // offset just past the stream's last read
	window int64  // current read-ahead window; 0 until the stream is sequential
	raEnd  int64  // read-ahead has been issued up to here
	runs   int    // consecutive continuations seen
	tick   uint64 // last use, for replacement and for counting active streams
	id     uint64 // tick at creation: tells a stream from a later one in its entry
}

type streamTable struct {
	s    [maxStreams]stream
	tick uint64
}

// reorderPieces is how many reads of its own size a read may land away from
// where its stream ended and still continue it. A large direct-I/O pread
// (a model loader's 1–64 MiB tensor read) reaches the server as 1 MiB
// pieces the kernel sends all at once (up to max_background, 64, of them),
// which server threads answer concurrently: the pieces arrive out of
// order, and only a tolerant match sees them as the one stream they are.
// Smaller reads must continue a stream exactly: they come from the page
// cache's read-ahead, in order, and a tolerance for them would take
// scattered small reads for a stream.
const (
	reorderPieces = 64
	minPiece      = 512 << 10
)

// observe records a read of n bytes at off and returns the stream it belongs
// to, and whether it continued an existing stream. A read continues a stream
// when it starts where the stream's furthest read ended or, for a large
// piece, within reorderPieces reads of its size before or after (so
// out-of-order pieces of one large read continue it and never move it
// back), and the window opens
// only on the second continuation in a row, so random reads that happen to
// land next to an earlier one do not trigger read-ahead.
func (t *streamTable) observe(off, n, initial, maxWindow int64) (st *stream, sequential bool) {
	t.tick++
	var slack int64
	if n >= minPiece {
		slack = reorderPieces * n
	}
	victim := 0
	best, bestDist := -1, int64(-1)
	for i := range t.s {
		s := &t.s[i]
		if !s.valid {
			if t.s[victim].valid {
				victim = i
			}
			continue
		}
		if d := max(off-s.next, s.next-off); d <= slack && (best < 0 || d < bestDist) {
			best, bestDist = i, d
		}
		if t.s[victim].valid && s.tick < t.s[victim].tick {
			victim = i
		}
	}
	if best >= 0 {
		s := &t.s[best]
		s.tick = t.tick
		s.next = max(s.next, off+n)
		s.runs++
		switch {
		case s.runs < 2:
		case s.window == 0:
			s.window = initial
		default:
			s.window *= 2
		}
		s.window = min(s.window, maxWindow)
		return s, true
	}
	t.s[victim] = stream{valid: true, next: off + n, tick: t.tick, id: t.tick}
	return &t.s[victim], false
}

// activeSequential counts streams with read-ahead that were used within the
// last `recent` reads; their windows share the memory bound.
func (t *streamTable) activeSequential(recent uint64) int64 {
	var n int64
	for i := range t.s {
		s := &t.s[i]
		if s.valid && s.window > 0 && t.tick-s.tick <= recent {
			n++
		}
	}
	return n
}
