package main

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/blobseal/blobseal/crypto"
	"github.com/blobseal/blobseal/internal/fusetest"
	"github.com/blobseal/blobseal/internal/testenv"
)

// rwImage builds `image create --read-write` of src and returns the image
// and key file paths.
func rwImage(t *testing.T, src string) (img, key string) {
	t.Helper()
	testenv.RequireTools(t, "mkfs.ext4", "debugfs")
	dir := t.TempDir()
	key = filepath.Join(dir, "key")
	if err := os.WriteFile(key, random(t, 32), 0o600); err != nil {
		t.Fatal(err)
	}
	img = filepath.Join(dir, "rw.img")
	stdout, stderr, code := blobseal(t, "image", "create", "--read-write", "--from", src, "--key-file", key, img)
	if code != 0 {
		t.Fatalf("image create --read-write: exit %d: %s", code, stderr)
	}
	if strings.Contains(stdout, "root hash") {
		t.Errorf("a read-write image got a verity tree:\n%s", stdout)
	}
	return img, key
}

// decryptImage writes the plaintext of a LUKS image to a file (crypto.Open
// with the key file's bytes), for e2fsck and the kernel's loop mount.
func decryptImage(t *testing.T, img, keyFile string) string {
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
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	vol, err := crypto.Open(f, st.Size(), key, crypto.OpenOptions{})
	if err != nil {
		t.Fatalf("unlock %s: %v", img, err)
	}
	defer vol.Close()
	plain := filepath.Join(t.TempDir(), "plain.ext4")
	out, err := os.Create(plain)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	if _, err := io.Copy(out, io.NewSectionReader(vol, 0, vol.Size())); err != nil {
		t.Fatalf("decrypt %s: %v", img, err)
	}
	return plain
}

func e2fsckClean(t *testing.T, plain string) {
	t.Helper()
	tools := testenv.RequireTools(t, "e2fsck")
	if out, err := exec.Command(tools[0], "-fn", plain).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -fn: %v (want exit 0):\n%s", err, out)
	}
}

// changeTree applies one set of changes under root (the mount, and a copy
// of the source as the reference).
func changeTree(t *testing.T, root string) {
	t.Helper()
	j := func(p string) string { return filepath.Join(root, p) }
	for _, err := range []error{
		os.MkdirAll(j("new/deeper"), 0o750),
		os.WriteFile(j("new/deeper/file"), bytes.Repeat([]byte("0123456789"), 50000), 0o640),
		os.Rename(j("dir/sub/file"), j("new/moved")),
		os.Remove(j("empty")),
		os.Symlink("new/moved", j("link2")),
		os.Link(j("big"), j("new/big-third")),
		os.Truncate(j("big"), 1<<20+3),
		unix.Setxattr(j("new"), "user.rw", []byte("set through the mount"), 0),
		os.Chmod(j("names/sp ace"), 0o600),
		os.RemoveAll(j("dir/sub")),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
}

// copyTree copies src to a new directory with cp -a (times, xattrs, links).
func copyTree(t *testing.T, src string) string {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "ref")
	if out, err := exec.Command("cp", "-a", src, dst).CombinedOutput(); err != nil {
		t.Fatalf("cp -a: %v: %s", err, out)
	}
	return dst
}

// TestMountReadWrite: image create --read-write, mount --read-write,
// changes, SIGTERM; the decrypted image passes e2fsck -fn and the kernel
// shows the changed tree. A second mount ended by fusermount3 -u also
// leaves a clean filesystem and keeps its change.
func TestMountReadWrite(t *testing.T) {
	src := testSource(t)
	img, key := rwImage(t, src)
	ref := copyTree(t, src)
	changeTree(t, ref)
	mnt := filepath.Join(t.TempDir(), "mnt")

	proc, _ := startMount(t, "--read-write", "--key-file", key, img, mnt)
	changeTree(t, mnt)
	var sfs unix.Statfs_t
	if err := unix.Statfs(mnt, &sfs); err != nil || sfs.Bfree*uint64(sfs.Bsize) < 60<<20 {
		t.Errorf("read-write image has %d free bytes (%v), want at least 60 MiB", sfs.Bfree*uint64(sfs.Bsize), err)
	}
	fusetest.CompareTrees(t, ref, mnt, fusetest.Compare{Xattrs: true, Ignore: []string{"lost+found"}})
	proc.stop(t)
	if !strings.Contains(proc.stderr.String(), "flushed and clean") {
		t.Errorf("no flush log line:\n%s", proc.stderr)
	}
	plain := decryptImage(t, img, key)
	e2fsckClean(t, plain)
	if os.Geteuid() == 0 {
		kernel := fusetest.LoopMount(t, plain)
		fusetest.CompareTrees(t, ref, kernel, fusetest.Compare{Xattrs: true, Ignore: []string{"lost+found"}})
		// The written image, mounted read-only by blobseal, stats exactly as
		// the kernel's ext4 shows its plaintext: times and inode numbers too.
		roMnt := filepath.Join(t.TempDir(), "ro")
		ro, _ := startMount(t, "--key-file", key, img, roMnt)
		fusetest.CompareTrees(t, kernel, roMnt, fusetest.Compare{Xattrs: true, Times: true, Inodes: true})
		ro.stop(t)
	}

	// fusermount3 -u ends the mount from outside; the process flushes and exits 0.
	proc, _ = startMount(t, "--read-write", "--key-file", key, img, mnt)
	if err := os.WriteFile(filepath.Join(mnt, "second"), []byte("second mount"), 0o644); err != nil {
		t.Fatal(err)
	}
	tools := testenv.RequireTools(t, "fusermount3")
	if out, err := exec.Command(tools[0], "-u", mnt).CombinedOutput(); err != nil {
		t.Fatalf("fusermount3 -u: %v: %s", err, out)
	}
	select {
	case err := <-proc.done:
		if err != nil {
			t.Fatalf("mount exited with %v after fusermount3 -u:\n%s", err, proc.stderr)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("mount still running 15 s after fusermount3 -u")
	}
	plain = decryptImage(t, img, key)
	e2fsckClean(t, plain)
	if os.Geteuid() == 0 {
		got, err := os.ReadFile(filepath.Join(fusetest.LoopMount(t, plain), "second"))
		if err != nil || string(got) != "second mount" {
			t.Errorf("file written before fusermount3 -u: %q, %v", got, err)
		}
	}
}

// TestMountReadWriteCrash: kill -9 the mount while a workload writes and
// fsyncs; the next mount replays the journal, every fsynced file is
// intact, and the filesystem is clean.
func TestMountReadWriteCrash(t *testing.T) {
	src := t.TempDir()
	img, key := rwImage(t, src)
	mnt := filepath.Join(t.TempDir(), "mnt")
	proc, _ := startMount(t, "--read-write", "--key-file", key, img, mnt)

	content := func(i int) []byte { return bytes.Repeat([]byte(fmt.Sprintf("file %d;", i)), 200+i%300) }
	var mu sync.Mutex
	synced := 0 // files 0..synced-1 were fsynced
	stop := make(chan struct{})
	done := make(chan struct{})
	failed := make(chan error, 1) // why the workload stopped
	go func() {
		defer close(done)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			f, err := os.Create(filepath.Join(mnt, fmt.Sprintf("f%04d", i)))
			if err != nil {
				failed <- err
				return
			}
			_, err = f.Write(content(i))
			if err == nil && i%2 == 0 { // every other file is fsynced
				err = f.Sync()
			}
			f.Close()
			if err != nil {
				failed <- err
				return
			}
			if i%2 == 0 {
				mu.Lock()
				synced = i + 1
				mu.Unlock()
			}
		}
	}()
	time.Sleep(1500 * time.Millisecond)
	select {
	case err := <-failed:
		t.Fatalf("the workload stopped before the kill: %v", err)
	default:
	}
	if err := proc.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-proc.done
	close(stop)
	<-done
	// The dead mount stays in the table until it is detached.
	if out, err := exec.Command("fusermount3", "-u", "-z", mnt).CombinedOutput(); err != nil {
		t.Logf("fusermount3 -u -z: %v: %s", err, out)
	}
	mu.Lock()
	n := synced
	mu.Unlock()
	if n < 10 {
		t.Fatalf("only %d files fsynced before the kill: the workload did not run", n)
	}
	t.Logf("killed after %d fsynced files", n)

	proc, _ = startMount(t, "--read-write", "--key-file", key, img, mnt)
	for i := 0; i < n; i += 2 {
		got, err := os.ReadFile(filepath.Join(mnt, fmt.Sprintf("f%04d", i)))
		if err != nil || !bytes.Equal(got, content(i)) {
			t.Errorf("fsynced file f%04d: %d bytes, %v", i, len(got), err)
		}
	}
	proc.stop(t)
	if !strings.Contains(proc.stderr.String(), "replayed the journal") { // read once the process is gone
		t.Errorf("the remount did not replay a journal:\n%s", proc.stderr)
	}
	e2fsckClean(t, decryptImage(t, img, key))
}

// TestMountReadWriteRefusals: what --read-write cannot serve is refused
// with a message saying why and what to do.
func TestMountReadWriteRefusals(t *testing.T) {
	testenv.RequireTools(t, "mkfs.ext4", "debugfs")
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	writeTestFile(t, filepath.Join(src, "f"), []byte("x"), 0o644)
	key := filepath.Join(dir, "key")
	if err := os.WriteFile(key, random(t, 32), 0o600); err != nil {
		t.Fatal(err)
	}
	verityImg := filepath.Join(dir, "verity.img")
	if _, stderr, code := blobseal(t, "image", "create", "--from", src, "--key-file", key, verityImg); code != 0 {
		t.Fatalf("image create: %s", stderr)
	}
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"mount", "--read-write", "--key-file", key, "--lease-duration", "5s", "http://127.0.0.1:1/acct/c/blob", mnt}, 2, "15s to 60s"},
		{[]string{"mount", "--read-write", "--key-file", key, "--lease-duration", "20.5s", "http://127.0.0.1:1/acct/c/blob", mnt}, 2, "whole seconds from 15s to 60s (storage's limits), or infinite"},
		{[]string{"mount", "--read-write", "--key-file", key, "--flush-timeout", "100ms", "http://127.0.0.1:1/acct/c/blob", mnt}, 2, "--flush-timeout 100ms must be from 1s to 1h"},
		{[]string{"mount", "--read-write", "--key-file", key, "--dirty-memory", "lots", "http://127.0.0.1:1/acct/c/blob", mnt}, 2, "--dirty-memory: \"lots\" is not a size like 256Mi"},
		{[]string{"mount", "--read-write", "--key-file", key, "--dirty-memory", "64Ki", "http://127.0.0.1:1/acct/c/blob", mnt}, 2, "--dirty-memory 65536 must hold at least two cache blocks (131072 bytes)"},
		{[]string{"mount", "--read-write", "--key-file", key, "--write-cache", "1Mi", "http://127.0.0.1:1/acct/c/blob", mnt}, 2, "--write-cache 1048576 must be from 4Mi to 64Gi"},
		{[]string{"mount", "--read-write", "--key-file", key, "--cache-dir", dir, "http://127.0.0.1:1/acct/c/blob", mnt}, 2, "drop --cache-dir"},
		{[]string{"mount", "--read-write", "--key-file", key, "--verity-root-hash", strings.Repeat("ab", 32), verityImg, mnt}, 2, "verity"},
		{[]string{"mount", "--read-write", "--key-file", key, verityImg, mnt}, 1, "ends with a verity tree"},
	} {
		_, stderr, code := blobseal(t, c.args...)
		if code != c.code || !strings.Contains(stderr, c.want) {
			t.Errorf("blobseal %q: exit %d, stderr %q; want exit %d mentioning %q", c.args, code, stderr, c.code, c.want)
		}
	}
	if fusetest.IsMounted(t, mnt) {
		t.Errorf("%s mounted after refused commands", mnt)
	}
}

// TestMountReadWriteBusyAtSignal: SIGTERM while a file is open for writing
// detaches the mount lazily; the open file keeps working, and the process
// flushes and exits only once it is closed, with every write in the image.
func TestMountReadWriteBusyAtSignal(t *testing.T) {
	img, key := rwImage(t, t.TempDir())
	mnt := filepath.Join(t.TempDir(), "mnt")
	proc, _ := startMount(t, "--read-write", "--unmount-grace", "300ms", "--key-file", key, img, mnt)
	f, err := os.Create(filepath.Join(mnt, "open"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString("before the signal;"); err != nil {
		t.Fatal(err)
	}
	if err := proc.cmd.Process.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second) // past the grace: detached lazily, still serving
	select {
	case err := <-proc.done:
		t.Fatalf("mount exited (%v) while a file was open:\n%s", err, proc.stderr)
	default:
	}
	if _, err := f.WriteString("after the signal"); err != nil {
		t.Fatalf("write to the open file after the lazy detach: %v", err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-proc.done:
		if err != nil {
			t.Fatalf("mount exited with %v:\n%s", err, proc.stderr)
		}
	case <-time.After(15 * time.Second):
		t.Fatalf("mount still running 15 s after the last file closed:\n%s", proc.stderr)
	}
	plain := decryptImage(t, img, key)
	e2fsckClean(t, plain)
	if os.Geteuid() == 0 {
		got, err := os.ReadFile(filepath.Join(fusetest.LoopMount(t, plain), "open"))
		if err != nil || string(got) != "before the signal;after the signal" {
			t.Errorf("file written across the signal: %q, %v", got, err)
		}
	}
}
