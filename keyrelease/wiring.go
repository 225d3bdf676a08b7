package keyrelease

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/blobseal/blobseal/keyrelease/evidence"
)

// TLSRoots returns the system roots plus the PEM certificates in caFile
// (the local stack's CA in tests and the demo). An empty caFile returns nil:
// system roots only.
func TLSRoots(caFile string) (*x509.CertPool, error) {
	if caFile == "" {
		return nil, nil
	}
	pemData, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("CA file: %w", err)
	}
	pool, err := x509.SystemCertPool()
	if err != nil || pool == nil {
		pool = x509.NewCertPool()
	}
	if !pool.AppendCertsFromPEM(pemData) {
		return nil, fmt.Errorf("CA file %s holds no PEM certificate", caFile)
	}
	return pool, nil
}

// HTTPClient is the client for MAA and the vault: the default transport
// (proxy settings, HTTP/2), TLS 1.2 or later with roots (nil: system), a
// one-minute bound per request.
func HTTPClient(roots *x509.CertPool) *http.Client {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}
	return &http.Client{Transport: tr, Timeout: time.Minute}
}

// EvidenceConfig chooses where SNP evidence comes from.
type EvidenceConfig struct {
	// Provider: "auto" (or ""), "sev-guest", "configfs-tsm" or "simulated"
	// (local testing; only when named).
	Provider     string
	CertCacheURL string
	// CertCache, when its URL is set, replaces CertCacheURL (the Azure
	// sidecars' cache kinds: Azure cache, local THIM, AMD KDS).
	CertCache evidence.CertCache
	// SimulatedDir holds the local stack's simulated signer; SimulatedHostData
	// is the HOST_DATA the simulated reports carry.
	SimulatedDir      string
	SimulatedHostData [32]byte
	// SimulatedDebuggable makes the simulated reports claim a debuggable
	// guest (to test that release policies refuse one).
	SimulatedDebuggable bool
	// HTTPClient fetches from the certificate cache (nil: the provider's).
	HTTPClient *http.Client
	Logger     *slog.Logger
}

// NewEvidence builds the evidence provider.
func NewEvidence(c EvidenceConfig) (evidence.Provider, error) {
	name := c.Provider
	if name == "" {
		name = "auto"
	}
	opts := evidence.Options{CertCacheURL: c.CertCacheURL, CertCache: c.CertCache, HTTPClient: c.HTTPClient, Logger: c.Logger}
	if name == evidence.ProviderSimulated {
		sim := &evidence.SimulatedConfig{HostData: c.SimulatedHostData, Debuggable: c.SimulatedDebuggable}
		if c.SimulatedDir != "" {
			signer, err := evidence.ReadSimulatedSigner(c.SimulatedDir)
			if err != nil {
				return nil, fmt.Errorf("simulated attestation: %w", err)
			}
			sim.Signer = signer
		}
		opts.Simulated = sim
	}
	return evidence.NewProvider(name, opts)
}

// HostData is HOST_DATA as ACI computes it from a CCE policy: the SHA-256
// of the policy text. policy may be the Rego text or the base64 form `az
// confcom acipolicygen` prints (and ARM templates carry).
func HostData(policy []byte) ([32]byte, error) {
	text := policy
	trimmed := strings.TrimSpace(string(policy))
	if dec, err := base64.StdEncoding.DecodeString(trimmed); err == nil && len(dec) > 0 && utf8.Valid(dec) && !strings.ContainsAny(trimmed, " \n\t") {
		text = dec
	}
	if len(text) == 0 {
		return [32]byte{}, errors.New("CCE policy is empty")
	}
	return sha256.Sum256(text), nil
}

// HostDataFile reads a CCE policy file and returns its HOST_DATA.
func HostDataFile(path string) ([32]byte, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return [32]byte{}, fmt.Errorf("CCE policy: %w", err)
	}
	hd, err := HostData(raw)
	if err != nil {
		return hd, fmt.Errorf("CCE policy file %s: %w", path, err)
	}
	return hd, nil
}

// ParseHostData reads HOST_DATA written as 64 hex digits.
func ParseHostData(s string) ([32]byte, error) {
	var hd [32]byte
	b, err := hex.DecodeString(strings.TrimSpace(s))
	if err != nil || len(b) != 32 {
		return hd, fmt.Errorf("host data must be 64 hex digits (the SHA-256 of the CCE policy), got %q", s)
	}
	copy(hd[:], b)
	return hd, nil
}
