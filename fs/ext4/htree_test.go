package ext4

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/blobseal/blobseal/internal/testenv"
)

// TestDirHashMatchesDebugfs checks all six htree hash variants against
// e2fsprogs' own implementation (debugfs dx_hash) for names of many lengths,
// including bytes >= 0x80 where signed and unsigned variants differ.
func TestDirHashMatchesDebugfs(t *testing.T) {
	tools := testenv.RequireTools(t, "debugfs", "mkfs.ext4")
	img := mkfs(t, nil, "", 2, "-b", "1024")
	seedUUID := "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
	seedBytes := []byte{0x0f, 0x1e, 0x2d, 0x3c, 0x4b, 0x5a, 0x69, 0x78, 0x87, 0x96, 0xa5, 0xb4, 0xc3, 0xd2, 0xe1, 0xf0}
	var seed [4]uint32
	for i := range seed {
		seed[i] = uint32(seedBytes[4*i]) | uint32(seedBytes[4*i+1])<<8 | uint32(seedBytes[4*i+2])<<16 | uint32(seedBytes[4*i+3])<<24
	}
	var names []string
	for _, n := range []int{1, 2, 3, 4, 5, 15, 16, 17, 31, 32, 33, 63, 64, 100, 200, 255} {
		b := fill(uint64(n), n)
		for i := range b {
			b[i] = 0x21 + b[i]%0xde // printable ASCII and high bytes, no spaces
			if b[i] == '"' || b[i] == '\\' || b[i] == '\'' {
				b[i] = 'q'
			}
		}
		names = append(names, string(b))
	}
	names = append(names, "hello", "lost+found", "a")
	algs := []struct {
		name string
		v    uint8
	}{{"legacy", hashLegacy}, {"half_md4", hashHalfMD4}, {"tea", hashTea},
		{"legacy_unsigned", hashLegacyUnsigned}, {"half_md4_unsigned", hashHalfMD4Unsigned}, {"tea_unsigned", hashTeaUnsigned}}
	var cmds strings.Builder
	for _, a := range algs {
		for _, n := range names {
			fmt.Fprintf(&cmds, "dx_hash -h %d -s %s %s\n", a.v, seedUUID, n) // debugfs 1.47 mis-parses the *_unsigned names
		}
	}
	cmdFile := filepath.Join(t.TempDir(), "cmds")
	must(t, os.WriteFile(cmdFile, []byte(cmds.String()), 0o600))
	out := runCmd(t, nil, tools[0], "-f", cmdFile, img)
	re := regexp.MustCompile(`^Hash of .* is 0x([0-9a-f]+) \(minor`)
	var got []uint32
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if m := re.FindStringSubmatch(sc.Text()); m != nil {
			v, err := strconv.ParseUint(m[1], 16, 32)
			must(t, err)
			got = append(got, uint32(v))
		}
	}
	if len(got) != len(algs)*len(names) {
		t.Fatalf("debugfs printed %d hashes, want %d:\n%s", len(got), len(algs)*len(names), out)
	}
	i := 0
	for _, a := range algs {
		for _, n := range names {
			h, ok := dirHash([]byte(n), a.v, seed)
			if !ok || h != got[i]&^1 {
				t.Errorf("%s(%q) = %#x, debugfs %#x", a.name, n, h, got[i])
			}
			i++
		}
	}
	if _, ok := dirHash([]byte("x"), 6, seed); ok {
		t.Error("hash version 6 (siphash) accepted; want a fallback to linear scan")
	}
}

// TestHtreeLargeDirectory has the kernel build a 20,000-entry indexed
// directory for several hash algorithms (signed and unsigned), then looks
// every name up through the index and checks a missing one is ErrNotFound.
func TestHtreeLargeDirectory(t *testing.T) {
	tools := testenv.RequireTools(t, "mkfs.ext4", "debugfs", "mount", "umount")
	testenv.RequireRoot(t)
	var names []string
	for i := 0; i < 20000; i++ {
		n := fmt.Sprintf("file-%05d-%s", i, strings.Repeat("z", i%40))
		if i%1000 == 0 {
			n += "-\xe9\xff" // high bytes: signed and unsigned hashing differ
		}
		names = append(names, n)
	}
	for _, c := range []struct {
		alg      string
		unsigned bool
		args     []string
	}{
		{"half_md4", false, []string{"-b", "1024"}},
		{"tea", true, []string{"-b", "1024", "-O", "^metadata_csum"}},
		{"legacy", false, []string{"-b", "4096"}},
		{"half_md4", true, []string{"-b", "1024", "-O", "large_dir"}},
	} {
		t.Run(fmt.Sprintf("%s-unsigned=%v%s", c.alg, c.unsigned, strings.Join(c.args, "")), func(t *testing.T) {
			img := mkfs(t, nil, "", 40, append(c.args, "-N", "25000")...)
			flags := "1" // signed_directory_hash
			if c.unsigned {
				flags = "2"
			}
			runCmd(t, nil, tools[1], "-w", "-R", "ssv def_hash_version "+c.alg, img)
			runCmd(t, nil, tools[1], "-w", "-R", "ssv flags "+flags, img)
			mnt := t.TempDir()
			runCmd(t, nil, tools[2], "-o", "loop", img, mnt)
			mounted := true
			defer func() {
				if mounted {
					runCmd(t, nil, tools[3], mnt)
				}
			}()
			big := filepath.Join(mnt, "big")
			must(t, os.Mkdir(big, 0o755))
			for _, n := range names {
				fh, err := os.Create(filepath.Join(big, n))
				must(t, err)
				must(t, fh.Close())
			}
			runCmd(t, nil, tools[3], mnt)
			mounted = false

			f, _ := openImage(t, img)
			dir, err := lookupPath(f, "/big")
			must(t, err)
			if !f.isIndexed(dir) {
				t.Fatalf("directory is not indexed (flags %#x)", dir.Flags)
			}
			b, err := f.dirBlockAt(dir, 0)
			must(t, err)
			hv, levels, _, err := f.dxRootInfo(dir, b)
			must(t, err)
			t.Logf("hash version %d, %d index levels, %d bytes", hv, levels, dir.Size)
			seen := map[uint32]bool{}
			for _, n := range names {
				ino, err := f.dxLookup(dir, []byte(n))
				if err != nil || ino == 0 {
					t.Fatalf("htree lookup %q: inode %d, %v", n, ino, err)
				}
				if seen[ino] {
					t.Fatalf("inode %d returned twice", ino)
				}
				seen[ino] = true
			}
			if _, err := f.Lookup(dir, "file-99999"); !errors.Is(err, ErrNotFound) {
				t.Errorf("missing name: %v, want ErrNotFound", err)
			}
			ents, err := f.ReadDir(dir)
			must(t, err)
			if len(ents) != len(names) {
				t.Errorf("ReadDir: %d entries, want %d", len(ents), len(names))
			}
		})
	}
}
