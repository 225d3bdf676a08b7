package evidence

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/google/go-sev-guest/abi"
	"github.com/google/go-sev-guest/kds"
)

// Names of the collateral ACI hands to containers.
const (
	EnvSecurityPolicy     = "UVM_SECURITY_POLICY"
	EnvReferenceInfo      = "UVM_REFERENCE_INFO"
	EnvHostAMDCertificate = "UVM_HOST_AMD_CERTIFICATE"
	EnvSecurityContextDir = "UVM_SECURITY_CONTEXT_DIR"

	FileSecurityPolicy     = "security-policy-base64"
	FileReferenceInfo      = "reference-info-base64"
	FileHostAMDCertificate = "host-amd-cert-base64"
)

// CertCacheAPIVersion is the api-version of Azure's certificate cache.
const CertCacheAPIVersion = "2020-10-15-preview"

const maxCollateralSize = 1 << 20

// HostAMDCertificate is the JSON in UVM_HOST_AMD_CERTIFICATE (and what THIM
// serves): the VCEK and the ASK/ARK chain in PEM, and the TCB they are for.
type HostAMDCertificate struct {
	VcekCert         string `json:"vcekCert"`
	CertificateChain string `json:"certificateChain"`
	Tcbm             string `json:"tcbm"`
	CacheControl     string `json:"cacheControl,omitempty"`
}

// ParseHostAMDCertificate decodes the host certificate JSON.
func ParseHostAMDCertificate(data []byte) (*HostAMDCertificate, error) {
	var h HostAMDCertificate
	if err := json.Unmarshal(data, &h); err != nil {
		return nil, fmt.Errorf("host AMD certificate is not the expected JSON {vcekCert, certificateChain, tcbm}: %w", err)
	}
	if strings.TrimSpace(h.VcekCert) == "" {
		return nil, errors.New("host AMD certificate JSON has no vcekCert")
	}
	if _, err := h.TCB(); err != nil {
		return nil, err
	}
	return &h, nil
}

// TCB returns tcbm as a number (hex in the JSON).
func (h *HostAMDCertificate) TCB() (uint64, error) {
	v, err := strconv.ParseUint(strings.TrimPrefix(strings.TrimSpace(h.Tcbm), "0x"), 16, 64)
	if err != nil {
		return 0, fmt.Errorf("host AMD certificate tcbm %q is not a hex TCB version", truncate(h.Tcbm, 40))
	}
	return v, nil
}

// Chain returns the PEM chain VCEK, ASK, ARK.
func (h *HostAMDCertificate) Chain() []byte {
	vcek := strings.TrimSpace(h.VcekCert) + "\n"
	return []byte(vcek + strings.TrimSpace(h.CertificateChain) + "\n")
}

// Collateral is what the container platform provides besides the report.
type Collateral struct {
	SecurityPolicy []byte // decoded CCE policy (its SHA-256 is HOST_DATA)
	ReferenceInfo  []byte // decoded UVM reference info
	HostAMDCert    *HostAMDCertificate
	Source         string // "environment", the directory, or "" when none was found
}

// KataSecurityContextDir is where confidential AKS (Kata) pods find the
// UVM reference info: the node's path, mounted into the pod at the same
// place.
const KataSecurityContextDir = "/opt/confidential-containers/share/kata-containers"

// LoadCollateral reads the collateral in the Azure sidecars' order: a
// security context directory first (UVM_SECURITY_CONTEXT_DIR, else the
// first security-context-* directory under rootDir as on ACI, else the Kata
// directory under rootDir as on confidential AKS), then the UVM_*
// environment variables. Absent collateral is not an error; malformed
// collateral is.
func LoadCollateral(lookupEnv func(string) (string, bool), rootDir string) (*Collateral, error) {
	if lookupEnv == nil {
		lookupEnv = os.LookupEnv
	}
	if rootDir == "" {
		rootDir = "/"
	}
	source := "environment"
	read := func(name string) (string, bool, error) {
		v, ok := lookupEnv(name)
		return v, ok && v != "", nil
	}
	if dir := securityContextDir(lookupEnv, rootDir); dir != "" {
		source = dir
		files := map[string]string{
			EnvSecurityPolicy:     FileSecurityPolicy,
			EnvReferenceInfo:      FileReferenceInfo,
			EnvHostAMDCertificate: FileHostAMDCertificate,
		}
		read = func(name string) (string, bool, error) {
			p := filepath.Join(dir, files[name])
			b, err := readLimited(p)
			if errors.Is(err, os.ErrNotExist) {
				return "", false, nil
			}
			if err != nil {
				return "", false, fmt.Errorf("read security context: %w", err)
			}
			return string(b), len(bytes.TrimSpace(b)) > 0, nil
		}
	}
	col := &Collateral{Source: source}
	decode := func(name string) ([]byte, error) {
		v, ok, err := read(name)
		if err != nil || !ok {
			return nil, err
		}
		b, err := decodeBase64(v)
		if err != nil {
			return nil, fmt.Errorf("%s (from %s) is not base64: %w", name, source, err)
		}
		return b, nil
	}
	var err error
	if col.SecurityPolicy, err = decode(EnvSecurityPolicy); err != nil {
		return nil, err
	}
	if col.ReferenceInfo, err = decode(EnvReferenceInfo); err != nil {
		return nil, err
	}
	cert, err := decode(EnvHostAMDCertificate)
	if err != nil {
		return nil, err
	}
	if cert != nil {
		if col.HostAMDCert, err = ParseHostAMDCertificate(cert); err != nil {
			return nil, fmt.Errorf("%s (from %s): %w", EnvHostAMDCertificate, source, err)
		}
	}
	return col, nil
}

// securityContextDir finds the directory holding the collateral files, ""
// when there is none.
func securityContextDir(lookupEnv func(string) (string, bool), rootDir string) string {
	if dir, ok := lookupEnv(EnvSecurityContextDir); ok && dir != "" {
		return dir
	}
	matches, _ := filepath.Glob(filepath.Join(rootDir, "security-context-*"))
	sort.Strings(matches)
	if len(matches) > 0 {
		return matches[0]
	}
	kata := filepath.Join(rootDir, KataSecurityContextDir)
	for _, f := range []string{FileReferenceInfo, FileSecurityPolicy, FileHostAMDCertificate} {
		if _, err := os.Stat(filepath.Join(kata, f)); err == nil {
			return kata
		}
	}
	return ""
}

func readLimited(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxCollateralSize+1))
	if err != nil {
		return nil, err
	}
	if len(b) > maxCollateralSize {
		return nil, fmt.Errorf("%s is larger than %d bytes", path, maxCollateralSize)
	}
	return b, nil
}

// decodeBase64 accepts standard and URL alphabets, padded or not.
func decodeBase64(s string) ([]byte, error) {
	s = strings.TrimRight(strings.TrimSpace(s), "=")
	if strings.ContainsAny(s, "-_") {
		return base64.RawURLEncoding.DecodeString(s)
	}
	return base64.RawStdEncoding.DecodeString(s)
}

// CertChain is a parsed VCEK chain.
type CertChain struct {
	VCEK, ASK, ARK *x509.Certificate // ASK and ARK may be nil if absent
}

// SplitCertChain parses a PEM chain and sorts it into VCEK (or VLEK), ASK
// (or ASVK) and the self-signed ARK, in whatever order they come.
func SplitCertChain(chain []byte) (*CertChain, error) {
	var out CertChain
	rest := chain
	n := 0
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		n++
		if n > 8 {
			return nil, errors.New("certificate chain has more than 8 certificates")
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("certificate %d of the chain does not parse: %w", n, err)
		}
		cn := c.Subject.CommonName
		switch {
		case cn == "SEV-VCEK" || cn == "SEV-VLEK":
			out.VCEK = c
		case bytes.Equal(c.RawSubject, c.RawIssuer):
			out.ARK = c
		default:
			out.ASK = c
		}
	}
	if n == 0 {
		return nil, errors.New("certificate chain holds no PEM CERTIFICATE block")
	}
	if out.VCEK == nil {
		return nil, errors.New("certificate chain has no VCEK (subject CN SEV-VCEK)")
	}
	return &out, nil
}

// VCEKTCB returns the TCB version a VCEK certificate was issued for.
func VCEKTCB(vcek *x509.Certificate) (uint64, error) {
	ext, err := kds.VcekCertificateExtensions(vcek)
	if err != nil {
		return 0, fmt.Errorf("VCEK certificate extensions: %w", err)
	}
	return uint64(ext.TCBVersion), nil
}

// resolveCertChain picks the VCEK chain for the report: the host
// certificate when its TCB matches, else the device's certificate table,
// else the certificate cache.
func resolveCertChain(ctx context.Context, opts Options, log *slog.Logger, chipID []byte, reportedTCB uint64, col *Collateral, table []byte) ([]byte, error) {
	var why string
	if col.HostAMDCert != nil {
		tcb, _ := col.HostAMDCert.TCB()
		if tcb == reportedTCB {
			chain := col.HostAMDCert.Chain()
			if _, err := SplitCertChain(chain); err != nil {
				return nil, fmt.Errorf("%s (from %s): %w", EnvHostAMDCertificate, col.Source, err)
			}
			return chain, nil
		}
		why = fmt.Sprintf("the host certificate is for TCB %016x but the report's TCB is %016x", tcb, reportedTCB)
		log.Info("host AMD certificate is stale; refreshing from the certificate cache", "host_tcbm", fmt.Sprintf("%016x", tcb), "reported_tcbm", fmt.Sprintf("%016x", reportedTCB))
	} else {
		why = fmt.Sprintf("%s is not set and no security context directory was found", EnvHostAMDCertificate)
	}
	if chain, ok := chainFromCertTable(table, reportedTCB); ok {
		return chain, nil
	}
	if opts.certCache().URL == "" {
		return nil, fmt.Errorf("no VCEK certificate chain for this report: %s; set --cert-cache-url (e.g. https://global.acccache.azure.net) to fetch it", why)
	}
	chain, err := fetchChain(ctx, opts, log, chipID, reportedTCB)
	if err != nil {
		return nil, fmt.Errorf("%s, and the certificate cache failed: %w", why, err)
	}
	return chain, nil
}

// chainFromCertTable uses the certificates the host attached to an
// extended report, if they are for the reported TCB.
func chainFromCertTable(table []byte, reportedTCB uint64) ([]byte, bool) {
	if len(table) == 0 {
		return nil, false
	}
	var ct abi.CertTable
	if err := ct.Unmarshal(table); err != nil {
		return nil, false
	}
	vcekDER, err := ct.GetByGUIDString(abi.VcekGUID)
	if err != nil || len(vcekDER) == 0 {
		return nil, false
	}
	vcek, err := x509.ParseCertificate(vcekDER)
	if err != nil {
		return nil, false
	}
	if tcb, err := VCEKTCB(vcek); err != nil || tcb != reportedTCB {
		return nil, false
	}
	out := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: vcekDER})
	for _, guid := range []string{abi.AskGUID, abi.ArkGUID} {
		if der, err := ct.GetByGUIDString(guid); err == nil && len(der) > 0 {
			out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
		}
	}
	return out, true
}

// CertCacheRequestURL is the URL fetched for a chip and TCB from an Azure
// cache base URL or a THIM URL.
func CertCacheRequestURL(base string, chipID []byte, tcb uint64) string {
	u, _ := CertCache{URL: base}.RequestURLs(chipID, tcb)
	return u
}

// fetchCertCache GETs u with retries on 429, 5xx and network errors.
func fetchCertCache(ctx context.Context, opts Options, log *slog.Logger, u string) ([]byte, error) {
	hc := opts.HTTPClient
	if hc == nil {
		hc = &http.Client{Timeout: 30 * time.Second}
	}
	retries := opts.CertCacheRetries
	if retries <= 0 {
		retries = 3
	}
	backoff := opts.CertCacheBackoff
	if backoff <= 0 {
		backoff = 500 * time.Millisecond
	}
	var lastErr error
	for attempt := 0; attempt <= retries; attempt++ {
		if attempt > 0 {
			d := backoff << (attempt - 1)
			d = d/2 + rand.N(d/2+1)
			select {
			case <-ctx.Done():
				return nil, ctx.Err()
			case <-time.After(d):
			}
		}
		body, status, err := getOnce(ctx, hc, u)
		switch {
		case err != nil && ctx.Err() != nil:
			return nil, ctx.Err()
		case err != nil:
			lastErr = err
			log.Debug("certificate cache request failed", "attempt", attempt+1, "err", err)
			continue
		case status == http.StatusTooManyRequests || status >= 500:
			lastErr = fmt.Errorf("GET %s: HTTP %d", u, status)
			log.Debug("certificate cache busy", "attempt", attempt+1, "status", status)
			continue
		case status != http.StatusOK:
			return nil, fmt.Errorf("GET %s: HTTP %d: %s (check --cert-cache-url)", u, status, truncate(string(body), 200))
		}
		return body, nil
	}
	return nil, fmt.Errorf("gave up after %d attempts: %w", retries+1, lastErr)
}

func getOnce(ctx context.Context, hc *http.Client, u string) ([]byte, int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, 0, fmt.Errorf("certificate cache URL: %w", err)
	}
	req.Header.Set("Metadata", "true") // THIM requires it; others ignore it
	resp, err := hc.Do(req)
	if err != nil {
		return nil, 0, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxCollateralSize))
	if err != nil {
		return nil, 0, err
	}
	return body, resp.StatusCode, nil
}

// parseCacheResponse accepts the THIM JSON form and the PEM chain form and
// checks that the VCEK is for the wanted TCB.
func parseCacheResponse(body []byte, tcb uint64) ([]byte, error) {
	chain := body
	if t := bytes.TrimSpace(body); len(t) > 0 && t[0] == '{' {
		h, err := ParseHostAMDCertificate(t)
		if err != nil {
			return nil, err
		}
		chain = h.Chain()
	}
	parsed, err := SplitCertChain(chain)
	if err != nil {
		return nil, err
	}
	got, err := VCEKTCB(parsed.VCEK)
	if err != nil {
		return nil, err
	}
	if got != tcb {
		return nil, fmt.Errorf("the cache returned a VCEK for TCB %016x, the report needs %016x", got, tcb)
	}
	return chain, nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
