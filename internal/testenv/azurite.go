package testenv

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os/exec"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Azurite's well-known development account.
const (
	AzuriteAccount = "devstoreaccount1"
	AzuriteKey     = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)

// Azurite is a running Azurite blob service bound to 127.0.0.1.
type Azurite struct {
	Port    int
	dataDir string
	bin     string

	mu  sync.Mutex
	cmd *exec.Cmd
}

// Endpoint is the blob service URL, e.g. http://127.0.0.1:PORT/devstoreaccount1.
func (a *Azurite) Endpoint() string {
	return fmt.Sprintf("http://127.0.0.1:%d/%s", a.Port, AzuriteAccount)
}

// ConnectionString is the shared-key connection string for this instance.
func (a *Azurite) ConnectionString() string {
	return fmt.Sprintf("DefaultEndpointsProtocol=http;AccountName=%s;AccountKey=%s;BlobEndpoint=%s;",
		AzuriteAccount, AzuriteKey, a.Endpoint())
}

// StartAzurite starts a private Azurite blob service for the test on a free
// loopback port, with telemetry off, and stops it at cleanup.
func StartAzurite(t testing.TB) *Azurite {
	t.Helper()
	bin := RequireTools(t, "azurite-blob")[0]
	a := &Azurite{Port: freePort(t), dataDir: t.TempDir(), bin: bin}
	if err := a.Start(); err != nil {
		t.Fatalf("start azurite: %v", err)
	}
	t.Cleanup(a.Stop)
	return a
}

// Start (re)starts the process on the same port and data directory.
func (a *Azurite) Start() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cmd != nil {
		return nil
	}
	cmd := exec.Command(a.bin,
		"--blobHost", "127.0.0.1", "--blobPort", strconv.Itoa(a.Port),
		"--location", a.dataDir,
		"--disableTelemetry", "--skipApiVersionCheck", "--silent", "--loose")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	stderr, _ := cmd.StderrPipe()
	if err := cmd.Start(); err != nil {
		return err
	}
	go func() { // drain so the process never blocks on a full pipe
		s := bufio.NewScanner(stderr)
		for s.Scan() {
		}
	}()
	a.cmd = cmd
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for ctx.Err() == nil {
		c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(a.Port)), time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("azurite did not listen on 127.0.0.1:%d within 30s", a.Port)
}

// Stop kills the process; data stays in place for a later Start.
func (a *Azurite) Stop() {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cmd == nil {
		return
	}
	_ = syscall.Kill(-a.cmd.Process.Pid, syscall.SIGKILL)
	_ = a.cmd.Wait()
	a.cmd = nil
}

// PID returns the Azurite process id (0 when stopped), for CPU accounting.
func (a *Azurite) PID() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cmd == nil {
		return 0
	}
	return a.cmd.Process.Pid
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// FreePort returns a currently unused loopback TCP port.
func FreePort(t testing.TB) int { return freePort(t) }
