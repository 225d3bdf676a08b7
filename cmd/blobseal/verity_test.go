package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/blobseal/blobseal/crypto"
	"github.com/blobseal/blobseal/fs/ext4"
	"github.com/blobseal/blobseal/image"
	"github.com/blobseal/blobseal/internal/fusetest"
	"github.com/blobseal/blobseal/internal/testenv"
)

// createVerity runs `image create --json` and returns the verity part.
func createVerity(t *testing.T, src, key, img string, extra ...string) image.VerityInfo {
	t.Helper()
	args := append([]string{"image", "create", "--json", "--from", src, "--key-file", key}, extra...)
	stdout, stderr, code := blobseal(t, append(args, img)...)
	if code != 0 {
		t.Fatalf("image create: exit %d: %s", code, stderr)
	}
	var out struct{ Verity *image.VerityInfo }
	if err := json.Unmarshal([]byte(stdout), &out); err != nil || out.Verity == nil {
		t.Fatalf("image create --json printed %q (%v)", stdout, err)
	}
	return *out.Verity
}

// veritysetupVerify checks an image's tree with the real veritysetup.
func veritysetupVerify(t *testing.T, img string, v image.VerityInfo) error {
	t.Helper()
	bin := testenv.RequireTools(t, "veritysetup")[0]
	out, err := exec.Command(bin, "verify", img, img, v.RootHash, fmt.Sprintf("--hash-offset=%d", v.HashOffset)).CombinedOutput()
	if err != nil {
		return fmt.Errorf("veritysetup verify: %v: %s", err, out)
	}
	return nil
}

// recordingFile notes the offsets a reader reads.
type recordingFile struct {
	f    *os.File
	mu   sync.Mutex
	offs []int64
}

func (r *recordingFile) ReadAt(p []byte, off int64) (int, error) {
	r.mu.Lock()
	r.offs = append(r.offs, off)
	r.mu.Unlock()
	return r.f.ReadAt(p, off)
}

// fileBlockOffset finds an image offset that holds ciphertext of the file
// at name, by reading the file through an unverified volume over a
// recording device.
func fileBlockOffset(t *testing.T, img, keyFile, name string) int64 {
	t.Helper()
	key, err := os.ReadFile(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, _ := f.Stat()
	rec := &recordingFile{f: f}
	vol, err := crypto.Open(rec, st.Size(), key, crypto.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer vol.Close()
	fsys, err := ext4.Open(vol, vol.Size())
	if err != nil {
		t.Fatal(err)
	}
	ino, err := fsys.Lookup(mustInode(t, fsys, ext4.RootIno), name)
	if err != nil {
		t.Fatal(err)
	}
	in := mustInode(t, fsys, ino)
	rec.mu.Lock()
	rec.offs = nil
	rec.mu.Unlock()
	if _, err := io.Copy(io.Discard, io.NewSectionReader(fsys.FileReader(in), 0, int64(in.Size))); err != nil {
		t.Fatal(err)
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if len(rec.offs) == 0 {
		t.Fatalf("reading %s read nothing from the device", name)
	}
	return rec.offs[len(rec.offs)/2] + 100
}

func mustInode(t *testing.T, fsys *ext4.FS, ino uint32) *ext4.Inode {
	t.Helper()
	in, err := fsys.Inode(ino)
	if err != nil {
		t.Fatal(err)
	}
	return in
}

// writeKey writes n random bytes to dir/key and returns the path.
func writeKey(t *testing.T, dir string, n int) string {
	t.Helper()
	key := filepath.Join(dir, "key")
	if err := os.WriteFile(key, random(t, n), 0o600); err != nil {
		t.Fatal(err)
	}
	return key
}

func flipByte(t *testing.T, path string, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0x20
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestVerityMount: images carry a tree veritysetup accepts; a mount pinned
// to its root serves the tree; a tampered data block gives EIO for the file
// that holds it (logged once, with its block number, and counted) while
// every other file reads fine; a tampered header, a rolled-back image and a
// missing root under --require-integrity refuse to mount, each saying why.
func TestVerityMount(t *testing.T) {
	testenv.RequireTools(t, "mkfs.ext4", "debugfs")
	src := testSource(t)
	dir := t.TempDir()
	key := writeKey(t, dir, 32)
	img := filepath.Join(dir, "v2.img")
	v := createVerity(t, src, key, img)
	if err := veritysetupVerify(t, img, v); err != nil {
		t.Fatal(err)
	}
	// An older image made with the same key: what a rollback would serve.
	old := filepath.Join(dir, "v1.img")
	writeTestFile(t, filepath.Join(src, "names", "sp ace"), []byte("older"), 0o644)
	createVerity(t, src, key, old)
	writeTestFile(t, filepath.Join(src, "names", "sp ace"), []byte("1"), 0o644)

	// Intact: the tree equals the source, and the manifest check passes.
	stdout, stderr, code := blobseal(t, "image", "check", "--key-file", key, "--verity-root-hash", v.RootHash, img)
	if code != 0 {
		t.Fatalf("image check with the root: exit %d: %s", code, stderr)
	}
	if got, want := checkManifest(t, stdout), sourceManifest(t, src); !slices.Equal(got, want) {
		t.Errorf("manifest differs from the source")
	}
	proc, mnt := startMount(t, "--key-file", key, "--verity-root-hash", v.RootHash, "--verity-hash-offset", fmt.Sprint(v.HashOffset), img, filepath.Join(dir, "mnt"))
	fusetest.CompareTrees(t, src, mnt, fusetest.Compare{Xattrs: true, Ignore: []string{"lost+found"}})
	proc.stop(t)
	if strings.Contains(proc.stderr.String(), "no verity root hash") {
		t.Error("a verified mount warned that it is unverified")
	}

	// A flipped ciphertext byte inside /big.
	tampered := filepath.Join(dir, "tampered.img")
	copyFile(t, img, tampered)
	off := fileBlockOffset(t, tampered, key, "big")
	flipByte(t, tampered, off)
	if err := veritysetupVerify(t, tampered, v); err == nil {
		t.Fatal("veritysetup accepts the tampered image: the test tampered nothing")
	}
	proc, mnt = startMount(t, "--key-file", key, "--verity-root-hash", v.RootHash, tampered, filepath.Join(dir, "mnt2"))
	for range 2 {
		if _, err := os.ReadFile(filepath.Join(mnt, "big")); !errors.Is(err, syscall.EIO) {
			t.Errorf("read of the tampered file: %v, want EIO", err)
		}
	}
	want, _ := os.ReadFile(filepath.Join(src, "dir", "sub", "file"))
	if got, err := os.ReadFile(filepath.Join(mnt, "dir", "sub", "file")); err != nil || !bytes.Equal(got, want) {
		t.Errorf("an intact file next to the tampered one: %q, %v", got, err)
	}
	names, err := os.ReadDir(filepath.Join(mnt, "names"))
	if err != nil || len(names) != 3 {
		t.Errorf("directory listing next to the tampered file: %d entries, %v", len(names), err)
	}
	proc.stop(t)
	log := proc.stderr.String()
	block := fmt.Sprintf("block=%d ", off/4096)
	if n := strings.Count(log, "integrity check failed"); n != 1 || !strings.Contains(log, block) {
		t.Errorf("the tampered block (%s) is logged %d times, want once naming it:\n%s", block, n, log)
	}
	if !strings.Contains(log, "integrity_failures=1") {
		t.Errorf("the statistics line does not count the failure:\n%s", log)
	}

	// Refusals: each names its check.
	header := filepath.Join(dir, "header.img")
	copyFile(t, img, header)
	flipByte(t, header, 1000) // inside the LUKS2 JSON area
	for _, c := range []struct {
		name string
		args []string
		want string
	}{
		{"tampered header", []string{"--verity-root-hash", v.RootHash, header}, "does not match its verity tree"},
		{"rolled back", []string{"--verity-root-hash", v.RootHash, old}, "rolled back"},
		{"wrong offset", []string{"--verity-root-hash", v.RootHash, "--verity-hash-offset", "4096", img}, "the configured hash offset"},
		{"integrity required", []string{"--require-integrity", img}, "no verity root hash is configured"},
		{"bad root", []string{"--verity-root-hash", "xyz", img}, "64 (sha256)"},
	} {
		_, stderr, code := blobseal(t, append([]string{"mount", "--key-file", key}, append(c.args, filepath.Join(dir, "mnt3"))...)...)
		if code == 0 || !strings.Contains(stderr, c.want) {
			t.Errorf("%s: exit %d, stderr %q; want a failure saying %q", c.name, code, stderr, c.want)
		}
	}
	// Without a root, the mount works and warns.
	proc, _ = startMount(t, "--key-file", key, img, filepath.Join(dir, "mnt4"))
	proc.stop(t)
	if !strings.Contains(proc.stderr.String(), "storage can modify this image undetected") {
		t.Errorf("an unverified mount did not warn:\n%s", proc.stderr)
	}
}

// TestVerityCryptsetupImages: an image cryptsetup encrypted, with a tree
// that veritysetup itself wrote, mounts unchanged; `blobseal image verity`
// adds a tree veritysetup accepts to such an image, and refuses to add a
// second one.
func TestVerityCryptsetupImages(t *testing.T) {
	tools := testenv.RequireTools(t, "cryptsetup", "veritysetup", "mkfs.ext4")
	src := testSource(t)
	dir := t.TempDir()
	key := writeKey(t, dir, 32)
	encrypt := func(name string) string {
		img := filepath.Join(dir, name)
		size, err := image.MakeExt4(t.Context(), src, img, image.MakeOptions{})
		if err != nil {
			t.Fatal(err)
		}
		cryptsetupEncrypt(t, tools[0], img, size, key)
		return img
	}

	// veritysetup's own tree, appended at the end (data size = file size).
	theirs := encrypt("theirs.img")
	st, _ := os.Stat(theirs)
	blocks := st.Size() / 4096
	out, err := exec.Command(tools[1], "format", theirs, theirs, fmt.Sprintf("--hash-offset=%d", st.Size()),
		fmt.Sprintf("--data-blocks=%d", blocks)).CombinedOutput()
	if err != nil {
		t.Fatalf("veritysetup format: %v: %s", err, out)
	}
	root := ""
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) == 3 && f[0] == "Root" && f[1] == "hash:" {
			root = f[2]
		}
	}
	if root == "" {
		t.Fatalf("no root hash in veritysetup's output:\n%s", out)
	}
	proc, mnt := startMount(t, "--key-file", key, "--verity-root-hash", root, theirs, filepath.Join(dir, "mnt"))
	fusetest.CompareTrees(t, src, mnt, fusetest.Compare{Xattrs: true, Ignore: []string{"lost+found"}})
	proc.stop(t)

	// Ours, added to a cryptsetup image.
	mine := encrypt("mine.img")
	stdout, stderr, code := blobseal(t, "image", "verity", "--json", mine)
	if code != 0 {
		t.Fatalf("image verity: exit %d: %s", code, stderr)
	}
	var v image.VerityInfo
	if err := json.Unmarshal([]byte(stdout), &v); err != nil {
		t.Fatal(err)
	}
	if err := veritysetupVerify(t, mine, v); err != nil {
		t.Fatal(err)
	}
	if _, stderr, code := blobseal(t, "image", "verity", mine); code != 1 || !strings.Contains(stderr, "already ends with a verity tree") {
		t.Errorf("second image verity: exit %d, %s", code, stderr)
	}
	stdout, stderr, code = blobseal(t, "image", "check", "--key-file", key, "--verity-root-hash", v.RootHash, mine)
	if code != 0 {
		t.Fatalf("image check: exit %d: %s", code, stderr)
	}
	if got, want := checkManifest(t, stdout), sourceManifest(t, src); !slices.Equal(got, want) {
		t.Errorf("manifest differs from the source")
	}
}
