// Package localmaa is a local attestation service that speaks Microsoft
// Azure Attestation's SevSnpVm protocol: POST /attest/SevSnpVm verifies the
// SNP report with go-sev-guest against configured AMD roots, checks that
// REPORT_DATA binds the runtime data, and issues an RS256 token with MAA's
// claim names; GET /certs and /.well-known/openid-configuration publish the
// signing key. It serves TLS with a certificate from keyrelease/localca.
//
// Differences from MAA: the UVM endorsement (COSE reference info) is not
// verified; x-ms-compliance-status is "azure-compliant-uvm" when the
// report's launch measurement is in Options.CompliantMeasurements. No
// attestation policy runs: debuggable guests get a token that says
// x-ms-sevsnpvm-is-debuggable=true, and the key release policy rejects them.
package localmaa

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/google/go-sev-guest/abi"
	"github.com/google/go-sev-guest/kds"
	spb "github.com/google/go-sev-guest/proto/sevsnp"
	"github.com/google/go-sev-guest/verify"
	"github.com/google/go-sev-guest/verify/trust"

	"github.com/blobseal/blobseal/keyrelease/evidence"
	"github.com/blobseal/blobseal/keyrelease/localca"
	"github.com/blobseal/blobseal/keyrelease/maa"
)

// Options configures the service.
type Options struct {
	// Roots is PEM holding the trusted AMD root (ARK) certificates and,
	// optionally, their ASKs; without an ASK, the request's ASK is used if
	// the ARK signed it. For simulated evidence: (*evidence.Simulated).Roots().
	Roots         []byte
	TokenLifetime time.Duration    // 0: 8 hours, like MAA
	Clock         func() time.Time // nil: time.Now
	Logger        *slog.Logger     // nil: discard
	// TLSCert is served by Start; nil: Start issues one from a fresh
	// localca CA, whose PEM CAPEM returns.
	TLSCert *tls.Certificate
	// BaseURL is the issuer (iss); "": Start's URL, or the request's host
	// when only Handler is used.
	BaseURL string
	// CompliantMeasurements are the launch measurements reported as
	// x-ms-compliance-status=azure-compliant-uvm.
	CompliantMeasurements [][]byte
	// SigningKey signs tokens; nil: a fresh RSA-2048 key.
	SigningKey *rsa.PrivateKey
}

// Server is the local attestation service.
type Server struct {
	opts     Options
	log      *slog.Logger
	arks     []*x509.Certificate
	asks     map[string]*x509.Certificate // by product line
	key      *rsa.PrivateKey
	jwk      jose.JSONWebKey // public, with x5c
	lifetime time.Duration

	mu      sync.Mutex
	baseURL string
	srv     *http.Server
	caPEM   []byte
}

// New validates the options and creates the signing key.
func New(opts Options) (*Server, error) {
	s := &Server{opts: opts, asks: map[string]*x509.Certificate{}, lifetime: opts.TokenLifetime, baseURL: strings.TrimRight(opts.BaseURL, "/")}
	if s.lifetime <= 0 {
		s.lifetime = 8 * time.Hour
	}
	if s.opts.Clock == nil {
		s.opts.Clock = time.Now
	}
	s.log = opts.Logger
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if err := s.loadRoots(opts.Roots); err != nil {
		return nil, err
	}
	s.key = opts.SigningKey
	if s.key == nil {
		var err error
		if s.key, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
			return nil, err
		}
	}
	cert, err := selfSigned(s.key)
	if err != nil {
		return nil, err
	}
	thumb, err := (&jose.JSONWebKey{Key: &s.key.PublicKey}).Thumbprint(crypto.SHA256)
	if err != nil {
		return nil, err
	}
	s.jwk = jose.JSONWebKey{
		Key:          &s.key.PublicKey,
		KeyID:        b64(thumb),
		Algorithm:    string(jose.RS256),
		Use:          "sig",
		Certificates: []*x509.Certificate{cert},
	}
	return s, nil
}

func (s *Server) loadRoots(data []byte) error {
	rest := data
	var all []*x509.Certificate
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return fmt.Errorf("localmaa: trusted root certificate: %w", err)
		}
		all = append(all, c)
	}
	for _, c := range all {
		if bytes.Equal(c.RawSubject, c.RawIssuer) {
			s.arks = append(s.arks, c)
		}
	}
	if len(s.arks) == 0 {
		return errors.New("localmaa: Options.Roots holds no self-signed AMD root (ARK) certificate; for simulated evidence pass (*evidence.Simulated).Roots()")
	}
	for _, c := range all {
		if bytes.Equal(c.RawSubject, c.RawIssuer) {
			continue
		}
		for _, ark := range s.arks {
			if c.CheckSignatureFrom(ark) == nil {
				s.asks[productLine(ark)] = c
			}
		}
	}
	return nil
}

// productLine reads "Milan" from an ARK named "ARK-Milan".
func productLine(ark *x509.Certificate) string {
	return strings.TrimPrefix(ark.Subject.CommonName, "ARK-")
}

func selfSigned(key *rsa.PrivateKey) (*x509.Certificate, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 64))
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "blobseal local attestation token signing"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

// SigningKeys returns the public signing keys, as /certs serves them.
func (s *Server) SigningKeys() jose.JSONWebKeySet {
	return jose.JSONWebKeySet{Keys: []jose.JSONWebKey{s.jwk}}
}

// CAPEM returns the PEM of the CA that issued the TLS certificate when
// Start generated it, else nil.
func (s *Server) CAPEM() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.caPEM
}

// Start listens on addr ("" means 127.0.0.1:0) with TLS and returns the
// base URL, which is also the token issuer unless Options.BaseURL is set.
func (s *Server) Start(addr string) (string, error) {
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.srv != nil {
		return "", errors.New("localmaa: already started")
	}
	cert := s.opts.TLSCert
	if cert == nil {
		ca, err := localca.New("blobseal local attestation CA", 7*24*time.Hour)
		if err != nil {
			return "", err
		}
		host, _, _ := net.SplitHostPort(addr)
		hosts := []string{"localhost", "127.0.0.1"}
		if host != "" && host != "localhost" && host != "127.0.0.1" {
			hosts = append(hosts, host)
		}
		c, err := ca.ServerCert(hosts...)
		if err != nil {
			return "", err
		}
		cert, s.caPEM = &c, ca.PEM()
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return "", fmt.Errorf("localmaa: listen on %s: %w", addr, err)
	}
	base := "https://" + ln.Addr().String()
	if s.baseURL == "" {
		s.baseURL = base
	}
	s.srv = &http.Server{
		Handler:           s.Handler(),
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      30 * time.Second,
		TLSConfig:         &tls.Config{Certificates: []tls.Certificate{*cert}, MinVersion: tls.VersionTLS12},
	}
	srv := s.srv
	go func() {
		if err := srv.ServeTLS(ln, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("local attestation service stopped", "err", err)
		}
	}()
	s.log.Info("local attestation service listening", "url", base)
	return base, nil
}

// Close stops a started server.
func (s *Server) Close() error {
	s.mu.Lock()
	srv := s.srv
	s.srv = nil
	s.mu.Unlock()
	if srv == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		return srv.Close()
	}
	return nil
}

// Handler serves the MAA-compatible API.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	// MAA routes the TEE type case-insensitively: the Azure sidecars post
	// to /attest/SevSnpVM, blobseal to /attest/SevSnpVm.
	mux.HandleFunc("POST /attest/{tee}", func(w http.ResponseWriter, r *http.Request) {
		if !strings.EqualFold(r.PathValue("tee"), strings.TrimPrefix(maa.AttestPath, "/attest/")) {
			s.fail(w, &apiError{http.StatusNotFound, "NotFound", "only SevSnpVm attestation is served here"})
			return
		}
		s.handleAttest(w, r)
	})
	mux.HandleFunc("GET /certs", s.handleCerts)
	mux.HandleFunc("GET /.well-known/openid-configuration", s.handleOpenID)
	return mux
}

func (s *Server) base(r *http.Request) string {
	s.mu.Lock()
	b := s.baseURL
	s.mu.Unlock()
	if b != "" {
		return b
	}
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	return scheme + "://" + r.Host
}

// handleCerts serves the keys in real MAA's shape: {x5c, kid, kty} with no
// n/e, so clients tested against this server also work against Azure.
func (s *Server) handleCerts(w http.ResponseWriter, _ *http.Request) {
	type maaKey struct {
		X5C []string `json:"x5c"`
		Kid string   `json:"kid"`
		Kty string   `json:"kty"`
	}
	var keys []maaKey
	for _, k := range s.SigningKeys().Keys {
		mk := maaKey{Kid: k.KeyID, Kty: "RSA"}
		for _, c := range k.Certificates {
			mk.X5C = append(mk.X5C, base64.StdEncoding.EncodeToString(c.Raw))
		}
		keys = append(keys, mk)
	}
	writeJSON(w, http.StatusOK, map[string]any{"keys": keys})
}

func (s *Server) handleOpenID(w http.ResponseWriter, r *http.Request) {
	base := s.base(r)
	writeJSON(w, http.StatusOK, map[string]any{
		"issuer":                                base,
		"jwks_uri":                              base + "/certs",
		"response_types_supported":              []string{"token", "none"},
		"id_token_signing_alg_values_supported": []string{"RS256"},
		"claims_supported": []string{"iss", "iat", "nbf", "exp", "jti", "nonce", maa.ClaimVersion,
			maa.ClaimAttestationType, maa.ClaimComplianceStatus, maa.ClaimRuntime, maa.ClaimHostData,
			maa.ClaimIsDebuggable, maa.ClaimVMPL, maa.ClaimLaunchMeasurement, maa.ClaimReportData},
	})
}

// apiError is an error answered with MAA's error body.
type apiError struct {
	status  int
	code    string
	message string
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func (s *Server) fail(w http.ResponseWriter, e *apiError) {
	s.log.Info("attestation rejected", "code", e.code, "reason", e.message)
	writeJSON(w, e.status, maa.ErrorResponse{Error: maa.ErrorDetail{Code: e.code, Message: e.message}})
}

func (s *Server) handleAttest(w http.ResponseWriter, r *http.Request) {
	if r.URL.Query().Get("api-version") == "" {
		s.fail(w, &apiError{http.StatusBadRequest, "MissingApiVersionParameter", "The api-version query parameter (?api-version=) is required for all requests."})
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20+1))
	if err != nil {
		s.fail(w, &apiError{http.StatusBadRequest, "InvalidParameter", "could not read the request body"})
		return
	}
	req, err := maa.DecodeSevSnpVmRequest(body)
	if err != nil {
		s.fail(w, &apiError{http.StatusBadRequest, "InvalidParameter", err.Error()})
		return
	}
	claims, aerr := s.attest(r.Context(), req, s.base(r))
	if aerr != nil {
		s.fail(w, aerr)
		return
	}
	token, err := s.sign(claims, s.base(r))
	if err != nil {
		s.fail(w, &apiError{http.StatusInternalServerError, "InternalError", "could not sign the token"})
		return
	}
	s.log.Info("attestation token issued", "jti", claims["jti"], "hostdata", claims[maa.ClaimHostData], "debuggable", claims[maa.ClaimIsDebuggable])
	writeJSON(w, http.StatusOK, maa.TokenResponse{Token: token})
}

// attest verifies the decoded request and returns the token claims.
func (s *Server) attest(ctx context.Context, req *maa.DecodedSevSnpVmRequest, base string) (map[string]any, *apiError) {
	bad := func(format string, args ...any) *apiError {
		return &apiError{http.StatusBadRequest, "InvalidParameter", fmt.Sprintf(format, args...)}
	}
	report, err := abi.ReportToProto(req.Report)
	if err != nil {
		return nil, bad("SnpReport is not a valid SEV-SNP attestation report: %v", err)
	}
	chain, err := evidence.SplitCertChain(req.CertChain)
	if err != nil {
		return nil, bad("VcekCertChain: %v", err)
	}
	if tcb, err := evidence.VCEKTCB(chain.VCEK); err != nil {
		return nil, bad("VcekCertChain: %v", err)
	} else if tcb != report.GetReportedTcb() {
		return nil, bad("VCEK certificate is for TCB %016x but the report's reported TCB is %016x: refresh the VCEK from the certificate cache", tcb, report.GetReportedTcb())
	}
	att := &spb.Attestation{Report: report, CertificateChain: &spb.CertificateChain{VcekCert: chain.VCEK.Raw}}
	if chain.ASK != nil {
		att.CertificateChain.AskCert = chain.ASK.Raw
	}
	if chain.ARK != nil {
		att.CertificateChain.ArkCert = chain.ARK.Raw
	}
	opts := &verify.Options{
		DisableCertFetching: true,
		TrustedRoots:        s.trustedRoots(chain.ASK),
		Now:                 s.opts.Clock(),
	}
	if err := verify.SnpAttestationContext(ctx, att, opts); err != nil {
		return nil, &apiError{http.StatusBadRequest, "InvalidParameter", fmt.Sprintf("SEV-SNP report verification failed (untrusted AMD root, bad certificate chain or bad report signature): %v", err)}
	}
	if req.RuntimeData != nil && !maa.RuntimeDataMatches(req.Report, req.RuntimeData) {
		return nil, bad("report data mismatch: the first 32 bytes of the report's REPORT_DATA are not SHA-256 of runtimeData.data")
	}
	return s.claims(report, req, base)
}

// trustedRoots pairs each configured ARK with its configured ASK, else with
// the request's ASK if that ARK signed it.
func (s *Server) trustedRoots(reqASK *x509.Certificate) map[string][]*trust.AMDRootCerts {
	roots := map[string][]*trust.AMDRootCerts{}
	for _, ark := range s.arks {
		line := productLine(ark)
		ask := s.asks[line]
		if ask == nil && reqASK != nil && reqASK.CheckSignatureFrom(ark) == nil {
			ask = reqASK
		}
		if ask == nil {
			continue
		}
		r := trust.AMDRootCertsProduct(line)
		r.ProductCerts = &trust.ProductCerts{Ark: ark, Ask: ask}
		roots[line] = append(roots[line], r)
	}
	return roots
}

func (s *Server) claims(report *spb.Report, req *maa.DecodedSevSnpVmRequest, base string) (map[string]any, *apiError) {
	policy, err := abi.ParseSnpPolicy(report.GetPolicy())
	if err != nil {
		return nil, &apiError{http.StatusBadRequest, "InvalidParameter", fmt.Sprintf("report guest policy: %v", err)}
	}
	tcb := kds.DecomposeTCBVersion(kds.TCBVersion(report.GetReportedTcb()))
	jti := make([]byte, 32)
	if _, err := rand.Read(jti); err != nil {
		return nil, &apiError{http.StatusInternalServerError, "InternalError", "no randomness"}
	}
	now := s.opts.Clock()
	c := map[string]any{
		"iss":                      base,
		"iat":                      now.Unix(),
		"nbf":                      now.Unix(),
		"exp":                      now.Add(s.lifetime).Unix(),
		"jti":                      hex.EncodeToString(jti),
		maa.ClaimVersion:           "1.0",
		maa.ClaimAttestationType:   maa.AttestationTypeSevSnpVM,
		maa.ClaimHostData:          hex.EncodeToString(report.GetHostData()),
		maa.ClaimIsDebuggable:      policy.Debug,
		maa.ClaimVMPL:              report.GetVmpl(),
		maa.ClaimLaunchMeasurement: hex.EncodeToString(report.GetMeasurement()),
		maa.ClaimReportData:        hex.EncodeToString(report.GetReportData()),
		maa.ClaimGuestSVN:          report.GetGuestSvn(),
		maa.ClaimIDKeyDigest:       hex.EncodeToString(report.GetIdKeyDigest()),
		maa.ClaimAuthorKeyDigest:   hex.EncodeToString(report.GetAuthorKeyDigest()),
		maa.ClaimFamilyID:          hex.EncodeToString(report.GetFamilyId()),
		maa.ClaimImageID:           hex.EncodeToString(report.GetImageId()),
		maa.ClaimReportID:          hex.EncodeToString(report.GetReportId()),
		maa.ClaimBootloaderSVN:     tcb.BlSpl,
		maa.ClaimTEESVN:            tcb.TeeSpl,
		maa.ClaimSNPFirmwareSVN:    tcb.SnpSpl,
		maa.ClaimMicrocodeSVN:      tcb.UcodeSpl,
		maa.ClaimSMTAllowed:        policy.SMT,
		maa.ClaimMigrationAllowed:  policy.MigrateMA,
	}
	if req.Nonce != "" {
		c[maa.ClaimNonce] = req.Nonce
	}
	for _, m := range s.opts.CompliantMeasurements {
		if bytes.Equal(m, report.GetMeasurement()) {
			c[maa.ClaimComplianceStatus] = maa.ComplianceCompliantUVM
		}
	}
	if req.RuntimeData != nil && req.RuntimeDataType == maa.DataTypeJSON {
		var rt any
		if err := json.Unmarshal(req.RuntimeData, &rt); err != nil {
			return nil, &apiError{http.StatusBadRequest, "InvalidParameter", "runtimeData is not JSON"}
		}
		c[maa.ClaimRuntime] = rt
	}
	return c, nil
}

func (s *Server) sign(claims map[string]any, base string) (string, error) {
	payload, err := json.Marshal(claims)
	if err != nil {
		return "", err
	}
	opts := (&jose.SignerOptions{}).WithType("JWT").WithHeader("jku", base+"/certs")
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.RS256, Key: jose.JSONWebKey{Key: s.key, KeyID: s.jwk.KeyID}}, opts)
	if err != nil {
		return "", err
	}
	jws, err := signer.Sign(payload)
	if err != nil {
		return "", err
	}
	return jws.CompactSerialize()
}

func b64(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }
