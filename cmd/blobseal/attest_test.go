package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blobseal/blobseal/keyrelease/evidence"
	"github.com/blobseal/blobseal/keyrelease/localmaa"
)

func TestAttestCommandAgainstLocalMAA(t *testing.T) {
	dir := t.TempDir()
	sim, err := evidence.NewSimulated(evidence.SimulatedConfig{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := evidence.WriteSimulatedSigner(dir, sim); err != nil {
		t.Fatal(err)
	}
	srv, err := localmaa.New(localmaa.Options{Roots: sim.Roots()})
	if err != nil {
		t.Fatal(err)
	}
	base, err := srv.Start("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	caFile := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(caFile, srv.CAPEM(), 0o600); err != nil {
		t.Fatal(err)
	}
	args := []string{"--maa-endpoint", base, "--attestation", "simulated", "--simulated-dir", dir, "--ca-file", caFile, "--nonce", "n-123", "-v"}
	var out, errOut bytes.Buffer
	if err := attest(context.Background(), args, &out, &errOut); err != nil {
		t.Fatalf("attest: %v\n%s", err, errOut.String())
	}
	var claims map[string]any
	if err := json.Unmarshal(out.Bytes(), &claims); err != nil {
		t.Fatalf("output is not the claims JSON: %v\n%s", err, out.String())
	}
	if claims["x-ms-attestation-type"] != "sevsnpvm" || claims["iss"] != base || claims["nonce"] != "n-123" {
		t.Fatalf("claims: %v", claims)
	}
	if strings.Count(out.String(), "eyJ") != 0 {
		t.Fatal("a JWT appears in the output without --print-token")
	}
	if !strings.Contains(errOut.String(), "SIMULATED") {
		t.Fatal("no warning about simulated attestation")
	}
	// With --print-token, the first line is the JWT.
	out.Reset()
	if err := attest(context.Background(), append(args, "--print-token"), &out, &errOut); err != nil {
		t.Fatal(err)
	}
	first, _, _ := strings.Cut(out.String(), "\n")
	if strings.Count(first, ".") != 2 || !strings.HasPrefix(first, "eyJ") {
		t.Fatalf("first line is not a JWT: %.40q", first)
	}
	if strings.Contains(errOut.String(), first) {
		t.Fatal("token leaked into the debug log")
	}
}

func TestAttestCommandUsage(t *testing.T) {
	var out, errOut bytes.Buffer
	err := attest(context.Background(), nil, &out, &errOut)
	if !errors.Is(err, errUsage) || !strings.Contains(err.Error(), "--maa-endpoint") {
		t.Fatalf("no endpoint: %v", err)
	}
	err = attest(context.Background(), []string{"--maa-endpoint", "https://127.0.0.1:1", "--attestation", "sev-guest", "--simulated-dir", "x"}, &out, &errOut)
	if !errors.Is(err, errUsage) {
		t.Fatalf("--simulated-dir without simulated: %v", err)
	}
	if _, statErr := os.Stat(evidence.DefaultSevGuestPath); statErr != nil {
		err = attest(context.Background(), []string{"--maa-endpoint", "https://127.0.0.1:1", "--attestation", "auto"}, &out, &errOut)
		if !errors.Is(err, evidence.ErrNotConfidentialVM) || !strings.Contains(err.Error(), "--attestation simulated") {
			t.Fatalf("auto outside a CVM: %v", err)
		}
	}
}
