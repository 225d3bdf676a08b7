package skr

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/blobseal/blobseal/keyrelease"
	"github.com/blobseal/blobseal/keyrelease/evidence"
)

// SkrEnv is the environment variable of Azure's SKR sidecar.
const SkrEnv = "SkrSideCarArgs"

// Config is everything `blobseal skr` needs; the CLI fills it from flags
// or from SkrSideCarArgs (ParseSkrSideCarArgs).
type Config struct {
	Address     string   // "" = DefaultAddress
	AllowedKeys []string // see Options.AllowedKeys
	Evidence    keyrelease.EvidenceConfig
	// CAFile adds TLS roots for MAA and the vault (the local stack's CA).
	CAFile string
	// IdentityClientID picks a user-assigned managed identity for requests
	// without access_token.
	IdentityClientID string
	MaxBodyBytes     int64
	RequestTimeout   time.Duration
	// Ready, if set, is called with the bound address once serving.
	Ready func(addr string)
}

// ParseSkrSideCarArgs reads the Azure SKR sidecar's configuration: base64
// JSON {"certcache": {endpoint_type, endpoint, tee_type, api_version},
// "identity": {"client_id"}}. An empty value is a valid configuration
// (attest/raw only in the Azure sidecar; here the certificate may still
// come from the security context).
func ParseSkrSideCarArgs(b64 string) (Config, error) {
	var c Config
	b64 = strings.TrimSpace(b64)
	if b64 == "" {
		return c, nil
	}
	raw, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		if raw, err = base64.RawStdEncoding.DecodeString(b64); err != nil {
			return c, fmt.Errorf("%s is not base64 (encode the JSON with `base64 -w0`): %v", SkrEnv, err)
		}
	}
	var info struct {
		CertCache struct {
			EndpointType string `json:"endpoint_type"`
			Endpoint     string `json:"endpoint"`
			TEEType      string `json:"tee_type"`
			APIVersion   string `json:"api_version"`
		} `json:"certcache"`
		Identity struct {
			ClientID string `json:"client_id"`
		} `json:"identity"`
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&info); err != nil {
		return c, fmt.Errorf("%s does not hold the expected JSON {certcache, identity}: %v", SkrEnv, err)
	}
	cc, err := evidence.LegacyCertCache(info.CertCache.EndpointType, info.CertCache.Endpoint, info.CertCache.TEEType, info.CertCache.APIVersion)
	if err != nil {
		return c, fmt.Errorf("%s: %w", SkrEnv, err)
	}
	c.Evidence.CertCache = cc
	c.IdentityClientID = info.Identity.ClientID
	return c, nil
}

// Run builds the evidence provider, HTTP client and identity through
// keyrelease and serves the API until ctx ends.
func Run(ctx context.Context, c Config, log *slog.Logger) error {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if c.Evidence.Logger == nil {
		c.Evidence.Logger = log
	}
	ev, err := keyrelease.NewEvidence(c.Evidence)
	if err != nil {
		return fmt.Errorf("skr: %w", err)
	}
	roots, err := keyrelease.TLSRoots(c.CAFile)
	if err != nil {
		return fmt.Errorf("skr: %w", err)
	}
	cred, err := keyrelease.NewCredential(keyrelease.CredentialOptions{ManagedIdentityClientID: c.IdentityClientID})
	if err != nil {
		return fmt.Errorf("skr: %w", err)
	}
	srv, err := New(Options{Evidence: ev, Credential: cred, HTTPClient: keyrelease.HTTPClient(roots), TrustedRoots: roots,
		AllowedKeys: c.AllowedKeys, MaxBodyBytes: c.MaxBodyBytes, RequestTimeout: c.RequestTimeout, Logger: log})
	if err != nil {
		return err
	}
	return srv.Serve(ctx, c.Address, c.Ready)
}
