// Package localhsm is a local key service that speaks the Azure Key Vault /
// Managed HSM data-plane protocol for the routes azkeys uses in secure key
// release: import (PUT /keys/{name}), create (POST /keys/{name}/create), get
// (GET /keys/{name}[/{version}]) and release (POST
// /keys/{name}[/{version}]/release). It challenges unauthenticated requests
// with 401 + WWW-Authenticate like the real service, accepts configured
// bearer tokens, verifies attestation tokens (RS256, key from the issuer's
// OpenID configuration and JWKS over TLS), evaluates the key's release policy,
// and answers with a JWS carrying x5c whose payload holds the key wrapped
// (RSA-OAEP + RFC 5649) to the token's runtime key. Keys live in memory only.
// It exists for tests and the local development stack.
package localhsm

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/subtle"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/blobseal/blobseal/internal/secret"
)

// Resources the 401 challenge can name.
const (
	ResourceManagedHSM = "https://managedhsm.azure.net"
	ResourceKeyVault   = "https://vault.azure.net"
)

// challengeAuthority is the Entra authority URL put in the challenge; no
// request ever goes there (the local stack uses fixed bearer tokens).
const challengeAuthority = "https://login.microsoftonline.com/00000000-0000-0000-0000-000000000000"

// apiVersionOK reports whether the service accepts an api-version (azkeys
// 1.5 sends 2025-07-01; the existing sidecar sends 7.3 or 7.4).
func apiVersionOK(v string) bool {
	switch v {
	case "7.3", "7.4", "7.5", "7.6", "2025-07-01":
		return true
	}
	return false
}

const maxBody = 1 << 20

// Options configure a Server.
type Options struct {
	// TLSCert serves HTTPS. Required for Start.
	TLSCert tls.Certificate
	// SigningCert signs release responses; its chain goes into x5c. Nil: TLSCert.
	SigningCert *tls.Certificate
	// TrustedIssuers are attestation service base URLs whose tokens are
	// accepted (their signing keys are fetched from
	// {issuer}/.well-known/openid-configuration → jwks_uri).
	TrustedIssuers []string
	// IssuerHTTPClient fetches issuer keys (holding the local CA roots).
	// Nil: a client with a 10 s timeout and system roots.
	IssuerHTTPClient *http.Client
	// BearerTokens may do everything; ReadOnlyTokens may import, create and
	// get but not release (to exercise permission errors).
	BearerTokens   []secret.Token
	ReadOnlyTokens []secret.Token
	// Resource named in the 401 challenge. Default ResourceManagedHSM.
	Resource string
	// Clock for token validity. Nil: time.Now.
	Clock func() time.Time
	// Logger gets one line per request (never tokens or keys). Nil: discard.
	Logger *slog.Logger
}

// Server is the local key service.
type Server struct {
	opts   Options
	signer crypto.Signer
	x5c    []string
	issuer *issuerKeys
	log    *slog.Logger
	clock  func() time.Time

	mu   sync.Mutex
	keys map[string][]*keyVersion // by name, oldest version first

	srvMu sync.Mutex
	srv   *http.Server
}

// New builds a server; Start or Handler serves it.
func New(opts Options) (*Server, error) {
	if len(opts.BearerTokens) == 0 {
		return nil, errors.New("localhsm: configure at least one accepted bearer token")
	}
	sc := opts.SigningCert
	if sc == nil {
		sc = &opts.TLSCert
	}
	if len(sc.Certificate) == 0 || sc.PrivateKey == nil {
		return nil, errors.New("localhsm: a signing certificate with its key is required (TLSCert or SigningCert)")
	}
	signer, ok := sc.PrivateKey.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("localhsm: signing key %T cannot sign", sc.PrivateKey)
	}
	switch k := signer.Public().(type) {
	case *rsa.PublicKey:
	case *ecdsa.PublicKey:
		if k.Curve.Params().BitSize != 256 {
			return nil, errors.New("localhsm: ECDSA signing keys must be P-256")
		}
	default:
		return nil, fmt.Errorf("localhsm: unsupported signing key %T", k)
	}
	if opts.Resource == "" {
		opts.Resource = ResourceManagedHSM
	}
	clock := opts.Clock
	if clock == nil {
		clock = time.Now
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	hc := opts.IssuerHTTPClient
	if hc == nil {
		hc = &http.Client{Timeout: 10 * time.Second}
	}
	s := &Server{
		opts:   opts,
		signer: signer,
		log:    log,
		clock:  clock,
		keys:   map[string][]*keyVersion{},
		issuer: newIssuerKeys(hc, opts.TrustedIssuers, clock),
	}
	for _, der := range sc.Certificate {
		s.x5c = append(s.x5c, b64std(der))
	}
	return s, nil
}

// Start listens on addr (e.g. "127.0.0.1:0") with TLS and serves in the
// background. It returns the base URL (https://127.0.0.1:PORT).
func (s *Server) Start(addr string) (string, error) {
	if len(s.opts.TLSCert.Certificate) == 0 {
		return "", errors.New("localhsm: TLSCert is required to serve")
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return "", fmt.Errorf("localhsm: listen on %s: %w", addr, err)
	}
	srv := &http.Server{
		Handler:           s.Handler(),
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       60 * time.Second,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	tlsLn := tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{s.opts.TLSCert}, MinVersion: tls.VersionTLS12})
	s.srvMu.Lock()
	s.srv = srv
	s.srvMu.Unlock()
	go func() {
		if err := srv.Serve(tlsLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("localhsm: serve", "err", err)
		}
	}()
	return "https://" + ln.Addr().String(), nil
}

// Close stops the server started by Start.
func (s *Server) Close() error {
	s.srvMu.Lock()
	srv := s.srv
	s.srv = nil
	s.srvMu.Unlock()
	if srv == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return srv.Shutdown(ctx)
}

var keyNameRE = regexp.MustCompile(`^[0-9A-Za-z-]{1,127}$`)

// Handler returns the HTTP handler (for use behind another TLS listener).
func (s *Server) Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rec := &statusRecorder{ResponseWriter: w, status: 200}
		start := time.Now()
		s.route(rec, r)
		s.log.Debug("localhsm request", "method", r.Method, "path", r.URL.Path, "status", rec.status, "elapsed", time.Since(start))
	})
}

type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (r *statusRecorder) WriteHeader(code int) {
	r.status = code
	r.ResponseWriter.WriteHeader(code)
}

// access levels of a bearer token.
const (
	accessNone = iota
	accessRead
	accessFull
)

func (s *Server) route(w http.ResponseWriter, r *http.Request) {
	auth := r.Header.Get("Authorization")
	if auth == "" {
		// The azkeys challenge policy sends its first request without a
		// token and learns the resource from this header.
		w.Header().Set("WWW-Authenticate", fmt.Sprintf(`Bearer authorization="%s", resource="%s"`, challengeAuthority, s.opts.Resource))
		writeError(w, http.StatusUnauthorized, "Unauthorized", "AKV10000: Request is missing a Bearer or PoP token.")
		return
	}
	level := s.access(auth)
	if level == accessNone {
		w.Header().Set("WWW-Authenticate", fmt.Sprintf(`Bearer authorization="%s", resource="%s"`, challengeAuthority, s.opts.Resource))
		writeError(w, http.StatusUnauthorized, "Unauthorized", "AKV10032: the bearer token is not accepted by this key service")
		return
	}
	if v := r.URL.Query().Get("api-version"); !apiVersionOK(v) {
		writeError(w, http.StatusBadRequest, "BadParameter", fmt.Sprintf("api-version %q is not supported; use 7.4 or 2025-07-01", v))
		return
	}
	parts := strings.Split(strings.Trim(r.URL.Path, "/"), "/")
	if len(parts) < 2 || parts[0] != "keys" {
		writeError(w, http.StatusNotFound, "NotFound", "no such route: this key service implements /keys/{name} import, create, get and release")
		return
	}
	name := parts[1]
	if !keyNameRE.MatchString(name) {
		writeError(w, http.StatusBadRequest, "BadParameter", "key name must be 1-127 letters, digits or dashes")
		return
	}
	rest := parts[2:]
	switch {
	case r.Method == http.MethodPut && len(rest) == 0:
		s.handleImport(w, r, name)
	case r.Method == http.MethodPost && len(rest) == 1 && rest[0] == "create":
		s.handleCreate(w, r, name)
	case r.Method == http.MethodGet && len(rest) <= 1:
		version := ""
		if len(rest) == 1 {
			version = rest[0]
		}
		s.handleGet(w, r, name, version)
	case r.Method == http.MethodPost && len(rest) >= 1 && len(rest) <= 2 && rest[len(rest)-1] == "release":
		if level < accessFull {
			writeError(w, http.StatusForbidden, "Forbidden", "Caller is not authorized to perform action on resource. Operation: 'Microsoft.KeyVault/managedHsm/keys/release/action'; the caller lacks the keys/release permission (AccessDenied)")
			return
		}
		version := ""
		if len(rest) == 2 {
			version = rest[0]
		}
		s.handleRelease(w, r, name, version)
	default:
		writeError(w, http.StatusMethodNotAllowed, "BadRequest", fmt.Sprintf("%s %s is not implemented by the local key service", r.Method, r.URL.Path))
	}
}

func (s *Server) access(auth string) int {
	tok, ok := strings.CutPrefix(auth, "Bearer ")
	if !ok || tok == "" {
		return accessNone
	}
	for _, t := range s.opts.BearerTokens {
		if subtle.ConstantTimeCompare([]byte(t.Reveal()), []byte(tok)) == 1 {
			return accessFull
		}
	}
	for _, t := range s.opts.ReadOnlyTokens {
		if subtle.ConstantTimeCompare([]byte(t.Reveal()), []byte(tok)) == 1 {
			return accessRead
		}
	}
	return accessNone
}

// vaultError is Key Vault's error body.
type vaultError struct {
	Error struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
}

func writeError(w http.ResponseWriter, status int, code, msg string) {
	var e vaultError
	e.Error.Code, e.Error.Message = code, msg
	writeJSON(w, status, e)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		http.Error(w, `{"error":{"code":"InternalError","message":"encoding failed"}}`, http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

func readJSON(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxBody))
	if err := dec.Decode(v); err != nil {
		writeError(w, http.StatusBadRequest, "BadParameter", fmt.Sprintf("request body is not the expected JSON: %v", err))
		return false
	}
	return true
}

func baseURL(r *http.Request) string { return "https://" + r.Host }
