package ext4

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/blobseal/blobseal/internal/testenv"
)

// corruptSource is a small tree with a multi-block extent tree, a directory
// with a subdirectory, an xattr block and a plain file.
func corruptSource(t *testing.T) string {
	t.Helper()
	src := t.TempDir()
	writeFile(t, filepath.Join(src, "plain"), fill(1, 5000), 0o644)
	// One block in every other one: each is its own extent, so the tree
	// needs index blocks (depth >= 1) at 1 KiB blocks.
	fh, err := os.Create(filepath.Join(src, "fragmented"))
	must(t, err)
	for i := int64(0); i < 400; i++ {
		_, err := fh.WriteAt(fill(uint64(i), 1024), 2*i*1024)
		must(t, err)
	}
	must(t, fh.Close())
	writeFile(t, filepath.Join(src, "a", "child", "f"), []byte("x"), 0o644)
	writeFile(t, filepath.Join(src, "xattrs"), []byte("x"), 0o644)
	return src
}

func setxattrBig(t *testing.T, p string) {
	t.Helper()
	must(t, setxattr(p, "user.big", fill(5, 600)))
}

// located gives byte offsets of structures in an image, found with the
// reader itself on the intact image.
type located struct {
	f   *FS
	img []byte
}

func (l located) ino(t *testing.T, path string) *Inode {
	in, err := lookupPath(l.f, path)
	if err != nil {
		t.Fatalf("locate %s: %v", path, err)
	}
	return in
}

func (l located) inodeOffset(ino uint32) int64 {
	f := l.f
	g := (ino - 1) / f.sb.inodesPerGroup
	idx := (ino - 1) % f.sb.inodesPerGroup
	return int64(f.groups[g].inodeTable)<<f.blockLog + int64(idx)*int64(f.sb.inodeSize)
}

func (l located) firstBlock(t *testing.T, in *Inode) int64 {
	runs, err := l.f.mapBlocks(in, 0, 1)
	if err != nil || len(runs) != 1 || runs[0].zero {
		t.Fatalf("locate block 0 of inode %d: %v %+v", in.Ino, err, runs)
	}
	return int64(runs[0].pblk) << l.f.blockLog
}

// withTimeout runs op and fails the test if it does not return in time.
func withTimeout(t *testing.T, op func() error) error {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- op() }()
	select {
	case err := <-done:
		return err
	case <-time.After(20 * time.Second):
		t.Fatal("operation hung on a corrupt image")
		return nil
	}
}

// TestCorruption flips bytes in specific structures and checks that the
// operation touching them fails with ErrCorrupt (or ErrUnsupported) naming
// the inode, without panicking or hanging.
func TestCorruption(t *testing.T) {
	testenv.RequireTools(t, "mkfs.ext4")
	testenv.RequireRoot(t)
	src := corruptSource(t)
	setxattrBig(t, filepath.Join(src, "xattrs"))
	images := map[string][]byte{}
	for name, args := range map[string][]string{
		"csum":   {"-b", "1024", "-O", "^has_journal", "-I", "256"},
		"nocsum": {"-b", "1024", "-O", "^has_journal,^metadata_csum", "-I", "256"},
	} {
		b, err := os.ReadFile(mkfs(t, nil, src, 2, args...))
		must(t, err)
		images[name] = b
	}
	le := binary.LittleEndian
	cases := []struct {
		name    string
		image   string
		corrupt func(t *testing.T, l located, b []byte) (ino uint32)
		op      func(f *FS, ino uint32) error
		want    error
		openErr bool
	}{
		{"superblock magic", "csum", func(t *testing.T, l located, b []byte) uint32 {
			b[1024+0x38] ^= 0xFF
			return 0
		}, nil, ErrCorrupt, true},
		{"superblock checksum", "csum", func(t *testing.T, l located, b []byte) uint32 {
			b[1024+0x20] ^= 0x01 // blocks per group
			return 0
		}, nil, ErrCorrupt, true},
		{"casefold feature", "nocsum", func(t *testing.T, l located, b []byte) uint32 {
			le.PutUint32(b[1024+0x60:], le.Uint32(b[1024+0x60:])|incompatCasefold)
			return 0
		}, nil, ErrUnsupported, true},
		{"block count beyond volume", "nocsum", func(t *testing.T, l located, b []byte) uint32 {
			le.PutUint32(b[1024+0x4:], 1<<30)
			return 0
		}, nil, ErrCorrupt, true},
		{"group descriptor checksum", "csum", func(t *testing.T, l located, b []byte) uint32 {
			b[2048+0x8] ^= 0x40 // inode table location of group 0
			return RootIno
		}, func(f *FS, ino uint32) error { _, err := f.Inode(ino); return err }, ErrCorrupt, false},
		{"inode checksum", "csum", func(t *testing.T, l located, b []byte) uint32 {
			in := l.ino(t, "/plain")
			b[l.inodeOffset(in.Ino)+0x4] ^= 0x10 // i_size
			return in.Ino
		}, func(f *FS, ino uint32) error { _, err := f.Inode(ino); return err }, ErrCorrupt, false},
		{"extent header magic in inode", "nocsum", func(t *testing.T, l located, b []byte) uint32 {
			in := l.ino(t, "/plain")
			b[l.inodeOffset(in.Ino)+0x28] ^= 0xFF
			return in.Ino
		}, readFile, ErrCorrupt, false},
		{"extent out of range", "nocsum", func(t *testing.T, l located, b []byte) uint32 {
			in := l.ino(t, "/plain")
			le.PutUint32(b[l.inodeOffset(in.Ino)+0x28+12+8:], 0x7fffff00) // ee_start_lo
			return in.Ino
		}, readFile, ErrCorrupt, false},
		{"extent index block header", "nocsum", func(t *testing.T, l located, b []byte) uint32 {
			in := l.ino(t, "/fragmented")
			idx := le.Uint32(in.iblock()[12+4:])
			if le.Uint16(in.iblock()[6:]) == 0 {
				t.Fatal("fragmented file has no index blocks")
			}
			b[int64(idx)<<10] ^= 0xFF
			return in.Ino
		}, readFile, ErrCorrupt, false},
		{"extent index loop", "nocsum", func(t *testing.T, l located, b []byte) uint32 {
			in := l.ino(t, "/fragmented")
			idx := le.Uint32(in.iblock()[12+4:])
			// Turn the leaf into an index node pointing at itself.
			blk := b[int64(idx)<<10:]
			le.PutUint16(blk[6:], 1)
			le.PutUint32(blk[12+4:], idx)
			le.PutUint16(blk[12+8:], 0)
			return in.Ino
		}, readFile, ErrCorrupt, false},
		{"extent block checksum", "csum", func(t *testing.T, l located, b []byte) uint32 {
			in := l.ino(t, "/fragmented")
			idx := le.Uint32(in.iblock()[12+4:])
			b[int64(idx)<<10+12+4] ^= 0x01
			return in.Ino
		}, readFile, ErrCorrupt, false},
		{"absurd size", "nocsum", func(t *testing.T, l located, b []byte) uint32 {
			in := l.ino(t, "/plain")
			le.PutUint32(b[l.inodeOffset(in.Ino)+0x6C:], 0xFFFFFF) // i_size_high
			return in.Ino
		}, func(f *FS, ino uint32) error {
			in, err := f.Inode(ino)
			if err != nil {
				return err
			}
			_, err = f.ReadAt(in, make([]byte, 10), int64(in.Size)-10)
			return err
		}, ErrCorrupt, false},
		{"directory block checksum", "csum", func(t *testing.T, l located, b []byte) uint32 {
			in := l.ino(t, "/a")
			off := l.firstBlock(t, in)
			i := bytes.Index(b[off:off+1024], []byte("child"))
			if i < 0 {
				t.Fatal("entry not found")
			}
			b[off+int64(i)] ^= 0x20
			return in.Ino
		}, readDir, ErrCorrupt, false},
		{"directory record length", "nocsum", func(t *testing.T, l located, b []byte) uint32 {
			in := l.ino(t, "/a")
			off := l.firstBlock(t, in)
			le.PutUint16(b[off+4:], 3) // "." rec_len
			return in.Ino
		}, readDir, ErrCorrupt, false},
		{"directory loop", "nocsum", func(t *testing.T, l located, b []byte) uint32 {
			a := l.ino(t, "/a")
			child := l.ino(t, "/a/child")
			off := l.firstBlock(t, child)
			i := bytes.Index(b[off:off+1024], []byte{1, FtRegular, 'f'}) // name_len 1, type, "f"
			if i < 6 {
				t.Fatal("entry not found")
			}
			le.PutUint32(b[off+int64(i)-6:], a.Ino) // /a/child/f → /a
			b[off+int64(i)-6+7] = FtDir
			return a.Ino
		}, func(f *FS, ino uint32) error { return f.Walk(func(string, *Inode) error { return nil }) }, ErrCorrupt, false},
		{"directory entry name with NUL", "nocsum", corruptName(0), readDir, ErrCorrupt, false},
		{"directory entry name with slash", "nocsum", corruptName('/'), readDir, ErrCorrupt, false},
		{"directory entry inode out of range", "nocsum", func(t *testing.T, l located, b []byte) uint32 {
			in := l.ino(t, "/a")
			off := l.firstBlock(t, in)
			le.PutUint32(b[off:], 0xFFFFFFF0)
			return in.Ino
		}, readDir, ErrCorrupt, false},
		{"xattr block magic", "nocsum", func(t *testing.T, l located, b []byte) uint32 {
			in := l.ino(t, "/xattrs")
			if in.fileACL == 0 {
				t.Fatal("no xattr block")
			}
			b[int64(in.fileACL)<<10] ^= 0xFF
			return in.Ino
		}, func(f *FS, ino uint32) error {
			in, err := f.Inode(ino)
			if err != nil {
				return err
			}
			_, err = f.ListXattr(in)
			return err
		}, ErrCorrupt, false},
		{"xattr block checksum", "csum", func(t *testing.T, l located, b []byte) uint32 {
			in := l.ino(t, "/xattrs")
			b[int64(in.fileACL)<<10+1023] ^= 0x01
			return in.Ino
		}, func(f *FS, ino uint32) error {
			in, err := f.Inode(ino)
			if err != nil {
				return err
			}
			_, err = f.GetXattr(in, "user.big")
			return err
		}, ErrCorrupt, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			orig := images[c.image]
			intact, err := Open(bytes.NewReader(orig), int64(len(orig)))
			must(t, err)
			b := bytes.Clone(orig)
			ino := c.corrupt(t, located{f: intact, img: orig}, b)
			var f *FS
			err = withTimeout(t, func() error {
				var err error
				f, err = Open(bytes.NewReader(b), int64(len(b)))
				return err
			})
			if c.openErr {
				if !errors.Is(err, c.want) {
					t.Fatalf("Open: %v, want %v", err, c.want)
				}
				t.Logf("Open: %v", err)
				return
			}
			if err != nil {
				t.Fatalf("Open: %v (the damage is local; Open should succeed)", err)
			}
			err = withTimeout(t, func() error { return c.op(f, ino) })
			if !errors.Is(err, c.want) {
				t.Fatalf("got %v, want %v", err, c.want)
			}
			if !strings.Contains(err.Error(), fmt.Sprintf("inode %d", ino)) {
				t.Errorf("error %q does not name inode %d", err, ino)
			}
			t.Logf("%v", err)
			// The intact image still reads.
			if err := c.op(intact, ino); err != nil {
				t.Errorf("intact image: %v", err)
			}
		})
	}
}

func readFile(f *FS, ino uint32) error {
	in, err := f.Inode(ino)
	if err != nil {
		return err
	}
	buf := make([]byte, 64<<10)
	for off := int64(0); ; off += int64(len(buf)) {
		_, err := f.ReadAt(in, buf, off)
		if err != nil {
			if err.Error() == "EOF" {
				return nil
			}
			return err
		}
	}
}

func readDir(f *FS, ino uint32) error {
	in, err := f.Inode(ino)
	if err != nil {
		return err
	}
	_, err = f.ReadDir(in)
	return err
}

// corruptName puts c into the name of /a's entry "child".
func corruptName(c byte) func(t *testing.T, l located, b []byte) uint32 {
	return func(t *testing.T, l located, b []byte) uint32 {
		in := l.ino(t, "/a")
		off := l.firstBlock(t, in)
		i := bytes.Index(b[off:off+1024], []byte("child"))
		if i < 0 {
			t.Fatal("entry not found")
		}
		b[off+int64(i)+2] = c
		return in.Ino
	}
}
