package hsm

import (
	"crypto/x509"
	"encoding/json"
	"fmt"
	"strings"

	"github.com/go-jose/go-jose/v4"

	"github.com/blobseal/blobseal/internal/secret"
)

// JWK renders the released key as a private JSON Web Key with kid and
// key_ops, the form the Azure SKR sidecar's /key/release returns. The
// result holds key material: the caller wipes it.
func (k *ReleasedKey) JWK() ([]byte, error) {
	var jk jose.JSONWebKey
	switch strings.TrimSuffix(k.Kty, "-HSM") {
	case "oct":
		jk.Key = []byte(k.Material)
	case "RSA", "EC":
		priv, err := x509.ParsePKCS8PrivateKey(k.Material)
		if err != nil {
			return nil, fmt.Errorf("released %s key is not PKCS#8: %w", k.Kty, err)
		}
		jk.Key = priv
	default:
		return nil, fmt.Errorf("released key type %q has no JWK form", k.Kty)
	}
	jk.KeyID = k.KID
	base, err := jk.MarshalJSON()
	if err != nil {
		return nil, fmt.Errorf("released key as JWK: %w", err)
	}
	defer secret.Wipe(base)
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(base, &fields); err != nil {
		return nil, err
	}
	ops := k.KeyOps
	if ops == nil {
		ops = []string{}
	}
	if fields["key_ops"], err = json.Marshal(ops); err != nil {
		return nil, err
	}
	out, err := json.Marshal(fields)
	for _, v := range fields {
		secret.Wipe(v)
	}
	return out, err
}
