package blockcache

// Sequential-stream detection. Readers do not identify themselves (FUSE reads
// arrive as bare offsets), so a stream is recognized by its expected next
// offset: a read that starts near where an earlier one ended continues that
// stream. A small table of recent streams lets several sequential readers
// interleave; a random read matches nothing and only displaces the least
// recently used entry, so it never triggers read-ahead.

const maxStreams = 32

type stream struct {
	valid bool
	next  int64 // offset just past the stream's last read
	start int64 // lowest offset of the reads counted in covered
	// covered is how many bytes the stream's reads brought, so
	// covered/(next-start) is how densely they fill its span.
	covered int64
	window  int64 // current read-ahead window; 0 until the stream is sequential
	raEnd   int64 // read-ahead has been issued up to here
	// inFlight is the bytes of the stream's read-ahead being fetched, at
	// most window; reach is how far ahead of next read-ahead may go,
	// fetched or not (see Cache.readAheadLocked). Both kept by the cache.
	inFlight int64
	reach    int64
	// eagerEnd is where the first read-ahead of a stream opened at once
	// (see Cache.observe) ends: up to there it is fetched in pieces that
	// run in parallel rather than one request the reader waits for whole.
	// Kept by the cache.
	eagerEnd int64
	runs     int    // consecutive continuations seen
	tick     uint64 // last use, for replacement and for counting active streams
	id       uint64 // tick at creation: tells a stream from a later one in its entry
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

// A stream reads ahead only while its reads fill at least 1/minDensity
// (half) of the span they lie in. Pieces of large reads, however shuffled,
// fill theirs; the tolerance above would otherwise also gather unrelated large
// random reads into a "stream": an mmap reader faulting pages in a
// shuffled order makes the kernel read 1 MiB around each fault, and every
// such read lands within 64 MiB of one of the table's streams. Before this
// rule they opened read-ahead windows that fetched 6.9 GB to serve a 1 GiB
// file. A quarter was not enough: 400 random 1 MiB reads of 512 MiB still
// read 108 MiB ahead (TestScatteredLargeReadsDoNotReadAhead).
const minDensity = 2

// densitySpan is the span beyond which a stream's density is rescaled to
// its recent half, so a long sequential past does not vouch for later
// random reads.
const densitySpan = 256 << 20

// observe records a read of n bytes at off and returns the stream it belongs
// to, and whether it continued an existing stream. A read continues a stream
// when it starts where the stream's furthest read ended or, for a large
// piece, within reorderPieces reads of its size before or after (so
// out-of-order pieces of one large read continue it and never move it
// back), and the window opens
// only on the second continuation in a row, so random reads that happen to
// land next to an earlier one do not trigger read-ahead. A read that
// starts no stream opens a new one; with eager > 0 its window opens at
// once, at eager bytes.
func (t *streamTable) observe(off, n, initial, maxWindow, eager int64) (st *stream, sequential bool) {
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
		s.start = min(s.start, off)
		s.next = max(s.next, off+n)
		s.covered += n
		if span := s.next - s.start; span > densitySpan {
			s.start = s.next - span/2
			s.covered /= 2
		}
		if !s.dense() {
			// Scattered reads: no read-ahead (and whatever is in flight
			// is not topped up), until reads fill the span again.
			s.runs, s.window = 0, 0
			return s, false
		}
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
	t.s[victim] = stream{valid: true, next: off + n, start: off, covered: n, tick: t.tick, id: t.tick}
	if eager > 0 {
		s := &t.s[victim]
		s.runs, s.window = 2, min(eager, maxWindow)
		return s, true
	}
	return &t.s[victim], false
}

// dense reports whether the stream's reads fill enough of their span to be
// one reader's sequential pass (see minDensity).
func (s *stream) dense() bool {
	return s.covered*minDensity >= s.next-s.start
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
