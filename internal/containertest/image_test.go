package containertest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/blobseal/blobseal/crypto"
	"github.com/blobseal/blobseal/image"
	"github.com/blobseal/blobseal/internal/fusetest"
	"github.com/blobseal/blobseal/internal/testenv"
	"github.com/blobseal/blobseal/keyrelease/evidence"
	"github.com/blobseal/blobseal/keyrelease/localmaa"
)

const repo = "../.."

func TestParseDockerfile(t *testing.T) {
	f, err := os.Open(filepath.Join(repo, "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b, err := ParseDockerfile(f, map[string]string{"VERSION": "v9", "TARGETARCH": "arm64"})
	if err != nil {
		t.Fatal(err)
	}
	line := strings.Join(append(b.Env, b.Args...), " ")
	for _, want := range []string{"CGO_ENABLED=0", "GOOS=linux", "GOARCH=arm64", "-X main.version=v9", "-trimpath", "./cmd/blobseal"} {
		if !strings.Contains(line, want) {
			t.Errorf("build line %q lacks %q", line, want)
		}
	}
	if b.Out != Binary && b.Out != "/out"+Binary {
		t.Errorf("binary built to %s", b.Out)
	}
	for _, bad := range []string{
		"FROM x\n",
		"RUN go build -o a .\nRUN go build -o b .\n",
		"RUN X=1 go build -ldflags \"$UNDECLARED\" -o a .\n",
		"RUN go build -o a . && rm -rf /\n",
	} {
		if _, err := ParseDockerfile(strings.NewReader(bad), nil); err == nil {
			t.Errorf("%q parsed", bad)
		}
	}
}

// TestImageRoot builds the binary exactly as the Dockerfile does and runs
// it chrooted into a root holding only that binary, the CA bundle and
// the devices (/dev/fuse, the runtime's /dev/null...): it starts, opens,
// decrypts and verifies an image, trusts a TLS server through the bundle at
// distroless's path and nothing else, and mounts the image without
// fusermount3, serving it until SIGTERM.
func TestImageRoot(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTools(t, "mkfs.ext4", "debugfs", "go")
	f, err := os.Open(filepath.Join(repo, "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	build, err := ParseDockerfile(f, map[string]string{"VERSION": "containertest", "TARGETOS": runtime.GOOS, "TARGETARCH": runtime.GOARCH})
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(t.TempDir(), "blobseal")
	if out, err := build.Build(repo, bin); err != nil {
		t.Fatalf("go build as the Dockerfile does: %v\n%s", err, out)
	}
	st, err := os.Stat(bin)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("binary: %d bytes (%.1f MiB)", st.Size(), float64(st.Size())/(1<<20))
	checkStatic(t, bin)

	// An image with a verity tree, its key, and a local attestation
	// service whose CA is only in the bundle.
	src := t.TempDir()
	files := map[string][]byte{"model.bin": make([]byte, 300<<10), "config/settings.json": []byte(`{"a":1}`)}
	rand.Read(files["model.bin"])
	for name, data := range files {
		os.MkdirAll(filepath.Dir(filepath.Join(src, name)), 0o755)
		if err := os.WriteFile(filepath.Join(src, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	key := make([]byte, 32)
	rand.Read(key)
	imgPath := filepath.Join(t.TempDir(), "data.img")
	res, err := image.Create(context.Background(), image.CreateOptions{From: src, Out: imgPath, Key: key, Crypto: crypto.FormatOptions{Format: "luks2"}})
	if err != nil {
		t.Fatal(err)
	}
	sim, err := evidence.NewSimulated(evidence.SimulatedConfig{})
	if err != nil {
		t.Fatal(err)
	}
	maa, err := localmaa.New(localmaa.Options{Roots: sim.Roots()})
	if err != nil {
		t.Fatal(err)
	}
	endpoint, err := maa.Start("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { maa.Close() })

	makeRoot := func(caPEM []byte) string {
		root := t.TempDir()
		if err := MakeRoot(root, bin, caPEM); err != nil {
			t.Fatal(err)
		}
		// The test's inputs: the image and its key, and the simulated
		// AMD signer (in a sidecar these come from storage and the HSM).
		img, _ := os.ReadFile(imgPath)
		must(t, os.WriteFile(filepath.Join(root, "data.img"), img, 0o644))
		must(t, os.WriteFile(filepath.Join(root, "key"), key, 0o600))
		must(t, os.Mkdir(filepath.Join(root, "signer"), 0o700))
		if _, err := evidence.WriteSimulatedSigner(filepath.Join(root, "signer"), sim); err != nil {
			t.Fatal(err)
		}
		return root
	}
	root := makeRoot(maa.CAPEM())

	out, errOut, err := chrootRun(root, Binary, "--version")
	if err != nil || out != "blobseal containertest\n" {
		t.Fatalf("--version: %q, %v\n%s", out, err, errOut)
	}

	out, errOut, err = chrootRun(root, Binary, "image", "check", "--key-file", "/key", "--verity-root-hash", res.Verity.RootHash, "/data.img")
	if err != nil {
		t.Fatalf("image check in the image root: %v\n%s", err, errOut)
	}
	for name, data := range files {
		sum := sha256.Sum256(data)
		if !strings.Contains(out, hex.EncodeToString(sum[:])+" /"+name+"\n") {
			t.Errorf("manifest lacks %s with its digest:\n%s", name, out)
		}
	}

	attest := []string{"attest", "--maa-endpoint", endpoint, "--attestation", "simulated", "--simulated-dir", "/signer", "--json"}
	out, errOut, err = chrootRun(root, append([]string{Binary}, attest...)...)
	if err != nil {
		t.Fatalf("attest in the image root: %v\n%s", err, errOut)
	}
	var claims map[string]any
	if err := json.Unmarshal([]byte(out), &claims); err != nil || claims["x-ms-attestation-type"] != "sevsnpvm" {
		t.Fatalf("attest claims: %v\n%s", err, out)
	}
	// Control: without the CA in the bundle the same call is refused, so
	// the binary's trust came from the bundle's path.
	other := makeRoot([]byte("# empty bundle\n"))
	if _, errOut, err := chrootRun(other, append([]string{Binary}, attest...)...); err == nil || !strings.Contains(errOut, "certificate") {
		t.Fatalf("attest trusted the service without its CA in the bundle: %v\n%s", err, errOut)
	}

	mountInRoot(t, root, res.Verity.RootHash, files)
}

// mountInRoot runs `/blobseal mount` chrooted into root (no fusermount3
// there: the binary calls mount(2) itself), reads the image's files through
// the mount point from outside the chroot, and unmounts with SIGTERM as a
// container runtime stops the container; nothing stays mounted.
func mountInRoot(t *testing.T, root, rootHash string, files map[string][]byte) {
	testenv.RequireFUSE(t)
	must(t, os.Mkdir(filepath.Join(root, "mnt"), 0o755))
	mnt := filepath.Join(root, "mnt") // the mount point as seen from outside
	cmd := chrootCommand(root, Binary, "mount", "--key-file", "/key", "--verity-root-hash", rootHash, "/data.img", "/mnt")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var errOut syncBuffer
	cmd.Stderr = &errOut
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ready := make(chan string, 1)
	exited := make(chan error, 1)
	go func() {
		line, _ := bufio.NewReader(stdout).ReadString('\n')
		ready <- line
		io.Copy(io.Discard, stdout)
		exited <- cmd.Wait()
	}()
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-exited:
			case <-time.After(15 * time.Second):
				_ = cmd.Process.Kill()
			}
		}
		if fusetest.IsMounted(t, mnt) {
			_ = unix.Unmount(mnt, unix.MNT_DETACH)
		}
	})
	select {
	case line := <-ready:
		if line != "ready\n" {
			t.Fatalf("mount in the image root printed %q; stderr:\n%s", line, errOut.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("mount in the image root not ready after 60s; stderr:\n%s", errOut.String())
	}
	for name, want := range files {
		got, err := os.ReadFile(filepath.Join(mnt, name))
		if err != nil {
			t.Fatalf("read %s through the mount: %v; stderr:\n%s", name, err, errOut.String())
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s through the mount differs from the source", name)
		}
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("mount in the image root exited with %v after SIGTERM; stderr:\n%s", err, errOut.String())
		}
	case <-time.After(15 * time.Second):
		t.Fatalf("mount in the image root still running 15s after SIGTERM")
	}
	if fusetest.IsMounted(t, mnt) {
		t.Errorf("%s still mounted after SIGTERM", mnt)
	}
}

// syncBuffer is a bytes.Buffer safe for the exec copier and the test.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// chrootRun runs argv chrooted into root with an empty environment, as a
// distroless container's entrypoint runs.
func chrootRun(root string, argv ...string) (string, string, error) {
	cmd := chrootCommand(root, argv...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	return out.String(), errOut.String(), err
}

// chrootCommand is argv chrooted into root with an empty environment.
func chrootCommand(root string, argv ...string) *exec.Cmd {
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Path = argv[0]
	cmd.Dir = "/"
	cmd.Env = []string{}
	cmd.SysProcAttr = &syscall.SysProcAttr{Chroot: root}
	return cmd
}

// checkStatic fails unless bin needs no dynamic loader and no shared
// library: it must run on an image without libc.
func checkStatic(t *testing.T, bin string) {
	t.Helper()
	f, err := elf.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP || p.Type == elf.PT_DYNAMIC {
			t.Fatalf("%s is dynamically linked (program header %v)", bin, p.Type)
		}
	}
	if libs, _ := f.ImportedLibraries(); len(libs) > 0 {
		t.Fatalf("%s needs shared libraries %v", bin, libs)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
