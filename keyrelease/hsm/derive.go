package hsm

import (
	"crypto/hkdf"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"

	"github.com/blobseal/blobseal/internal/secret"
)

// DefaultLabel is the HKDF info string of the existing sidecar for RSA keys.
const DefaultLabel = "Symmetric Encryption Key"

// ReleasedKey is key material released by the HSM and unwrapped locally.
type ReleasedKey struct {
	Kty      string // "oct-HSM", "oct", "RSA-HSM", "RSA", "EC-HSM", "EC"
	KID      string // full key identifier including the version
	KeyOps   []string
	Policy   []byte       // the key's release policy as returned with it (JSON), if any
	Material secret.Bytes // raw bytes for oct keys, PKCS#8 DER for RSA and EC keys
}

// Version returns the version segment of KID ("" if absent).
func (k *ReleasedKey) Version() string {
	parts := strings.Split(strings.TrimRight(k.KID, "/"), "/")
	for i, p := range parts {
		if p == "keys" && i+2 < len(parts) {
			return parts[i+2]
		}
	}
	return ""
}

// DeriveSecret turns a released key into the 32-byte filesystem secret:
// oct keys give their 32 bytes directly; RSA keys give
// HKDF-SHA256(secret = big-endian D, salt = hex-decoded saltHex,
// info = label or DefaultLabel).
func DeriveSecret(k *ReleasedKey, saltHex, label string) (secret.Bytes, error) {
	if k == nil {
		return nil, errors.New("derive: no released key")
	}
	switch strings.ToUpper(strings.TrimSuffix(k.Kty, "-HSM")) {
	case "OCT":
		if len(k.Material) != 32 {
			return nil, fmt.Errorf("derive: %s key is %d bytes; the filesystem secret must be 32 (import a 256-bit key)", k.Kty, len(k.Material))
		}
		out := make(secret.Bytes, 32)
		copy(out, k.Material)
		return out, nil
	case "RSA":
		priv, err := x509.ParsePKCS8PrivateKey(k.Material)
		if err != nil {
			return nil, fmt.Errorf("derive: released %s key is not PKCS#8: %w", k.Kty, err)
		}
		rk, ok := priv.(*rsa.PrivateKey)
		if !ok {
			return nil, fmt.Errorf("derive: released %s key holds a %T, not an RSA key", k.Kty, priv)
		}
		salt, err := hex.DecodeString(strings.TrimSpace(saltHex))
		if err != nil {
			return nil, fmt.Errorf("derive: key_derivation salt must be hex: %w", err)
		}
		if label == "" {
			label = DefaultLabel
		}
		d := rk.D.Bytes()
		defer wipe(d)
		out, err := hkdf.Key(sha256.New, d, salt, label, 32)
		if err != nil {
			return nil, fmt.Errorf("derive: hkdf: %w", err)
		}
		return secret.Bytes(out), nil
	case "EC":
		if _, err := x509.ParsePKCS8PrivateKey(k.Material); err != nil {
			return nil, fmt.Errorf("derive: released %s key is not PKCS#8: %w", k.Kty, err)
		}
		return nil, fmt.Errorf("derive: %s keys do not define a filesystem secret; use an oct-HSM or RSA-HSM key", k.Kty)
	}
	return nil, fmt.Errorf("derive: unsupported key type %q (want oct-HSM or RSA-HSM)", k.Kty)
}
