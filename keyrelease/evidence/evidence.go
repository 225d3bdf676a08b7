// Package evidence collects AMD SEV-SNP attestation evidence for Microsoft
// Azure Attestation: the hardware report (through go-sev-guest, from
// /dev/sev-guest or configfs-tsm), the VCEK certificate chain and the
// collateral that Azure Container Instances hands to containers (UVM_*
// environment or a security-context directory). A simulated provider, backed
// by go-sev-guest's test-only AMD signer, exists for local testing and is only
// ever chosen by name.
//
// The simulated signer across processes: `blobseal dev serve --dir DIR`
// calls LoadOrCreateSimulated(DIR, cfg), which writes DIR/simulated-amd-signer.pem
// (test-only ARK/ASK certificates and ASK/VCEK keys, mode 0600), and gives
// its Roots() to the local MAA; a separate `mount --attestation simulated`
// passes ReadSimulatedSigner(DIR) as SimulatedConfig.Signer and so signs
// with the chain that service trusts.
package evidence

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"time"

	"github.com/google/go-sev-guest/abi"
	"github.com/google/go-sev-guest/client"
)

// Provider names accepted by NewProvider.
const (
	ProviderSevGuest    = "sev-guest"
	ProviderConfigfsTSM = "configfs-tsm"
	ProviderAuto        = "auto"
	ProviderSimulated   = "simulated"
)

// Default locations of the guest interfaces.
const (
	DefaultSevGuestPath    = "/dev/sev-guest"
	DefaultConfigfsTSMPath = "/sys/kernel/config/tsm/report"
)

// ReportSize is the size of a raw SNP attestation report.
const ReportSize = abi.ReportSize

// ErrNotConfidentialVM reports that no SEV-SNP guest interface exists.
var ErrNotConfidentialVM = errors.New("not running in an AMD SEV-SNP confidential VM")

// Evidence is what MAA's SevSnpVm API needs.
type Evidence struct {
	Report           []byte   // raw SNP report, 1184 bytes
	CertChain        []byte   // PEM: VCEK, ASK, ARK
	UVMReferenceInfo []byte   // raw UVM reference info (COSE_Sign1), may be nil
	HostData         [32]byte // HOST_DATA of the report (SHA-256 of the CCE policy on ACI)
	Provider         string   // name of the provider that produced it
}

// Provider produces evidence whose REPORT_DATA is reportData.
type Provider interface {
	Name() string
	Get(ctx context.Context, reportData [64]byte) (*Evidence, error)
}

// Options configures NewProvider.
type Options struct {
	// CertCacheURL is the certificate cache used when the host certificate is
	// missing or its TCB does not match the report: an Azure cache base URL
	// such as https://global.acccache.azure.net (the path
	// /SevSnpVM/certificates/{chip_id}/{tcbm} is appended) or the full THIM
	// URL http://169.254.169.254/metadata/THIM/amd/certification.
	CertCacheURL string
	// CertCache, when its URL is set, replaces CertCacheURL: any of the
	// Azure sidecars' cache kinds (Azure cache, local THIM, AMD KDS).
	CertCache CertCache
	// HTTPClient is used for the certificate cache; nil means a client with
	// a 30 s timeout.
	HTTPClient *http.Client
	// Logger receives diagnostics; nil discards them.
	Logger *slog.Logger
	// Simulated configures the "simulated" provider; nil means defaults.
	Simulated *SimulatedConfig
	// LookupEnv reads the UVM_* variables; nil means os.LookupEnv.
	LookupEnv func(string) (string, bool)
	// RootDir is searched for security-context-* directories when
	// UVM_SECURITY_CONTEXT_DIR is unset; "" means "/".
	RootDir string
	// SevGuestPath and ConfigfsTSMPath override the device locations.
	SevGuestPath    string
	ConfigfsTSMPath string
	// CertCacheRetries is how often a failed cache request (429, 5xx,
	// network) is retried; 0 means 3. CertCacheBackoff is the first delay.
	CertCacheRetries int
	CertCacheBackoff time.Duration
}

func (o Options) logger() *slog.Logger {
	if o.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return o.Logger
}

func (o Options) sevGuestPath() string {
	if o.SevGuestPath == "" {
		return DefaultSevGuestPath
	}
	return o.SevGuestPath
}

func (o Options) configfsPath() string {
	if o.ConfigfsTSMPath == "" {
		return DefaultConfigfsTSMPath
	}
	return o.ConfigfsTSMPath
}

// ReportData returns the REPORT_DATA MAA expects for runtimeData: its
// SHA-256, zero-padded to 64 bytes.
func ReportData(runtimeData []byte) [64]byte {
	var rd [64]byte
	sum := sha256.Sum256(runtimeData)
	copy(rd[:], sum[:])
	return rd
}

// NewProvider returns the named provider. "auto" picks configfs-tsm or
// /dev/sev-guest, whichever exists, and never the simulated provider.
func NewProvider(name string, opts Options) (Provider, error) {
	log := opts.logger()
	switch name {
	case ProviderSimulated:
		cfg := SimulatedConfig{}
		if opts.Simulated != nil {
			cfg = *opts.Simulated
		}
		s, err := NewSimulated(cfg)
		if err != nil {
			return nil, err
		}
		log.Warn("using SIMULATED SEV-SNP attestation: reports are signed with go-sev-guest's test-only AMD keys; this is not a confidential VM and real attestation services reject it")
		return s, nil
	case ProviderSevGuest, ProviderConfigfsTSM, ProviderAuto:
	default:
		return nil, fmt.Errorf("unknown attestation provider %q: use sev-guest, configfs-tsm, auto or simulated", name)
	}
	haveDevice := exists(opts.sevGuestPath())
	haveTSM := exists(opts.configfsPath())
	absent := fmt.Errorf("%w: %s and configfs-tsm (%s) absent (use --attestation simulated only for local testing)",
		ErrNotConfidentialVM, opts.sevGuestPath(), opts.configfsPath())
	var src reportSource
	switch {
	case name == ProviderSevGuest && haveDevice, name == ProviderAuto && haveDevice && !haveTSM:
		src = sevGuestSource{path: opts.sevGuestPath()}
	case name == ProviderConfigfsTSM && haveTSM, name == ProviderAuto && haveTSM:
		src = configfsSource{}
	case !haveDevice && !haveTSM:
		return nil, absent
	case name == ProviderSevGuest:
		return nil, fmt.Errorf("%s does not exist but configfs-tsm does: use --attestation configfs-tsm or auto", opts.sevGuestPath())
	default:
		return nil, fmt.Errorf("configfs-tsm (%s) does not exist but %s does: use --attestation sev-guest or auto", opts.configfsPath(), opts.sevGuestPath())
	}
	return newHardware(name, src, opts), nil
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// reportSource is the part that needs the hardware: a signed report for
// reportData, plus the certificate table the host attached, if any.
type reportSource interface {
	rawReport(ctx context.Context, reportData [64]byte) (report, certTable []byte, err error)
}

type sevGuestSource struct{ path string }

func (s sevGuestSource) rawReport(ctx context.Context, reportData [64]byte) ([]byte, []byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, nil, err
	}
	d := &client.LinuxDevice{}
	if err := d.Open(s.path); err != nil {
		return nil, nil, fmt.Errorf("open %s (is this an SEV-SNP guest, and may this user open the device?): %w", s.path, err)
	}
	defer d.Close()
	report, certs, err := client.GetRawExtendedReport(d, reportData)
	if err != nil {
		// Some hosts do not serve extended reports; the plain report is
		// enough when the collateral provides the certificates.
		report, err = client.GetRawReport(d, reportData)
		if err != nil {
			return nil, nil, fmt.Errorf("SNP_GET_REPORT on %s: %w", s.path, err)
		}
		certs = nil
	}
	return report, certs, nil
}

type configfsSource struct{}

func (configfsSource) rawReport(ctx context.Context, reportData [64]byte) ([]byte, []byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, nil, err
	}
	q, err := (&client.LinuxConfigFsQuoteProvider{}).GetRawQuote(reportData)
	if err != nil {
		return nil, nil, fmt.Errorf("configfs-tsm report: %w", err)
	}
	if len(q) < ReportSize {
		return nil, nil, fmt.Errorf("configfs-tsm returned %d bytes, want at least %d", len(q), ReportSize)
	}
	return q[:ReportSize], q[ReportSize:], nil
}

// hardware is the provider for a real guest interface.
type hardware struct {
	name string
	src  reportSource
	opts Options
	log  *slog.Logger
}

var _ Provider = (*hardware)(nil)

func newHardware(name string, src reportSource, opts Options) *hardware {
	return &hardware{name: name, src: src, opts: opts, log: opts.logger()}
}

func (h *hardware) Name() string { return h.name }

func (h *hardware) Get(ctx context.Context, reportData [64]byte) (*Evidence, error) {
	raw, table, err := h.src.rawReport(ctx, reportData)
	if err != nil {
		return nil, err
	}
	if len(raw) < ReportSize {
		return nil, fmt.Errorf("SNP report is %d bytes, want %d", len(raw), ReportSize)
	}
	raw = raw[:ReportSize]
	report, err := abi.ReportToProto(raw)
	if err != nil {
		return nil, fmt.Errorf("parse SNP report: %w", err)
	}
	col, err := LoadCollateral(h.opts.LookupEnv, h.opts.RootDir)
	if err != nil {
		return nil, err
	}
	if col.ReferenceInfo == nil {
		h.log.Warn("no UVM reference info (UVM_REFERENCE_INFO or reference-info-base64): MAA will not report x-ms-compliance-status azure-compliant-uvm")
	}
	if col.SecurityPolicy != nil {
		// On ACI, HOST_DATA is SHA-256 of the CCE policy; a mismatch means
		// the collateral belongs to another container group.
		if sum := sha256.Sum256(col.SecurityPolicy); !bytes.Equal(sum[:], report.GetHostData()) {
			h.log.Warn("the security policy in the collateral does not hash to the report's HOST_DATA", "source", col.Source,
				"policy_sha256", hex.EncodeToString(sum[:]), "host_data", hex.EncodeToString(report.GetHostData()))
		}
	}
	chain, err := resolveCertChain(ctx, h.opts, h.log, report.GetChipId(), report.GetReportedTcb(), col, table)
	if err != nil {
		return nil, err
	}
	ev := &Evidence{
		Report:           append([]byte(nil), raw...),
		CertChain:        chain,
		UVMReferenceInfo: col.ReferenceInfo,
		Provider:         h.name,
	}
	copy(ev.HostData[:], report.GetHostData())
	return ev, nil
}
