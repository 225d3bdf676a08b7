package blob

import (
	"context"
	"fmt"
	"io"
)

// Prefix returns a read-only Source of the first size bytes of s: reads
// beyond end at size, as if the source were that short. It confines a
// reader to the part of an image an integrity tree covers. Capabilities
// pass through explicitly: written ranges (clipped) and the version; it is
// never writable.
func Prefix(s Source, size int64) (Source, error) {
	if size < 0 || size > s.Size() {
		return nil, fmt.Errorf("prefix of %d bytes of %s, which has %d", size, s, s.Size())
	}
	p := prefix{s: s, size: size}
	rl, listed := s.(RangeLister)
	v, versioned := s.(Versioned)
	switch {
	case listed && versioned:
		return struct {
			prefix
			listedPrefix
			Versioned
		}{p, listedPrefix{rl, size}, v}, nil
	case listed:
		return struct {
			prefix
			listedPrefix
		}{p, listedPrefix{rl, size}}, nil
	case versioned:
		return struct {
			prefix
			Versioned
		}{p, v}, nil
	}
	return p, nil
}

type prefix struct {
	s    Source
	size int64
}

func (p prefix) Size() int64    { return p.size }
func (p prefix) String() string { return p.s.String() }

func (p prefix) ReadAt(ctx context.Context, b []byte, off int64) (int, error) {
	if off >= p.size {
		if len(b) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	if rest := p.size - off; int64(len(b)) > rest {
		n, err := p.s.ReadAt(ctx, b[:rest], off)
		if err == nil {
			err = io.EOF
		}
		return n, err
	}
	return p.s.ReadAt(ctx, b, off)
}

type listedPrefix struct {
	rl   RangeLister
	size int64
}

func (l listedPrefix) WrittenRanges(ctx context.Context) ([]Range, error) {
	rs, err := l.rl.WrittenRanges(ctx)
	if err != nil {
		return nil, err
	}
	out := rs[:0:0]
	for _, r := range rs {
		if r.Off >= l.size {
			break
		}
		if r.End() > l.size {
			r.Len = l.size - r.Off
		}
		out = append(out, r)
	}
	return out, nil
}
