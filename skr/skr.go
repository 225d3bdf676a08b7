// Package skr serves the REST API of Azure's secure key release (SKR)
// sidecar, so applications written for that sidecar keep working when
// blobseal replaces it: GET /status, POST /attest/raw, /attest/combined,
// /attest/maa and /key/release, with the same JSON fields, the same default
// port and JSON error bodies. Beyond the Azure sidecar it bounds request
// sizes and times, counts requests per endpoint, and can restrict which keys
// may be released. All attestation and release work is keyrelease's.
package skr

import (
	"context"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"

	"github.com/blobseal/blobseal/internal/secret"
	"github.com/blobseal/blobseal/keyrelease"
	"github.com/blobseal/blobseal/keyrelease/evidence"
	"github.com/blobseal/blobseal/keyrelease/hsm"
)

// DefaultAddress is where the Azure SKR sidecar listens (localhost:8080).
const DefaultAddress = "127.0.0.1:8080"

// Defaults for Options.
const (
	DefaultMaxBodyBytes   = 64 << 10
	DefaultRequestTimeout = 2 * time.Minute
	DefaultMaxInFlight    = 8
)

// Options configure a Server.
type Options struct {
	// Evidence produces SNP reports. Required.
	Evidence evidence.Provider
	// Credential authenticates to the vault when a /key/release request
	// carries no access_token (managed or workload identity). Nil: such
	// requests fail with 401-style errors naming access_token.
	Credential azcore.TokenCredential
	// HTTPClient carries MAA and vault requests; TrustedRoots verify the
	// vault's signed release responses (nil: system roots).
	HTTPClient   *http.Client
	TrustedRoots *x509.CertPool
	// AllowedKeys, when not empty, lists the keys /key/release may release:
	// "NAME" (any vault) or "VAULTHOST/NAME". Others get 403.
	AllowedKeys []string
	// MaxBodyBytes bounds request bodies (default 64 KiB).
	MaxBodyBytes int64
	// RequestTimeout bounds one request's attestation and release work
	// (default 2 minutes).
	RequestTimeout time.Duration
	// MaxInFlight bounds the attestation and release requests served at
	// once (each makes an SNP report and an RSA key); more are answered 429
	// (default 8).
	MaxInFlight int
	Logger      *slog.Logger
}

// Server answers the SKR API.
type Server struct {
	o       Options
	log     *slog.Logger
	mux     *http.ServeMux
	metrics *Metrics
	slots   chan struct{} // MaxInFlight tokens
}

// Metrics counts requests per endpoint and status class.
type Metrics struct {
	mu     sync.Mutex
	counts map[string]*EndpointStats
}

// EndpointStats are one endpoint's counters.
type EndpointStats struct {
	Requests uint64
	Errors   uint64 // responses with status >= 400
	Total    time.Duration
}

func (m *Metrics) observe(endpoint string, status int, d time.Duration) {
	m.mu.Lock()
	defer m.mu.Unlock()
	st := m.counts[endpoint]
	if st == nil {
		st = &EndpointStats{}
		m.counts[endpoint] = st
	}
	st.Requests++
	if status >= 400 {
		st.Errors++
	}
	st.Total += d
}

// Snapshot copies the counters, by endpoint ("POST /key/release").
func (m *Metrics) Snapshot() map[string]EndpointStats {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make(map[string]EndpointStats, len(m.counts))
	for k, v := range m.counts {
		out[k] = *v
	}
	return out
}

// New checks the options and builds the handler.
func New(o Options) (*Server, error) {
	if o.Evidence == nil {
		return nil, errors.New("skr: an evidence provider is required (the SEV-SNP guest device)")
	}
	if o.MaxBodyBytes <= 0 {
		o.MaxBodyBytes = DefaultMaxBodyBytes
	}
	if o.RequestTimeout <= 0 {
		o.RequestTimeout = DefaultRequestTimeout
	}
	if o.MaxInFlight <= 0 {
		o.MaxInFlight = DefaultMaxInFlight
	}
	for _, k := range o.AllowedKeys {
		if strings.TrimSpace(k) == "" || strings.Count(k, "/") > 1 {
			return nil, fmt.Errorf("skr: allowed key %q must be NAME or VAULTHOST/NAME", k)
		}
	}
	s := &Server{o: o, log: o.Logger, mux: http.NewServeMux(), metrics: &Metrics{counts: map[string]*EndpointStats{}},
		slots: make(chan struct{}, o.MaxInFlight)}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	s.handle("GET /status", s.status)
	s.handle("POST /attest/raw", s.attestRaw)
	s.handle("POST /attest/combined", s.attestCombined)
	s.handle("POST /attest/maa", s.attestMAA)
	s.handle("POST /key/release", s.keyRelease)
	for path, method := range map[string]string{"/status": "GET", "/attest/raw": "POST", "/attest/combined": "POST", "/attest/maa": "POST", "/key/release": "POST"} {
		s.mux.HandleFunc(path, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Allow", method)
			writeError(w, http.StatusMethodNotAllowed, fmt.Sprintf("%s takes %s, not %s", path, method, r.Method))
		})
	}
	s.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, fmt.Sprintf("no endpoint %s %s (endpoints: GET /status, POST /attest/raw, /attest/combined, /attest/maa, /key/release)", r.Method, truncate(r.URL.Path, 100)))
	})
	return s, nil
}

// Handler serves the API.
func (s *Server) Handler() http.Handler { return s.mux }

// Metrics returns the per-endpoint counters.
func (s *Server) Metrics() *Metrics { return s.metrics }

// statusWriter remembers the status for the metrics.
type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

// apiError is a failure the handler answers with; exactly one body is
// written per request (the Azure sidecar appends a second one after some
// errors, which breaks JSON clients).
type apiError struct {
	status int
	msg    string
}

func (e *apiError) Error() string { return e.msg }

func (s *Server) handle(pattern string, h func(*http.Request) (any, *apiError)) {
	s.mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		sw := &statusWriter{ResponseWriter: w}
		r.Body = http.MaxBytesReader(sw, r.Body, s.o.MaxBodyBytes)
		ctx, cancel := context.WithTimeout(r.Context(), s.o.RequestTimeout)
		defer cancel()
		var resp any
		var aerr *apiError
		if r.Method == http.MethodGet {
			resp, aerr = h(r.WithContext(ctx))
		} else {
			select {
			case s.slots <- struct{}{}:
				resp, aerr = h(r.WithContext(ctx))
				<-s.slots
			default:
				sw.Header().Set("Retry-After", "1")
				aerr = &apiError{http.StatusTooManyRequests, fmt.Sprintf("%d attestation or release requests are already running; retry shortly", s.o.MaxInFlight)}
			}
		}
		if aerr != nil {
			writeError(sw, aerr.status, aerr.msg)
			s.log.Warn("skr request failed", "endpoint", pattern, "status", aerr.status, "error", aerr.msg)
		} else {
			writeJSON(sw, http.StatusOK, resp)
		}
		s.metrics.observe(pattern, sw.status, time.Since(start))
	})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		status, body = http.StatusInternalServerError, []byte(`{"error":"encoding the response failed"}`)
	}
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	_, _ = w.Write(body)
	if kr, ok := v.(keyResponse); ok {
		// The body held the released key.
		secret.Wipe(body)
		kr.wipe()
	}
}

func writeError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, map[string]string{"error": msg})
}

// decode reads one JSON object with the required string fields.
func decode(r *http.Request, v any, required map[string]*string) *apiError {
	dec := json.NewDecoder(r.Body)
	if err := dec.Decode(v); err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return &apiError{http.StatusRequestEntityTooLarge, fmt.Sprintf("invalid request format: body larger than %d bytes", mbe.Limit)}
		}
		return &apiError{http.StatusBadRequest, "invalid request format: " + err.Error()}
	}
	if dec.More() {
		return &apiError{http.StatusBadRequest, "invalid request format: more than one JSON value in the body"}
	}
	var missing []string
	for name, p := range required {
		if strings.TrimSpace(*p) == "" {
			missing = append(missing, name)
		}
	}
	if len(missing) > 0 {
		return &apiError{http.StatusBadRequest, fmt.Sprintf("invalid request format: missing required field(s) %s", strings.Join(sorted(missing), ", "))}
	}
	return nil
}

// runtimeData decodes runtime_data: the Azure sidecar documents standard
// base64, and its own tests also send URL-safe base64; both are accepted.
func runtimeData(s string) ([]byte, *apiError) {
	for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.URLEncoding, base64.RawStdEncoding, base64.RawURLEncoding} {
		if b, err := enc.DecodeString(s); err == nil {
			return b, nil
		}
	}
	return nil, &apiError{http.StatusBadRequest, "decoding base64-encoded runtime data of request failed: runtime_data must be base64"}
}

func (s *Server) status(*http.Request) (any, *apiError) {
	// The Azure sidecar answers "Status OK" once it serves (its README
	// writes it in capitals; clients look at the status code).
	return map[string]string{"message": "Status OK"}, nil
}

type attestRequest struct {
	RuntimeData string `json:"runtime_data"`
	MAAEndpoint string `json:"maa_endpoint"`
}

// evidenceFor gets a report whose REPORT_DATA is SHA-256(runtime data), as
// the Azure sidecar builds it.
func (s *Server) evidenceFor(r *http.Request, rd []byte) (*evidence.Evidence, *apiError) {
	ev, err := s.o.Evidence.Get(r.Context(), evidence.ReportData(rd))
	if err != nil {
		return nil, failure(&keyrelease.StageError{Stage: keyrelease.StageEvidence, Err: fmt.Errorf("attestation evidence (%s): %w", s.o.Evidence.Name(), err)})
	}
	return ev, nil
}

// requestEvidence answers the body {"runtime_data": base64} of the attest
// endpoints with a report binding that data.
func (s *Server) requestEvidence(r *http.Request) (*evidence.Evidence, *apiError) {
	var req attestRequest
	if e := decode(r, &req, map[string]*string{"runtime_data": &req.RuntimeData}); e != nil {
		return nil, e
	}
	rd, e := runtimeData(req.RuntimeData)
	if e != nil {
		return nil, e
	}
	return s.evidenceFor(r, rd)
}

func (s *Server) attestRaw(r *http.Request) (any, *apiError) {
	ev, e := s.requestEvidence(r)
	if e != nil {
		return nil, e
	}
	return map[string]string{"report": hex.EncodeToString(ev.Report)}, nil
}

// reportedTCBOffset is REPORTED_TCB in the SNP attestation report (AMD SEV-SNP
// ABI, table "ATTESTATION_REPORT structure").
const reportedTCBOffset = 0x180

func (s *Server) attestCombined(r *http.Request) (any, *apiError) {
	ev, e := s.requestEvidence(r)
	if e != nil {
		return nil, e
	}
	if len(ev.Report) < reportedTCBOffset+8 {
		return nil, &apiError{http.StatusInternalServerError, fmt.Sprintf("SNP report is %d bytes", len(ev.Report))}
	}
	// Field names and encodings of the Azure sidecar's combined response.
	return map[string]string{
		"evidence":         base64.StdEncoding.EncodeToString(ev.Report),
		"endorsements":     base64.StdEncoding.EncodeToString(ev.CertChain),
		"uvm_endorsements": base64.StdEncoding.EncodeToString(ev.UVMReferenceInfo),
		"endorsed_tcb":     hex.EncodeToString(ev.Report[reportedTCBOffset : reportedTCBOffset+8]),
	}, nil
}

func (s *Server) attestMAA(r *http.Request) (any, *apiError) {
	var req attestRequest
	if e := decode(r, &req, map[string]*string{"runtime_data": &req.RuntimeData, "maa_endpoint": &req.MAAEndpoint}); e != nil {
		return nil, e
	}
	rd, e := runtimeData(req.RuntimeData)
	if e != nil {
		return nil, e
	}
	endpoint, e := endpointURL("maa_endpoint", req.MAAEndpoint)
	if e != nil {
		return nil, e
	}
	tok, err := keyrelease.Attest(r.Context(), keyrelease.AttestConfig{Evidence: s.o.Evidence, MAAEndpoint: endpoint, HTTPClient: s.o.HTTPClient, Logger: s.log}, rd)
	if err != nil {
		return nil, failure(err)
	}
	return map[string]string{"token": tok.Reveal()}, nil
}

type keyReleaseRequest struct {
	MAAEndpoint string       `json:"maa_endpoint"`
	AKVEndpoint string       `json:"akv_endpoint"`
	KID         string       `json:"kid"`
	AccessToken secret.Token `json:"access_token"`
}

// keyResponse is {"key": JWK as a string}, as the Azure sidecar answers.
type keyResponse struct {
	Key string `json:"key"`
	jwk []byte
}

func (k keyResponse) wipe() { secret.Wipe(k.jwk) }

func (s *Server) keyRelease(r *http.Request) (any, *apiError) {
	var req keyReleaseRequest
	if e := decode(r, &req, map[string]*string{"maa_endpoint": &req.MAAEndpoint, "akv_endpoint": &req.AKVEndpoint, "kid": &req.KID}); e != nil {
		return nil, e
	}
	maaURL, e := endpointURL("maa_endpoint", req.MAAEndpoint)
	if e != nil {
		return nil, e
	}
	vaultURL, e := endpointURL("akv_endpoint", req.AKVEndpoint)
	if e != nil {
		return nil, e
	}
	name, version, e := keyName(req.KID)
	if e != nil {
		return nil, e
	}
	vu, _ := url.Parse(vaultURL)
	if !s.allowed(vu.Hostname(), name) {
		return nil, &apiError{http.StatusForbidden, fmt.Sprintf("key %q of %s is not in this sidecar's allowed keys", name, vu.Hostname())}
	}
	cred := s.o.Credential
	if req.AccessToken != "" {
		cred = hsm.BearerToken(req.AccessToken)
	}
	if cred == nil {
		return nil, &apiError{http.StatusUnauthorized, "no vault credential: this sidecar has no managed identity configured; pass access_token"}
	}
	rk, err := keyrelease.ReleaseRaw(r.Context(), keyrelease.Config{
		Evidence: s.o.Evidence, MAAEndpoint: maaURL, VaultURL: vaultURL, KeyName: name, KeyVersion: version,
		Credential: cred, HTTPClient: s.o.HTTPClient, TrustedRoots: s.o.TrustedRoots, Logger: s.log,
	})
	if err != nil {
		return nil, failure(err)
	}
	defer rk.Material.Wipe()
	jwk, err := rk.JWK()
	if err != nil {
		return nil, &apiError{http.StatusInternalServerError, err.Error()}
	}
	s.log.Info("key released through the SKR API", "kid", rk.KID, "kty", rk.Kty)
	return keyResponse{Key: string(jwk), jwk: jwk}, nil
}

func (s *Server) allowed(host, name string) bool {
	if len(s.o.AllowedKeys) == 0 {
		return true
	}
	for _, k := range s.o.AllowedKeys {
		if strings.EqualFold(k, name) || strings.EqualFold(k, host+"/"+name) {
			return true
		}
	}
	return false
}

// endpointURL accepts what the Azure sidecar accepts, a bare host
// ("sharedeus2.eus2.attest.azure.net"), and https URLs.
func endpointURL(field, v string) (string, *apiError) {
	v = strings.TrimSpace(v)
	if !strings.Contains(v, "://") {
		v = "https://" + v
	}
	u, err := url.Parse(v)
	if err != nil || u.Scheme != "https" || u.Host == "" || u.User != nil {
		return "", &apiError{http.StatusBadRequest, fmt.Sprintf("%s %q must be a host name or an https URL", field, truncate(secret.RedactURL(v), 200))}
	}
	return strings.TrimRight(u.String(), "/"), nil
}

// keyName reads kid: a key name (as the Azure sidecar's clients send it),
// NAME/VERSION, or a full key identifier URL.
func keyName(kid string) (name, version string, _ *apiError) {
	kid = strings.TrimSpace(kid)
	if strings.Contains(kid, "://") {
		u, err := url.Parse(kid)
		if err == nil {
			parts := strings.Split(strings.Trim(u.Path, "/"), "/")
			if len(parts) >= 2 && parts[0] == "keys" {
				name = parts[1]
				if len(parts) > 2 {
					version = parts[2]
				}
			}
		}
	} else {
		name, version, _ = strings.Cut(kid, "/")
	}
	if name == "" || strings.ContainsAny(name+version, "/?#") || len(name) > 127 {
		return "", "", &apiError{http.StatusBadRequest, fmt.Sprintf("kid %q must be a key name, NAME/VERSION or https://VAULT/keys/NAME[/VERSION]", truncate(kid, 200))}
	}
	return name, version, nil
}

// failure maps a keyrelease error to the status the Azure sidecar uses
// (403 for attestation and release failures), with 5xx where the fault is
// not the caller's.
func failure(err error) *apiError {
	status := http.StatusForbidden
	var se *keyrelease.StageError
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		status = http.StatusGatewayTimeout
	case errors.As(err, &se) && se.Stage == keyrelease.StageEvidence:
		status = http.StatusInternalServerError
	case errors.Is(err, hsm.ErrServiceFailure):
		status = http.StatusBadGateway
	case errors.Is(err, hsm.ErrUnauthorized):
		status = http.StatusUnauthorized
	case errors.Is(err, hsm.ErrKeyNotFound):
		status = http.StatusNotFound
	}
	return &apiError{status, err.Error()}
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}

func sorted(s []string) []string {
	sort.Strings(s)
	return s
}

// IsLoopback reports whether addr (HOST:PORT) listens on loopback only.
func IsLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// Serve listens on addr ("" = DefaultAddress) until ctx ends. The Azure
// sidecar binds localhost only, since anything else exposes attestation and
// key release beyond the container group; another address is served but
// warned about. ready, if not nil, gets the bound address.
func (s *Server) Serve(ctx context.Context, addr string, ready func(boundAddr string)) error {
	if addr == "" {
		addr = DefaultAddress
	}
	if !IsLoopback(addr) {
		s.log.Warn("SKR API listens beyond loopback: other hosts can request attestation and key release", "address", addr)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("skr: listen on %s: %w", addr, err)
	}
	hs := &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 30 * time.Second,
		WriteTimeout: s.o.RequestTimeout + 30*time.Second, IdleTimeout: 2 * time.Minute}
	done := make(chan error, 1)
	go func() { done <- hs.Serve(ln) }()
	s.log.Info("SKR API serving", "address", ln.Addr().String())
	if ready != nil {
		ready(ln.Addr().String())
	}
	select {
	case err := <-done:
		return fmt.Errorf("skr: %w", err)
	case <-ctx.Done():
		shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = hs.Shutdown(shutdown)
		return nil
	}
}
