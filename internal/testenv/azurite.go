package testenv

import (
	"context"
	"testing"

	"github.com/blobseal/blobseal/internal/azurite"
)

// Azurite's well-known development account.
const (
	AzuriteAccount = azurite.Account
	AzuriteKey     = azurite.Key
)

// Azurite is a running Azurite blob service bound to 127.0.0.1.
type Azurite struct {
	*azurite.Server
}

// StartAzurite starts a private Azurite blob service for the test on a free
// loopback port, with telemetry off, and stops it at cleanup.
func StartAzurite(t testing.TB) *Azurite {
	t.Helper()
	RequireTools(t, azurite.Binary)
	srv, err := azurite.New(t.TempDir())
	if err != nil {
		t.Fatalf("azurite: %v", err)
	}
	a := &Azurite{srv}
	if err := a.Start(); err != nil {
		t.Fatalf("start azurite: %v", err)
	}
	t.Cleanup(a.Stop)
	return a
}

// Start (re)starts the process on the same port and data directory.
func (a *Azurite) Start() error { return a.Server.Start(context.Background()) }

// FreePort returns a currently unused loopback TCP port.
func FreePort(t testing.TB) int {
	t.Helper()
	p, err := azurite.FreePort()
	if err != nil {
		t.Fatalf("free port: %v", err)
	}
	return p
}
