// Package hsm releases keys from Azure Managed HSM or Key Vault Premium
// (secure key release) and unwraps them locally: the azkeys Release call with
// an attestation token, verification of the signed (JWS, x5c) response to
// trusted roots and to the vault's host name, RSA-OAEP + RFC 5649 unwrap, and
// the derivation of the 32-byte filesystem secret. Failures are turned into
// messages that say what to fix.
package hsm

import (
	"context"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/runtime"
	"github.com/Azure/azure-sdk-for-go/sdk/azidentity"
	"github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys"
	"github.com/go-jose/go-jose/v4"

	"github.com/blobseal/blobseal/internal/secret"
	kpolicy "github.com/blobseal/blobseal/keyrelease/policy"
)

// Errors callers can test with errors.Is; messages carry the details.
var (
	ErrPermission     = errors.New("the identity lacks permission")
	ErrUnauthorized   = errors.New("the vault rejected the credential")
	ErrPolicy         = errors.New("the attestation does not satisfy the key release policy")
	ErrNotExportable  = errors.New("the key is not exportable")
	ErrTokenExpired   = errors.New("the attestation token has expired")
	ErrTokenRejected  = errors.New("the vault rejected the attestation token")
	ErrKeyNotFound    = errors.New("key not found")
	ErrBadResponse    = errors.New("the vault's release response failed verification")
	ErrBadRequest     = errors.New("the vault rejected the request")
	ErrServiceFailure = errors.New("the vault failed")
)

// Options configure a Client.
type Options struct {
	// HTTPClient carries requests (its transport holds CA roots for a local
	// service). Nil: a client with a 30-second timeout and system roots.
	HTTPClient *http.Client
	// TrustedRoots verify the x5c chain of release responses. Nil: system roots.
	TrustedRoots *x509.CertPool
	// Logger gets one line per request step; never secrets. Nil: discard.
	Logger *slog.Logger
	// MaxRetries for transient failures (default 3, with exponential backoff).
	MaxRetries int32
	// DisableChallengeResourceVerification lets the 401 challenge name a
	// resource whose domain differs from the vault host. It is set
	// automatically for loopback vaults (the local key service).
	DisableChallengeResourceVerification bool
	// Clock is the time release responses' certificates are checked at.
	// Nil: time.Now.
	Clock func() time.Time
}

// Client releases keys from one vault.
type Client struct {
	vault *url.URL
	kc    *azkeys.Client
	roots *x509.CertPool
	clock func() time.Time
	log   *slog.Logger
}

// New makes a client for vaultURL (https://NAME.managedhsm.azure.net,
// https://NAME.vault.azure.net, a bare host meaning https, or the local key
// service).
func New(vaultURL string, cred azcore.TokenCredential, opts Options) (*Client, error) {
	if vaultURL != "" && !strings.Contains(vaultURL, "://") {
		vaultURL = "https://" + vaultURL // akv.endpoint of the existing sidecar is a bare host
	}
	u, err := url.Parse(vaultURL)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return nil, fmt.Errorf("vault URL %q must be https://HOST (e.g. https://myhsm.managedhsm.azure.net)", secret.RedactURL(vaultURL))
	}
	if cred == nil {
		return nil, errors.New("vault credential missing: use managed identity, workload identity, Azure CLI or a bearer token")
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	httpc := opts.HTTPClient
	if httpc == nil {
		httpc = &http.Client{Timeout: 30 * time.Second}
	}
	retries := opts.MaxRetries
	if retries == 0 {
		retries = 3
	}
	co := &azkeys.ClientOptions{
		ClientOptions: azcore.ClientOptions{
			Transport: httpc,
			Retry: policy.RetryOptions{
				MaxRetries:    retries,
				TryTimeout:    30 * time.Second,
				RetryDelay:    500 * time.Millisecond,
				MaxRetryDelay: 8 * time.Second,
			},
			Telemetry: policy.TelemetryOptions{Disabled: true},
		},
		DisableChallengeResourceVerification: opts.DisableChallengeResourceVerification || isLoopback(u.Hostname()),
	}
	kc, err := azkeys.NewClient(strings.TrimRight(u.String(), "/"), cred, co)
	if err != nil {
		return nil, fmt.Errorf("key vault client: %w", err)
	}
	clock := opts.Clock
	if clock == nil {
		clock = time.Now
	}
	return &Client{vault: u, kc: kc, roots: opts.TrustedRoots, clock: clock, log: log}, nil
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// Keys exposes the underlying azkeys client (import, create, get).
func (c *Client) Keys() *azkeys.Client { return c.kc }

// Release asks the vault to release keyName (keyVersion "" = latest) to the
// attested environment described by token, with the response wrapped to
// wrapping's public key (which the token must carry in x-ms-runtime.keys), and
// unwraps it.
func (c *Client) Release(ctx context.Context, keyName, keyVersion string, token secret.Token, wrapping *rsa.PrivateKey, alg string) (*ReleasedKey, error) {
	if keyName == "" {
		return nil, errors.New("release: key name is empty")
	}
	if alg == "" {
		alg = AlgCKMRSAAESKeyWrap
	}
	if _, err := oaepHash(alg); err != nil {
		return nil, fmt.Errorf("release: %w", err)
	}
	if wrapping == nil {
		return nil, errors.New("release: no wrapping key")
	}
	target := token.Reveal()
	enc := azkeys.KeyEncryptionAlgorithm(alg)
	start := time.Now()
	resp, err := c.kc.Release(ctx, keyName, keyVersion, azkeys.ReleaseParameters{
		TargetAttestationToken: &target,
		Algorithm:              &enc,
	}, nil)
	c.log.Debug("hsm release request", "vault", c.vault.Host, "key", keyName, "version", keyVersion, "enc", alg, "elapsed", time.Since(start), "ok", err == nil)
	if err != nil {
		return nil, c.explain(ctx, err, keyName, keyVersion, token)
	}
	if resp.Value == nil || *resp.Value == "" {
		return nil, fmt.Errorf("%w: empty \"value\"", ErrBadResponse)
	}
	rk, err := c.openResponse(*resp.Value, keyName, alg, wrapping)
	if err != nil {
		return nil, err
	}
	c.log.Info("key released", "vault", c.vault.Host, "kid", rk.KID, "kty", rk.Kty, "bytes", len(rk.Material))
	return rk, nil
}

// releasePayload is the signed body of a release response.
type releasePayload struct {
	Request struct {
		APIVersion string `json:"api-version"`
		Enc        string `json:"enc"`
		KID        string `json:"kid"`
	} `json:"request"`
	Response struct {
		Key struct {
			Key struct {
				KID    string   `json:"kid"`
				Kty    string   `json:"kty"`
				KeyOps []string `json:"key_ops"`
				KeyHSM string   `json:"key_hsm"`
			} `json:"key"`
			Attributes    json.RawMessage `json:"attributes"`
			ReleasePolicy *struct {
				ContentType string `json:"contentType"`
				Data        string `json:"data"`
			} `json:"release_policy"`
		} `json:"key"`
	} `json:"response"`
}

// keyHSM is the decoded key_hsm field: the transfer blob of Key Vault's
// BYOK format.
type keyHSM struct {
	SchemaVersion string `json:"schema_version"`
	Header        struct {
		KID string `json:"kid"`
		Alg string `json:"alg"`
		Enc string `json:"enc"`
	} `json:"header"`
	Ciphertext string `json:"ciphertext"`
}

// signatureAlgs are the JWS algorithms a release response may use.
func signatureAlgs() []jose.SignatureAlgorithm {
	return []jose.SignatureAlgorithm{jose.RS256, jose.RS384, jose.RS512, jose.PS256, jose.PS384, jose.PS512, jose.ES256, jose.ES384, jose.ES512}
}

// JWSOptions are what a release response is checked against.
type JWSOptions struct {
	Host  string         // the vault's host name the leaf certificate must be valid for
	Roots *x509.CertPool // nil: system roots
	// Now is when the certificate chain must be valid. Zero: the current
	// time; a recorded response verifies at its recording time.
	Now time.Time
}

// VerifyReleaseJWS checks a release response: its x5c chain must lead to
// o.Roots at o.Now with a leaf valid for o.Host, and the signature must
// verify with the leaf's key. It returns the payload.
func VerifyReleaseJWS(compact string, o JWSOptions) ([]byte, error) {
	host, roots := o.Host, o.Roots
	obj, err := jose.ParseSignedCompact(compact, signatureAlgs())
	if err != nil {
		return nil, fmt.Errorf("%w: not a compact JWS with an accepted algorithm: %v", ErrBadResponse, err)
	}
	if len(obj.Signatures) != 1 {
		return nil, fmt.Errorf("%w: want one signature, got %d", ErrBadResponse, len(obj.Signatures))
	}
	hdr := obj.Signatures[0].Protected
	chains, err := hdr.Certificates(x509.VerifyOptions{
		DNSName:     host,
		Roots:       roots,
		CurrentTime: o.Now,
		KeyUsages:   []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	if err != nil {
		return nil, fmt.Errorf("%w: x5c certificate chain does not verify to the trusted roots for host %q: %v", ErrBadResponse, host, err)
	}
	leaf := chains[0][0]
	payload, err := obj.Verify(leaf.PublicKey)
	if err != nil {
		return nil, fmt.Errorf("%w: signature does not verify with the x5c leaf certificate (%s): %v", ErrBadResponse, leaf.Subject.CommonName, err)
	}
	return payload, nil
}

func (c *Client) openResponse(compact, keyName, alg string, wrapping *rsa.PrivateKey) (*ReleasedKey, error) {
	payload, err := VerifyReleaseJWS(compact, JWSOptions{Host: c.vault.Hostname(), Roots: c.roots, Now: c.clock()})
	if err != nil {
		return nil, err
	}
	return parsePayload(payload, keyName, alg, wrapping)
}

// parsePayload reads a verified release payload and unwraps the key.
func parsePayload(payload []byte, keyName, alg string, wrapping *rsa.PrivateKey) (*ReleasedKey, error) {
	var p releasePayload
	if err := json.Unmarshal(payload, &p); err != nil {
		return nil, fmt.Errorf("%w: payload is not the release JSON: %v", ErrBadResponse, err)
	}
	k := p.Response.Key.Key
	if k.KeyHSM == "" {
		return nil, fmt.Errorf("%w: response.key.key.key_hsm is missing", ErrBadResponse)
	}
	if !kidNames(k.KID, keyName) {
		return nil, fmt.Errorf("%w: released key %q is not the requested key %q", ErrBadResponse, k.KID, keyName)
	}
	if p.Request.Enc != "" && p.Request.Enc != alg {
		return nil, fmt.Errorf("%w: key wrapped with %q, requested %q", ErrBadResponse, p.Request.Enc, alg)
	}
	blob, err := decodeB64(k.KeyHSM)
	if err != nil {
		return nil, fmt.Errorf("%w: key_hsm is not base64url: %v", ErrBadResponse, err)
	}
	var kh keyHSM
	if err := json.Unmarshal(blob, &kh); err != nil {
		return nil, fmt.Errorf("%w: key_hsm is not the transfer JSON: %v", ErrBadResponse, err)
	}
	if kh.Header.Enc != "" && kh.Header.Enc != alg {
		return nil, fmt.Errorf("%w: key_hsm header says enc %q, requested %q", ErrBadResponse, kh.Header.Enc, alg)
	}
	ct, err := decodeB64(kh.Ciphertext)
	if err != nil {
		return nil, fmt.Errorf("%w: key_hsm ciphertext is not base64url: %v", ErrBadResponse, err)
	}
	material, err := UnwrapKeyHSM(ct, wrapping, alg)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadResponse, err)
	}
	rk := &ReleasedKey{Kty: k.Kty, KID: k.KID, KeyOps: k.KeyOps, Material: material}
	if rp := p.Response.Key.ReleasePolicy; rp != nil && rp.Data != "" {
		if pol, err := decodeB64(rp.Data); err == nil {
			rk.Policy = pol
		}
	}
	return rk, nil
}

// kidNames reports whether a key identifier (https://host/keys/NAME/VERSION)
// names keyName.
func kidNames(kid, keyName string) bool {
	u, err := url.Parse(kid)
	if err != nil {
		return false
	}
	parts := strings.Split(strings.Trim(u.Path, "/"), "/")
	return len(parts) >= 2 && parts[0] == "keys" && parts[1] == keyName
}

// decodeB64 accepts base64url with or without padding (the service omits
// it) and, leniently, standard base64.
func decodeB64(s string) ([]byte, error) {
	s = strings.TrimRight(s, "=")
	if b, err := base64.RawURLEncoding.DecodeString(s); err == nil {
		return b, nil
	}
	return base64.RawStdEncoding.DecodeString(s)
}

// vaultError is Key Vault's error body.
type vaultError struct {
	Error struct {
		Code       string `json:"code"`
		Message    string `json:"message"`
		InnerError *struct {
			Code string `json:"code"`
		} `json:"innererror"`
	} `json:"error"`
}

// responseError extracts Key Vault's error code and message.
func responseError(err error) (code, msg string, status int, ok bool) {
	var re *azcore.ResponseError
	if !errors.As(err, &re) {
		return "", "", 0, false
	}
	code, status = re.ErrorCode, re.StatusCode
	if re.RawResponse != nil {
		if body, perr := runtime.Payload(re.RawResponse); perr == nil {
			var ve vaultError
			if json.Unmarshal(body, &ve) == nil {
				msg = ve.Error.Message
				if code == "" {
					code = ve.Error.Code
				}
				if ve.Error.InnerError != nil && ve.Error.InnerError.Code != "" {
					code += "/" + ve.Error.InnerError.Code
				}
			}
		}
	}
	return code, msg, status, true
}

// explain turns a failed release into an actionable error. When the policy
// can be read, it names the claims of the token that do not satisfy it.
func (c *Client) explain(ctx context.Context, err error, keyName, keyVersion string, token secret.Token) error {
	where := fmt.Sprintf("release of key %q from %s", keyName, c.vault.Host)
	var re *azcore.ResponseError
	if !errors.As(err, &re) {
		var authErr *azidentity.AuthenticationFailedError
		switch {
		case ctx.Err() != nil:
			return fmt.Errorf("%s: %w", where, ctx.Err())
		case errors.As(err, &authErr) || strings.Contains(strings.ToLower(err.Error()), "credential"):
			return fmt.Errorf("%s: %w: could not get a token for the vault (check the managed identity, workload identity or bearer token): %s", where, ErrUnauthorized, scrub(err.Error(), token))
		}
		return fmt.Errorf("%s: cannot reach the vault (check the URL, DNS, network and TLS roots): %s", where, scrub(err.Error(), token))
	}
	code, msg, _, _ := responseError(err)
	msg = scrub(msg, token)
	lower := strings.ToLower(msg + " " + code)
	switch {
	case re.StatusCode == http.StatusUnauthorized:
		return fmt.Errorf("%s: %w (HTTP 401 %s: %s): check the credential (managed identity, workload identity, Azure CLI login or bearer token) and that its token is for the vault's resource", where, ErrUnauthorized, code, msg)
	case re.StatusCode == http.StatusNotFound:
		return fmt.Errorf("%s: %w (%s): check the key name and version and the vault URL", where, ErrKeyNotFound, msg)
	case strings.Contains(lower, "expired") || strings.Contains(lower, "lifetime"):
		return fmt.Errorf("%s: %w (%s): get a fresh attestation token and check the VM clock", where, ErrTokenExpired, msg)
	case strings.Contains(lower, "exportable"):
		return fmt.Errorf("%s: %w (%s): the key must be created or imported with exportable=true and a release policy", where, ErrNotExportable, msg)
	case strings.Contains(lower, "policy"):
		detail := c.policyDetail(ctx, keyName, keyVersion, token)
		return fmt.Errorf("%s: %w (%s)%s", where, ErrPolicy, msg, detail)
	case re.StatusCode == http.StatusForbidden && (strings.Contains(lower, "not authorized") || strings.Contains(lower, "permission") || strings.Contains(lower, "accessdenied") || strings.Contains(lower, "forbiddenbyrbac")):
		return fmt.Errorf("%s: %w (%s): grant the identity the keys/release permission (Managed HSM Crypto Service Release User role, or a Key Vault access policy with 'release')", where, ErrPermission, msg)
	case strings.Contains(lower, "token") || strings.Contains(lower, "attestation") || strings.Contains(lower, "issuer") || strings.Contains(lower, "signature"):
		return fmt.Errorf("%s: %w (%s): the token must come from an attestation service named in the key's release policy", where, ErrTokenRejected, msg)
	case re.StatusCode >= 500:
		return fmt.Errorf("%s: %w (HTTP %d %s: %s): retry later", where, ErrServiceFailure, re.StatusCode, code, msg)
	default:
		return fmt.Errorf("%s: %w (HTTP %d %s: %s)", where, ErrBadRequest, re.StatusCode, code, msg)
	}
}

// policyDetail reads the key's release policy and evaluates the token's
// claims against it to name what differs. The token is not verified here;
// its claims only explain a refusal.
func (c *Client) policyDetail(ctx context.Context, keyName, keyVersion string, token secret.Token) string {
	claims, err := UnverifiedClaims(token)
	if err != nil {
		return ": the token's claims could not be read to compare them with the policy"
	}
	got, err := c.kc.GetKey(ctx, keyName, keyVersion, nil)
	if err != nil || got.ReleasePolicy == nil || len(got.ReleasePolicy.EncodedPolicy) == 0 {
		return ": the release policy is not readable with this identity (keys/get), so the differing claims cannot be named"
	}
	pol, err := kpolicy.Parse(got.ReleasePolicy.EncodedPolicy)
	if err != nil {
		return fmt.Sprintf(": the key's release policy could not be parsed: %v", err)
	}
	iss, _ := claims["iss"].(string)
	ok, mm := pol.Evaluate(iss, claims)
	if ok {
		return ": the token's claims satisfy the policy as read; the vault may not trust the token's issuer or signature"
	}
	return ": " + kpolicy.Describe(mm) + "; fix the deployment (CCE policy, debug mode) or the key's release policy"
}

// UnverifiedClaims decodes a JWT's claims without checking its signature,
// for explanations only.
func UnverifiedClaims(token secret.Token) (map[string]any, error) {
	parts := strings.Split(token.Reveal(), ".")
	if len(parts) != 3 {
		return nil, errors.New("token is not a JWT")
	}
	body, err := decodeB64(parts[1])
	if err != nil {
		return nil, errors.New("token payload is not base64url")
	}
	var claims map[string]any
	if err := json.Unmarshal(body, &claims); err != nil {
		return nil, errors.New("token payload is not JSON")
	}
	return claims, nil
}

// scrub removes the token from text that may echo it.
func scrub(s string, token secret.Token) string {
	if t := token.Reveal(); len(t) > 8 {
		s = strings.ReplaceAll(s, t, "[REDACTED]")
	}
	return s
}

// fixedToken is a TokenCredential with one preset bearer token.
type fixedToken struct{ tok secret.Token }

var _ azcore.TokenCredential = fixedToken{}

// Format keeps the token out of every fmt verb (fmt cannot see the
// redacting methods of an unexported field).
func (f fixedToken) Format(s fmt.State, _ rune) {
	_, _ = io.WriteString(s, "hsm.BearerToken([REDACTED])")
}

func (f fixedToken) GetToken(context.Context, policy.TokenRequestOptions) (azcore.AccessToken, error) {
	if f.tok == "" {
		return azcore.AccessToken{}, errors.New("bearer token is empty")
	}
	return azcore.AccessToken{Token: f.tok.Reveal(), ExpiresOn: time.Now().Add(time.Hour)}, nil
}

// BearerToken returns a credential that always presents tok (akv.bearer_token
// of the existing sidecar's configuration).
func BearerToken(tok secret.Token) azcore.TokenCredential { return fixedToken{tok: tok} }
