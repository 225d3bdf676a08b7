package hsm

import (
	"context"
	"crypto/rsa"
	"errors"
	"fmt"
	"math/big"
	"strings"

	"github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys"

	"github.com/blobseal/blobseal/internal/secret"
	kpolicy "github.com/blobseal/blobseal/keyrelease/policy"
)

// KeySpec describes a key to put into the vault with a release policy.
type KeySpec struct {
	// Kty is "oct-HSM" (Managed HSM) or "RSA-HSM" (Managed HSM, Key Vault
	// Premium).
	Kty string
	// Oct is the key to import for oct-HSM (32 bytes); RSA the key to import
	// for RSA-HSM. Both nil: the vault generates the key (create).
	Oct secret.Bytes
	RSA *rsa.PrivateKey
	// KeySize in bits when generating (oct-HSM: 256; RSA-HSM: 2048).
	KeySize int
	// Policy is the release policy JSON (see package policy).
	Policy []byte
	// Immutable marks the release policy immutable.
	Immutable bool
}

// PutKey imports (Oct or RSA set) or creates a key with an exportable flag
// and release policy, returning the new key identifier (with version).
func (c *Client) PutKey(ctx context.Context, name string, spec KeySpec) (string, error) {
	pol, err := kpolicy.Parse(spec.Policy)
	if err != nil {
		return "", fmt.Errorf("key %q: %w", name, err)
	}
	for _, w := range pol.Warnings {
		c.log.Warn("release policy accepted with a warning", "key", name, "warning", w)
	}
	ct := "application/json; charset=utf-8"
	t := true
	imm := spec.Immutable
	rp := &azkeys.KeyReleasePolicy{ContentType: &ct, EncodedPolicy: spec.Policy, Immutable: &imm}
	attrs := &azkeys.KeyAttributes{Enabled: &t, Exportable: &t}
	kty := azkeys.KeyType(spec.Kty)
	var kid *azkeys.ID
	switch {
	case spec.Oct != nil || spec.RSA != nil:
		jwk := &azkeys.JSONWebKey{Kty: &kty}
		switch strings.TrimSuffix(spec.Kty, "-HSM") {
		case "oct":
			if spec.Oct == nil {
				return "", errors.New("oct key import needs the key bytes")
			}
			jwk.K = []byte(spec.Oct)
		case "RSA":
			if spec.RSA == nil {
				return "", errors.New("RSA key import needs an RSA private key")
			}
			k := spec.RSA
			k.Precompute()
			if len(k.Primes) != 2 {
				return "", errors.New("RSA key import needs a two-prime key")
			}
			jwk.N, jwk.E, jwk.D = k.N.Bytes(), big.NewInt(int64(k.E)).Bytes(), k.D.Bytes()
			jwk.P, jwk.Q = k.Primes[0].Bytes(), k.Primes[1].Bytes()
			jwk.DP, jwk.DQ, jwk.QI = k.Precomputed.Dp.Bytes(), k.Precomputed.Dq.Bytes(), k.Precomputed.Qinv.Bytes()
		default:
			return "", fmt.Errorf("key type %q cannot be imported; use oct-HSM or RSA-HSM", spec.Kty)
		}
		resp, err := c.kc.ImportKey(ctx, name, azkeys.ImportKeyParameters{Key: jwk, HSM: &t, KeyAttributes: attrs, ReleasePolicy: rp}, nil)
		if err != nil {
			return "", c.putError(err, "import", name)
		}
		kid = resp.Key.KID
	default:
		params := azkeys.CreateKeyParameters{Kty: &kty, KeyAttributes: attrs, ReleasePolicy: rp}
		if spec.KeySize > 0 {
			ks := int32(spec.KeySize)
			params.KeySize = &ks
		}
		resp, err := c.kc.CreateKey(ctx, name, params, nil)
		if err != nil {
			return "", c.putError(err, "create", name)
		}
		kid = resp.Key.KID
	}
	if kid == nil {
		return "", fmt.Errorf("%s key %q: the vault returned no key identifier", spec.Kty, name)
	}
	c.log.Info("key stored with release policy", "vault", c.vault.Host, "kid", string(*kid), "kty", spec.Kty)
	return string(*kid), nil
}

func (c *Client) putError(err error, op, name string) error {
	var msg string
	if code, m, status, ok := responseError(err); ok {
		msg = fmt.Sprintf("HTTP %d %s: %s", status, code, m)
		switch status {
		case 401:
			msg += " (check the credential and that it is for this vault)"
		case 403:
			msg += " (grant the identity keys/create and keys/import, e.g. the Managed HSM Crypto User role)"
		}
	} else {
		msg = err.Error()
	}
	return fmt.Errorf("%s key %q on %s: %s", op, name, c.vault.Host, msg)
}
