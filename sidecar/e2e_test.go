package sidecar_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/blobseal/blobseal/blob"
	"github.com/blobseal/blobseal/image"
	"github.com/blobseal/blobseal/internal/secret"
	"github.com/blobseal/blobseal/internal/testenv"
	"github.com/blobseal/blobseal/keyrelease/localstack"
)

// binary is cmd/blobseal built once by TestMain: the tests run the real
// command, as a container runtime would.
var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "blobseal-sidecar-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "blobseal")
	out, err := exec.Command("go", "build", "-o", binary, "../cmd/blobseal").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "build cmd/blobseal: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

const demoData = "../examples/demo-data"

// env is the local stack, Azurite and one image uploaded as a page and a
// block blob, its key imported with a policy bound to hostData.
type env struct {
	stack    *localstack.Stack
	azurite  *testenv.Azurite
	dir      string
	hostData [32]byte
	urls     map[string]string // page, block → blob URL
	root     string            // the image's verity root hash
	// roots overrides the verity_root_hash legacyArgs puts in each entry
	// (by blob type; "" leaves the field out, as existing configs do).
	roots map[string]string
	key   secret.Bytes // the filesystem key the key service releases
	// readWrite sets read_write in legacyArgs' entries.
	readWrite bool
}

func setup(t *testing.T) *env {
	testenv.RequireFUSE(t)
	testenv.RequireTools(t, "mkfs.ext4", "azurite-blob")
	e := &env{dir: t.TempDir(), hostData: sha256.Sum256([]byte("package policy\n# sidecar test\n")), urls: map[string]string{}}
	var err error
	if e.stack, err = localstack.Start(localstack.Options{SignerDir: filepath.Join(e.dir, "signer")}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.stack.Close)
	if _, err := e.stack.WriteStackFile(e.dir); err != nil {
		t.Fatal(err)
	}
	e.azurite = testenv.StartAzurite(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	key := make(secret.Bytes, 32)
	rand.Read(key)
	e.key = key
	img := filepath.Join(e.dir, "demo.img")
	res, err := image.Create(ctx, image.CreateOptions{From: demoData, Out: img, Key: key})
	if err != nil {
		t.Fatal(err)
	}
	e.root = res.Verity.RootHash
	// The page blob's entry pins the root (blobseal's optional field); the
	// block blob's is an existing configuration, unchanged.
	e.roots = map[string]string{"page": e.root, "block": ""}
	if err := e.stack.ImportOctKey(ctx, "fs-key", key, e.hostData); err != nil {
		t.Fatal(err)
	}
	for _, typ := range []string{"page", "block"} {
		u := e.azurite.Endpoint() + "/images/demo-" + typ + ".img"
		if _, err := blob.Upload(ctx, img, u, blob.UploadOptions{Options: blob.Options{ConnectionString: e.azurite.ConnectionString()},
			Type: typ, CreateContainer: true}); err != nil {
			t.Fatal(err)
		}
		e.urls[typ] = u
	}
	return e
}

// legacyArgs is the Azure encfs sidecar's EncfsSideCarArgs for the given
// mount points, with bare-host endpoints as existing deployments have them.
func (e *env) legacyArgs(t *testing.T, mounts map[string]string) string {
	host := func(s string) string {
		u, err := url.Parse(s)
		if err != nil {
			t.Fatal(err)
		}
		return u.Host
	}
	var fss []map[string]any
	for _, typ := range []string{"page", "block"} {
		mp, ok := mounts[typ]
		if !ok {
			continue
		}
		entry := map[string]any{
			"mount_point": mp, "azure_url": e.urls[typ], "azure_url_private": false, "read_write": e.readWrite, // private means managed identity; Azurite takes the shared key from the environment
			"key": map[string]any{"kid": "fs-key", "kty": "oct-HSM",
				"authority": map[string]any{"endpoint": host(e.stack.MAAEndpoint)},
				"akv":       map[string]any{"endpoint": host(e.stack.VaultURL), "bearer_token": e.stack.Bearer.Reveal()}},
		}
		if root := e.roots[typ]; root != "" {
			entry["verity_root_hash"] = root
		}
		if typ == "page" { // blobseal's optional field; the block entry goes without
			entry["read_timeout"] = "90s"
		}
		fss = append(fss, entry)
	}
	js, err := json.Marshal(map[string]any{"azure_filesystems": fss})
	if err != nil {
		t.Fatal(err)
	}
	return base64.StdEncoding.EncodeToString(js)
}

func (e *env) command(args string, hostData [32]byte, extra ...string) *exec.Cmd {
	cmd := exec.Command(binary, append([]string{"sidecar", "--attestation", "simulated", "--simulated-dir", filepath.Join(e.dir, "signer"),
		"--simulated-host-data", hex.EncodeToString(hostData[:]), "--ca-file", filepath.Join(e.dir, "ca.pem"),
		"--health-address", "off"}, extra...)...)
	cmd.Env = append(os.Environ(), "EncfsSideCarArgs="+args, "AZURE_STORAGE_CONNECTION_STRING="+e.azurite.ConnectionString())
	return cmd
}

func waitFile(t *testing.T, path string, exited <-chan error, stderr fmt.Stringer) {
	t.Helper()
	deadline := time.After(90 * time.Second)
	for {
		if _, err := os.Stat(path); err == nil {
			return
		}
		select {
		case err := <-exited:
			t.Fatalf("sidecar exited before %s appeared: %v\n%s", path, err, stderr)
		case <-deadline:
			t.Fatalf("%s did not appear within 90s", path)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// sameTree compares every file and directory under got with want, byte for byte.
func sameTree(t *testing.T, want, got string) {
	t.Helper()
	n := 0
	err := filepath.WalkDir(want, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(want, p)
		gp := filepath.Join(got, rel)
		if d.IsDir() {
			fi, err := os.Stat(gp)
			if err != nil || !fi.IsDir() {
				return fmt.Errorf("directory %s missing in the mount: %v", rel, err)
			}
			return nil
		}
		a, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		b, err := os.ReadFile(gp)
		if err != nil {
			return fmt.Errorf("read %s through the mount: %w", rel, err)
		}
		if !bytes.Equal(a, b) {
			return fmt.Errorf("%s differs through the mount", rel)
		}
		n++
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if n == 0 {
		t.Fatal("no files compared")
	}
}

func notMounted(t *testing.T, dir string) {
	t.Helper()
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(mi), dir) {
		t.Fatalf("a mount under %s is left:\n%s", dir, mi)
	}
}

// TestLegacyTwoMountsAndSIGTERM: the legacy config with a page blob and a
// block blob; both trees are readable and equal the source; SIGTERM exits 0,
// unpublishes the mount points and leaves nothing mounted. Logs at debug
// level never hold the key service's bearer token.
func TestLegacyTwoMountsAndSIGTERM(t *testing.T) {
	e := setup(t)
	mnt := t.TempDir()
	mounts := map[string]string{"page": filepath.Join(mnt, "share1"), "block": filepath.Join(mnt, "share2")}
	ready := filepath.Join(mnt, "ready")
	cmd := e.command(e.legacyArgs(t, mounts), e.hostData, "--ready-file", ready, "--log-level", "debug")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			<-exited
		}
	}()
	waitFile(t, ready, exited, &stderr)
	for _, mp := range mounts {
		sameTree(t, demoData, mp)
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("exit after SIGTERM: %v\n%s", err, stderr.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatal("sidecar did not exit within 30s of SIGTERM")
	}
	for _, mp := range mounts {
		if _, err := os.Lstat(mp); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("mount point %s still published after SIGTERM (err %v)", mp, err)
		}
	}
	notMounted(t, mnt)
	if got := strings.Count(stderr.String(), "integrity=\"verity root "+e.root); got != 1 {
		t.Errorf("%d filesystems report verified integrity, want 1 (the page blob's):\n%s", got, stderr.String())
	}
	if !strings.Contains(stderr.String(), "no verity root hash configured") {
		t.Error("the filesystem without a root hash logged no warning")
	}
	if strings.Contains(stderr.String(), e.stack.Bearer.Reveal()) {
		t.Error("debug log holds the bearer token")
	}
	if !strings.Contains(stderr.String(), "level=DEBUG") {
		t.Error("no debug lines logged: the secret check above proves nothing")
	}
}

// TestDeniedRelease: the VM's host data does not match the key's policy;
// nothing is mounted, the exit is non-zero and stderr names the claim.
func TestDeniedRelease(t *testing.T) {
	e := setup(t)
	mnt := t.TempDir()
	mp := filepath.Join(mnt, "share")
	stderr := mustFail(t, e.command(e.legacyArgs(t, map[string]string{"page": mp}), sha256.Sum256([]byte("another policy"))), mnt, mp)
	if !strings.Contains(stderr, "x-ms-sevsnpvm-hostdata") {
		t.Errorf("stderr does not name the refused claim:\n%s", stderr)
	}
}

// mustFail runs a sidecar that must exit non-zero without publishing mp or
// leaving anything mounted under mnt; it returns the sidecar's stderr.
func mustFail(t *testing.T, cmd *exec.Cmd, mnt, mp string) string {
	t.Helper()
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	done := make(chan error, 1)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err == nil {
			t.Fatalf("sidecar exited 0; stderr:\n%s", stderr.String())
		}
	case <-time.After(90 * time.Second):
		cmd.Process.Kill()
		t.Fatal("sidecar did not exit within 90s")
	}
	if _, err := os.Lstat(mp); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("mount point %s exists after a failure (err %v)", mp, err)
	}
	notMounted(t, mnt)
	return stderr.String()
}

// TestWrongRootRefused: the configuration pins another image's root (an
// older image rolled back in storage looks the same): nothing is mounted,
// the exit is non-zero and stderr says which check failed.
func TestWrongRootRefused(t *testing.T) {
	e := setup(t)
	e.roots["page"] = strings.Repeat("ab", 32)
	mnt := t.TempDir()
	mp := filepath.Join(mnt, "share")
	stderr := mustFail(t, e.command(e.legacyArgs(t, map[string]string{"page": mp}), e.hostData), mnt, mp)
	for _, want := range []string{"does not match the pinned root hash", "rolled back"} {
		if !strings.Contains(stderr, want) {
			t.Errorf("stderr does not say %q:\n%s", want, stderr)
		}
	}
}
