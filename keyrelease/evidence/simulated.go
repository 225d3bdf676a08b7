package evidence

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha512"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/google/go-sev-guest/abi"
	"github.com/google/go-sev-guest/kds"
	spb "github.com/google/go-sev-guest/proto/sevsnp"
	sevtest "github.com/google/go-sev-guest/testing"
)

// SimulatedSignerFile is the file name `blobseal dev serve --dir DIR` writes
// the simulated signer to, so that a separate process (mount --attestation
// simulated) signs with the same test-only chain the local MAA trusts. The
// keys in it are test-only and worthless outside the local stack.
const SimulatedSignerFile = "simulated-amd-signer.pem"

// DefaultSimulatedTCB is the reported TCB of simulated reports unless
// configured: bootloader 3, TEE 0, SNP 8, microcode 115.
const DefaultSimulatedTCB = uint64(115)<<56 | uint64(8)<<48 | 3

// SimulatedConfig shapes the simulated reports.
type SimulatedConfig struct {
	HostData         [32]byte
	Measurement      [48]byte
	Debuggable       bool
	VMPL             uint32
	GuestSVN         uint32
	FamilyID         [16]byte
	ImageID          [16]byte
	TCB              uint64   // reported TCB; 0 means DefaultSimulatedTCB
	ChipID           [64]byte // zero means a fixed test chip ID
	UVMReferenceInfo []byte   // passed through as Evidence.UVMReferenceInfo
	// Signer is a PEM signer from (*Simulated).SignerPEM or
	// ReadSimulatedSigner; nil means a new chain over go-sev-guest's
	// published test-only AMD keys (or fresh keys with FreshKeys).
	Signer []byte
	// FreshKeys generates new ARK/ASK/VCEK keys (an "untrusted" AMD root).
	FreshKeys bool
}

// Simulated is a fake AMD secure processor: it really signs reports with a
// VCEK certified by a test-only ASK and ARK, so verifiers run their real
// code. It is a Provider named "simulated".
type Simulated struct {
	cfg         SimulatedConfig
	ark, ask    *x509.Certificate
	askKey      *rsa.PrivateKey
	vcekKey     *ecdsa.PrivateKey
	productName string
	tcb         uint64
	chipID      [64]byte

	mu    sync.Mutex
	vceks map[uint64]*x509.Certificate // by TCB
}

var _ Provider = (*Simulated)(nil)

// NewSimulated builds the signer.
func NewSimulated(cfg SimulatedConfig) (*Simulated, error) {
	if cfg.VMPL > 3 {
		return nil, fmt.Errorf("simulated VMPL %d is out of range 0-3", cfg.VMPL)
	}
	s := &Simulated{cfg: cfg, tcb: cfg.TCB, chipID: cfg.ChipID, vceks: map[uint64]*x509.Certificate{}}
	if s.tcb == 0 {
		s.tcb = DefaultSimulatedTCB
	}
	if s.chipID == ([64]byte{}) {
		for i := range s.chipID {
			s.chipID[i] = byte(0xc0 + i%16)
		}
	}
	s.productName = kds.ProductName(abi.DefaultSevProduct())
	if cfg.Signer != nil {
		if err := s.loadSigner(cfg.Signer); err != nil {
			return nil, fmt.Errorf("simulated signer: %w", err)
		}
		return s, nil
	}
	keys := sevtest.DefaultAmdKeys()
	if cfg.FreshKeys {
		var err error
		if keys, err = freshAmdKeys(); err != nil {
			return nil, err
		}
	}
	now := time.Now().Add(-time.Hour)
	b := &sevtest.AmdSignerBuilder{
		Keys:             keys,
		ProductName:      s.productName,
		CSPID:            "blobseal-simulated",
		ArkCreationTime:  now,
		AskCreationTime:  now,
		AsvkCreationTime: now,
		VcekCreationTime: now,
		VlekCreationTime: now,
	}
	signer, err := b.TestOnlyCertChain()
	if err != nil {
		return nil, fmt.Errorf("simulated signer: %w", err)
	}
	s.ark, s.ask, s.askKey, s.vcekKey = signer.Ark, signer.Ask, keys.Ask, keys.Vcek
	return s, nil
}

func freshAmdKeys() (*sevtest.AmdKeys, error) {
	var k sevtest.AmdKeys
	var err error
	// 2048-bit keeps tests fast; verifiers do not pin the root key size.
	for _, p := range []**rsa.PrivateKey{&k.Ark, &k.Ask, &k.Asvk} {
		if *p, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
			return nil, err
		}
	}
	for _, p := range []**ecdsa.PrivateKey{&k.Vcek, &k.Vlek} {
		if *p, err = ecdsa.GenerateKey(elliptic.P384(), rand.Reader); err != nil {
			return nil, err
		}
	}
	return &k, nil
}

// Name implements Provider.
func (s *Simulated) Name() string { return ProviderSimulated }

// TCB is the reported TCB of this signer's reports.
func (s *Simulated) TCB() uint64 { return s.tcb }

// ChipID is the simulated chip's ID.
func (s *Simulated) ChipID() [64]byte { return s.chipID }

// Get implements Provider.
func (s *Simulated) Get(ctx context.Context, reportData [64]byte) (*Evidence, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	report, err := s.Report(reportData)
	if err != nil {
		return nil, err
	}
	chain, err := s.VCEKChainPEM(s.tcb)
	if err != nil {
		return nil, err
	}
	return &Evidence{
		Report:           report,
		CertChain:        chain,
		UVMReferenceInfo: s.cfg.UVMReferenceInfo,
		HostData:         s.cfg.HostData,
		Provider:         ProviderSimulated,
	}, nil
}

// Report returns a raw report for reportData, signed by the VCEK.
func (s *Simulated) Report(reportData [64]byte) ([]byte, error) {
	reportID := make([]byte, 32)
	if _, err := rand.Read(reportID); err != nil {
		return nil, err
	}
	r := &spb.Report{
		Version:         2,
		GuestSvn:        s.cfg.GuestSVN,
		Policy:          abi.SnpPolicyToBytes(abi.SnpPolicy{SMT: true, Debug: s.cfg.Debuggable}),
		FamilyId:        s.cfg.FamilyID[:],
		ImageId:         s.cfg.ImageID[:],
		Vmpl:            s.cfg.VMPL,
		SignatureAlgo:   1, // ECDSA P-384 with SHA-384
		CurrentTcb:      s.tcb,
		PlatformInfo:    1, // SMT enabled
		ReportData:      reportData[:],
		Measurement:     s.cfg.Measurement[:],
		HostData:        s.cfg.HostData[:],
		IdKeyDigest:     make([]byte, 48),
		AuthorKeyDigest: make([]byte, 48),
		ReportId:        reportID,
		ReportIdMa:      make([]byte, 32),
		ReportedTcb:     s.tcb,
		ChipId:          s.chipID[:],
		CommittedTcb:    s.tcb,
		CurrentMajor:    1,
		CurrentMinor:    55,
		CommittedMajor:  1,
		CommittedMinor:  55,
		LaunchTcb:       s.tcb,
		Signature:       make([]byte, abi.SignatureSize),
	}
	raw, err := abi.ReportToAbiBytes(r)
	if err != nil {
		return nil, fmt.Errorf("simulated report: %w", err)
	}
	digest := sha512.Sum384(abi.SignedComponent(raw))
	rr, ss, err := ecdsa.Sign(rand.Reader, s.vcekKey, digest[:])
	if err != nil {
		return nil, fmt.Errorf("simulated report signature: %w", err)
	}
	if err := abi.SetSignature(rr, ss, raw); err != nil {
		return nil, err
	}
	return raw, nil
}

// Roots returns the PEM of the test-only ARK and ASK, the trusted roots to
// configure a local MAA with.
func (s *Simulated) Roots() []byte {
	return append(pemCert(s.ark), pemCert(s.ask)...)
}

// VCEKChainPEM returns VCEK (for tcb), ASK and ARK in PEM.
func (s *Simulated) VCEKChainPEM(tcb uint64) ([]byte, error) {
	vcek, err := s.vcek(tcb)
	if err != nil {
		return nil, err
	}
	out := pemCert(vcek)
	out = append(out, pemCert(s.ask)...)
	return append(out, pemCert(s.ark)...), nil
}

// HostAMDCertificateJSON returns the UVM_HOST_AMD_CERTIFICATE JSON (before
// base64) for a VCEK issued for tcb.
func (s *Simulated) HostAMDCertificateJSON(tcb uint64) ([]byte, error) {
	vcek, err := s.vcek(tcb)
	if err != nil {
		return nil, err
	}
	h := HostAMDCertificate{
		VcekCert:         string(pemCert(vcek)),
		CertificateChain: string(append(pemCert(s.ask), pemCert(s.ark)...)),
		Tcbm:             fmt.Sprintf("%016X", tcb),
	}
	return json.Marshal(h)
}

func (s *Simulated) vcek(tcb uint64) (*x509.Certificate, error) {
	s.mu.Lock()
	c, ok := s.vceks[tcb]
	s.mu.Unlock()
	if ok {
		return c, nil
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 64))
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		Version:            3,
		SignatureAlgorithm: x509.SHA384WithRSAPSS,
		PublicKeyAlgorithm: x509.ECDSA,
		SerialNumber:       serial,
		Subject:            amdName("SEV-VCEK", serial),
		NotBefore:          s.ask.NotBefore,
		NotAfter:           s.ask.NotAfter,
		ExtraExtensions:    sevtest.CustomExtensions(kds.DecomposeTCBVersion(kds.TCBVersion(tcb)), s.chipID[:], "", s.productName),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, s.ask, s.vcekKey.Public(), s.askKey)
	if err != nil {
		return nil, fmt.Errorf("simulated VCEK: %w", err)
	}
	c, err = x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	if prev, ok := s.vceks[tcb]; ok {
		c = prev
	} else {
		s.vceks[tcb] = c
	}
	s.mu.Unlock()
	return c, nil
}

func amdName(cn string, serial *big.Int) pkix.Name {
	return pkix.Name{
		Organization:       []string{"Advanced Micro Devices"},
		Country:            []string{"US"},
		OrganizationalUnit: []string{"Engineering"},
		Locality:           []string{"Santa Clara"},
		Province:           []string{"CA"},
		SerialNumber:       fmt.Sprintf("%x", serial),
		CommonName:         cn,
	}
}

func pemCert(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}

// SignerPEM serializes the test-only chain and keys (ARK and ASK
// certificates, ASK and VCEK private keys) for SimulatedConfig.Signer.
func (s *Simulated) SignerPEM() ([]byte, error) {
	askKey, err := x509.MarshalPKCS8PrivateKey(s.askKey)
	if err != nil {
		return nil, err
	}
	vcekKey, err := x509.MarshalPKCS8PrivateKey(s.vcekKey)
	if err != nil {
		return nil, err
	}
	blocks := []*pem.Block{
		{Type: "CERTIFICATE", Headers: map[string]string{"Role": "ARK"}, Bytes: s.ark.Raw},
		{Type: "CERTIFICATE", Headers: map[string]string{"Role": "ASK"}, Bytes: s.ask.Raw},
		{Type: "PRIVATE KEY", Headers: map[string]string{"Role": "ASK", "Note": "test-only simulated SEV-SNP key"}, Bytes: askKey},
		{Type: "PRIVATE KEY", Headers: map[string]string{"Role": "VCEK", "Note": "test-only simulated SEV-SNP key"}, Bytes: vcekKey},
	}
	var out []byte
	for _, b := range blocks {
		out = append(out, pem.EncodeToMemory(b)...)
	}
	return out, nil
}

func (s *Simulated) loadSigner(data []byte) error {
	rest := data
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		role := b.Headers["Role"]
		switch b.Type {
		case "CERTIFICATE":
			c, err := x509.ParseCertificate(b.Bytes)
			if err != nil {
				return fmt.Errorf("%s certificate: %w", role, err)
			}
			switch role {
			case "ARK":
				s.ark = c
			case "ASK":
				s.ask = c
			}
		case "PRIVATE KEY":
			k, err := x509.ParsePKCS8PrivateKey(b.Bytes)
			if err != nil {
				return fmt.Errorf("%s key: %w", role, err)
			}
			switch key := k.(type) {
			case *rsa.PrivateKey:
				if role == "ASK" {
					s.askKey = key
				}
			case *ecdsa.PrivateKey:
				if role == "VCEK" {
					s.vcekKey = key
				}
			}
		}
	}
	if s.ark == nil || s.ask == nil || s.askKey == nil || s.vcekKey == nil {
		return errors.New("PEM must hold the ARK and ASK certificates and the ASK and VCEK keys (write it with SignerPEM)")
	}
	if !s.askKey.PublicKey.Equal(s.ask.PublicKey) {
		return errors.New("ASK key does not match the ASK certificate")
	}
	return nil
}

// WriteSimulatedSigner writes s.SignerPEM() to dir/SimulatedSignerFile.
func WriteSimulatedSigner(dir string, s *Simulated) (string, error) {
	data, err := s.SignerPEM()
	if err != nil {
		return "", err
	}
	p := filepath.Join(dir, SimulatedSignerFile)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		return "", fmt.Errorf("write simulated signer: %w", err)
	}
	return p, nil
}

// ReadSimulatedSigner reads dir/SimulatedSignerFile for SimulatedConfig.Signer.
func ReadSimulatedSigner(dir string) ([]byte, error) {
	p := filepath.Join(dir, SimulatedSignerFile)
	b, err := readLimited(p)
	if err != nil {
		return nil, fmt.Errorf("read simulated signer (start `blobseal dev serve --dir %s` first): %w", dir, err)
	}
	return b, nil
}

// LoadOrCreateSimulated returns a simulated signer for the local stack
// directory dir: the one in dir/SimulatedSignerFile if it exists, else a new
// one with fresh test-only keys, written there. `blobseal dev serve --dir`
// calls it (and trusts Roots()); a separate mount process reads the same
// file with ReadSimulatedSigner. cfg.Signer and cfg.FreshKeys are ignored.
func LoadOrCreateSimulated(dir string, cfg SimulatedConfig) (*Simulated, error) {
	cfg.FreshKeys = false
	data, err := readLimited(filepath.Join(dir, SimulatedSignerFile))
	switch {
	case err == nil:
		cfg.Signer = data
		return NewSimulated(cfg)
	case !errors.Is(err, os.ErrNotExist):
		return nil, fmt.Errorf("read simulated signer: %w", err)
	}
	cfg.Signer, cfg.FreshKeys = nil, true
	s, err := NewSimulated(cfg)
	if err != nil {
		return nil, err
	}
	if _, err := WriteSimulatedSigner(dir, s); err != nil {
		return nil, err
	}
	return s, nil
}
