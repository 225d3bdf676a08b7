package verity

import (
	"bytes"
	"context"
	"testing"
	"time"
)

// FuzzParseSuperblock: any 512 bytes either parse into parameters that
// validate and survive a round trip, or give an error; never a panic.
func FuzzParseSuperblock(f *testing.F) {
	p := Params{HashType: 1, Algorithm: "sha256", DataBlockSize: 4096, HashBlockSize: 4096, DataBlocks: 99, Salt: fixedSalt}
	sb, _ := p.MarshalSuperblock()
	f.Add(sb)
	p.Algorithm, p.DataBlockSize, p.Salt = "sha512", 512, nil
	sb, _ = p.MarshalSuperblock()
	f.Add(sb)
	f.Add(make([]byte, 512))
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := ParseSuperblock(b)
		if err != nil {
			return
		}
		if err := p.validate(); err != nil {
			t.Fatalf("parsed parameters do not validate: %v", err)
		}
		out, err := p.MarshalSuperblock()
		if err != nil {
			t.Fatalf("parsed parameters do not marshal: %v", err)
		}
		q, err := ParseSuperblock(out)
		if err != nil || q.DataBlocks != p.DataBlocks || !bytes.Equal(q.Salt, p.Salt) || q.Algorithm != p.Algorithm {
			t.Fatalf("round trip: %+v -> %+v (%v)", p, q, err)
		}
	})
}

// FuzzTree: an arbitrary image (superblock and tree included) with an
// arbitrary root either refuses to open or verifies without panicking, and
// whatever it accepts is what the tree says: a range Verify passes hashes
// to the digests its bottom nodes hold.
func FuzzTree(f *testing.F) {
	// Small blocks keep the inputs small, which the mutator needs.
	for _, n := range []int64{1, 3, 20} {
		data := randomData(uint64(n), (n+7)/8, nil)[:n*512]
		clear(data[512:1024])
		w := &memWriter{b: append([]byte(nil), data...)}
		built, err := Build(context.Background(), readerAt(data), w, int64(len(data)), BuildOptions{
			Params: Params{DataBlocks: n, DataBlockSize: 512, HashBlockSize: 512, Salt: fixedSalt[:8]},
		})
		if err != nil {
			f.Fatal(err)
		}
		f.Add(w.b, built.Root, int64(-1))
		f.Add(w.b, built.Root, built.HashOffset)
	}
	f.Fuzz(func(t *testing.T, img, root []byte, hashOffset int64) {
		if len(img) > 4<<20 {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		tr, err := Open(ctx, &memSource{data: img}, root, Options{HashOffset: hashOffset, HeadBytes: 8192, CacheBytes: 64 << 10})
		if err != nil {
			return
		}
		defer tr.Close()
		size := tr.DataSize()
		if size > int64(len(img)) {
			t.Fatalf("tree covers %d bytes of a %d-byte image", size, len(img))
		}
		step := tr.BlockSize() * 3
		for off := int64(0); off < size; off += step {
			n := min(step, size-off)
			if _, err := tr.Verify(ctx, off, img[off:off+n]); err != nil {
				t.Fatalf("Verify(%d, %d): %v", off, n, err)
			}
			if _, err := tr.Zeros(ctx, off, off+n); err != nil {
				t.Fatalf("Zeros: %v", err)
			}
		}
	})
}

// FuzzTamper: whatever bytes storage changes in an image (data, tree or
// superblock), no data block that differs from the original is ever
// accepted: the tree refuses to open, or Verify reports every changed block.
func FuzzTamper(f *testing.F) {
	const n = 300 // 512-byte blocks: three levels
	data := randomData(11, (n+7)/8, nil)[:n*512]
	clear(data[40*512 : 50*512])
	w := &memWriter{b: append([]byte(nil), data...)}
	built, err := Build(context.Background(), readerAt(data), w, int64(len(data)), BuildOptions{
		Params: Params{DataBlocks: n, DataBlockSize: 512, HashBlockSize: 512, Salt: fixedSalt[:4]},
	})
	if err != nil {
		f.Fatal(err)
	}
	orig := w.b
	f.Add([]byte{1}, uint32(0))
	f.Add([]byte{0xff, 0}, uint32(45*512))
	f.Add([]byte{7}, uint32(built.HashOffset+100))
	f.Add([]byte{7, 7, 7, 7}, uint32(len(orig)-3))
	f.Fuzz(func(t *testing.T, patch []byte, at uint32) {
		img := append([]byte(nil), orig...)
		pos := int(at) % len(img)
		copy(img[pos:], patch)
		ctx := context.Background()
		tr, err := Open(ctx, &memSource{data: img}, built.Root, Options{HashOffset: built.HashOffset, HeadBytes: 1024, CacheBytes: 4096})
		if err != nil {
			if bytes.Equal(img, orig) {
				t.Fatalf("the untouched image does not open: %v", err)
			}
			return
		}
		defer tr.Close()
		if tr.DataSize() != int64(len(data)) {
			t.Fatalf("tree covers %d bytes, not %d", tr.DataSize(), len(data))
		}
		bad, err := tr.Verify(ctx, 0, img[:len(data)])
		if err != nil {
			t.Fatal(err)
		}
		for b := int64(0); b < n; b++ {
			changed := !bytes.Equal(img[b*512:(b+1)*512], orig[b*512:(b+1)*512])
			rejected := false
			for _, r := range bad {
				if r.Off <= b*512 && b*512 < r.End() {
					rejected = true
				}
			}
			if changed && !rejected {
				t.Fatalf("block %d was modified and accepted", b)
			}
			if !changed && rejected && bytes.Equal(img[len(data):], orig[len(data):]) {
				t.Fatalf("block %d is intact, the tree too, yet it was rejected", b)
			}
		}
	})
}
