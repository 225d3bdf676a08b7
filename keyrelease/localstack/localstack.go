// Package localstack starts blobseal's whole local key-release stack in one
// process, for tests, the demo and `blobseal dev serve`: a fresh TLS CA, a
// simulated AMD SEV-SNP signer, the local attestation service (trusting the
// simulated roots) and the local key service (trusting that attestation
// service as issuer, behind a generated bearer token). Test-only: nothing
// here attests real hardware.
package localstack

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
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
	"github.com/blobseal/blobseal/keyrelease/hsm"
	"github.com/blobseal/blobseal/keyrelease/localca"
	"github.com/blobseal/blobseal/keyrelease/localhsm"
	"github.com/blobseal/blobseal/keyrelease/localmaa"
	"github.com/blobseal/blobseal/keyrelease/policy"
)

// Options shape the stack.
type Options struct {
	// SignerDir holds the simulated signer (created when absent, reused
	// otherwise, so a sidecar process can load the same chain).
	SignerDir string
	// Simulated shapes the simulated reports (host data etc.).
	Simulated evidence.SimulatedConfig
	// Addr is HOST:PORT for the attestation service (default 127.0.0.1:0);
	// the key service listens on PORT+1, or on a free port when PORT is 0.
	Addr string
	// Hosts are extra names the services' certificates hold, besides
	// localhost and 127.0.0.1.
	Hosts []string
	// Validity of the CA (default 24 hours).
	Validity time.Duration
	Logger   *slog.Logger
}

// addrs returns the listen addresses of the attestation and key services.
func (o Options) addrs() (maaAddr, vaultAddr string, err error) {
	if o.Addr == "" {
		return "127.0.0.1:0", "127.0.0.1:0", nil
	}
	host, port, err := net.SplitHostPort(o.Addr)
	if err != nil {
		return "", "", fmt.Errorf("localstack: address %q: %w", o.Addr, err)
	}
	p, err := strconv.Atoi(port)
	if err != nil || p < 0 || p > 65534 {
		return "", "", fmt.Errorf("localstack: address %q: the port must be 0-65534 (the key service takes the next one)", o.Addr)
	}
	if p == 0 {
		return o.Addr, net.JoinHostPort(host, "0"), nil
	}
	return o.Addr, net.JoinHostPort(host, strconv.Itoa(p+1)), nil
}

// Stack is a running local stack. Close stops it.
type Stack struct {
	MAAEndpoint string // https://127.0.0.1:PORT
	VaultURL    string // https://127.0.0.1:PORT
	Bearer      secret.Token
	SignerDir   string
	Simulated   *evidence.Simulated
	CA          *localca.CA

	closers []func()
}

// Start starts the stack, by default on 127.0.0.1 ports chosen by the kernel.
func Start(o Options) (_ *Stack, err error) {
	if o.SignerDir == "" {
		return nil, errors.New("localstack: SignerDir is required (a directory for the simulated signer)")
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Validity <= 0 {
		o.Validity = 24 * time.Hour
	}
	maaAddr, vaultAddr, err := o.addrs()
	if err != nil {
		return nil, err
	}
	hosts := append([]string{"localhost", "127.0.0.1"}, o.Hosts...)
	if err := os.MkdirAll(o.SignerDir, 0o700); err != nil {
		return nil, fmt.Errorf("localstack: signer directory: %w", err)
	}
	st := &Stack{SignerDir: o.SignerDir}
	defer func() {
		if err != nil {
			st.Close()
		}
	}()
	if st.CA, err = localca.New("blobseal local stack CA", o.Validity); err != nil {
		return nil, err
	}
	cert, err := st.CA.ServerCert(hosts...)
	if err != nil {
		return nil, err
	}
	// The key service signs its release responses with its TLS key: RSA,
	// so the JWS is RS256 like Managed HSM's.
	hsmCert, err := st.CA.ServerCertRSA(hosts...)
	if err != nil {
		return nil, err
	}
	if st.Simulated, err = evidence.LoadOrCreateSimulated(o.SignerDir, o.Simulated); err != nil {
		return nil, err
	}
	maa, err := localmaa.New(localmaa.Options{Roots: st.Simulated.Roots(), TLSCert: &cert, Logger: o.Logger,
		CompliantMeasurements: [][]byte{o.Simulated.Measurement[:]}})
	if err != nil {
		return nil, err
	}
	if st.MAAEndpoint, err = maa.Start(maaAddr); err != nil {
		return nil, err
	}
	st.closers = append(st.closers, func() { maa.Close() })
	tok := make([]byte, 24)
	if _, err := rand.Read(tok); err != nil {
		return nil, err
	}
	st.Bearer = secret.Token("local-" + hex.EncodeToString(tok))
	kv, err := localhsm.New(localhsm.Options{TLSCert: hsmCert, TrustedIssuers: []string{st.MAAEndpoint},
		IssuerHTTPClient: st.HTTPClient(), BearerTokens: []secret.Token{st.Bearer}, Logger: o.Logger})
	if err != nil {
		return nil, err
	}
	if st.VaultURL, err = kv.Start(vaultAddr); err != nil {
		return nil, err
	}
	st.closers = append(st.closers, func() { kv.Close() })
	return st, nil
}

// CAPEM is the CA certificate both services' TLS certificates chain to.
func (st *Stack) CAPEM() []byte { return st.CA.PEM() }

// CAPool holds the CA certificate.
func (st *Stack) CAPool() *x509.CertPool { return st.CA.Pool() }

// HTTPClient trusts the stack's CA.
func (st *Stack) HTTPClient() *http.Client {
	return &http.Client{Transport: &http.Transport{TLSClientConfig: st.CA.ClientTLS()}, Timeout: 30 * time.Second}
}

// ImportOctKey imports key as an oct-HSM key named name whose release
// policy requires sevsnpvm attestation by this stack's MAA, not debuggable,
// with the given host data.
func (st *Stack) ImportOctKey(ctx context.Context, name string, key secret.Bytes, hostData [32]byte) error {
	claims, err := policy.SevSnpVmClaims(policy.SevSnpVmOptions{HostData: hex.EncodeToString(hostData[:])})
	if err != nil {
		return err
	}
	pol, err := policy.Build(st.MAAEndpoint, claims)
	if err != nil {
		return err
	}
	polJSON, err := json.Marshal(pol)
	if err != nil {
		return err
	}
	client, err := hsm.New(st.VaultURL, hsm.BearerToken(st.Bearer), hsm.Options{HTTPClient: st.HTTPClient(), TrustedRoots: st.CAPool()})
	if err != nil {
		return err
	}
	if _, err := client.PutKey(ctx, name, hsm.KeySpec{Kty: "oct-HSM", Oct: key, Policy: polJSON}); err != nil {
		return fmt.Errorf("import key %q into the local key service: %w", name, err)
	}
	return nil
}

// Files are the paths WriteStackFile wrote.
type Files struct {
	CAPEMFile, BearerTokenFile, SimulatedSignerFile string
}

// WriteStackFile writes the CA certificate and the bearer token (mode 0600,
// a test-only token) into dir, for processes that join the stack.
func (st *Stack) WriteStackFile(dir string) (Files, error) {
	f := Files{CAPEMFile: filepath.Join(dir, "ca.pem"), BearerTokenFile: filepath.Join(dir, "bearer-token")}
	if err := os.WriteFile(f.CAPEMFile, st.CAPEM(), 0o600); err != nil {
		return Files{}, err
	}
	if err := os.WriteFile(f.BearerTokenFile, []byte(st.Bearer.Reveal()), 0o600); err != nil {
		return Files{}, err
	}
	signer, err := evidence.WriteSimulatedSigner(dir, st.Simulated)
	if err != nil {
		return Files{}, err
	}
	f.SimulatedSignerFile = signer
	return f, nil
}

// Close stops both services.
func (st *Stack) Close() {
	for i := len(st.closers) - 1; i >= 0; i-- {
		st.closers[i]()
	}
	st.closers = nil
}
