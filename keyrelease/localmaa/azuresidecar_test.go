package localmaa_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/blobseal/blobseal/internal/secret"
	"github.com/blobseal/blobseal/keyrelease/evidence"
)

// azureSidecarBody builds the attest request the way the Azure sidecars do
// (microsoft/confidential-sidecar-containers pkg/attest/maa.go,
// newAttestSNPRequestBody): padded base64url everywhere, runtimeData typed
// JSON, an always-present initTimeData (empty: the sidecar cannot send its
// Rego policy), and the nonce as a JSON number (a random uint64).
func azureSidecarBody(t *testing.T, ev *evidence.Evidence, keyBlob []byte, nonce uint64) []byte {
	t.Helper()
	type attestedData struct {
		Data     string `json:"data"`
		DataType string `json:"dataType"`
	}
	enc := base64.URLEncoding
	endorse, _ := json.Marshal(struct {
		Uvm []string `json:"Uvm"`
	}{Uvm: []string{enc.EncodeToString(ev.UVMReferenceInfo)}})
	report, _ := json.Marshal(struct {
		SNPReport    string `json:"SnpReport"`
		CertChain    string `json:"VcekCertChain"`
		Endorsements string `json:"Endorsements,omitempty"`
	}{enc.EncodeToString(ev.Report), enc.EncodeToString(ev.CertChain), enc.EncodeToString(endorse)})
	body, err := json.Marshal(struct {
		Report       string       `json:"report"`
		RuntimeData  attestedData `json:"runtimeData"`
		InittimeData attestedData `json:"initTimeData"`
		Nonce        uint64       `json:"nonce"`
	}{enc.EncodeToString(report), attestedData{enc.EncodeToString(keyBlob), "JSON"}, attestedData{}, nonce})
	if err != nil {
		t.Fatal(err)
	}
	return body
}

func TestAcceptsTheAzureSidecarsRequestBody(t *testing.T) {
	m := testMeasurement()
	sim := newSim(t, evidence.SimulatedConfig{Measurement: m, UVMReferenceInfo: []byte("cose-sign1 bytes")})
	s := newStack(t, sim, nil)
	_, keyBlob := wrappingKey(t)
	ev, err := sim.Get(context.Background(), evidence.ReportData(keyBlob))
	if err != nil {
		t.Fatal(err)
	}
	const nonce = uint64(18446744073709551615) // the largest a uint64 nonce can be
	body := azureSidecarBody(t, ev, keyBlob, nonce)
	if !strings.Contains(string(body), `"nonce":18446744073709551615`) || !strings.Contains(string(body), `"initTimeData":{"data":"","dataType":""}`) {
		t.Fatalf("body does not have the Azure sidecar's shape: %s", body)
	}
	// The Azure sidecar's URL: https://%s/attest/%s?%s with TEEType SevSnpVM
	// and api-version=2020-10-01.
	resp, err := s.hc.Post(s.base+"/attest/SevSnpVM?api-version=2020-10-01", "application/json", strings.NewReader(string(body)))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out struct{ Token string }
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d, %v", resp.StatusCode, err)
	}
	c, err := s.verifier(t, nil).Verify(context.Background(), secret.Token(out.Token))
	if err != nil {
		t.Fatal(err)
	}
	if c.Nonce != "18446744073709551615" || len(c.RuntimeKeys) != 1 {
		t.Fatalf("nonce %q, %d runtime keys", c.Nonce, len(c.RuntimeKeys))
	}

	for name, bad := range map[string]string{
		"fractional nonce": strings.Replace(string(body), `"nonce":18446744073709551615`, `"nonce":1.5`, 1),
		"negative nonce":   strings.Replace(string(body), `"nonce":18446744073709551615`, `"nonce":-1`, 1),
		"object nonce":     strings.Replace(string(body), `"nonce":18446744073709551615`, `"nonce":{}`, 1),
	} {
		resp, err := s.hc.Post(s.base+"/attest/SevSnpVm?api-version=2022-08-01", "application/json", strings.NewReader(bad))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("%s: status %d", name, resp.StatusCode)
		}
	}
}
