package evidence

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// The URLs the Azure sidecars build from their certcache configuration
// (microsoft/confidential-sidecar-containers pkg/attest/certcache.go and its
// THIM endpoint on the metadata address).
func TestLegacyCertCacheURLs(t *testing.T) {
	chip := []byte{0xab, 0xcd}
	tcb := uint64(0x7300000000000403) // microcode 0x73, SNP 0, TEE 4, boot loader 3
	for _, c := range []struct {
		typ, endpoint, tee, api string
		vcek, chain             string
	}{
		{"AzCache", "americas.test.acccache.azure.net", "SevSnpVM", "api-version=2020-10-15-preview",
			"https://americas.test.acccache.azure.net/SevSnpVM/certificates/abcd/7300000000000403?api-version=2020-10-15-preview", ""},
		{"", "global.acccache.azure.net", "", "",
			"https://global.acccache.azure.net/SevSnpVM/certificates/abcd/7300000000000403?api-version=" + CertCacheAPIVersion, ""},
		{"LocalTHIM", "169.254.169.254", "", "",
			"http://169.254.169.254/metadata/THIM/amd/certification", ""},
		// SkrSideCarArgs of Microsoft's confidential AKS Kafka sample (a pod
		// with runtimeClassName kata-cc-isolation): the endpoint carries the path.
		{"LocalTHIM", "169.254.169.254/metadata/THIM/amd/certification", "", "",
			"http://169.254.169.254/metadata/THIM/amd/certification", ""},
		{"AMD", "kdsintf.amd.com", "vcek/v1/Milan", "",
			"https://kdsintf.amd.com/vcek/v1/Milan/abcd?ucodeSPL=115&snpSPL=0&teeSPL=4&blSPL=3", "https://kdsintf.amd.com/vcek/v1/Milan/cert_chain"},
	} {
		cc, err := LegacyCertCache(c.typ, c.endpoint, c.tee, c.api)
		if err != nil {
			t.Fatalf("%s: %v", c.typ, err)
		}
		vcek, chain := cc.RequestURLs(chip, tcb)
		if vcek != c.vcek || chain != c.chain {
			t.Errorf("%s:\n got %s %s\nwant %s %s", c.typ, vcek, chain, c.vcek, c.chain)
		}
	}
	if _, err := LegacyCertCache("Azure", "x", "", ""); err == nil || !strings.Contains(err.Error(), "AzCache, LocalTHIM or AMD") {
		t.Errorf("unknown type: %v", err)
	}
	if _, err := LegacyCertCache("AMD", "kdsintf.amd.com", "", ""); err == nil || !strings.Contains(err.Error(), "tee_type") {
		t.Errorf("AMD without product: %v", err)
	}
}

// An AMD KDS (VCEK as DER by chip and SPLs, ASK/ARK as PEM) and a local
// THIM (plain http, JSON) both yield the chain for the report's TCB.
func TestCertCacheKindsFetch(t *testing.T) {
	sim := newSim(t, SimulatedConfig{})
	chip := sim.ChipID()
	var tcb [8]byte
	binary.LittleEndian.PutUint64(tcb[:], sim.TCB())
	chainPEM, err := sim.VCEKChainPEM(sim.TCB())
	if err != nil {
		t.Fatal(err)
	}
	vcekBlock, rest := pem.Decode(chainPEM)
	kds := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.String() {
		case fmt.Sprintf("/vcek/v1/Milan/%s?ucodeSPL=%d&snpSPL=%d&teeSPL=%d&blSPL=%d", hex.EncodeToString(chip[:]), tcb[7], tcb[6], tcb[1], tcb[0]):
			w.Write(vcekBlock.Bytes)
		case "/vcek/v1/Milan/cert_chain":
			w.Write(rest)
		default:
			http.Error(w, "unexpected "+r.URL.String(), http.StatusNotFound)
		}
	}))
	t.Cleanup(kds.Close)
	thim := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/metadata/THIM/amd/certification" || r.Header.Get("Metadata") != "true" {
			http.Error(w, "unexpected", http.StatusNotFound)
			return
		}
		b, _ := sim.HostAMDCertificateJSON(sim.TCB())
		w.Write(b)
	}))
	t.Cleanup(thim.Close)
	thimCC, err := LegacyCertCache("LocalTHIM", strings.TrimPrefix(thim.URL, "http://"), "", "")
	if err != nil {
		t.Fatal(err)
	}
	for name, cc := range map[string]CertCache{
		"AMD":       {Kind: CertCacheAMD, URL: kds.URL + "/vcek/v1/Milan"},
		"LocalTHIM": thimCC,
	} {
		h := newHardware("sev-guest", simSource{sim}, Options{LookupEnv: envMap(nil), RootDir: t.TempDir(), CertCache: cc})
		ev, err := h.Get(context.Background(), [64]byte{})
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		c, err := SplitCertChain(ev.CertChain)
		if err != nil || c.VCEK.Subject.CommonName != "SEV-VCEK" || c.ARK == nil {
			t.Fatalf("%s: chain %v", name, err)
		}
	}
}
