// Package maa speaks Microsoft Azure Attestation's SevSnpVm protocol: it
// builds the attest request from SEV-SNP evidence, sends it with retries, and
// verifies the RS256 tokens MAA (or blobseal's local MAA) issues against the
// issuer's published keys.
package maa

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/blobseal/blobseal/keyrelease/evidence"
)

// APIVersion is the MAA data-plane API version used.
const APIVersion = "2022-08-01"

// AttestPath is the SevSnpVm attest endpoint, relative to the instance URL.
const AttestPath = "/attest/SevSnpVm"

// Data types of runtimeData.
const (
	DataTypeJSON   = "JSON"
	DataTypeBinary = "Binary"
)

// maxRequestSize bounds what the decoder accepts.
const maxRequestSize = 1 << 20

// SevSnpVmRequest is the JSON body of POST /attest/SevSnpVm.
type SevSnpVmRequest struct {
	Report                    string       `json:"report"`
	RuntimeData               *RuntimeBlob `json:"runtimeData,omitempty"`
	InitTimeData              *RuntimeBlob `json:"initTimeData,omitempty"`
	DraftPolicyForAttestation string       `json:"draftPolicyForAttestation,omitempty"`
	// Nonce is a string from blobseal; the Azure sidecar sends a JSON
	// number (a random uint64). Both are accepted; see NonceString.
	Nonce json.RawMessage `json:"nonce,omitempty"`
}

// NonceString reads the nonce as text: a JSON string as is, a JSON number
// in its decimal form.
func (r *SevSnpVmRequest) NonceString() (string, error) {
	if len(r.Nonce) == 0 || string(r.Nonce) == "null" {
		return "", nil
	}
	var s string
	if err := json.Unmarshal(r.Nonce, &s); err == nil {
		return s, nil
	}
	var n json.Number
	d := json.NewDecoder(bytes.NewReader(r.Nonce))
	d.UseNumber()
	if err := d.Decode(&n); err != nil || strings.ContainsAny(n.String(), ".eE-") || len(n.String()) > 20 {
		return "", fmt.Errorf("\"nonce\" must be a string or an unsigned integer, got %s", truncate(string(r.Nonce), 40))
	}
	return n.String(), nil
}

// RuntimeBlob is runtimeData/initTimeData: base64url data and its type.
type RuntimeBlob struct {
	Data     string `json:"data"`
	DataType string `json:"dataType"`
}

// SnpReportEnvelope is the JSON inside the base64url "report" field.
type SnpReportEnvelope struct {
	SnpReport     string `json:"SnpReport"`
	VcekCertChain string `json:"VcekCertChain"`
	Endorsements  string `json:"Endorsements,omitempty"`
}

// Endorsements is the JSON inside the base64url "Endorsements" field.
type Endorsements struct {
	Uvm []string `json:"Uvm,omitempty"`
}

// TokenResponse is the 200 response body.
type TokenResponse struct {
	Token string `json:"token"`
}

// ErrorResponse is MAA's error body.
type ErrorResponse struct {
	Error ErrorDetail `json:"error"`
}

// ErrorDetail is the code and message of an error body.
type ErrorDetail struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

var b64 = base64.RawURLEncoding

// EncodeSevSnpVmRequest builds the request body: report = b64url(JSON{
// SnpReport: b64url(report), VcekCertChain: b64url(PEM chain), Endorsements:
// b64url(JSON{Uvm: [b64url(reference info)]})}), runtimeData {data:
// b64url(runtime JSON), dataType: JSON}, nonce.
func EncodeSevSnpVmRequest(ev *evidence.Evidence, runtimeData []byte, nonce string) ([]byte, error) {
	if ev == nil {
		return nil, errors.New("no evidence")
	}
	if len(ev.Report) != evidence.ReportSize {
		return nil, fmt.Errorf("SNP report is %d bytes, want %d", len(ev.Report), evidence.ReportSize)
	}
	if len(ev.CertChain) == 0 {
		return nil, errors.New("evidence has no VCEK certificate chain")
	}
	env := SnpReportEnvelope{
		SnpReport:     b64.EncodeToString(ev.Report),
		VcekCertChain: b64.EncodeToString(ev.CertChain),
	}
	if len(ev.UVMReferenceInfo) > 0 {
		e, err := json.Marshal(Endorsements{Uvm: []string{b64.EncodeToString(ev.UVMReferenceInfo)}})
		if err != nil {
			return nil, err
		}
		env.Endorsements = b64.EncodeToString(e)
	}
	inner, err := json.Marshal(env)
	if err != nil {
		return nil, err
	}
	req := SevSnpVmRequest{Report: b64.EncodeToString(inner)}
	if nonce != "" {
		n, err := json.Marshal(nonce)
		if err != nil {
			return nil, err
		}
		req.Nonce = n
	}
	if runtimeData != nil {
		dataType := DataTypeBinary
		if json.Valid(runtimeData) {
			dataType = DataTypeJSON
		}
		req.RuntimeData = &RuntimeBlob{Data: b64.EncodeToString(runtimeData), DataType: dataType}
	}
	return json.Marshal(req)
}

// DecodedSevSnpVmRequest is a request with every layer decoded.
type DecodedSevSnpVmRequest struct {
	Report           []byte
	CertChain        []byte
	UVMReferenceInfo [][]byte
	RuntimeData      []byte // nil when absent
	RuntimeDataType  string
	InitTimeData     []byte
	Nonce            string
	DraftPolicy      string
}

// DecodeSevSnpVmRequest parses a request body through all its base64url
// and JSON layers. Errors name the field at fault.
func DecodeSevSnpVmRequest(body []byte) (*DecodedSevSnpVmRequest, error) {
	if len(body) > maxRequestSize {
		return nil, fmt.Errorf("request body is larger than %d bytes", maxRequestSize)
	}
	var req SevSnpVmRequest
	if err := json.Unmarshal(body, &req); err != nil {
		return nil, fmt.Errorf("request body is not JSON {report, runtimeData, nonce}: %w", err)
	}
	if req.Report == "" {
		return nil, errors.New("request has no \"report\"")
	}
	inner, err := decodeB64URL(req.Report)
	if err != nil {
		return nil, fmt.Errorf("\"report\" is not base64url: %w", err)
	}
	var env SnpReportEnvelope
	if err := json.Unmarshal(inner, &env); err != nil {
		return nil, fmt.Errorf("decoded \"report\" is not JSON {SnpReport, VcekCertChain, Endorsements}: %w", err)
	}
	nonce, err := req.NonceString()
	if err != nil {
		return nil, err
	}
	out := &DecodedSevSnpVmRequest{Nonce: nonce, DraftPolicy: req.DraftPolicyForAttestation}
	if out.Report, err = decodeB64URL(env.SnpReport); err != nil {
		return nil, fmt.Errorf("\"SnpReport\" is not base64url: %w", err)
	}
	if len(out.Report) != evidence.ReportSize {
		return nil, fmt.Errorf("\"SnpReport\" is %d bytes, want %d", len(out.Report), evidence.ReportSize)
	}
	if out.CertChain, err = decodeB64URL(env.VcekCertChain); err != nil {
		return nil, fmt.Errorf("\"VcekCertChain\" is not base64url: %w", err)
	}
	if env.Endorsements != "" {
		e, err := decodeB64URL(env.Endorsements)
		if err != nil {
			return nil, fmt.Errorf("\"Endorsements\" is not base64url: %w", err)
		}
		var endorse Endorsements
		if err := json.Unmarshal(e, &endorse); err != nil {
			return nil, fmt.Errorf("decoded \"Endorsements\" is not JSON {Uvm: [...]}: %w", err)
		}
		for i, u := range endorse.Uvm {
			d, err := decodeB64URL(u)
			if err != nil {
				return nil, fmt.Errorf("\"Endorsements.Uvm[%d]\" is not base64url: %w", i, err)
			}
			out.UVMReferenceInfo = append(out.UVMReferenceInfo, d)
		}
	}
	if req.RuntimeData != nil {
		if out.RuntimeData, err = decodeB64URL(req.RuntimeData.Data); err != nil {
			return nil, fmt.Errorf("\"runtimeData.data\" is not base64url: %w", err)
		}
		out.RuntimeDataType = req.RuntimeData.DataType
		switch out.RuntimeDataType {
		case DataTypeJSON:
			if !json.Valid(out.RuntimeData) {
				return nil, errors.New("\"runtimeData\" has dataType JSON but its data is not JSON")
			}
		case DataTypeBinary:
		default:
			return nil, fmt.Errorf("\"runtimeData.dataType\" is %q, want JSON or Binary", truncate(out.RuntimeDataType, 40))
		}
	}
	if req.InitTimeData != nil {
		if out.InitTimeData, err = decodeB64URL(req.InitTimeData.Data); err != nil {
			return nil, fmt.Errorf("\"initTimeData.data\" is not base64url: %w", err)
		}
	}
	return out, nil
}

// decodeB64URL accepts base64url with or without padding.
func decodeB64URL(s string) ([]byte, error) {
	return b64.DecodeString(strings.TrimRight(s, "="))
}

// RuntimeDataMatches reports whether the report's REPORT_DATA starts with
// SHA-256(runtimeData), which is what MAA checks.
func RuntimeDataMatches(report, runtimeData []byte) bool {
	if len(report) < 0x90 {
		return false
	}
	sum := sha256.Sum256(runtimeData)
	return string(report[0x50:0x70]) == string(sum[:])
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
