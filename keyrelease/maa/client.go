package maa

import (
	"bytes"
	"context"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"math/rand/v2"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/blobseal/blobseal/internal/secret"
	"github.com/blobseal/blobseal/keyrelease/evidence"
)

// DefaultUserAgent is sent unless Options.UserAgent is set.
const DefaultUserAgent = "blobseal-maa/1"

// Options configures a Client.
type Options struct {
	HTTPClient *http.Client  // nil: a default client
	UserAgent  string        // "": DefaultUserAgent
	Timeout    time.Duration // per attempt; 0: 30 s
	MaxRetries int           // retries on 429, 5xx and network errors; 0: 3, negative: none
	RetryDelay time.Duration // first backoff delay; 0: 500 ms (doubles, with jitter, capped at 10 s)
	Logger     *slog.Logger  // nil: discard
}

// Client calls one MAA instance.
type Client struct {
	endpoint string
	opts     Options
	hc       *http.Client
	log      *slog.Logger
}

// New returns a client for endpoint, the instance URL (e.g.
// https://sharedeus.eus.attest.azure.net); a bare host name means https.
func New(endpoint string, opts Options) *Client {
	endpoint = strings.TrimRight(strings.TrimSpace(endpoint), "/")
	if endpoint != "" && !strings.Contains(endpoint, "://") {
		endpoint = "https://" + endpoint
	}
	if opts.UserAgent == "" {
		opts.UserAgent = DefaultUserAgent
	}
	if opts.Timeout <= 0 {
		opts.Timeout = 30 * time.Second
	}
	switch {
	case opts.MaxRetries == 0:
		opts.MaxRetries = 3
	case opts.MaxRetries < 0:
		opts.MaxRetries = 0
	}
	if opts.RetryDelay <= 0 {
		opts.RetryDelay = 500 * time.Millisecond
	}
	hc := opts.HTTPClient
	if hc == nil {
		hc = &http.Client{}
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Client{endpoint: endpoint, opts: opts, hc: hc, log: log}
}

// Endpoint is the normalized instance URL.
func (c *Client) Endpoint() string { return c.endpoint }

// Error is a non-success answer from MAA.
type Error struct {
	StatusCode int
	Code       string // MAA's error code, if the body had one
	Message    string // MAA's message (truncated)
	Hint       string // what to do about it
}

func (e *Error) Error() string {
	s := fmt.Sprintf("attestation service returned HTTP %d", e.StatusCode)
	if e.Code != "" {
		s += " " + e.Code
	}
	if e.Message != "" {
		s += ": " + e.Message
	}
	if e.Hint != "" {
		s += " (" + e.Hint + ")"
	}
	return s
}

// Temporary reports whether retrying may help.
func (e *Error) Temporary() bool {
	return e.StatusCode == http.StatusTooManyRequests || e.StatusCode >= 500
}

// AttestSevSnpVm sends the evidence and returns MAA's token. runtimeData
// must be the data whose SHA-256 the report's REPORT_DATA holds (see
// RuntimeData); nonce is echoed in the token's "nonce" claim.
func (c *Client) AttestSevSnpVm(ctx context.Context, ev *evidence.Evidence, runtimeData []byte, nonce string) (secret.Token, error) {
	if c.endpoint == "" {
		return "", errors.New("no attestation endpoint: set --maa-endpoint (e.g. https://sharedeus.eus.attest.azure.net)")
	}
	u, err := url.Parse(c.endpoint)
	if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		return "", fmt.Errorf("attestation endpoint %q is not an http(s) URL", secret.RedactURL(c.endpoint))
	}
	if ev == nil {
		return "", errors.New("no evidence to attest")
	}
	if !RuntimeDataMatches(ev.Report, runtimeData) {
		return "", errors.New("the report's REPORT_DATA is not SHA-256 of the runtime data: the evidence was collected for different runtime data (wrapping key)")
	}
	body, err := EncodeSevSnpVmRequest(ev, runtimeData, nonce)
	if err != nil {
		return "", err
	}
	target := c.endpoint + AttestPath + "?api-version=" + APIVersion
	var lastErr error
	for attempt := 0; attempt <= c.opts.MaxRetries; attempt++ {
		if attempt > 0 {
			d := c.backoff(attempt, lastErr)
			c.log.Debug("retrying attestation", "attempt", attempt+1, "delay", d, "reason", lastErr)
			select {
			case <-ctx.Done():
				return "", fmt.Errorf("attestation cancelled: %w", ctx.Err())
			case <-time.After(d):
			}
		}
		tok, err := c.attestOnce(ctx, target, body)
		if err == nil {
			c.log.Debug("attestation token received", "endpoint", secret.RedactURL(c.endpoint), "attempts", attempt+1)
			return tok, nil
		}
		if ctx.Err() != nil {
			return "", fmt.Errorf("attestation cancelled: %w", ctx.Err())
		}
		var me *Error
		if errors.As(err, &me) && !me.Temporary() {
			return "", err
		}
		lastErr = err
	}
	return "", fmt.Errorf("attestation service %s unavailable after %d attempts: %w", secret.RedactURL(c.endpoint), c.opts.MaxRetries+1, lastErr)
}

// retryAfter carries a server-requested delay.
type retryAfter struct {
	err   *Error
	after time.Duration
}

func (r *retryAfter) Error() string { return r.err.Error() }
func (r *retryAfter) Unwrap() error { return r.err }

func (c *Client) backoff(attempt int, last error) time.Duration {
	var ra *retryAfter
	if errors.As(last, &ra) && ra.after > 0 {
		return min(ra.after, 30*time.Second)
	}
	d := c.opts.RetryDelay << (attempt - 1)
	d = min(d, 10*time.Second)
	return d/2 + rand.N(d/2+1)
}

func (c *Client) attestOnce(ctx context.Context, target string, body []byte) (secret.Token, error) {
	ctx, cancel := context.WithTimeout(ctx, c.opts.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, target, bytes.NewReader(body))
	if err != nil {
		return "", err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json")
	req.Header.Set("User-Agent", c.opts.UserAgent)
	start := time.Now()
	resp, err := c.hc.Do(req)
	if err != nil {
		return "", fmt.Errorf("POST %s: %w", secret.RedactURL(c.endpoint)+AttestPath, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return "", fmt.Errorf("read attestation response: %w", err)
	}
	c.log.Debug("attestation response", "status", resp.StatusCode, "elapsed", time.Since(start))
	if resp.StatusCode != http.StatusOK {
		e := newError(resp.StatusCode, data)
		if after := parseRetryAfter(resp.Header.Get("Retry-After")); after > 0 {
			return "", &retryAfter{err: e, after: after}
		}
		return "", e
	}
	var tr TokenResponse
	if err := json.Unmarshal(data, &tr); err != nil {
		return "", fmt.Errorf("attestation response is not JSON {token}: %w", err)
	}
	if strings.Count(tr.Token, ".") != 2 {
		return "", errors.New("attestation response holds no JWT in \"token\"")
	}
	return secret.Token(tr.Token), nil
}

func parseRetryAfter(v string) time.Duration {
	if v == "" {
		return 0
	}
	if n, err := strconv.Atoi(strings.TrimSpace(v)); err == nil && n >= 0 {
		return time.Duration(n) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil {
		return time.Until(t)
	}
	return 0
}

// newError turns an error response into an actionable error.
func newError(status int, body []byte) *Error {
	e := &Error{StatusCode: status}
	var er ErrorResponse
	if json.Unmarshal(body, &er) == nil && (er.Error.Code != "" || er.Error.Message != "") {
		e.Code = truncate(er.Error.Code, 80)
		e.Message = truncate(er.Error.Message, 400)
	} else if len(body) > 0 {
		e.Message = truncate(strings.TrimSpace(string(body)), 200)
	}
	m := strings.ToLower(e.Message)
	switch {
	case status == http.StatusUnauthorized || status == http.StatusForbidden:
		e.Hint = "this attestation provider requires authorization; use a provider that allows unauthenticated attest calls, such as the shared regional ones"
	case status == http.StatusNotFound:
		e.Hint = "check --maa-endpoint: it must be the attestation provider's base URL, e.g. https://sharedeus.eus.attest.azure.net"
	case status == http.StatusTooManyRequests:
		e.Hint = "throttled; retry later"
	case status >= 500:
		e.Hint = "the attestation service failed; retry later"
	case strings.Contains(m, "report data") || strings.Contains(m, "report_data") || strings.Contains(m, "runtime data"):
		e.Hint = "REPORT_DATA does not match SHA-256 of the runtime data: collect the evidence for the same wrapping key that is sent"
	case strings.Contains(m, "certificate") || strings.Contains(m, "vcek") || strings.Contains(m, "root"):
		e.Hint = "the VCEK chain did not verify to AMD's roots: refresh the host certificate (--cert-cache-url) or, for the local stack, use the roots of the same simulated signer"
	case strings.Contains(m, "signature"):
		e.Hint = "the report signature did not verify against the VCEK: the report or chain is corrupt or from another chip"
	case status == http.StatusBadRequest:
		e.Hint = "the attestation service rejected the evidence; see its message"
	}
	return e
}

// RuntimeData returns the runtime JSON MAA expects: a JWK set holding pub,
// {"keys":[{"e","key_ops":["encrypt"],"kid","kty":"RSA","n"}]}, with kid the
// RFC 7638 thumbprint. MAA copies it into the token's x-ms-runtime claim.
func RuntimeData(pub *rsa.PublicKey) ([]byte, error) {
	if pub == nil || pub.N == nil {
		return nil, errors.New("no public key")
	}
	if pub.N.BitLen() < 2048 {
		return nil, fmt.Errorf("wrapping key is %d bits, want at least 2048", pub.N.BitLen())
	}
	n := b64.EncodeToString(pub.N.Bytes())
	e := b64.EncodeToString(big.NewInt(int64(pub.E)).Bytes())
	// RFC 7638: SHA-256 of the required members in lexicographic order.
	thumb := sha256.Sum256([]byte(`{"e":"` + e + `","kty":"RSA","n":"` + n + `"}`))
	type jwk struct {
		E      string   `json:"e"`
		KeyOps []string `json:"key_ops"`
		Kid    string   `json:"kid"`
		Kty    string   `json:"kty"`
		N      string   `json:"n"`
	}
	return json.Marshal(struct {
		Keys []jwk `json:"keys"`
	}{Keys: []jwk{{E: e, KeyOps: []string{"encrypt"}, Kid: b64.EncodeToString(thumb[:]), Kty: "RSA", N: n}}})
}
