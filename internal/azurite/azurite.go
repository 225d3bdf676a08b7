// Package azurite runs Azurite, the Azure Blob Storage emulator, as a child
// process bound to 127.0.0.1 with telemetry off (it otherwise tries to reach
// the internet). Tests, the demo and benchmarks start it here.
package azurite

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"syscall"
	"time"
)

// The emulator's well-known development account.
const (
	Account = "devstoreaccount1"
	Key     = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)

// Binary is the blob-only Azurite command (npm package azurite).
const Binary = "azurite-blob"

// ErrNotInstalled reports that azurite-blob is not on PATH.
var ErrNotInstalled = errors.New("azurite-blob not found: install it with `npm install -g azurite@3.35.0` (scripts/install-deps.sh does)")

// Server is a running (or stopped, restartable) Azurite blob service.
type Server struct {
	Port    int
	dataDir string
	bin     string

	mu  sync.Mutex
	cmd *exec.Cmd
}

// New prepares a server on a free loopback port keeping its data in dataDir.
func New(dataDir string) (*Server, error) {
	bin, err := exec.LookPath(Binary)
	if err != nil {
		return nil, ErrNotInstalled
	}
	port, err := FreePort()
	if err != nil {
		return nil, err
	}
	return &Server{Port: port, dataDir: dataDir, bin: bin}, nil
}

// Endpoint is the blob service URL, http://127.0.0.1:PORT/devstoreaccount1.
func (a *Server) Endpoint() string {
	return fmt.Sprintf("http://127.0.0.1:%d/%s", a.Port, Account)
}

// ConnectionString is the shared-key connection string for this instance.
func (a *Server) ConnectionString() string {
	return fmt.Sprintf("DefaultEndpointsProtocol=http;AccountName=%s;AccountKey=%s;BlobEndpoint=%s;", Account, Key, a.Endpoint())
}

// Start (re)starts the process and waits until it accepts connections.
func (a *Server) Start(ctx context.Context) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cmd != nil {
		return nil
	}
	if err := os.MkdirAll(a.dataDir, 0o755); err != nil {
		return err
	}
	// --skipApiVersionCheck: azblob 1.8 sends an API version Azurite 3.35
	// does not know. --loose: ignore headers it does not implement.
	cmd := exec.Command(a.bin,
		"--blobHost", "127.0.0.1", "--blobPort", strconv.Itoa(a.Port), "--location", a.dataDir,
		"--disableTelemetry", "--skipApiVersionCheck", "--silent", "--loose")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start azurite: %w", err)
	}
	go func() { // drain so the process never blocks on a full pipe
		for s := bufio.NewScanner(stderr); s.Scan(); {
		}
	}()
	a.cmd = cmd
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(a.Port))
	for ctx.Err() == nil {
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	a.stopLocked()
	return fmt.Errorf("azurite did not listen on %s within 30s", addr)
}

// Stop kills the process; data stays for a later Start. Azurite persists
// metadata about every 5 s, so blobs written just before Stop may be lost.
func (a *Server) Stop() {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.stopLocked()
}

func (a *Server) stopLocked() {
	if a.cmd == nil {
		return
	}
	_ = syscall.Kill(-a.cmd.Process.Pid, syscall.SIGKILL)
	_ = a.cmd.Wait()
	a.cmd = nil
}

// PID returns the process id (0 when stopped), for CPU accounting.
func (a *Server) PID() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cmd == nil {
		return 0
	}
	return a.cmd.Process.Pid
}

// FreePort returns a currently unused loopback TCP port.
func FreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
