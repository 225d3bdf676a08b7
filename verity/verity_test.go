package verity

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"

	"github.com/blobseal/blobseal/blob"
)

var fixedSalt = bytes.Repeat([]byte{0xa5, 0x3c}, 16)

// Geometries around the level boundaries: one block (no levels), one node,
// one node plus one, two levels, two levels plus one.
var blockCounts = []int64{1, 2, 127, 128, 129, 128 * 128, 128*128 + 1, 3*128*128 + 77}

// Our trees are byte-identical to veritysetup's, and veritysetup verifies
// what we wrote, for every geometry and with zero blocks mixed in.
func TestBuildMatchesVeritysetup(t *testing.T) {
	for _, n := range blockCounts {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			data := randomData(uint64(n), n, func(b int64) bool { return b%5 == 3 })
			ours, built := buildImage(t, data, fixedSalt)
			if built.TreeBytes != int64(len(ours)-len(data)) {
				t.Fatalf("TreeBytes %d, wrote %d", built.TreeBytes, len(ours)-len(data))
			}
			path := writeTemp(t, ours)
			out, err := veritysetup(t, "verify", path, path, built.RootHex(), fmt.Sprintf("--hash-offset=%d", len(data)))
			if err != nil {
				t.Fatalf("veritysetup verify rejects our tree: %v\n%s", err, out)
			}

			// veritysetup's own tree over the same data, salt and UUID.
			theirs := writeTemp(t, data)
			uuid := fmt.Sprintf("%x-%x-%x-%x-%x", built.Params.UUID[:4], built.Params.UUID[4:6], built.Params.UUID[6:8], built.Params.UUID[8:10], built.Params.UUID[10:])
			root := veritysetupFormat(t, theirs, n, "--salt="+hex.EncodeToString(fixedSalt), "--uuid="+uuid)
			if !bytes.Equal(root, built.Root) {
				t.Fatalf("root %x, veritysetup %x", built.Root, root)
			}
			got, err := os.ReadFile(theirs)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, ours) {
				t.Fatalf("tree differs from veritysetup's (sizes %d and %d) at byte %d", len(ours), len(got), firstDiff(ours, got))
			}
		})
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// A tree veritysetup wrote (random salt, its defaults) opens and verifies
// every block; Zeros finds exactly the zero blocks.
func TestTreeOfVeritysetup(t *testing.T) {
	for _, n := range []int64{1, 200, 128*128 + 3} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			isZero := func(b int64) bool { return b%7 == 0 || (b > 100 && b < 170) }
			data := randomData(uint64(n)+100, n, isZero)
			path := writeTemp(t, data)
			root := veritysetupFormat(t, path, n)
			img, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			src := &memSource{data: img}
			tr, err := Open(testCtx(t), src, root, Options{HashOffset: -1})
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			defer tr.Close()
			if tr.HashOffset() != n*4096 || tr.DataSize() != n*4096 {
				t.Fatalf("located hash offset %d, data %d; want %d", tr.HashOffset(), tr.DataSize(), n*4096)
			}
			// Verify in uneven chunks.
			for off := int64(0); off < n*4096; {
				l := min(int64(4096*(1+off/4096%37)), n*4096-off)
				bad, err := tr.Verify(testCtx(t), off, img[off:off+l])
				if err != nil || len(bad) != 0 {
					t.Fatalf("Verify(%d, %d) = %v, %v", off, l, bad, err)
				}
				off += l
			}
			zeros, err := tr.Zeros(testCtx(t), 0, n*4096)
			if err != nil {
				t.Fatal(err)
			}
			var want []blob.Range
			for b := range n {
				if isZero(b) {
					want = appendBlock(want, b)
				}
			}
			if fmt.Sprint(zeros) != fmt.Sprint(want) {
				t.Fatalf("Zeros = %v, want %v", zeros, want)
			}
		})
	}
}

func appendBlock(rs []blob.Range, b int64) []blob.Range {
	if k := len(rs) - 1; k >= 0 && rs[k].End() == b*4096 {
		rs[k].Len += 4096
		return rs
	}
	return append(rs, blob.Range{Off: b * 4096, Len: 4096})
}

// A flipped data byte fails exactly its block; the others still verify,
// and the mismatch is counted.
func TestDataTamper(t *testing.T) {
	n := int64(128*3 + 5)
	data := randomData(1, n, nil)
	img, built := buildImage(t, data, nil)
	src := &memSource{data: img}
	tr, err := Open(testCtx(t), src, built.Root, Options{HashOffset: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	for _, b := range []int64{0, 1, 127, 128, 200, n - 1} {
		block := append([]byte(nil), img[b*4096:(b+1)*4096]...)
		block[100] ^= 1
		chunk := append([]byte(nil), img[:n*4096]...)
		copy(chunk[b*4096:], block)
		bad, err := tr.Verify(testCtx(t), 0, chunk)
		if err != nil {
			t.Fatal(err)
		}
		if len(bad) != 1 || bad[0] != (blob.Range{Off: b * 4096, Len: 4096}) {
			t.Fatalf("block %d flipped: bad = %v", b, bad)
		}
	}
	// A zero block turned non-zero fails too (its digest is the zero one).
	zdata := randomData(2, 300, func(b int64) bool { return b == 9 })
	zimg, zbuilt := buildImage(t, zdata, nil)
	ztr, err := Open(testCtx(t), &memSource{data: zimg}, zbuilt.Root, Options{HashOffset: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer ztr.Close()
	block := make([]byte, 4096)
	block[4095] = 1
	if bad, err := ztr.Verify(testCtx(t), 9*4096, block); err != nil || len(bad) != 1 {
		t.Fatalf("non-zero bytes in a zero block: bad %v, err %v", bad, err)
	}
	if st := tr.Stats(); st.DataMismatches != 6 {
		t.Fatalf("DataMismatches = %d, want 6", st.DataMismatches)
	}
}

// A flipped byte in a bottom-level node fails the data blocks under it
// and no others; in an upper node, the subtree; in the top node, Open.
func TestTreeTamper(t *testing.T) {
	n := int64(128*128 + 500) // three levels: 130 + 2 + 1 nodes
	data := randomData(3, n, nil)
	img, built := buildImage(t, data, nil)
	g, err := newGeometry(built.Params, built.HashOffset)
	if err != nil {
		t.Fatal(err)
	}
	if g.levels() != 3 {
		t.Fatalf("%d levels", g.levels())
	}
	open := func(t *testing.T, img []byte) (*Tree, error) {
		// HeadBytes small: nodes come through the lazy path, not Open's read.
		return Open(testCtx(t), &memSource{data: img}, built.Root, Options{HashOffset: -1, HeadBytes: 4096})
	}
	for _, c := range []struct {
		name string
		at   int64 // byte flipped
		want blob.Range
	}{
		{"bottom", g.start[0]*4096 + 5*4096 + 17, blob.Range{Off: 640 * 4096, Len: 128 * 4096}},  // node 5 of level 0: data blocks 640..767
		{"middle", g.start[1]*4096 + 1*4096 + 3, blob.Range{Off: 16384 * 4096, Len: 500 * 4096}}, // node 1 of level 1: data blocks 16384..
	} {
		t.Run(c.name, func(t *testing.T) {
			bad := append([]byte(nil), img...)
			bad[c.at] ^= 1
			tr, err := open(t, bad)
			if err != nil {
				t.Fatal(err)
			}
			defer tr.Close()
			got, err := tr.Verify(testCtx(t), 0, img[:n*4096])
			if err != nil {
				t.Fatal(err)
			}
			if fmt.Sprint(got) != fmt.Sprint([]blob.Range{c.want}) {
				t.Fatalf("bad = %v, want %v", got, c.want)
			}
			if st := tr.Stats(); st.NodeMismatches != 1 {
				t.Fatalf("NodeMismatches = %d", st.NodeMismatches)
			}
		})
	}
	t.Run("top", func(t *testing.T) {
		bad := append([]byte(nil), img...)
		bad[g.start[2]*4096+40] ^= 1
		if _, err := open(t, bad); !errors.Is(err, ErrRootMismatch) {
			t.Fatalf("Open = %v, want ErrRootMismatch", err)
		}
	})
}

// Every superblock field that matters is checked: a flip either makes the
// superblock invalid or changes the tree so the root no longer matches.
func TestSuperblockTamper(t *testing.T) {
	data := randomData(4, 300, nil)
	img, built := buildImage(t, data, nil)
	sb := built.HashOffset
	for off := int64(0); off < SuperblockSize; off++ {
		bad := append([]byte(nil), img...)
		bad[sb+off] ^= 0x01
		tr, err := Open(testCtx(t), &memSource{data: bad}, built.Root, Options{HashOffset: -1})
		if err == nil {
			// Bytes the format does not use (UUID, padding) may change.
			unused := (off >= 16 && off < 32) || (off > 32+6 && off < 64) || (off >= 82 && off < 88) || off >= 88+int64(len(built.Params.Salt))
			if !unused {
				t.Errorf("flip of superblock byte %d accepted", off)
			}
			tr.Close()
			continue
		}
		if !errors.Is(err, ErrBadSuperblock) && !errors.Is(err, ErrNoSuperblock) && !errors.Is(err, ErrRootMismatch) && !errors.Is(err, ErrTruncated) {
			t.Errorf("flip of superblock byte %d: unexpected error %v", off, err)
		}
	}
}

// Truncated, swapped and rolled-back trees refuse to open, each with an
// error that names its check.
func TestOpenRefusals(t *testing.T) {
	data := randomData(5, 1000, nil)
	img, built := buildImage(t, data, nil)
	ctx := testCtx(t)
	t.Run("truncated", func(t *testing.T) {
		_, err := Open(ctx, &memSource{data: img[:len(img)-4096]}, built.Root, Options{HashOffset: built.HashOffset})
		if !errors.Is(err, ErrTruncated) {
			t.Fatalf("err = %v", err)
		}
		if _, err := Open(ctx, &memSource{data: img[:len(img)-4096]}, built.Root, Options{HashOffset: -1}); !errors.Is(err, ErrNoSuperblock) {
			t.Fatalf("located: err = %v", err)
		}
	})
	t.Run("other image", func(t *testing.T) {
		other, _ := buildImage(t, randomData(6, 1000, nil), nil)
		_, err := Open(ctx, &memSource{data: other}, built.Root, Options{HashOffset: -1})
		if !errors.Is(err, ErrRootMismatch) || !strings.Contains(err.Error(), "rolled back") {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("no tree", func(t *testing.T) {
		_, err := Open(ctx, &memSource{data: data}, built.Root, Options{HashOffset: -1})
		if !errors.Is(err, ErrNoSuperblock) || !strings.Contains(err.Error(), "--verity-hash-offset") {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("wrong root length", func(t *testing.T) {
		if _, err := Open(ctx, &memSource{data: img}, built.Root[:20], Options{HashOffset: -1}); err == nil {
			t.Fatal("a 20-byte root was accepted")
		}
	})
	t.Run("data overlaps tree", func(t *testing.T) {
		bad := append([]byte(nil), img...)
		// Claim one more data block than there is room for before the tree.
		p := built.Params
		p.DataBlocks++
		sb, _ := p.MarshalSuperblock()
		copy(bad[built.HashOffset:], sb)
		if _, err := Open(ctx, &memSource{data: bad}, built.Root, Options{HashOffset: built.HashOffset}); !errors.Is(err, ErrBadSuperblock) {
			t.Fatalf("err = %v", err)
		}
	})
}

// A sparse image: zero subtrees are recognised from their parents, so
// verifying a long zero run reads almost no tree.
func TestZeroSubtrees(t *testing.T) {
	n := int64(64 << 20 / 4096) // 64 MiB: 128 bottom nodes
	data := make([]byte, n*4096)
	copy(data[8<<20:], randomData(7, 16, nil)) // 64 KiB of data at 8 MiB
	img, built := buildImage(t, data, nil)
	src := &memSource{data: img}
	tr, err := Open(testCtx(t), src, built.Root, Options{HashOffset: -1, HeadBytes: 4096})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	before := src.bytes.Load()
	zeros, err := tr.Zeros(testCtx(t), 0, n*4096)
	if err != nil {
		t.Fatal(err)
	}
	want := []blob.Range{{Off: 0, Len: 8 << 20}, {Off: 8<<20 + 64<<10, Len: n*4096 - 8<<20 - 64<<10}}
	if fmt.Sprint(zeros) != fmt.Sprint(want) {
		t.Fatalf("Zeros = %v, want %v", zeros, want)
	}
	if bad, err := tr.Verify(testCtx(t), 0, data); err != nil || len(bad) > 0 {
		t.Fatalf("Verify: %v %v", bad, err)
	}
	st := tr.Stats()
	if read := src.bytes.Load() - before; read > 2*4096 || st.NodesSynthesized < 127 {
		t.Fatalf("read %d tree bytes, synthesised %d nodes: zero subtrees were fetched", read, st.NodesSynthesized)
	}
	if st.ZeroBlocks != uint64(n-16) || st.BlocksVerified != 16 {
		t.Fatalf("stats %+v", st)
	}
}

// Under a tiny node cache, many goroutines verify overlapping ranges;
// every answer is right, under -race.
func TestConcurrentVerifyWithEviction(t *testing.T) {
	n := int64(128 * 64)
	data := randomData(8, n, func(b int64) bool { return b%100 == 0 })
	img, built := buildImage(t, data, nil)
	src := &memSource{data: img}
	tr, err := Open(testCtx(t), src, built.Root, Options{HashOffset: -1, CacheBytes: 8 * 4096, GroupNodes: 2, HeadBytes: 4096})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 200 {
				b := int64((w*7919 + i*104729) % int(n-40))
				l := int64(1 + (i % 40))
				chunk := append([]byte(nil), img[b*4096:(b+l)*4096]...)
				flip := i%3 == 0
				if flip {
					chunk[(l-1)*4096+1] ^= 0xff
				}
				bad, err := tr.Verify(testCtx(t), b*4096, chunk)
				if err != nil {
					t.Error(err)
					return
				}
				if flip != (len(bad) == 1 && bad[0].Off == (b+l-1)*4096) || (!flip && len(bad) != 0) {
					t.Errorf("Verify(%d,+%d) flip=%v: bad %v", b, l, flip, bad)
					return
				}
			}
		}()
	}
	wg.Wait()
}

// A storage fault while reading nodes is an error (retryable), not a
// mismatch, and is not cached.
func TestNodeReadFault(t *testing.T) {
	data := randomData(9, 600, nil)
	img, built := buildImage(t, data, nil)
	src := &memSource{data: img}
	tr, err := Open(testCtx(t), src, built.Root, Options{HashOffset: -1, HeadBytes: 4096})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	src.fail.Store(true)
	if _, err := tr.Verify(testCtx(t), 0, img[:4096]); err == nil || errors.Is(err, ErrMismatch) {
		t.Fatalf("Verify during a fault = %v, want a read error", err)
	}
	src.fail.Store(false)
	if bad, err := tr.Verify(testCtx(t), 0, img[:4096]); err != nil || len(bad) != 0 {
		t.Fatalf("after the fault: %v, %v", bad, err)
	}
}

func TestLocate(t *testing.T) {
	for _, n := range blockCounts {
		off, size, err := AppendedLayout(n * 4096)
		if err != nil {
			t.Fatal(err)
		}
		got, ok := Locate(size)
		if !ok || got != off {
			t.Fatalf("%d blocks: Locate(%d) = %d, %v; want %d", n, size, got, ok, off)
		}
		if _, ok := Locate(size + 4096); ok && n > 1 {
			if o, _ := Locate(size + 4096); o == off {
				t.Fatalf("Locate(%d) found the same data size", size+4096)
			}
		}
	}
	for _, size := range []int64{0, 4096, 12345, 1 << 62} {
		if _, ok := Locate(size); ok && size < 8192 {
			t.Fatalf("Locate(%d) found a tree", size)
		}
	}
}

func TestSuperblockRoundTrip(t *testing.T) {
	p := Params{HashType: 1, Algorithm: "sha256", DataBlockSize: 4096, HashBlockSize: 4096, DataBlocks: 12345, Salt: fixedSalt}
	copy(p.UUID[:], "0123456789abcdef")
	b, err := p.MarshalSuperblock()
	if err != nil {
		t.Fatal(err)
	}
	q, err := ParseSuperblock(b)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(p) != fmt.Sprint(q) {
		t.Fatalf("%+v != %+v", q, p)
	}
	for _, bad := range []func(p *Params){
		func(p *Params) { p.HashType = 0 },
		func(p *Params) { p.Algorithm = "sha1" },
		func(p *Params) { p.DataBlockSize = 8192 },
		func(p *Params) { p.HashBlockSize = 1000 },
		func(p *Params) { p.DataBlocks = 0 },
		func(p *Params) { p.Salt = make([]byte, 257) },
	} {
		q := p
		bad(&q)
		if _, err := q.MarshalSuperblock(); !errors.Is(err, ErrBadSuperblock) {
			t.Errorf("%+v: err = %v", q, err)
		}
	}
}
