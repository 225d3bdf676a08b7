package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/blobseal/blobseal/image"
	"github.com/blobseal/blobseal/internal/fusetest"
	"github.com/blobseal/blobseal/internal/testenv"
)

// binary is the blobseal executable built once for the end-to-end tests.
var binary string

// TestMain builds the real binary (the end-to-end tests run it as a user
// would) and fails the run if any mount outlives the tests.
func TestMain(m *testing.M) {
	os.Exit(fusetest.RunMain(&buildingM{m}))
}

// buildingM builds the binary inside RunMain, so it lands in the private
// temporary directory that RunMain removes.
type buildingM struct{ m *testing.M }

func (b *buildingM) Run() int {
	dir, err := os.MkdirTemp("", "bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	binary = filepath.Join(dir, "blobseal")
	goTool, err := exec.LookPath("go") // go test puts its own toolchain first in PATH
	if err != nil {
		goTool = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	if out, err := exec.Command(goTool, "build", "-o", binary, ".").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "go build: %v\n%s", err, out)
		return 1
	}
	return b.m.Run()
}

// blobseal runs the binary to completion and returns stdout, stderr and
// the exit code.
func blobseal(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	var exit *exec.ExitError
	if errors.As(err, &exit) {
		code = exit.ExitCode()
	} else if err != nil {
		t.Fatalf("run blobseal %v: %v", args, err)
	}
	return stdout.String(), stderr.String(), code
}

// mountProcess is a running `blobseal mount`.
type mountProcess struct {
	cmd    *exec.Cmd
	stderr *bytes.Buffer
	done   chan error
}

// startMount runs `blobseal mount` and waits for its "ready" line and its
// ready file; the cleanup SIGTERMs it if the test did not.
func startMount(t *testing.T, args ...string) (*mountProcess, string) {
	t.Helper()
	testenv.RequireFUSE(t)
	if err := os.MkdirAll(args[len(args)-1], 0o755); err != nil {
		t.Fatal(err)
	}
	ready := filepath.Join(t.TempDir(), "ready")
	cmd := exec.Command(binary, append([]string{"mount", "--ready-file", ready}, args...)...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	p := &mountProcess{cmd: cmd, stderr: &bytes.Buffer{}, done: make(chan error, 1)}
	cmd.Stderr = p.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 16)
	go func() {
		s := bufio.NewScanner(stdout)
		for s.Scan() {
			lines <- s.Text()
		}
		close(lines)
		p.done <- cmd.Wait()
	}()
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-p.done:
			case <-time.After(15 * time.Second):
				_ = cmd.Process.Kill()
				t.Errorf("blobseal mount ignored SIGTERM for 15s; stderr:\n%s", p.stderr)
			}
		}
	})
	select {
	case line, ok := <-lines:
		if !ok || line != "ready" {
			<-p.done
			t.Fatalf("blobseal mount: first line %q (open %v), stderr:\n%s", line, ok, p.stderr)
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("blobseal mount not ready after 60s; stderr:\n%s", p.stderr)
	}
	b, err := os.ReadFile(ready)
	if err != nil {
		t.Fatalf("ready file not written by the time \"ready\" was printed: %v", err)
	}
	return p, strings.TrimSpace(string(b))
}

// stop sends SIGTERM and requires a clean exit.
func (p *mountProcess) stop(t *testing.T) { t.Helper(); p.stopWith(t, syscall.SIGTERM) }

// stopWith sends sig and requires a clean exit.
func (p *mountProcess) stopWith(t *testing.T, sig os.Signal) {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-p.done:
		if err != nil {
			t.Fatalf("blobseal mount exited with %v after %v; stderr:\n%s", err, sig, p.stderr)
		}
	case <-time.After(15 * time.Second):
		t.Fatalf("blobseal mount still running 15s after %v", sig)
	}
}

func writeTestFile(t *testing.T, p string, data []byte, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, data, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil {
		t.Fatal(err)
	}
}

func random(t *testing.T, n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// testSource builds a small tree with the interesting kinds of entries.
func testSource(t *testing.T) string {
	t.Helper()
	src := filepath.Join(t.TempDir(), "src")
	writeTestFile(t, filepath.Join(src, "big"), random(t, 3<<20+5), 0o644)
	writeTestFile(t, filepath.Join(src, "empty"), nil, 0o600)
	writeTestFile(t, filepath.Join(src, "dir", "sub", "file"), []byte("nested\n"), 0o755)
	writeTestFile(t, filepath.Join(src, "names", "sp ace"), []byte("1"), 0o644)
	writeTestFile(t, filepath.Join(src, "names", "bad-\xff"), []byte("2"), 0o644)
	writeTestFile(t, filepath.Join(src, "names", strings.Repeat("z", 255)), []byte("3"), 0o644)
	if err := os.Symlink("dir/sub/file", filepath.Join(src, "link")); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(filepath.Join(src, "big"), filepath.Join(src, "dir", "big-again")); err != nil {
		t.Fatal(err)
	}
	if err := unix.Setxattr(filepath.Join(src, "empty"), "user.note", []byte("xattr value"), 0); err != nil {
		t.Fatal(err)
	}
	if os.Geteuid() == 0 {
		if err := os.Lchown(filepath.Join(src, "dir", "sub", "file"), 4242, 4343); err != nil {
			t.Fatal(err)
		}
	}
	return src
}

// sourceManifest computes, independently of the image, the manifest lines
// `image check` must print for src. Directory sizes are ext4-specific, so
// they are blanked on both sides.
func sourceManifest(t *testing.T, src string) []string {
	t.Helper()
	var lines []string
	err := filepath.Walk(src, func(p string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		st := info.Sys().(*syscall.Stat_t)
		rel, _ := filepath.Rel(src, p)
		e := image.ManifestEntry{Path: "/" + filepath.ToSlash(rel), Mode: st.Mode, UID: st.Uid, GID: st.Gid,
			Size: uint64(st.Size), Digest: "-"}
		if rel == "." {
			e.Path = "/"
		}
		switch st.Mode & syscall.S_IFMT {
		case syscall.S_IFREG:
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			sum := sha256.Sum256(b)
			e.Digest = hex.EncodeToString(sum[:])
		case syscall.S_IFLNK:
			if e.Digest, err = os.Readlink(p); err != nil {
				return err
			}
		}
		lines = append(lines, blankDirSize(e.String()))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(lines)
	return lines
}

func blankDirSize(line string) string {
	if !strings.HasPrefix(line, "d ") {
		return line
	}
	f := strings.SplitN(line, " ", 5)
	f[3] = "-"
	return strings.Join(f, " ")
}

func checkManifest(t *testing.T, stdout string) []string {
	t.Helper()
	var got []string
	for _, l := range strings.Split(strings.TrimSuffix(stdout, "\n"), "\n") {
		if strings.HasSuffix(l, " /lost+found") {
			continue
		}
		got = append(got, blankDirSize(l))
	}
	slices.Sort(got)
	return got
}

// TestImageCreateCheckMount is the whole local workflow through the real
// binary: create an encrypted image from a directory, check it against a
// manifest computed from the directory, mount it, compare the mount with
// the directory byte for byte, and stop it with SIGTERM.
func TestImageCreateCheckMount(t *testing.T) {
	testenv.RequireTools(t, "mkfs.ext4", "debugfs")
	src := testSource(t)
	dir := t.TempDir()
	key := filepath.Join(dir, "key")
	if err := os.WriteFile(key, append(random(t, 31), '\n'), 0o600); err != nil { // newline kept
		t.Fatal(err)
	}
	img := filepath.Join(dir, "image.luks")
	if _, stderr, code := blobseal(t, "image", "create", "--from", src, "--key-file", key, img); code != 0 {
		t.Fatalf("image create: exit %d: %s", code, stderr)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, ".*")); len(left) != 0 {
		t.Errorf("temporary files left next to the image: %q", left)
	}
	head := make([]byte, 6)
	if f, err := os.Open(img); err != nil {
		t.Fatal(err)
	} else {
		f.Read(head)
		f.Close()
	}
	if string(head) != "LUKS\xba\xbe" {
		t.Fatalf("image does not start with a LUKS header: %q", head)
	}
	// cryptsetup accepts the key file as is (newline included).
	if cs, err := exec.LookPath("cryptsetup"); err == nil {
		if out, err := exec.Command(cs, "open", "--test-passphrase", "--key-file", key, img).CombinedOutput(); err != nil {
			t.Errorf("cryptsetup rejects the key for our image: %v: %s", err, out)
		}
	}

	stdout, stderr, code := blobseal(t, "image", "check", "--key-file", key, img)
	if code != 0 {
		t.Fatalf("image check: exit %d: %s", code, stderr)
	}
	if got, want := checkManifest(t, stdout), sourceManifest(t, src); !slices.Equal(got, want) {
		t.Errorf("image check manifest differs from the source:\ngot:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}

	proc, mnt := startMount(t, "--key-file", key, img, filepath.Join(dir, "mnt"))
	if !fusetest.IsMounted(t, mnt) {
		t.Fatalf("ready, but %s is not mounted", mnt)
	}
	fusetest.CompareTrees(t, src, mnt, fusetest.Compare{Xattrs: true, Ignore: []string{"lost+found"}})
	proc.stop(t)
	if fusetest.IsMounted(t, mnt) {
		t.Errorf("%s still mounted after SIGTERM", mnt)
	}
	if !strings.Contains(proc.stderr.String(), "unmounted") {
		t.Errorf("no unmount log line:\n%s", proc.stderr)
	}
}

// TestMountPlainFormat: a headerless image made with --format plain needs
// --format plain to mount, and says so when it is missing.
func TestMountPlainFormat(t *testing.T) {
	testenv.RequireTools(t, "mkfs.ext4", "debugfs")
	src := testSource(t)
	dir := t.TempDir()
	key := writeKey(t, dir, 64)
	img := filepath.Join(dir, "image.plain")
	if _, stderr, code := blobseal(t, "image", "create", "--format", "plain", "--from", src, "--key-file", key, img); code != 0 {
		t.Fatalf("image create --format plain: exit %d: %s", code, stderr)
	}
	_, stderr, code := blobseal(t, "mount", "--key-file", key, img, t.TempDir())
	if code != 1 || !strings.Contains(stderr, "--format plain") {
		t.Errorf("mount of a plain image without --format: exit %d, stderr %q", code, stderr)
	}
	// Straight from the file here; the other tests read through the cache.
	proc, mnt := startMount(t, "--format", "plain", "--cache-local=false", "--key-file", key, img, filepath.Join(dir, "mnt"))
	fusetest.CompareTrees(t, src, mnt, fusetest.Compare{Xattrs: true, Ignore: []string{"lost+found"}})
	proc.stopWith(t, os.Interrupt) // Ctrl-C unmounts as cleanly as SIGTERM
	if fusetest.IsMounted(t, mnt) {
		t.Errorf("%s still mounted after SIGINT", mnt)
	}
}

// TestCryptsetupImageThroughBinary: an image cryptsetup encrypted (Azure
// tooling parameters) mounts and checks unchanged; damage planted with
// debugfs (a wrong link count, a broken extent header) makes image check
// exit 1 naming the paths, while the mount stays up and serves the rest.
func TestCryptsetupImageThroughBinary(t *testing.T) {
	tools := testenv.RequireTools(t, "cryptsetup", "debugfs")
	src := testSource(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "img")
	size, err := image.MakeExt4(context.Background(), src, img, image.MakeOptions{})
	if err != nil {
		t.Fatal(err)
	}
	key := filepath.Join(dir, "key")
	if err := os.WriteFile(key, random(t, 32), 0o600); err != nil {
		t.Fatal(err)
	}
	// Damage: big has two names but claims five, and the nested file
	// loses its extent header.
	script := "sif /big links_count 5\nsif /dir/sub/file block[0] 0\n"
	cmd := exec.Command(tools[1], "-w", "-f", "-", img)
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("debugfs: %v: %s", err, out)
	}
	cryptsetupEncrypt(t, tools[0], img, size, key)

	stdout, stderr, code := blobseal(t, "image", "check", "--key-file", key, img)
	if code != 1 {
		t.Errorf("image check of a damaged image: exit %d, want 1; stderr:\n%s", code, stderr)
	}
	for _, want := range []string{"link count 5 but 2 names", "/dir/sub/file"} {
		if !strings.Contains(stderr, want) {
			t.Errorf("image check stderr lacks %q:\n%s", want, stderr)
		}
	}
	if !strings.Contains(stdout, " /names/sp ace") && !strings.Contains(stdout, `"/names/sp ace"`) {
		t.Errorf("manifest of the undamaged part is missing entries:\n%s", stdout)
	}

	proc, mnt := startMount(t, "--key-file", key, img, filepath.Join(dir, "mnt"))
	if _, err := os.ReadFile(filepath.Join(mnt, "dir", "sub", "file")); !errors.Is(err, syscall.EIO) {
		t.Errorf("read of the damaged file: %v, want EIO", err)
	}
	want, _ := os.ReadFile(filepath.Join(src, "big"))
	if got, err := os.ReadFile(filepath.Join(mnt, "big")); err != nil || !bytes.Equal(got, want) {
		t.Errorf("undamaged file through the mount: %d bytes, %v", len(got), err)
	}
	proc.stop(t)
	if !strings.Contains(proc.stderr.String(), "inode=") {
		t.Errorf("no log line naming the damaged inode:\n%s", proc.stderr)
	}
}

// cryptsetupEncrypt encrypts the ext4 image img (size bytes) in place with
// cryptsetup and the Azure tooling's parameters: LUKS2, aes-xts-plain64,
// 4096-byte sectors, pbkdf2 with 1000 iterations.
func cryptsetupEncrypt(t *testing.T, cryptsetup, img string, size int64, key string) {
	t.Helper()
	if err := os.Truncate(img, size+32<<20); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(cryptsetup, "reencrypt", "--encrypt", "--batch-mode", "--type", "luks2",
		"--cipher", "aes-xts-plain64", "--sector-size", "4096", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
		"--reduce-device-size", "32M", "--key-file", key, img).CombinedOutput(); err != nil {
		t.Fatalf("cryptsetup reencrypt: %v: %s", err, out)
	}
}

// TestMountErrors: bad usage exits 2, bad input exits 1 with a message
// naming what to fix, and nothing is left mounted.
func TestMountErrors(t *testing.T) {
	testenv.RequireTools(t, "mkfs.ext4", "debugfs")
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	writeTestFile(t, filepath.Join(src, "f"), []byte("x"), 0o644)
	key := filepath.Join(dir, "key")
	if err := os.WriteFile(key, random(t, 32), 0o600); err != nil {
		t.Fatal(err)
	}
	wrong := filepath.Join(dir, "wrong")
	if err := os.WriteFile(wrong, random(t, 32), 0o600); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "img")
	if _, stderr, code := blobseal(t, "image", "create", "--from", src, "--key-file", key, img); code != 0 {
		t.Fatalf("image create: %s", stderr)
	}
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		args []string
		code int
		want string
	}{
		{[]string{"mount", img, mnt}, 2, "--key-file"},
		{[]string{"mount", "--key-file", key, img}, 2, "MOUNTPOINT"},
		{[]string{"mount", "--key-file", key, "--log-format", "xml", img, mnt}, 2, "--log-format"},
		{[]string{"mount", "--key-file", key, "--read-timeout", "0s", img, mnt}, 2, "--read-timeout 0s: must be a positive duration"},
		{[]string{"mount", "--key-file", key, "--read-timeout", "soon", img, mnt}, 2, "--read-timeout"},
		{[]string{"mount", "--key-file", key, "--request-timeout", "-1s", img, mnt}, 2, "--request-timeout -1s"},
		{[]string{"mount", "--key-file", key, "--interrupt-grace", "0", img, mnt}, 2, "--interrupt-grace"},
		{[]string{"mount", "--key-file", key, "--retries", "0", img, mnt}, 2, "--retries 0: must be between 1 and 1000"},
		{[]string{"mount", "--key-file", key, "--retries", "many", img, mnt}, 2, "--retries"},
		{[]string{"mount", "--key-file", key, filepath.Join(dir, "missing"), mnt}, 1, "missing"},
		{[]string{"mount", "--cache-local=false", "--key-file", key, filepath.Join(dir, "missing"), mnt}, 1, "does not exist"},
		{[]string{"mount", "--key-file", filepath.Join(dir, "nokey"), img, mnt}, 1, "key file"},
		{[]string{"mount", "--key-file", wrong, img, mnt}, 1, "key"},
		{[]string{"mount", "--key-file", key, img, filepath.Join(dir, "nomnt")}, 1, "mount point"},
		{[]string{"image", "create", "--from", src, "--key-file", key, "--sector-size", "4096", "--block-size", "1024", img + "2"}, 2, "--sector-size"},
		{[]string{"image", "create", "--from", filepath.Join(dir, "nosrc"), "--key-file", key, img + "3"}, 1, "source directory"},
		{[]string{"image", "check", "--key-file", wrong, img}, 1, "key"},
	}
	for _, c := range cases {
		_, stderr, code := blobseal(t, c.args...)
		if code != c.code || !strings.Contains(stderr, c.want) {
			t.Errorf("blobseal %q: exit %d, stderr %q; want exit %d mentioning %q", c.args, code, stderr, c.code, c.want)
		}
		if bytes.Contains([]byte(stderr), []byte("panic")) {
			t.Errorf("blobseal %q panicked: %s", c.args, stderr)
		}
	}
	if fusetest.IsMounted(t, mnt) {
		t.Errorf("%s mounted after failed commands", mnt)
	}
	for _, p := range []string{img + "2", img + "3"} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("failed create left %s behind (%v)", p, err)
		}
	}
}

// TestMountBlobURL serves an image kept in blob storage (Azurite, the real
// storage server), as a page blob and as a block blob: blob.Open, the block
// cache and decryption sit under the same FUSE tree.
func TestMountBlobURL(t *testing.T) {
	testenv.RequireTools(t, "mkfs.ext4", "debugfs")
	az := testenv.StartAzurite(t)
	src := testSource(t)
	dir := t.TempDir()
	key := filepath.Join(dir, "key")
	if err := os.WriteFile(key, random(t, 32), 0o600); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "image.luks")
	if _, stderr, code := blobseal(t, "image", "create", "--from", src, "--key-file", key, img); code != 0 {
		t.Fatalf("image create: %s", stderr)
	}
	for _, typ := range []string{"page", "block"} {
		t.Run(typ, func(t *testing.T) {
			url := az.Endpoint() + "/images/" + typ + ".img"
			t.Setenv("AZURE_STORAGE_CONNECTION_STRING", az.ConnectionString())
			// 1 MiB blocks: a block blob of many blocks.
			stdout, stderr, code := blobseal(t, "image", "upload", "--json", "--type", typ, "--block-size", "1", "--create-container", img, url)
			if code != 0 {
				t.Fatalf("image upload: %s", stderr)
			}
			var sum uploadJSON
			if err := json.Unmarshal([]byte(stdout), &sum); err != nil || sum.Type != typ || !sum.Verified || sum.ETag == "" ||
				sum.Uploaded <= 0 || sum.Uploaded > sum.Size || sum.Requests <= 0 {
				t.Fatalf("image upload --json: %v\n%s", err, stdout)
			}
			if fi, err := os.Stat(img); err != nil || fi.Size() != sum.Size {
				t.Fatalf("upload summary size %d, image %v", sum.Size, fi)
			}
			if strings.ContainsAny(stderr, "\r\x1b") {
				t.Errorf("progress drawn on a stderr that is not a terminal: %q", stderr)
			}
			proc, mnt := startMount(t, "--key-file", key, url, filepath.Join(t.TempDir(), "mnt"))
			fusetest.CompareTrees(t, src, mnt, fusetest.Compare{Xattrs: true, Ignore: []string{"lost+found"}})
			proc.stop(t)
			log := proc.stderr.String()
			if strings.Contains(log, "AccountKey") {
				t.Errorf("credential in the log:\n%s", log)
			}
			// The exit statistics count what reading the tree cost.
			m := regexp.MustCompile(`msg="image statistics" requests=(\d+) bytes_fetched=(\d+)`).FindStringSubmatch(log)
			if m == nil || m[1] == "0" || m[2] == "0" {
				t.Errorf("no statistics line with requests and bytes on exit:\n%s", log)
			}
		})
	}
}

// TestMountBusyAtSignal: a file held open through the mount keeps it busy;
// on SIGTERM the command retries for --unmount-grace, then detaches lazily
// and exits 1 saying so, and the mount point is free again.
func TestMountBusyAtSignal(t *testing.T) {
	testenv.RequireTools(t, "mkfs.ext4", "debugfs")
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	writeTestFile(t, filepath.Join(src, "held"), []byte("held open"), 0o644)
	key := filepath.Join(dir, "key")
	if err := os.WriteFile(key, random(t, 32), 0o600); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "img")
	if _, stderr, code := blobseal(t, "image", "create", "--from", src, "--key-file", key, img); code != 0 {
		t.Fatalf("image create: %s", stderr)
	}
	proc, mnt := startMount(t, "--unmount-grace", "500ms", "--key-file", key, img, filepath.Join(dir, "mnt"))
	held, err := os.Open(filepath.Join(mnt, "held"))
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	if err := proc.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-proc.done:
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() != 1 || !strings.Contains(proc.stderr.String(), "lazily") {
			t.Errorf("busy mount at SIGTERM: %v, stderr:\n%s\nwant exit 1 reporting a lazy detach", err, proc.stderr)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("blobseal mount did not exit 20s after SIGTERM on a busy mount")
	}
	if fusetest.IsMounted(t, mnt) {
		t.Errorf("%s still mounted after lazy detach", mnt)
	}
}

// TestMountWithKeyRelease: `blobseal mount` gets the image key by secure
// key release from a running dev stack (simulated SEV-SNP evidence, local
// MAA and vault) instead of a key file, serves the image, and refuses —
// naming the claim, mounting nothing — when the attested HOST_DATA is not
// the one the key's release policy demands.
func TestMountWithKeyRelease(t *testing.T) {
	testenv.RequireTools(t, "mkfs.ext4", "debugfs")
	testenv.RequireFUSE(t)
	dev := startDevStack(t)
	dir := t.TempDir()
	src := testSource(t)
	keyBytes := random(t, 32)
	key := filepath.Join(dir, "key")
	if err := os.WriteFile(key, keyBytes, 0o600); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "image.luks")
	if _, stderr, code := blobseal(t, "image", "create", "--from", src, "--key-file", key, img); code != 0 {
		t.Fatalf("image create: exit %d: %s", code, stderr)
	}
	hostData := strings.Repeat("5a", 32)
	if err := runIn(context.Background(), "key", "import", "--dev-dir", dev, "--key-name", "fs-key", "--key-file", key, "--host-data", hostData); err != nil {
		t.Fatal(err)
	}
	release := []string{"--dev-dir", dev, "--key-name", "fs-key", "--attestation", "simulated"}

	mnt := filepath.Join(dir, "mnt")
	proc, got := startMount(t, append(release, "--simulated-host-data", hostData, img, mnt)...)
	if !fusetest.IsMounted(t, got) {
		t.Fatalf("ready, but %s is not mounted", got)
	}
	fusetest.CompareTrees(t, src, got, fusetest.Compare{Xattrs: true, Ignore: []string{"lost+found"}})
	proc.stop(t)
	logs := proc.stderr.String()
	if !strings.Contains(logs, "SIMULATED") {
		t.Errorf("simulated attestation not logged:\n%s", logs)
	}
	if strings.Contains(logs, hex.EncodeToString(keyBytes)) || strings.Contains(logs, base64.RawURLEncoding.EncodeToString(keyBytes)) {
		t.Errorf("the released key appears in the log:\n%s", logs)
	}

	// Another container group's HOST_DATA: the vault refuses, nothing mounts.
	mnt2 := filepath.Join(dir, "mnt2")
	if err := os.Mkdir(mnt2, 0o755); err != nil {
		t.Fatal(err)
	}
	_, stderr, code := blobseal(t, append(append([]string{"mount"}, release...), "--simulated-host-data", strings.Repeat("77", 32), img, mnt2)...)
	if code != 1 || !strings.Contains(stderr, "x-ms-sevsnpvm-hostdata") {
		t.Errorf("release with the wrong HOST_DATA: exit %d, stderr %q; want exit 1 naming x-ms-sevsnpvm-hostdata", code, stderr)
	}
	if fusetest.IsMounted(t, mnt2) {
		t.Errorf("%s mounted although the key release was refused", mnt2)
	}

	usage := []struct {
		args []string
		want string
	}{
		{append([]string{"mount", "--key-file", key}, append(release, img, mnt2)...), "not both"},
		{[]string{"mount", "--key-name", "fs-key", img, mnt2}, "--vault"},
		{[]string{"mount", "--dev-dir", dev, "--key-name", "fs-key", "--simulated-host-data", "zz", "--attestation", "simulated", img, mnt2}, "--simulated-host-data"},
		{[]string{"mount", "--dev-dir", dev, "--key-name", "fs-key", "--simulated-host-data", hostData, img, mnt2}, "--attestation simulated"},
	}
	for _, c := range usage {
		_, stderr, code := blobseal(t, c.args...)
		if code != 2 || !strings.Contains(stderr, c.want) {
			t.Errorf("blobseal %q: exit %d, stderr %q; want exit 2 mentioning %q", c.args, code, stderr, c.want)
		}
	}
}
