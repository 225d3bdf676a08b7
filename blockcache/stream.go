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
}

type streamTable struct {
	s    [maxStreams]stream
	tick uint64
}

// observe records a read of n bytes at off and returns the stream it belongs
// to, and whether it continued an existing stream. A read continues a stream
// only when it starts exactly where the stream's last read ended (reordered
// reads simply form a second entry that continues on its own), and the window
// opens only on the second continuation in a row, so random reads that happen
// to land next to an earlier one do not trigger read-ahead.
func (t *streamTable) observe(off, n, initial, maxWindow int64) (st *stream, sequential bool) {
	t.tick++
	victim := 0
	for i := range t.s {
		s := &t.s[i]
		if !s.valid {
			if t.s[victim].valid {
				victim = i
			}
			continue
		}
		if off == s.next {
			s.tick = t.tick
			s.next = off + n
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
		if t.s[victim].valid && s.tick < t.s[victim].tick {
			victim = i
		}
	}
	t.s[victim] = stream{valid: true, next: off + n, tick: t.tick}
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
