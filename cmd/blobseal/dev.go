package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/blobseal/blobseal/internal/secret"
	"github.com/blobseal/blobseal/keyrelease/evidence"
	"github.com/blobseal/blobseal/keyrelease/localca"
	"github.com/blobseal/blobseal/keyrelease/localhsm"
	"github.com/blobseal/blobseal/keyrelease/localmaa"
)

// StackFile is the name of the file `blobseal dev serve --dir DIR` writes
// into DIR once both local services are listening. It is JSON:
//
//	{
//	  "version": 1,
//	  "maa_endpoint": "https://127.0.0.1:PORT",   // local attestation service (MAA SevSnpVm API); also the token issuer
//	  "vault_url": "https://127.0.0.1:PORT",      // local key service (Key Vault / Managed HSM keys API)
//	  "resource": "https://managedhsm.azure.net", // resource named in the vault's 401 challenge
//	  "ca_pem_file": "DIR/ca.pem",                // the fresh CA both services' TLS (and the vault's JWS x5c) chain to
//	  "bearer_token_file": "DIR/bearer-token",    // bearer token the key service accepts (test-only credential)
//	  "simulated_signer_file": "DIR/simulated-amd-signer.pem", // test-only AMD chain the attestation service trusts;
//	                                              // pass it as the simulated evidence provider's signer
//	  "pid": 1234                                 // the serving process
//	}
//
// stack.json is written last (atomically) so its presence means ready, and
// all these files are removed when the server stops. Everything in DIR is
// test-only material: no production key or credential is ever written.
const StackFile = "stack.json"

type devStack struct {
	Version             int    `json:"version"`
	MAAEndpoint         string `json:"maa_endpoint"`
	VaultURL            string `json:"vault_url"`
	Resource            string `json:"resource"`
	CAPEMFile           string `json:"ca_pem_file"`
	BearerTokenFile     string `json:"bearer_token_file"`
	SimulatedSignerFile string `json:"simulated_signer_file"`
	PID                 int    `json:"pid"`
}

func readDevStack(dir string) (*devStack, error) {
	b, err := os.ReadFile(filepath.Join(dir, StackFile))
	if err != nil {
		return nil, fmt.Errorf("read %s (is `blobseal dev serve --dir %s` running?): %w", StackFile, dir, err)
	}
	var st devStack
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("%s in %s is not valid: %w", StackFile, dir, err)
	}
	if st.Version != 1 || st.MAAEndpoint == "" || st.VaultURL == "" {
		return nil, fmt.Errorf("%s in %s lacks version 1, maa_endpoint or vault_url", StackFile, dir)
	}
	return &st, nil
}

func runDevServe(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("dev serve", flag.ContinueOnError)
	dir := fs.String("dir", "", "directory for stack.json, the CA certificate, the bearer token and the simulated signer")
	addr := fs.String("addr", "127.0.0.1:0", "HOST:PORT of the attestation service; the key service listens on PORT+1 (or a free port when PORT is 0)")
	verbose := fs.Bool("v", false, "debug logging (never prints keys or tokens)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *dir == "" {
		return usageErrorf("--dir is required")
	}
	if fs.NArg() > 0 {
		return usageErrorf("unexpected arguments %v", fs.Args())
	}
	host, port, err := net.SplitHostPort(*addr)
	if err != nil {
		return usageErrorf("--addr %q: %v", *addr, err)
	}
	maaPort, err := strconv.Atoi(port)
	if err != nil || maaPort < 0 || maaPort > 65534 {
		return usageErrorf("--addr port %q must be 0-65534", port)
	}
	vaultAddr := net.JoinHostPort(host, "0")
	if maaPort != 0 {
		vaultAddr = net.JoinHostPort(host, strconv.Itoa(maaPort+1))
	}
	if err := os.MkdirAll(*dir, 0o700); err != nil {
		return fmt.Errorf("--dir: %w", err)
	}
	level := slog.LevelInfo
	if *verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	ca, err := localca.New("blobseal dev CA", 7*24*time.Hour)
	if err != nil {
		return err
	}
	hosts := []string{"localhost", "127.0.0.1"}
	if host != "" && host != "localhost" && host != "127.0.0.1" {
		hosts = append(hosts, host)
	}
	cert, err := ca.ServerCert(hosts...)
	if err != nil {
		return err
	}
	sim, err := evidence.NewSimulated(evidence.SimulatedConfig{})
	if err != nil {
		return err
	}
	var zeroMeasurement [48]byte // simulated reports' default launch measurement
	maaSrv, err := localmaa.New(localmaa.Options{Roots: sim.Roots(), TLSCert: &cert, Logger: log, CompliantMeasurements: [][]byte{zeroMeasurement[:]}})
	if err != nil {
		return err
	}
	maaURL, err := maaSrv.Start(*addr)
	if err != nil {
		return err
	}
	defer maaSrv.Close()

	tokBytes := make([]byte, 32)
	if _, err := rand.Read(tokBytes); err != nil {
		return err
	}
	bearer := secret.Token("blobseal-dev-" + hex.EncodeToString(tokBytes))
	hsmSrv, err := localhsm.New(localhsm.Options{
		TLSCert:          cert,
		TrustedIssuers:   []string{maaURL},
		IssuerHTTPClient: &http.Client{Transport: &http.Transport{TLSClientConfig: ca.ClientTLS()}, Timeout: 10 * time.Second},
		BearerTokens:     []secret.Token{bearer},
		Logger:           log,
	})
	if err != nil {
		return err
	}
	vaultURL, err := hsmSrv.Start(vaultAddr)
	if err != nil {
		return err
	}
	defer hsmSrv.Close()

	var written []string
	defer func() {
		for _, p := range written {
			os.Remove(p)
		}
	}()
	write := func(name string, data []byte) (string, error) {
		p, err := filepath.Abs(filepath.Join(*dir, name))
		if err != nil {
			return "", err
		}
		tmp := p + ".tmp"
		if err := os.WriteFile(tmp, data, 0o600); err != nil {
			return "", err
		}
		if err := os.Rename(tmp, p); err != nil {
			os.Remove(tmp)
			return "", err
		}
		written = append(written, p)
		return p, nil
	}
	caFile, err := write("ca.pem", ca.PEM())
	if err != nil {
		return err
	}
	bearerFile, err := write("bearer-token", []byte(bearer.Reveal()+"\n"))
	if err != nil {
		return err
	}
	signerFile, err := evidence.WriteSimulatedSigner(*dir, sim)
	if err != nil {
		return err
	}
	if signerFile, err = filepath.Abs(signerFile); err != nil {
		return err
	}
	written = append(written, signerFile)
	st := devStack{Version: 1, MAAEndpoint: maaURL, VaultURL: vaultURL, Resource: localhsm.ResourceManagedHSM,
		CAPEMFile: caFile, BearerTokenFile: bearerFile, SimulatedSignerFile: signerFile, PID: os.Getpid()}
	js, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	stackFile, err := write(StackFile, append(js, '\n'))
	if err != nil {
		return err
	}
	log.Info("local stack ready (test-only: simulated attestation and an in-memory key service)",
		"maa_endpoint", maaURL, "vault_url", vaultURL, "stack", stackFile)
	fmt.Println(stackFile)
	<-ctx.Done()
	log.Info("local stack stopping")
	if err := context.Cause(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}
