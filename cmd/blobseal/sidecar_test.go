package main

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"

	"github.com/blobseal/blobseal/keyrelease"
)

// logProcess is a running blobseal whose stderr (its log) is watched.
type logProcess struct {
	cmd  *exec.Cmd
	done chan error
	mu   sync.Mutex
	log  bytes.Buffer
	seen chan string  // log lines as they come
	out  bytes.Buffer // stdout, complete once the process has exited
}

// startLogged runs the binary with env added to the environment (and the
// sidecars' variables cleared unless given); the cleanup kills it if the
// test did not stop it.
func startLogged(t *testing.T, env []string, args ...string) *logProcess {
	t.Helper()
	p := &logProcess{cmd: exec.Command(binary, args...), done: make(chan error, 1), seen: make(chan string, 256)}
	p.cmd.Env = append(os.Environ(), "EncfsSideCarArgs=", "SkrSideCarArgs=")
	p.cmd.Env = append(p.cmd.Env, env...)
	p.cmd.Stdout = &p.out // exec copies into it; read only after Wait
	stderr, err := p.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		s := bufio.NewScanner(stderr)
		for s.Scan() {
			p.mu.Lock()
			p.log.WriteString(s.Text() + "\n")
			p.mu.Unlock()
			select {
			case p.seen <- s.Text():
			default:
			}
		}
		close(p.seen)
		p.done <- p.cmd.Wait()
	}()
	t.Cleanup(func() {
		if p.cmd.ProcessState == nil {
			_ = p.cmd.Process.Kill()
			<-p.done
		}
	})
	return p
}

func (p *logProcess) String() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.log.String()
}

// await returns the first log line matching re.
func (p *logProcess) await(t *testing.T, re *regexp.Regexp) []string {
	t.Helper()
	timeout := time.After(20 * time.Second)
	for {
		select {
		case line, ok := <-p.seen:
			if !ok {
				t.Fatalf("blobseal exited before logging %s; log:\n%s", re, p)
			}
			if m := re.FindStringSubmatch(line); m != nil {
				return m
			}
		case <-timeout:
			t.Fatalf("no log line matching %s in 20s; log:\n%s", re, p)
		}
	}
}

// stop sends SIGTERM and returns the exit code.
func (p *logProcess) stop(t *testing.T) int {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, os.ErrProcessDone) {
		t.Fatal(err)
	}
	select {
	case err := <-p.done:
		var exit *exec.ExitError
		if errors.As(err, &exit) {
			return exit.ExitCode()
		}
		if err != nil {
			t.Fatal(err)
		}
		return 0
	case <-time.After(15 * time.Second):
		t.Fatalf("blobseal ignored SIGTERM; log:\n%s", p)
	}
	return -1
}

var skrServing = regexp.MustCompile(`msg="SKR API serving".* address=(\S+)`)

// `blobseal sidecar --skr-address` with no filesystem serves the SKR API
// alone, wired to the same evidence, CA and vault as key release.
func TestSidecarSKRAddress(t *testing.T) {
	dev := startDevStack(t)
	st, err := readDevStack(dev)
	if err != nil {
		t.Fatal(err)
	}
	bearer, err := keyrelease.ReadBearerFile(st.BearerTokenFile)
	if err != nil {
		t.Fatal(err)
	}
	key := make([]byte, 32)
	rand.Read(key)
	keyFile := filepath.Join(t.TempDir(), "key")
	os.WriteFile(keyFile, key, 0o600)
	if _, stderr, code := blobseal(t, "key", "import", "--dev-dir", dev, "--key-name", "app-key", "--key-file", keyFile, "--host-data", strings.Repeat("0", 64)); code != 0 {
		t.Fatalf("key import: exit %d\n%s", code, stderr)
	}

	p := startLogged(t, nil, "sidecar", "--skr-address", "127.0.0.1:0", "--health-address", "off",
		"--attestation", "simulated", "--simulated-dir", filepath.Dir(st.SimulatedSignerFile), "--ca-file", st.CAPEMFile)
	base := "http://" + p.await(t, skrServing)[1]
	resp, err := http.Get(base + "/status")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("GET /status: %d", resp.StatusCode)
	}
	body := `{"maa_endpoint":"` + st.MAAEndpoint + `","akv_endpoint":"` + st.VaultURL + `","kid":"app-key","access_token":"` + bearer.Reveal() + `"}`
	resp, err = http.Post(base+"/key/release", "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	var out struct{ Key string }
	var jwk jose.JSONWebKey
	if resp.StatusCode != 200 || json.Unmarshal(raw, &out) != nil || jwk.UnmarshalJSON([]byte(out.Key)) != nil {
		t.Fatalf("POST /key/release: %d %s", resp.StatusCode, raw)
	}
	if k, ok := jwk.Key.([]byte); !ok || !bytes.Equal(k, key) {
		t.Fatal("the sidecar's SKR API released other bytes than the imported key")
	}
	if code := p.stop(t); code != 0 {
		t.Fatalf("exit %d after SIGTERM; log:\n%s", code, p)
	}
	if strings.Contains(p.String(), bearer.Reveal()) {
		t.Fatal("the log shows the bearer token")
	}
}

// SkrSideCarArgs alone turns the SKR API on at the Azure sidecar's address.
func TestSidecarSkrSideCarArgsAlone(t *testing.T) {
	p := startLogged(t, []string{"SkrSideCarArgs=" + kafkaSampleSkrArgs}, "sidecar", "--health-address", "off", "--attestation", "simulated")
	// 127.0.0.1:8080 may be taken on a shared machine: serving there or
	// failing to listen there both show where the API went.
	p.await(t, regexp.MustCompile(`SKR API serving.*address=127\.0\.0\.1:8080|listen on 127\.0\.0\.1:8080`))
	p.stop(t)

	// Without any configuration the sidecar names all three ways to give one.
	_, stderr, code := blobseal(t, "sidecar")
	if code != 2 || !strings.Contains(stderr, "--config FILE") || !strings.Contains(stderr, "--skr-address") {
		t.Fatalf("no configuration: exit %d\n%s", code, stderr)
	}
	// A broken SkrSideCarArgs is a usage error naming the variable.
	cmd := exec.Command(binary, "sidecar", "--health-address", "off")
	cmd.Env = append(os.Environ(), "EncfsSideCarArgs=", "SkrSideCarArgs=%%%")
	outb, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 2 || !strings.Contains(string(outb), "SkrSideCarArgs is not base64") {
		t.Fatalf("broken SkrSideCarArgs: %v\n%s", err, outb)
	}
}
