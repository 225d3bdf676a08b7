package evidence

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-sev-guest/abi"
	spb "github.com/google/go-sev-guest/proto/sevsnp"
	"github.com/google/go-sev-guest/verify"
	"github.com/google/go-sev-guest/verify/trust"
)

func newSim(t *testing.T, cfg SimulatedConfig) *Simulated {
	t.Helper()
	s, err := NewSimulated(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// verifyWithRoots runs go-sev-guest's verifier with only the given roots.
func verifyWithRoots(t *testing.T, ev *Evidence, roots []byte) error {
	t.Helper()
	report, err := abi.ReportToProto(ev.Report)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := SplitCertChain(ev.CertChain)
	if err != nil {
		t.Fatal(err)
	}
	rootChain, err := SplitCertChain(append(pemCert(chain.VCEK), roots...))
	if err != nil {
		t.Fatal(err)
	}
	r := trust.AMDRootCertsProduct("Milan")
	r.ProductCerts = &trust.ProductCerts{Ark: rootChain.ARK, Ask: rootChain.ASK}
	att := &spb.Attestation{Report: report, CertificateChain: &spb.CertificateChain{VcekCert: chain.VCEK.Raw, AskCert: chain.ASK.Raw, ArkCert: chain.ARK.Raw}}
	return verify.SnpAttestation(att, &verify.Options{DisableCertFetching: true, TrustedRoots: map[string][]*trust.AMDRootCerts{"Milan": {r}}, Now: time.Now()})
}

func TestNoConfidentialVM(t *testing.T) {
	dir := t.TempDir()
	opts := Options{SevGuestPath: filepath.Join(dir, "sev-guest"), ConfigfsTSMPath: filepath.Join(dir, "tsm/report")}
	for _, name := range []string{ProviderAuto, ProviderSevGuest, ProviderConfigfsTSM} {
		_, err := NewProvider(name, opts)
		if !errors.Is(err, ErrNotConfidentialVM) {
			t.Fatalf("%s: err = %v, want ErrNotConfidentialVM", name, err)
		}
		for _, want := range []string{"not running in an AMD SEV-SNP confidential VM", opts.SevGuestPath, "configfs-tsm", "absent", "use --attestation simulated only for local testing"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("%s: error %q lacks %q", name, err, want)
			}
		}
	}
	// With the real default paths, on a machine that is not an SNP guest.
	if !exists(DefaultSevGuestPath) && !exists(DefaultConfigfsTSMPath) {
		_, err := NewProvider(ProviderAuto, Options{})
		want := "not running in an AMD SEV-SNP confidential VM: /dev/sev-guest and configfs-tsm (/sys/kernel/config/tsm/report) absent (use --attestation simulated only for local testing)"
		if err == nil || err.Error() != want {
			t.Fatalf("auto: err = %v, want %q", err, want)
		}
	}
}

func TestProviderChoiceByName(t *testing.T) {
	dir := t.TempDir()
	dev := filepath.Join(dir, "sev-guest")
	if err := os.WriteFile(dev, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	opts := Options{SevGuestPath: dev, ConfigfsTSMPath: filepath.Join(dir, "none")}
	p, err := NewProvider(ProviderAuto, opts)
	if err != nil || p.Name() != ProviderAuto {
		t.Fatalf("auto with a device: %v, %v", p, err)
	}
	if _, ok := p.(*Simulated); ok {
		t.Fatal("auto chose the simulated provider")
	}
	if _, err := NewProvider(ProviderConfigfsTSM, opts); err == nil || !strings.Contains(err.Error(), "use --attestation sev-guest or auto") {
		t.Fatalf("configfs-tsm without configfs: %v", err)
	}
	if _, err := NewProvider("simulate", opts); err == nil || !strings.Contains(err.Error(), "unknown attestation provider \"simulate\"") {
		t.Fatalf("typo: %v", err)
	}
	var logs bytes.Buffer
	opts.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	p, err = NewProvider(ProviderSimulated, opts)
	if err != nil || p.Name() != ProviderSimulated {
		t.Fatalf("simulated: %v, %v", p, err)
	}
	if !strings.Contains(logs.String(), "level=WARN") || !strings.Contains(logs.String(), "SIMULATED") {
		t.Fatalf("simulated provider did not log a warning: %q", logs.String())
	}
}

func TestSimulatedReportIsSignedAndShaped(t *testing.T) {
	cfg := SimulatedConfig{Debuggable: true, VMPL: 2, GuestSVN: 7}
	copy(cfg.HostData[:], bytes.Repeat([]byte{0xab}, 32))
	copy(cfg.Measurement[:], bytes.Repeat([]byte{0x5a}, 48))
	sim := newSim(t, cfg)
	runtime := []byte(`{"keys":[]}`)
	ev, err := sim.Get(context.Background(), ReportData(runtime))
	if err != nil {
		t.Fatal(err)
	}
	if len(ev.Report) != 1184 || ev.Provider != "simulated" || ev.HostData != cfg.HostData {
		t.Fatalf("evidence: len %d provider %q hostdata %x", len(ev.Report), ev.Provider, ev.HostData)
	}
	r, err := abi.ReportToProto(ev.Report)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(runtime)
	if !bytes.Equal(r.ReportData[:32], sum[:]) || !bytes.Equal(r.ReportData[32:], make([]byte, 32)) {
		t.Errorf("REPORT_DATA = %x, want sha256 %x zero-padded", r.ReportData, sum)
	}
	pol, err := abi.ParseSnpPolicy(r.Policy)
	if err != nil || !pol.Debug {
		t.Errorf("policy %x: debug=%v err=%v", r.Policy, pol.Debug, err)
	}
	if r.Vmpl != 2 || r.GuestSvn != 7 || !bytes.Equal(r.Measurement, cfg.Measurement[:]) || r.ReportedTcb != sim.TCB() {
		t.Errorf("report fields: vmpl %d svn %d measurement %x tcb %x", r.Vmpl, r.GuestSvn, r.Measurement, r.ReportedTcb)
	}
	if err := verifyWithRoots(t, ev, sim.Roots()); err != nil {
		t.Fatalf("go-sev-guest rejects the simulated report: %v", err)
	}
	// One flipped bit in the signed part breaks the signature.
	ev.Report[0x90] ^= 1
	if err := verifyWithRoots(t, ev, sim.Roots()); err == nil {
		t.Fatal("tampered report verified")
	}
	ev.Report[0x90] ^= 1
	// A chain from another (fresh) root does not verify.
	other := newSim(t, SimulatedConfig{FreshKeys: true})
	if err := verifyWithRoots(t, ev, other.Roots()); err == nil {
		t.Fatal("report verified against an unrelated root")
	}
}

func TestSimulatedSignerReloads(t *testing.T) {
	dir := t.TempDir()
	a := newSim(t, SimulatedConfig{FreshKeys: true})
	p, err := WriteSimulatedSigner(dir, a)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(p); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("signer file: %v %v", fi, err)
	}
	data, err := ReadSimulatedSigner(dir)
	if err != nil {
		t.Fatal(err)
	}
	b := newSim(t, SimulatedConfig{Signer: data})
	ev, err := b.Get(context.Background(), ReportData([]byte("x")))
	if err != nil {
		t.Fatal(err)
	}
	// The second process's evidence verifies against the first one's roots.
	if err := verifyWithRoots(t, ev, a.Roots()); err != nil {
		t.Fatalf("reloaded signer: %v", err)
	}
	if _, err := NewSimulated(SimulatedConfig{Signer: []byte("junk")}); err == nil || !strings.Contains(err.Error(), "ARK and ASK certificates") {
		t.Fatalf("junk signer: %v", err)
	}
	if _, err := ReadSimulatedSigner(t.TempDir()); err == nil || !strings.Contains(err.Error(), "dev serve") {
		t.Fatalf("missing signer file: %v", err)
	}
}

// simSource stands in for the SEV-SNP device (absent here) with the
// simulated signer, so the collateral path runs as it would in ACI.
type simSource struct{ s *Simulated }

func (f simSource) rawReport(ctx context.Context, rd [64]byte) ([]byte, []byte, error) {
	r, err := f.s.Report(rd)
	return r, nil, err
}

func envMap(m map[string]string) func(string) (string, bool) {
	return func(k string) (string, bool) { v, ok := m[k]; return v, ok }
}

func b64std(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

func vcekTCBOf(t *testing.T, chain []byte) uint64 {
	t.Helper()
	c, err := SplitCertChain(chain)
	if err != nil {
		t.Fatal(err)
	}
	tcb, err := VCEKTCB(c.VCEK)
	if err != nil {
		t.Fatal(err)
	}
	return tcb
}

func TestACICollateralFromEnvironment(t *testing.T) {
	var hd [32]byte
	copy(hd[:], bytes.Repeat([]byte{7}, 32))
	sim := newSim(t, SimulatedConfig{HostData: hd})
	hostCert, err := sim.HostAMDCertificateJSON(sim.TCB())
	if err != nil {
		t.Fatal(err)
	}
	ref := []byte("cose-sign1-reference-info")
	env := map[string]string{
		EnvHostAMDCertificate: b64std(hostCert),
		EnvReferenceInfo:      b64std(ref),
		EnvSecurityPolicy:     b64std([]byte("package policy")),
	}
	var logs bytes.Buffer
	h := newHardware("sev-guest", simSource{sim}, Options{LookupEnv: envMap(env), RootDir: t.TempDir(), Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	ev, err := h.Get(context.Background(), ReportData([]byte("rt")))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(ev.UVMReferenceInfo, ref) || ev.HostData != hd || ev.Provider != "sev-guest" {
		t.Fatalf("evidence: ref %q hostdata %x provider %q", ev.UVMReferenceInfo, ev.HostData, ev.Provider)
	}
	if got := vcekTCBOf(t, ev.CertChain); got != sim.TCB() {
		t.Fatalf("VCEK TCB %x, want %x", got, sim.TCB())
	}
	if err := verifyWithRoots(t, ev, sim.Roots()); err != nil {
		t.Fatal(err)
	}
	// The policy given does not hash to HOST_DATA: warned, not fatal.
	if !strings.Contains(logs.String(), "does not hash to the report's HOST_DATA") {
		t.Fatalf("no HOST_DATA warning: %q", logs.String())
	}
	logs.Reset()
	policy := []byte("package policy")
	hd2 := sha256.Sum256(policy)
	sim2 := newSim(t, SimulatedConfig{HostData: hd2})
	hostCert2, _ := sim2.HostAMDCertificateJSON(sim2.TCB())
	env2 := map[string]string{EnvHostAMDCertificate: b64std(hostCert2), EnvSecurityPolicy: b64std(policy)}
	h2 := newHardware("sev-guest", simSource{sim2}, Options{LookupEnv: envMap(env2), RootDir: t.TempDir(), Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if _, err := h2.Get(context.Background(), [64]byte{}); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(logs.String(), "HOST_DATA") {
		t.Fatalf("warned although the policy matches: %q", logs.String())
	}

	env[EnvHostAMDCertificate] = "%%%"
	if _, err := h.Get(context.Background(), [64]byte{}); err == nil || !strings.Contains(err.Error(), "UVM_HOST_AMD_CERTIFICATE (from environment) is not base64") {
		t.Fatalf("bad base64: %v", err)
	}
	env[EnvHostAMDCertificate] = b64std([]byte(`{"vcekCert":"x","tcbm":"zz"}`))
	if _, err := h.Get(context.Background(), [64]byte{}); err == nil || !strings.Contains(err.Error(), "tcbm") {
		t.Fatalf("bad tcbm: %v", err)
	}
}

func TestACICollateralFromSecurityContextDir(t *testing.T) {
	sim := newSim(t, SimulatedConfig{})
	hostCert, err := sim.HostAMDCertificateJSON(sim.TCB())
	if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	dir := filepath.Join(root, "security-context-123456")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	write := func(name string, data []byte) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(b64std(data)+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(FileHostAMDCertificate, hostCert)
	write(FileReferenceInfo, []byte("ref-from-dir"))
	write(FileSecurityPolicy, []byte("policy"))

	// Found by globbing the root directory.
	h := newHardware("configfs-tsm", simSource{sim}, Options{LookupEnv: envMap(nil), RootDir: root})
	ev, err := h.Get(context.Background(), ReportData(nil))
	if err != nil {
		t.Fatal(err)
	}
	if string(ev.UVMReferenceInfo) != "ref-from-dir" || vcekTCBOf(t, ev.CertChain) != sim.TCB() {
		t.Fatalf("from dir: ref %q", ev.UVMReferenceInfo)
	}
	// Named by UVM_SECURITY_CONTEXT_DIR.
	col, err := LoadCollateral(envMap(map[string]string{EnvSecurityContextDir: dir}), t.TempDir())
	if err != nil || col.Source != dir || string(col.SecurityPolicy) != "policy" || col.HostAMDCert == nil {
		t.Fatalf("named dir: %+v %v", col, err)
	}
}

func TestMissingCollateralIsActionable(t *testing.T) {
	sim := newSim(t, SimulatedConfig{})
	h := newHardware("sev-guest", simSource{sim}, Options{LookupEnv: envMap(nil), RootDir: t.TempDir()})
	_, err := h.Get(context.Background(), [64]byte{})
	if err == nil || !strings.Contains(err.Error(), "UVM_HOST_AMD_CERTIFICATE is not set") || !strings.Contains(err.Error(), "--cert-cache-url") {
		t.Fatalf("err = %v", err)
	}
}

// certCache is a local stand-in for Azure's certificate cache.
func certCache(t *testing.T, sim *Simulated, jsonForm bool, failFirst int) (*httptest.Server, *atomic.Int32) {
	var calls atomic.Int32
	chip := sim.ChipID()
	want := fmt.Sprintf("/SevSnpVM/certificates/%s/%x", hex.EncodeToString(chip[:]), sim.TCB())
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := calls.Add(1)
		if r.URL.Path != want || r.URL.Query().Get("api-version") != CertCacheAPIVersion {
			http.Error(w, "unexpected "+r.URL.String(), http.StatusNotFound)
			return
		}
		if int(n) <= failFirst {
			http.Error(w, "busy", http.StatusServiceUnavailable)
			return
		}
		var body []byte
		var err error
		if jsonForm {
			body, err = sim.HostAMDCertificateJSON(sim.TCB())
		} else {
			body, err = sim.VCEKChainPEM(sim.TCB())
		}
		if err != nil {
			http.Error(w, err.Error(), 500)
			return
		}
		_, _ = w.Write(body)
	}))
	t.Cleanup(srv.Close)
	return srv, &calls
}

func TestCertCacheRefreshOnTCBMismatch(t *testing.T) {
	sim := newSim(t, SimulatedConfig{})
	stale, err := sim.HostAMDCertificateJSON(sim.TCB() - 1)
	if err != nil {
		t.Fatal(err)
	}
	env := envMap(map[string]string{EnvHostAMDCertificate: b64std(stale)})
	for _, tc := range []struct {
		name      string
		jsonForm  bool
		failFirst int
		calls     int32
	}{
		{"pem", false, 0, 1},
		{"thim-json", true, 0, 1},
		{"retry-503", false, 2, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv, calls := certCache(t, sim, tc.jsonForm, tc.failFirst)
			h := newHardware("sev-guest", simSource{sim}, Options{LookupEnv: env, CertCacheURL: srv.URL, CertCacheBackoff: time.Millisecond})
			ev, err := h.Get(context.Background(), [64]byte{})
			if err != nil {
				t.Fatal(err)
			}
			if got := vcekTCBOf(t, ev.CertChain); got != sim.TCB() {
				t.Fatalf("refreshed VCEK TCB %x, want %x", got, sim.TCB())
			}
			if calls.Load() != tc.calls {
				t.Fatalf("cache calls = %d, want %d", calls.Load(), tc.calls)
			}
		})
	}
	// Without a cache URL, the stale certificate is reported with the fix.
	h := newHardware("sev-guest", simSource{sim}, Options{LookupEnv: env})
	_, err = h.Get(context.Background(), [64]byte{})
	if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("TCB %016x but the report's TCB is %016x", sim.TCB()-1, sim.TCB())) || !strings.Contains(err.Error(), "--cert-cache-url") {
		t.Fatalf("stale without cache: %v", err)
	}
	// A cache that answers with the wrong TCB is refused.
	wrong := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := sim.VCEKChainPEM(sim.TCB() - 1)
		_, _ = w.Write(b)
	}))
	defer wrong.Close()
	h = newHardware("sev-guest", simSource{sim}, Options{LookupEnv: env, CertCacheURL: wrong.URL})
	if _, err := h.Get(context.Background(), [64]byte{}); err == nil || !strings.Contains(err.Error(), "the cache returned a VCEK for TCB") {
		t.Fatalf("wrong TCB from cache: %v", err)
	}
}

func TestCertCacheHonoursContext(t *testing.T) {
	sim := newSim(t, SimulatedConfig{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "busy", http.StatusTooManyRequests)
	}))
	defer srv.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	h := newHardware("sev-guest", simSource{sim}, Options{LookupEnv: envMap(nil), RootDir: t.TempDir(), CertCacheURL: srv.URL, CertCacheBackoff: time.Hour})
	start := time.Now()
	_, err := h.Get(ctx, [64]byte{})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want deadline exceeded", err)
	}
	if time.Since(start) > 5*time.Second {
		t.Fatal("cancellation did not stop the backoff")
	}
}

func TestSplitCertChainAnyOrder(t *testing.T) {
	sim := newSim(t, SimulatedConfig{})
	chain, err := sim.VCEKChainPEM(sim.TCB())
	if err != nil {
		t.Fatal(err)
	}
	// Reverse order: ARK, ASK, VCEK.
	parts := strings.SplitAfter(string(chain), "-----END CERTIFICATE-----\n")
	rev := parts[2] + parts[1] + parts[0]
	c, err := SplitCertChain([]byte(rev))
	if err != nil {
		t.Fatal(err)
	}
	if c.VCEK.Subject.CommonName != "SEV-VCEK" || c.ARK.Subject.CommonName != "ARK-Milan" || c.ASK.Subject.CommonName != "SEV-Milan" {
		t.Fatalf("sorted: %s %s %s", c.VCEK.Subject.CommonName, c.ASK.Subject.CommonName, c.ARK.Subject.CommonName)
	}
	if err := c.VCEK.CheckSignatureFrom(c.ASK); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{"", "not pem", string(pemCert(c.ARK))} {
		if _, err := SplitCertChain([]byte(bad)); err == nil {
			t.Errorf("SplitCertChain(%.20q) succeeded", bad)
		}
	}
}

func TestCertCacheRequestURL(t *testing.T) {
	chip := []byte{0xab, 0x01}
	got := CertCacheRequestURL("https://global.acccache.azure.net/", chip, 0x0300000000000008)
	want := "https://global.acccache.azure.net/SevSnpVM/certificates/ab01/300000000000008?api-version=2020-10-15-preview"
	if got != want {
		t.Fatalf("got %s\nwant %s", got, want)
	}
	thim := "http://169.254.169.254/metadata/THIM/amd/certification"
	if got := CertCacheRequestURL(thim, chip, 1); got != thim {
		t.Fatalf("THIM URL rewritten: %s", got)
	}
}

func TestLoadOrCreateSimulated(t *testing.T) {
	dir := t.TempDir()
	a, err := LoadOrCreateSimulated(dir, SimulatedConfig{})
	if err != nil {
		t.Fatal(err)
	}
	b, err := LoadOrCreateSimulated(dir, SimulatedConfig{Debuggable: true})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a.Roots(), b.Roots()) {
		t.Fatal("second call did not reuse the signer in dir")
	}
	ev, err := b.Get(context.Background(), [64]byte{})
	if err != nil {
		t.Fatal(err)
	}
	if err := verifyWithRoots(t, ev, a.Roots()); err != nil {
		t.Fatal(err)
	}
	// Fresh keys, not go-sev-guest's published ones.
	def := newSim(t, SimulatedConfig{})
	if bytes.Equal(def.ark.RawSubjectPublicKeyInfo, a.ark.RawSubjectPublicKeyInfo) {
		t.Fatal("dev signer uses the published test keys")
	}
}

// tableSource is a device that attaches the host's certificate table to
// an extended report, as SNP_GET_EXT_REPORT and configfs-tsm's auxblob do.
type tableSource struct {
	s   *Simulated
	tcb uint64
}

func (f tableSource) rawReport(ctx context.Context, rd [64]byte) ([]byte, []byte, error) {
	r, err := f.s.Report(rd)
	if err != nil {
		return nil, nil, err
	}
	vcek, err := f.s.vcek(f.tcb)
	if err != nil {
		return nil, nil, err
	}
	table := abi.CertsFromProto(&spb.CertificateChain{VcekCert: vcek.Raw, AskCert: f.s.ask.Raw, ArkCert: f.s.ark.Raw}).Marshal()
	return r, table, nil
}

func TestCertificatesFromExtendedReport(t *testing.T) {
	sim := newSim(t, SimulatedConfig{})
	h := newHardware("sev-guest", tableSource{sim, sim.TCB()}, Options{LookupEnv: envMap(nil), RootDir: t.TempDir()})
	ev, err := h.Get(context.Background(), ReportData([]byte("x")))
	if err != nil {
		t.Fatal(err)
	}
	if err := verifyWithRoots(t, ev, sim.Roots()); err != nil {
		t.Fatal(err)
	}
	// A table for another TCB is not used.
	h = newHardware("sev-guest", tableSource{sim, sim.TCB() + 1}, Options{LookupEnv: envMap(nil), RootDir: t.TempDir()})
	if _, err := h.Get(context.Background(), [64]byte{}); err == nil || !strings.Contains(err.Error(), "--cert-cache-url") {
		t.Fatalf("stale table: %v", err)
	}
}
