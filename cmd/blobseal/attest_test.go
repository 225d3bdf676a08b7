package main

import (
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
	args := []string{"attest", "--maa-endpoint", base, "--attestation", "simulated", "--simulated-dir", dir, "--ca-file", caFile, "--nonce", "n-123", "-v"}
	out, errOut, err := runOut(context.Background(), append(args, "--json")...)
	if err != nil {
		t.Fatalf("attest: %v\n%s", err, errOut)
	}
	var claims map[string]any
	if err := json.Unmarshal([]byte(out), &claims); err != nil {
		t.Fatalf("output is not the claims JSON: %v\n%s", err, out)
	}
	if claims["x-ms-attestation-type"] != "sevsnpvm" || claims["iss"] != base || claims["nonce"] != "n-123" {
		t.Fatalf("claims: %v", claims)
	}
	if strings.Count(out, "eyJ") != 0 {
		t.Fatal("a JWT appears in the output without --print-token")
	}
	if !strings.Contains(errOut, "SIMULATED") {
		t.Fatal("no warning about simulated attestation")
	}
	// Without --json, one sorted "name: JSON value" line per claim.
	out, _, err = runOut(context.Background(), args...)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "nonce: \"n-123\"\n") || !strings.Contains(out, "x-ms-attestation-type: \"sevsnpvm\"\n") {
		t.Fatalf("claim lines: %s", out)
	}
	// With --print-token, the first line is the JWT.
	out, errOut, err = runOut(context.Background(), append(args, "--print-token")...)
	if err != nil {
		t.Fatal(err)
	}
	first, _, _ := strings.Cut(out, "\n")
	if strings.Count(first, ".") != 2 || !strings.HasPrefix(first, "eyJ") {
		t.Fatalf("first line is not a JWT: %.40q", first)
	}
	if strings.Contains(errOut, first) {
		t.Fatal("token leaked into the debug log")
	}
	// With --json too, one object holding both.
	out, _, err = runOut(context.Background(), append(args, "--print-token", "--json")...)
	if err != nil {
		t.Fatal(err)
	}
	var both struct {
		Token  string         `json:"token"`
		Claims map[string]any `json:"claims"`
	}
	if err := json.Unmarshal([]byte(out), &both); err != nil || strings.Count(both.Token, ".") != 2 || !strings.HasPrefix(both.Token, "eyJ") || both.Claims["nonce"] != "n-123" {
		t.Fatalf("--print-token --json: %v\n%s", err, out)
	}
}

func TestAttestCommandUsage(t *testing.T) {
	err := runIn(context.Background(), "attest")
	if !errors.Is(err, errUsage) || !strings.Contains(err.Error(), "--maa-endpoint is required") {
		t.Fatalf("no endpoint: %v", err)
	}
	err = runIn(context.Background(), "attest", "--maa-endpoint", "https://127.0.0.1:1", "--attestation", "sev-guest", "--simulated-dir", "x")
	if !errors.Is(err, errUsage) {
		t.Fatalf("--simulated-dir without simulated: %v", err)
	}
	if _, statErr := os.Stat(evidence.DefaultSevGuestPath); statErr != nil {
		err = runIn(context.Background(), "attest", "--maa-endpoint", "https://127.0.0.1:1", "--attestation", "auto")
		if !errors.Is(err, evidence.ErrNotConfidentialVM) || !strings.Contains(err.Error(), "--attestation simulated") {
			t.Fatalf("auto outside a CVM: %v", err)
		}
	}
}
