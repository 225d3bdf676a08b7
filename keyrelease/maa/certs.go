package maa

import (
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/go-jose/go-jose/v4"
)

// maxSigningKeys bounds a /certs document; real MAA instances publish a handful.
const maxSigningKeys = 64

// ParseSigningKeys reads an MAA /certs document. Real MAA lists its keys as
// {kid, kty, x5c} without n/e, which a strict JWK parser rejects, so each
// entry is read on its own: n/e when present, otherwise the public key of the
// first x5c certificate. The certificate's validity period is not checked:
// the document itself is trusted because it came from the issuer over TLS.
func ParseSigningKeys(body []byte) (jose.JSONWebKeySet, error) {
	var doc struct {
		Keys []json.RawMessage `json:"keys"`
	}
	if err := json.Unmarshal(body, &doc); err != nil {
		return jose.JSONWebKeySet{}, fmt.Errorf("not a JWK set: %w", err)
	}
	if len(doc.Keys) == 0 {
		return jose.JSONWebKeySet{}, errors.New("JWK set has no keys")
	}
	if len(doc.Keys) > maxSigningKeys {
		return jose.JSONWebKeySet{}, fmt.Errorf("JWK set has %d keys, more than %d", len(doc.Keys), maxSigningKeys)
	}
	var set jose.JSONWebKeySet
	for i, raw := range doc.Keys {
		k, err := parseSigningKey(raw)
		if err != nil {
			return jose.JSONWebKeySet{}, fmt.Errorf("key %d: %w", i, err)
		}
		if k != nil {
			set.Keys = append(set.Keys, *k)
		}
	}
	if len(set.Keys) == 0 {
		return jose.JSONWebKeySet{}, errors.New("JWK set has no RSA signing keys")
	}
	return set, nil
}

// parseSigningKey returns nil (no error) for key types other than RSA, which
// cannot verify RS256 tokens anyway.
func parseSigningKey(raw json.RawMessage) (*jose.JSONWebKey, error) {
	var entry struct {
		Kid string   `json:"kid"`
		Kty string   `json:"kty"`
		N   string   `json:"n"`
		E   string   `json:"e"`
		X5C []string `json:"x5c"`
	}
	if err := json.Unmarshal(raw, &entry); err != nil {
		return nil, err
	}
	if entry.Kty != "RSA" {
		return nil, nil
	}
	if entry.N != "" || entry.E != "" {
		var k jose.JSONWebKey
		if err := k.UnmarshalJSON(raw); err != nil {
			return nil, fmt.Errorf("kid %q: %w", truncate(entry.Kid, 100), err)
		}
		return &k, nil
	}
	if len(entry.X5C) == 0 {
		return nil, fmt.Errorf("kid %q has neither n/e nor an x5c certificate", truncate(entry.Kid, 100))
	}
	// x5c entries are standard base64 (RFC 7517 4.7), not base64url.
	der, err := base64.StdEncoding.DecodeString(entry.X5C[0])
	if err != nil {
		return nil, fmt.Errorf("kid %q: x5c[0] is not base64: %w", truncate(entry.Kid, 100), err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("kid %q: x5c[0]: %w", truncate(entry.Kid, 100), err)
	}
	pub, ok := cert.PublicKey.(*rsa.PublicKey)
	if !ok {
		return nil, fmt.Errorf("kid %q: x5c[0] holds a %T key, want RSA", truncate(entry.Kid, 100), cert.PublicKey)
	}
	return &jose.JSONWebKey{Key: pub, KeyID: entry.Kid, Algorithm: string(jose.RS256), Use: "sig", Certificates: []*x509.Certificate{cert}}, nil
}
