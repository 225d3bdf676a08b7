package localhsm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"sync"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"

	"github.com/blobseal/blobseal/keyrelease/maa"
	"github.com/blobseal/blobseal/keyrelease/policy"
)

const (
	jwksTTL        = 10 * time.Minute
	jwksMinRefetch = 10 * time.Second
	clockLeeway    = 30 * time.Second
)

// errTokenExpired marks tokens outside their validity window.
var errTokenExpired = errors.New("attestation token expired")

// issuerKeys fetches and caches the signing keys of trusted attestation
// services.
type issuerKeys struct {
	hc      *http.Client
	trusted []string
	clock   func() time.Time

	mu    sync.Mutex
	cache map[string]cachedKeys
}

type cachedKeys struct {
	set     jose.JSONWebKeySet
	fetched time.Time
}

func newIssuerKeys(hc *http.Client, trusted []string, clock func() time.Time) *issuerKeys {
	return &issuerKeys{hc: hc, trusted: trusted, clock: clock, cache: map[string]cachedKeys{}}
}

func (ik *issuerKeys) isTrusted(iss string) bool {
	for _, t := range ik.trusted {
		if policy.SameAuthority(t, iss) {
			return true
		}
	}
	return false
}

// verify checks a MAA token's signature (RS256 with the issuer's key named by
// kid) and validity window, and returns its claims and issuer.
func (ik *issuerKeys) verify(ctx context.Context, raw string) (map[string]any, string, error) {
	tok, err := jwt.ParseSigned(raw, []jose.SignatureAlgorithm{jose.RS256})
	if err != nil {
		return nil, "", fmt.Errorf("attestation token is not an RS256 JWT: %v", err)
	}
	var unverified jwt.Claims
	if err := tok.UnsafeClaimsWithoutVerification(&unverified); err != nil {
		return nil, "", fmt.Errorf("attestation token claims are unreadable: %v", err)
	}
	iss := unverified.Issuer
	if !ik.isTrusted(iss) {
		return nil, "", fmt.Errorf("attestation token issuer %q is not trusted by this key service", iss)
	}
	kid := tok.Headers[0].KeyID
	key, err := ik.key(ctx, iss, kid)
	if err != nil {
		return nil, "", err
	}
	var std jwt.Claims
	claims := map[string]any{}
	if err := tok.Claims(key.Key, &std, &claims); err != nil {
		return nil, "", fmt.Errorf("attestation token signature does not verify with issuer key %q: %v", kid, err)
	}
	if std.Expiry == nil {
		return nil, "", errors.New("attestation token has no exp claim")
	}
	if err := std.ValidateWithLeeway(jwt.Expected{Time: ik.clock()}, clockLeeway); err != nil {
		if errors.Is(err, jwt.ErrExpired) || errors.Is(err, jwt.ErrNotValidYet) || errors.Is(err, jwt.ErrIssuedInTheFuture) {
			return nil, "", fmt.Errorf("%w or not yet valid (exp %s, nbf %v)", errTokenExpired, std.Expiry.Time().UTC().Format(time.RFC3339), std.NotBefore)
		}
		return nil, "", fmt.Errorf("attestation token claims invalid: %v", err)
	}
	return claims, iss, nil
}

// key returns the issuer's key with kid, fetching the JWKS when it is not
// cached, stale, or lacks kid. The lock is never held across the fetch.
func (ik *issuerKeys) key(ctx context.Context, iss, kid string) (*jose.JSONWebKey, error) {
	now := ik.clock()
	ik.mu.Lock()
	c, ok := ik.cache[iss]
	ik.mu.Unlock()
	if ok && now.Sub(c.fetched) < jwksTTL {
		if ks := c.set.Key(kid); len(ks) > 0 {
			return &ks[0], nil
		}
		if now.Sub(c.fetched) < jwksMinRefetch {
			return nil, fmt.Errorf("attestation token key %q is not among the issuer's signing keys", kid)
		}
	}
	set, err := ik.fetch(ctx, iss)
	if err != nil {
		return nil, err
	}
	ik.mu.Lock()
	ik.cache[iss] = cachedKeys{set: set, fetched: now}
	ik.mu.Unlock()
	if ks := set.Key(kid); len(ks) > 0 {
		return &ks[0], nil
	}
	return nil, fmt.Errorf("attestation token key %q is not among the issuer's signing keys", kid)
}

func (ik *issuerKeys) fetch(ctx context.Context, iss string) (jose.JSONWebKeySet, error) {
	var set jose.JSONWebKeySet
	base, err := url.Parse(iss)
	if err != nil || base.Scheme != "https" {
		return set, fmt.Errorf("issuer %q is not an https URL", iss)
	}
	var cfg struct {
		JWKSURI string `json:"jwks_uri"`
	}
	if err := ik.getJSON(ctx, base.JoinPath(".well-known", "openid-configuration").String(), &cfg); err != nil {
		return set, fmt.Errorf("issuer %s: openid-configuration: %v", iss, err)
	}
	ju, err := url.Parse(cfg.JWKSURI)
	if err != nil || ju.Scheme != "https" || ju.Host != base.Host {
		return set, fmt.Errorf("issuer %s: jwks_uri %q must be https on the issuer's host", iss, cfg.JWKSURI)
	}
	// Real MAA publishes x5c-only keys; parse them the way the client does.
	var raw json.RawMessage
	if err := ik.getJSON(ctx, ju.String(), &raw); err != nil {
		return set, fmt.Errorf("issuer %s: signing keys: %v", iss, err)
	}
	if set, err = maa.ParseSigningKeys(raw); err != nil {
		return set, fmt.Errorf("issuer %s: signing keys: %v", iss, err)
	}
	return set, nil
}

func (ik *issuerKeys) getJSON(ctx context.Context, u string, v any) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		if attempt > 0 {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(time.Duration(attempt) * 200 * time.Millisecond):
			}
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
		if err != nil {
			return err
		}
		resp, err := ik.hc.Do(req)
		if err != nil {
			lastErr = err
			continue
		}
		body, err := io.ReadAll(io.LimitReader(resp.Body, maxBody))
		resp.Body.Close()
		if err != nil {
			lastErr = err
			continue
		}
		if resp.StatusCode >= 500 || resp.StatusCode == http.StatusTooManyRequests {
			lastErr = fmt.Errorf("HTTP %d", resp.StatusCode)
			continue
		}
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("HTTP %d from %s", resp.StatusCode, u)
		}
		return json.Unmarshal(body, v)
	}
	return lastErr
}
