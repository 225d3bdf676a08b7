package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"github.com/blobseal/blobseal/keyrelease/localhsm"
	"github.com/blobseal/blobseal/keyrelease/localstack"
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

func newDevCmd() *cobra.Command {
	return newGroup("dev", "Local stand-ins for the cloud services (testing only)", newDevServeCmd())
}

func newDevServeCmd() *cobra.Command {
	var dir, addr string
	var verbose bool
	cmd := &cobra.Command{
		Use:   "serve --dir DIR [flags]",
		Short: "Run the local attestation and key services",
		Long: "Runs a local attestation service (MAA's SevSnpVm API, trusting a simulated AMD signer) and a\n" +
			"local key service (the Managed HSM keys API) on 127.0.0.1, and describes them in DIR/" + StackFile + ".\n" +
			"Test-only: no production key or credential is ever written.",
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runDevServe(cmd.Context(), dir, addr, verbose, cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
	f := cmd.Flags()
	f.StringVar(&dir, "dir", "", "directory for stack.json, the CA certificate, the bearer token and the simulated signer")
	f.StringVar(&addr, "addr", "127.0.0.1:0", "HOST:PORT of the attestation service; the key service listens on PORT+1 (or a free port when PORT is 0)")
	f.BoolVarP(&verbose, "verbose", "v", false, "debug logging (never prints keys or tokens)")
	markRequired(cmd, "dir")
	return cmd
}

func runDevServe(ctx context.Context, dir, addr string, verbose bool, stdout, stderr io.Writer) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return usageErrorf("--addr %q: %v", addr, err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("--dir: %w", err)
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return fmt.Errorf("--dir: %w", err)
	}
	level := slog.LevelInfo
	if verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))

	var hosts []string
	if host != "" && host != "localhost" && host != "127.0.0.1" {
		hosts = append(hosts, host)
	}
	// Every file the stack leaves in the directory goes when it stops.
	var written []string
	defer func() {
		for _, p := range written {
			os.Remove(p)
		}
	}()
	st, err := localstack.Start(localstack.Options{SignerDir: abs, Addr: addr, Hosts: hosts,
		Validity: 7 * 24 * time.Hour, Logger: log})
	if err != nil {
		return fmt.Errorf("start the local stack: %w", err)
	}
	defer st.Close()
	files, err := st.WriteStackFile(abs)
	if err != nil {
		return fmt.Errorf("write the local stack's files into %s: %w", abs, err)
	}
	written = append(written, files.CAPEMFile, files.BearerTokenFile, files.SimulatedSignerFile)
	manifest := devStack{Version: 1, MAAEndpoint: st.MAAEndpoint, VaultURL: st.VaultURL, Resource: localhsm.ResourceManagedHSM,
		CAPEMFile: files.CAPEMFile, BearerTokenFile: files.BearerTokenFile, SimulatedSignerFile: files.SimulatedSignerFile,
		PID: os.Getpid()}
	js, err := json.MarshalIndent(manifest, "", "  ")
	if err != nil {
		return err
	}
	// stack.json goes last, through a rename: its presence means ready.
	stackFile := filepath.Join(abs, StackFile)
	if err := writeReadyFile(stackFile, append(js, '\n')); err != nil {
		return fmt.Errorf("write %s: %w", stackFile, err)
	}
	written = append(written, stackFile)
	log.Info("local stack ready (test-only: simulated attestation and an in-memory key service)",
		"maa_endpoint", st.MAAEndpoint, "vault_url", st.VaultURL, "stack", stackFile)
	fmt.Fprintln(stdout, stackFile)
	<-ctx.Done()
	log.Info("local stack stopping")
	if err := context.Cause(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}
