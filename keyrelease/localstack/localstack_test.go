package localstack

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/blobseal/blobseal/internal/secret"
	"github.com/blobseal/blobseal/keyrelease"
	"github.com/blobseal/blobseal/keyrelease/evidence"
	"github.com/blobseal/blobseal/keyrelease/hsm"
	"github.com/blobseal/blobseal/keyrelease/maa"
)

func releaseConfig(st *Stack, ev evidence.Provider, key string) keyrelease.Config {
	return keyrelease.Config{Evidence: ev, MAAEndpoint: st.MAAEndpoint, VaultURL: st.VaultURL, KeyName: key,
		Credential: hsm.BearerToken(st.Bearer), HTTPClient: st.HTTPClient(), TrustedRoots: st.CAPool()}
}

// TestReleaseThroughStack imports a key with a policy bound to the host
// data and has the real release client obtain it through both services;
// a VM with other host data is refused with the claim named.
func TestReleaseThroughStack(t *testing.T) {
	hostData := sha256.Sum256([]byte("package policy\n"))
	dir := t.TempDir()
	st, err := Start(Options{SignerDir: dir, Simulated: evidence.SimulatedConfig{HostData: hostData}})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if !strings.HasPrefix(st.MAAEndpoint, "https://127.0.0.1:") || !strings.HasPrefix(st.VaultURL, "https://127.0.0.1:") {
		t.Fatalf("endpoints %q %q are not local https", st.MAAEndpoint, st.VaultURL)
	}
	// The key service signs release responses with its TLS key; RSA means
	// RS256, as Managed HSM signs.
	conn, err := tls.Dial("tcp", strings.TrimPrefix(st.VaultURL, "https://"), &tls.Config{RootCAs: st.CAPool()})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := conn.ConnectionState().PeerCertificates[0].PublicKey.(*rsa.PublicKey); !ok {
		t.Errorf("key service certificate key is %T, want RSA", conn.ConnectionState().PeerCertificates[0].PublicKey)
	}
	conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	key := make(secret.Bytes, 32)
	rand.Read(key)
	if err := st.ImportOctKey(ctx, "fs-key", key, hostData); err != nil {
		t.Fatal(err)
	}
	got, err := keyrelease.Release(ctx, releaseConfig(st, st.Simulated, "fs-key"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, key) {
		t.Fatal("released secret differs from the imported key")
	}

	// Same signer chain (loaded from the dir), other host data: denied.
	signer, err := evidence.ReadSimulatedSigner(dir)
	if err != nil {
		t.Fatal(err)
	}
	other, err := evidence.NewSimulated(evidence.SimulatedConfig{HostData: sha256.Sum256([]byte("other")), Signer: signer})
	if err != nil {
		t.Fatal(err)
	}
	_, err = keyrelease.Release(ctx, releaseConfig(st, other, "fs-key"))
	if !errors.Is(err, hsm.ErrPolicy) || !strings.Contains(err.Error(), "x-ms-sevsnpvm-hostdata") {
		t.Fatalf("release with wrong host data: %v, want a policy refusal naming the host data claim", err)
	}
}

func TestWriteStackFile(t *testing.T) {
	st, err := Start(Options{SignerDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	dir := t.TempDir()
	f, err := st.WriteStackFile(dir)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := os.ReadFile(f.CAPEMFile)
	if !bytes.Equal(ca, st.CAPEM()) {
		t.Error("ca.pem differs from the stack's CA")
	}
	tok, _ := os.ReadFile(f.BearerTokenFile)
	if string(tok) != st.Bearer.Reveal() {
		t.Error("bearer-token file differs from the stack's token")
	}
	if _, err := evidence.ReadSimulatedSigner(dir); err != nil {
		t.Errorf("signer not readable from %s: %v", dir, err)
	}
	for _, p := range []string{f.CAPEMFile, f.BearerTokenFile} {
		fi, err := os.Stat(p)
		if err != nil {
			t.Errorf("%s: %v", p, err)
		} else if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: mode %v, want 0600", p, fi.Mode().Perm())
		}
	}
}

func TestStartNeedsSignerDir(t *testing.T) {
	if _, err := Start(Options{}); err == nil || !strings.Contains(err.Error(), "SignerDir") {
		t.Fatalf("err = %v, want one naming SignerDir", err)
	}
}

func TestStartRejectsBadAddr(t *testing.T) {
	for _, addr := range []string{"127.0.0.1", "127.0.0.1:65535", "127.0.0.1:http"} {
		if _, err := Start(Options{SignerDir: t.TempDir(), Addr: addr}); err == nil || !strings.Contains(err.Error(), addr) {
			t.Errorf("Start(Addr %q) = %v, want an error naming the address", addr, err)
		}
	}
}

func TestStartOnGivenHost(t *testing.T) {
	st, err := Start(Options{SignerDir: t.TempDir(), Addr: "127.0.0.1:0", Hosts: []string{"blobseal.test"}})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	for _, endpoint := range []string{st.MAAEndpoint, st.VaultURL} {
		host := strings.TrimPrefix(endpoint, "https://")
		conn, err := tls.Dial("tcp", host, &tls.Config{RootCAs: st.CAPool(), ServerName: "blobseal.test"})
		if err != nil {
			t.Errorf("%s: TLS for the extra host name: %v", endpoint, err)
			continue
		}
		conn.Close()
	}
}

// Attest and ReleaseWithToken are the chain's two steps, usable apart: a
// token obtained once releases the key; a token bound to another wrapping
// key does not.
func TestAttestThenReleaseWithToken(t *testing.T) {
	hostData := sha256.Sum256([]byte("package policy\n# two steps\n"))
	st, err := Start(Options{SignerDir: t.TempDir(), Simulated: evidence.SimulatedConfig{HostData: hostData}})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	key := make(secret.Bytes, 32)
	rand.Read(key)
	if err := st.ImportOctKey(ctx, "two-steps", key, hostData); err != nil {
		t.Fatal(err)
	}
	wrapping, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	rd, err := maa.RuntimeData(&wrapping.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	cfg := releaseConfig(st, st.Simulated, "two-steps")
	tok, err := keyrelease.Attest(ctx, keyrelease.AttestConfig{Evidence: st.Simulated, MAAEndpoint: st.MAAEndpoint, HTTPClient: st.HTTPClient()}, rd)
	if err != nil {
		t.Fatal(err)
	}
	rk, err := keyrelease.ReleaseWithToken(ctx, cfg, tok, wrapping)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(rk.Material, key) {
		t.Fatal("released key differs")
	}
	rk.Material.Wipe()
	other, _ := rsa.GenerateKey(rand.Reader, 2048)
	if _, err := keyrelease.ReleaseWithToken(ctx, cfg, tok, other); err == nil {
		t.Fatal("released with a wrapping key the token does not name")
	}
	var se *keyrelease.StageError
	if _, err := keyrelease.ReleaseWithToken(ctx, cfg, "", wrapping); !errors.As(err, &se) || se.Stage != keyrelease.StageConfig {
		t.Fatalf("no token: %v", err)
	}
}

// A key whose release policy is in the legacy form found on deployed keys
// (version 0.2, authority without https://) is imported with a warning,
// released to a matching VM, and a denial still names the differing claim.
func TestLegacyPolicyFromTheField(t *testing.T) {
	hostData := sha256.Sum256([]byte("package policy\n# legacy\n"))
	st, err := Start(Options{SignerDir: t.TempDir(), Simulated: evidence.SimulatedConfig{HostData: hostData}})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	legacy := fmt.Sprintf(`{"anyOf":[{"allOf":[{"claim":"x-ms-sevsnpvm-hostdata","equals":"%x"},{"claim":"x-ms-sevsnpvm-is-debuggable","equals":false}],"authority":"%s"}],"version":"0.2"}`,
		hostData, strings.TrimPrefix(st.MAAEndpoint, "https://"))
	var logs bytes.Buffer
	client, err := hsm.New(st.VaultURL, hsm.BearerToken(st.Bearer), hsm.Options{HTTPClient: st.HTTPClient(), TrustedRoots: st.CAPool(),
		Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	key := make(secret.Bytes, 32)
	rand.Read(key)
	if _, err := client.PutKey(ctx, "legacy", hsm.KeySpec{Kty: "oct-HSM", Oct: key, Policy: []byte(legacy)}); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logs.String(), "legacy format") || !strings.Contains(logs.String(), "no scheme") {
		t.Fatalf("import warnings missing: %s", logs.String())
	}
	got, err := keyrelease.Release(ctx, releaseConfig(st, st.Simulated, "legacy"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, key) {
		t.Fatal("released secret differs")
	}
	signer, err := st.Simulated.SignerPEM()
	if err != nil {
		t.Fatal(err)
	}
	other, err := evidence.NewSimulated(evidence.SimulatedConfig{HostData: sha256.Sum256([]byte("other")), Signer: signer})
	if err != nil {
		t.Fatal(err)
	}
	_, err = keyrelease.Release(ctx, releaseConfig(st, other, "legacy"))
	if !errors.Is(err, hsm.ErrPolicy) || !strings.Contains(err.Error(), "x-ms-sevsnpvm-hostdata") {
		t.Fatalf("denial: %v", err)
	}
}
