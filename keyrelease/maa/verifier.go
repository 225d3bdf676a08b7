package maa

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/go-jose/go-jose/v4"

	"github.com/blobseal/blobseal/internal/secret"
)

// Claim names MAA uses for SevSnpVm tokens.
const (
	ClaimAttestationType   = "x-ms-attestation-type"
	ClaimComplianceStatus  = "x-ms-compliance-status"
	ClaimRuntime           = "x-ms-runtime"
	ClaimVersion           = "x-ms-ver"
	ClaimHostData          = "x-ms-sevsnpvm-hostdata"
	ClaimIsDebuggable      = "x-ms-sevsnpvm-is-debuggable"
	ClaimVMPL              = "x-ms-sevsnpvm-vmpl"
	ClaimLaunchMeasurement = "x-ms-sevsnpvm-launchmeasurement"
	ClaimReportData        = "x-ms-sevsnpvm-reportdata"
	ClaimGuestSVN          = "x-ms-sevsnpvm-guestsvn"
	ClaimIDKeyDigest       = "x-ms-sevsnpvm-idkeydigest"
	ClaimAuthorKeyDigest   = "x-ms-sevsnpvm-authorkeydigest"
	ClaimFamilyID          = "x-ms-sevsnpvm-familyId"
	ClaimImageID           = "x-ms-sevsnpvm-imageId"
	ClaimBootloaderSVN     = "x-ms-sevsnpvm-bootloader-svn"
	ClaimTEESVN            = "x-ms-sevsnpvm-tee-svn"
	ClaimSNPFirmwareSVN    = "x-ms-sevsnpvm-snpfw-svn"
	ClaimMicrocodeSVN      = "x-ms-sevsnpvm-microcode-svn"
	ClaimSMTAllowed        = "x-ms-sevsnpvm-smt-allowed"
	ClaimMigrationAllowed  = "x-ms-sevsnpvm-migration-allowed"
	ClaimReportID          = "x-ms-sevsnpvm-reportid"
	ClaimNonce             = "nonce"

	AttestationTypeSevSnpVM = "sevsnpvm"
	ComplianceCompliantUVM  = "azure-compliant-uvm"
)

// Claims are the verified claims of a token.
type Claims struct {
	Raw               map[string]any
	Issuer            string
	IssuedAt          time.Time
	NotBefore         time.Time
	Expiry            time.Time
	ID                string
	AttestationType   string
	ComplianceStatus  string
	HostData          string // hex
	Debuggable        bool
	VMPL              int
	LaunchMeasurement string // hex
	ReportData        string // hex
	Nonce             string
	Runtime           map[string]any
	RuntimeKeys       []jose.JSONWebKey // from x-ms-runtime.keys
}

// ParseClaims interprets a token payload. It checks types, not signatures
// or times.
func ParseClaims(payload []byte) (*Claims, error) {
	d := json.NewDecoder(bytes.NewReader(payload))
	d.UseNumber()
	var raw map[string]any
	if err := d.Decode(&raw); err != nil {
		return nil, fmt.Errorf("token payload is not a JSON object: %w", err)
	}
	if raw == nil {
		return nil, errors.New("token payload is not a JSON object")
	}
	c := &Claims{Raw: raw}
	var err error
	str := func(name string, dst *string) {
		if err != nil {
			return
		}
		if v, ok := raw[name]; ok {
			s, ok := v.(string)
			if !ok {
				err = fmt.Errorf("claim %s is %T, want a string", name, v)
				return
			}
			*dst = s
		}
	}
	num := func(name string) (int64, bool) {
		v, ok := raw[name]
		if !ok || err != nil {
			return 0, false
		}
		n, ok := v.(json.Number)
		if !ok {
			err = fmt.Errorf("claim %s is %T, want a number", name, v)
			return 0, false
		}
		i, e := n.Int64()
		if e != nil {
			f, fe := n.Float64()
			if fe != nil {
				err = fmt.Errorf("claim %s: %w", name, e)
				return 0, false
			}
			i = int64(f)
		}
		return i, true
	}
	timeClaim := func(name string, dst *time.Time) {
		if i, ok := num(name); ok {
			*dst = time.Unix(i, 0)
		}
	}
	str("iss", &c.Issuer)
	str("jti", &c.ID)
	str(ClaimAttestationType, &c.AttestationType)
	str(ClaimComplianceStatus, &c.ComplianceStatus)
	str(ClaimHostData, &c.HostData)
	str(ClaimLaunchMeasurement, &c.LaunchMeasurement)
	str(ClaimReportData, &c.ReportData)
	str(ClaimNonce, &c.Nonce)
	timeClaim("iat", &c.IssuedAt)
	timeClaim("nbf", &c.NotBefore)
	timeClaim("exp", &c.Expiry)
	if i, ok := num(ClaimVMPL); ok {
		c.VMPL = int(i)
	}
	if err != nil {
		return nil, err
	}
	if v, ok := raw[ClaimIsDebuggable]; ok {
		b, ok := v.(bool)
		if !ok {
			return nil, fmt.Errorf("claim %s is %T, want a boolean", ClaimIsDebuggable, v)
		}
		c.Debuggable = b
	}
	if v, ok := raw[ClaimRuntime]; ok {
		rt, ok := v.(map[string]any)
		if !ok {
			return nil, fmt.Errorf("claim %s is %T, want an object", ClaimRuntime, v)
		}
		c.Runtime = rt
		if keys, ok := rt["keys"]; ok {
			kb, err := json.Marshal(map[string]any{"keys": keys})
			if err != nil {
				return nil, err
			}
			var set jose.JSONWebKeySet
			if err := json.Unmarshal(kb, &set); err != nil {
				return nil, fmt.Errorf("claim %s.keys is not a JWK set: %w", ClaimRuntime, err)
			}
			c.RuntimeKeys = set.Keys
		}
	}
	return c, nil
}

// VerifierOptions configures a Verifier.
type VerifierOptions struct {
	// AllowedIssuers lists the exact issuer URLs (MAA instance URLs) whose
	// tokens are accepted. Required.
	AllowedIssuers []string
	HTTPClient     *http.Client     // fetches OpenID metadata and keys; nil: 30 s timeout client
	Clock          func() time.Time // nil: time.Now
	Leeway         time.Duration    // clock skew allowed on exp/nbf; 0: 1 minute
	KeyCacheTTL    time.Duration    // 0: 10 minutes
	Logger         *slog.Logger
}

// Verifier checks MAA tokens against the issuer's published signing keys.
type Verifier struct {
	opts    VerifierOptions
	allowed map[string]bool
	hc      *http.Client
	log     *slog.Logger

	mu    sync.Mutex
	cache map[string]cachedKeys // by issuer
}

type cachedKeys struct {
	set     jose.JSONWebKeySet
	fetched time.Time
}

// NewVerifier returns a verifier for the allowed issuers.
func NewVerifier(opts VerifierOptions) (*Verifier, error) {
	if len(opts.AllowedIssuers) == 0 {
		return nil, errors.New("token verifier needs at least one allowed issuer (the MAA endpoint URL)")
	}
	v := &Verifier{opts: opts, allowed: map[string]bool{}, cache: map[string]cachedKeys{}}
	for _, iss := range opts.AllowedIssuers {
		v.allowed[normalizeIssuer(iss)] = true
	}
	if v.opts.Clock == nil {
		v.opts.Clock = time.Now
	}
	if v.opts.Leeway == 0 {
		v.opts.Leeway = time.Minute
	}
	if v.opts.KeyCacheTTL == 0 {
		v.opts.KeyCacheTTL = 10 * time.Minute
	}
	v.hc = opts.HTTPClient
	if v.hc == nil {
		v.hc = &http.Client{Timeout: 30 * time.Second}
	}
	v.log = opts.Logger
	if v.log == nil {
		v.log = slog.New(slog.DiscardHandler)
	}
	return v, nil
}

func normalizeIssuer(iss string) string {
	iss = strings.TrimRight(strings.TrimSpace(iss), "/")
	if iss != "" && !strings.Contains(iss, "://") {
		iss = "https://" + iss
	}
	return iss
}

// Verify checks the token's RS256 signature against its issuer's keys, the
// issuer against the allowed list, and exp/nbf against the clock.
func (v *Verifier) Verify(ctx context.Context, token secret.Token) (*Claims, error) {
	jws, unverified, err := parseUnverified(token.Reveal())
	if err != nil {
		return nil, err
	}
	hdr := jws.Signatures[0].Header
	iss := normalizeIssuer(unverified.Issuer)
	if iss == "" {
		return nil, errors.New("attestation token has no iss claim")
	}
	if !v.allowed[iss] {
		return nil, fmt.Errorf("attestation token issuer %q is not allowed (allowed: %s)", truncate(unverified.Issuer, 200), strings.Join(v.opts.AllowedIssuers, ", "))
	}
	key, err := v.key(ctx, iss, hdr.KeyID)
	if err != nil {
		return nil, err
	}
	payload, err := jws.Verify(key)
	if err != nil {
		return nil, fmt.Errorf("attestation token signature does not verify with %s key %q: %w", iss, hdr.KeyID, err)
	}
	c, err := ParseClaims(payload)
	if err != nil {
		return nil, err
	}
	now := v.opts.Clock()
	if c.Expiry.IsZero() {
		return nil, errors.New("attestation token has no exp claim")
	}
	if now.After(c.Expiry.Add(v.opts.Leeway)) {
		return nil, fmt.Errorf("attestation token expired at %s (now %s): attest again", c.Expiry.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
	}
	if !c.NotBefore.IsZero() && now.Add(v.opts.Leeway).Before(c.NotBefore) {
		return nil, fmt.Errorf("attestation token is not valid before %s (now %s): check the clock", c.NotBefore.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
	}
	return c, nil
}

// parseUnverified splits a compact RS256 JWS and reads its claims without
// checking the signature (to learn the issuer).
func parseUnverified(token string) (*jose.JSONWebSignature, *Claims, error) {
	if len(token) > 1<<20 {
		return nil, nil, errors.New("attestation token is larger than 1 MiB")
	}
	jws, err := jose.ParseSigned(token, []jose.SignatureAlgorithm{jose.RS256})
	if err != nil {
		// go-jose's messages do not quote the input, so no token leaks.
		return nil, nil, fmt.Errorf("attestation token is not an RS256 JWS: %w", err)
	}
	if len(jws.Signatures) != 1 {
		return nil, nil, fmt.Errorf("attestation token has %d signatures, want 1", len(jws.Signatures))
	}
	c, err := ParseClaims(jws.UnsafePayloadWithoutVerification())
	if err != nil {
		return nil, nil, err
	}
	return jws, c, nil
}

// key returns the issuer's signing key kid, refetching once when the cached
// set does not have it (key rotation).
func (v *Verifier) key(ctx context.Context, iss, kid string) (*jose.JSONWebKey, error) {
	v.mu.Lock()
	ck, ok := v.cache[iss]
	v.mu.Unlock()
	fresh := ok && v.opts.Clock().Sub(ck.fetched) < v.opts.KeyCacheTTL
	if fresh {
		if k := findKey(ck.set, kid); k != nil {
			return k, nil
		}
	}
	set, err := v.fetchKeys(ctx, iss)
	if err != nil {
		return nil, err
	}
	v.mu.Lock()
	v.cache[iss] = cachedKeys{set: set, fetched: v.opts.Clock()}
	v.mu.Unlock()
	if k := findKey(set, kid); k != nil {
		return k, nil
	}
	return nil, fmt.Errorf("issuer %s publishes no signing key with kid %q", iss, kid)
}

func findKey(set jose.JSONWebKeySet, kid string) *jose.JSONWebKey {
	for i := range set.Keys {
		k := &set.Keys[i]
		if (kid == "" || k.KeyID == kid) && k.Valid() && k.IsPublic() {
			return k
		}
	}
	return nil
}

// fetchKeys reads {iss}/.well-known/openid-configuration for jwks_uri (same
// host as the issuer), falling back to {iss}/certs.
func (v *Verifier) fetchKeys(ctx context.Context, iss string) (jose.JSONWebKeySet, error) {
	jwksURI := iss + "/certs"
	var meta struct {
		JWKSURI string `json:"jwks_uri"`
	}
	if body, status, err := v.get(ctx, iss+"/.well-known/openid-configuration"); err == nil && status == http.StatusOK && json.Unmarshal(body, &meta) == nil && meta.JWKSURI != "" {
		iu, _ := url.Parse(iss)
		ju, err := url.Parse(meta.JWKSURI)
		if err != nil || iu == nil || ju.Host != iu.Host || ju.Scheme != iu.Scheme {
			return jose.JSONWebKeySet{}, fmt.Errorf("issuer %s advertises jwks_uri %q on another host; refusing it", iss, truncate(meta.JWKSURI, 200))
		}
		jwksURI = meta.JWKSURI
	} else if err != nil && ctx.Err() != nil {
		return jose.JSONWebKeySet{}, ctx.Err()
	}
	body, status, err := v.get(ctx, jwksURI)
	if err != nil {
		return jose.JSONWebKeySet{}, fmt.Errorf("fetch signing keys of %s: %w", iss, err)
	}
	if status != http.StatusOK {
		return jose.JSONWebKeySet{}, fmt.Errorf("fetch signing keys %s: HTTP %d", jwksURI, status)
	}
	set, err := ParseSigningKeys(body)
	if err != nil {
		return jose.JSONWebKeySet{}, fmt.Errorf("signing keys at %s: %w", jwksURI, err)
	}
	v.log.Debug("fetched attestation signing keys", "issuer", iss, "keys", len(set.Keys))
	return set, nil
}

func (v *Verifier) get(ctx context.Context, u string) ([]byte, int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, 0, err
	}
	req.Header.Set("Accept", "application/json")
	resp, err := v.hc.Do(req)
	if err != nil {
		return nil, 0, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return body, resp.StatusCode, err
}
