package localhsm

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"math/big"
	"net/http"
	"strings"
	"time"

	"github.com/blobseal/blobseal/keyrelease/policy"
)

// keyVersion is one version of a key, held in memory only.
type keyVersion struct {
	version    string
	kty        string // oct-HSM, RSA-HSM, EC-HSM (or software kty)
	keyOps     []string
	oct        []byte
	priv       any // *rsa.PrivateKey or *ecdsa.PrivateKey
	enabled    bool
	exportable bool
	created    time.Time
	updated    time.Time
	policy     []byte // release policy JSON, nil if none
	policyCT   string
	immutable  bool
	tags       map[string]string
}

// Wire types, as azkeys and the REST reference spell them.
type jwk struct {
	Kty    string   `json:"kty"`
	KID    string   `json:"kid,omitempty"`
	KeyOps []string `json:"key_ops,omitempty"`
	K      string   `json:"k,omitempty"`
	N      string   `json:"n,omitempty"`
	E      string   `json:"e,omitempty"`
	D      string   `json:"d,omitempty"`
	P      string   `json:"p,omitempty"`
	Q      string   `json:"q,omitempty"`
	DP     string   `json:"dp,omitempty"`
	DQ     string   `json:"dq,omitempty"`
	QI     string   `json:"qi,omitempty"`
	Crv    string   `json:"crv,omitempty"`
	X      string   `json:"x,omitempty"`
	Y      string   `json:"y,omitempty"`
	KeyHSM string   `json:"key_hsm,omitempty"`
}

type attributes struct {
	Enabled         *bool  `json:"enabled,omitempty"`
	Exportable      *bool  `json:"exportable,omitempty"`
	Created         int64  `json:"created,omitempty"`
	Updated         int64  `json:"updated,omitempty"`
	RecoverableDays int    `json:"recoverableDays,omitempty"`
	RecoveryLevel   string `json:"recoveryLevel,omitempty"`
}

type releasePolicyWire struct {
	ContentType string `json:"contentType,omitempty"`
	Data        string `json:"data,omitempty"`
	Immutable   *bool  `json:"immutable,omitempty"`
}

type keyBundle struct {
	Key           jwk                `json:"key"`
	Attributes    attributes         `json:"attributes"`
	ReleasePolicy *releasePolicyWire `json:"release_policy,omitempty"`
	Tags          map[string]string  `json:"tags,omitempty"`
}

type importRequest struct {
	Key           *jwk               `json:"key"`
	HSM           *bool              `json:"Hsm"`
	Attributes    *attributes        `json:"attributes"`
	ReleasePolicy *releasePolicyWire `json:"release_policy"`
	Tags          map[string]string  `json:"tags"`
}

type createRequest struct {
	Kty            string             `json:"kty"`
	KeySize        *int               `json:"key_size"`
	PublicExponent *int               `json:"public_exponent"`
	Crv            string             `json:"crv"`
	KeyOps         []string           `json:"key_ops"`
	Attributes     *attributes        `json:"attributes"`
	ReleasePolicy  *releasePolicyWire `json:"release_policy"`
	Tags           map[string]string  `json:"tags"`
}

const policyContentType = "application/json; charset=utf-8"

// commonAttributes validates attributes and release policy shared by import
// and create; it fills v.
func commonAttributes(v *keyVersion, attrs *attributes, rp *releasePolicyWire, tags map[string]string) error {
	v.enabled = true
	if attrs != nil {
		if attrs.Enabled != nil {
			v.enabled = *attrs.Enabled
		}
		if attrs.Exportable != nil {
			v.exportable = *attrs.Exportable
		}
	}
	if rp != nil && rp.Data != "" {
		ct := rp.ContentType
		if ct == "" {
			ct = policyContentType
		}
		if !strings.EqualFold(strings.ReplaceAll(ct, " ", ""), strings.ReplaceAll(policyContentType, " ", "")) {
			return fmt.Errorf("release_policy.contentType %q is not supported; use %q", ct, policyContentType)
		}
		raw, err := decodeB64URL(rp.Data)
		if err != nil {
			return fmt.Errorf("release_policy.data must be base64url: %v", err)
		}
		if _, err := policy.Parse(raw); err != nil {
			return fmt.Errorf("release_policy.data: %v", err)
		}
		v.policy, v.policyCT = raw, ct
		v.immutable = rp.Immutable != nil && *rp.Immutable
	}
	if v.exportable && v.policy == nil {
		return fmt.Errorf("exportable keys must have a release policy (release_policy.data)")
	}
	v.tags = tags
	now := time.Now().UTC().Truncate(time.Second)
	v.created, v.updated = now, now
	return nil
}

func (s *Server) handleImport(w http.ResponseWriter, r *http.Request, name string) {
	var req importRequest
	if !readJSON(w, r, &req) {
		return
	}
	if req.Key == nil {
		writeError(w, http.StatusBadRequest, "BadParameter", "key (a JSON web key) is required")
		return
	}
	v := &keyVersion{keyOps: req.Key.KeyOps}
	hsm := req.HSM != nil && *req.HSM
	kty := req.Key.Kty
	base := strings.TrimSuffix(kty, "-HSM")
	if hsm || strings.HasSuffix(kty, "-HSM") {
		v.kty = base + "-HSM"
	} else {
		v.kty = base
	}
	switch base {
	case "oct":
		k, err := decodeB64URL(req.Key.K)
		if err != nil || (len(k) != 16 && len(k) != 24 && len(k) != 32) {
			writeError(w, http.StatusBadRequest, "BadParameter", "oct key material k must be base64url of 16, 24 or 32 bytes")
			return
		}
		v.oct = k
	case "RSA":
		priv, err := rsaFromJWK(req.Key)
		if err != nil {
			writeError(w, http.StatusBadRequest, "BadParameter", "RSA key: "+err.Error())
			return
		}
		v.priv = priv
	default:
		writeError(w, http.StatusBadRequest, "BadParameter", fmt.Sprintf("kty %q cannot be imported here; use oct, oct-HSM, RSA or RSA-HSM (EC keys: create them)", kty))
		return
	}
	if err := commonAttributes(v, req.Attributes, req.ReleasePolicy, req.Tags); err != nil {
		writeError(w, http.StatusBadRequest, "BadParameter", err.Error())
		return
	}
	if len(v.keyOps) == 0 {
		v.keyOps = defaultOps(base)
	}
	s.store(w, r, name, v)
}

func (s *Server) handleCreate(w http.ResponseWriter, r *http.Request, name string) {
	var req createRequest
	if !readJSON(w, r, &req) {
		return
	}
	v := &keyVersion{kty: req.Kty, keyOps: req.KeyOps}
	base := strings.TrimSuffix(req.Kty, "-HSM")
	switch base {
	case "oct":
		bits := 256
		if req.KeySize != nil {
			bits = *req.KeySize
		}
		if bits != 128 && bits != 192 && bits != 256 {
			writeError(w, http.StatusBadRequest, "BadParameter", "oct key_size must be 128, 192 or 256")
			return
		}
		v.oct = make([]byte, bits/8)
		if _, err := rand.Read(v.oct); err != nil {
			writeError(w, http.StatusInternalServerError, "InternalError", "random source failed")
			return
		}
	case "RSA":
		bits := 2048
		if req.KeySize != nil {
			bits = *req.KeySize
		}
		if bits != 2048 && bits != 3072 && bits != 4096 {
			writeError(w, http.StatusBadRequest, "BadParameter", "RSA key_size must be 2048, 3072 or 4096")
			return
		}
		if req.PublicExponent != nil && *req.PublicExponent != 65537 {
			writeError(w, http.StatusBadRequest, "BadParameter", "public_exponent must be 65537")
			return
		}
		priv, err := rsa.GenerateKey(rand.Reader, bits)
		if err != nil {
			writeError(w, http.StatusInternalServerError, "InternalError", "RSA key generation failed")
			return
		}
		v.priv = priv
	case "EC":
		var curve elliptic.Curve
		switch req.Crv {
		case "P-256", "":
			curve, req.Crv = elliptic.P256(), "P-256"
		case "P-384":
			curve = elliptic.P384()
		case "P-521":
			curve = elliptic.P521()
		default:
			writeError(w, http.StatusBadRequest, "BadParameter", fmt.Sprintf("crv %q is not supported; use P-256, P-384 or P-521", req.Crv))
			return
		}
		priv, err := ecdsa.GenerateKey(curve, rand.Reader)
		if err != nil {
			writeError(w, http.StatusInternalServerError, "InternalError", "EC key generation failed")
			return
		}
		v.priv = priv
	default:
		writeError(w, http.StatusBadRequest, "BadParameter", fmt.Sprintf("kty %q is not supported; use oct-HSM, RSA-HSM or EC-HSM", req.Kty))
		return
	}
	if err := commonAttributes(v, req.Attributes, req.ReleasePolicy, req.Tags); err != nil {
		writeError(w, http.StatusBadRequest, "BadParameter", err.Error())
		return
	}
	if len(v.keyOps) == 0 {
		v.keyOps = defaultOps(base)
	}
	s.store(w, r, name, v)
}

func defaultOps(base string) []string {
	switch base {
	case "oct":
		return []string{"encrypt", "decrypt", "wrapKey", "unwrapKey"}
	case "EC":
		return []string{"sign", "verify"}
	}
	return []string{"encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"}
}

func (s *Server) store(w http.ResponseWriter, r *http.Request, name string, v *keyVersion) {
	var id [16]byte
	if _, err := rand.Read(id[:]); err != nil {
		writeError(w, http.StatusInternalServerError, "InternalError", "random source failed")
		return
	}
	v.version = hex.EncodeToString(id[:])
	s.mu.Lock()
	if prev := s.keys[name]; len(prev) > 0 {
		last := prev[len(prev)-1]
		if last.immutable && last.policy != nil && string(last.policy) != string(v.policy) {
			s.mu.Unlock()
			writeError(w, http.StatusBadRequest, "BadParameter", "the key's release policy is immutable and cannot change in a new version")
			return
		}
	}
	s.keys[name] = append(s.keys[name], v)
	bundle := bundleOf(baseURL(r), name, v)
	s.mu.Unlock()
	s.log.Info("localhsm key stored", "name", name, "version", v.version, "kty", v.kty, "exportable", v.exportable)
	writeJSON(w, http.StatusOK, bundle)
}

func (s *Server) lookup(name, version string) *keyVersion {
	s.mu.Lock()
	defer s.mu.Unlock()
	vs := s.keys[name]
	if len(vs) == 0 {
		return nil
	}
	if version == "" {
		return vs[len(vs)-1]
	}
	for _, v := range vs {
		if v.version == version {
			return v
		}
	}
	return nil
}

func (s *Server) handleGet(w http.ResponseWriter, r *http.Request, name, version string) {
	v := s.lookup(name, version)
	if v == nil {
		writeError(w, http.StatusNotFound, "KeyNotFound", fmt.Sprintf("A key with (name/id) %s/%s was not found in this key vault.", name, version))
		return
	}
	s.mu.Lock()
	bundle := bundleOf(baseURL(r), name, v)
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, bundle)
}

// bundleOf renders the public view of a key version (no private material).
func bundleOf(base, name string, v *keyVersion) keyBundle {
	t, f := true, false
	b := keyBundle{
		Key: jwk{Kty: v.kty, KID: fmt.Sprintf("%s/keys/%s/%s", base, name, v.version), KeyOps: v.keyOps},
		Attributes: attributes{
			Enabled: &v.enabled, Exportable: &v.exportable,
			Created: v.created.Unix(), Updated: v.updated.Unix(),
			RecoverableDays: 7, RecoveryLevel: "CustomizedRecoverable+Purgeable",
		},
		Tags: v.tags,
	}
	switch k := v.priv.(type) {
	case *rsa.PrivateKey:
		b.Key.N = b64url(k.N.Bytes())
		b.Key.E = b64url(big.NewInt(int64(k.E)).Bytes())
	case *ecdsa.PrivateKey:
		b.Key.Crv = k.Curve.Params().Name
		size := (k.Curve.Params().BitSize + 7) / 8
		pub, err := k.PublicKey.Bytes() // 0x04 || X || Y
		if err == nil && len(pub) == 1+2*size {
			b.Key.X, b.Key.Y = b64url(pub[1:1+size]), b64url(pub[1+size:])
		}
	}
	if v.policy != nil {
		imm := &f
		if v.immutable {
			imm = &t
		}
		b.ReleasePolicy = &releasePolicyWire{ContentType: v.policyCT, Data: b64url(v.policy), Immutable: imm}
	}
	return b
}

// material returns the bytes released for a key: raw for oct, PKCS#8 else.
func (v *keyVersion) material() ([]byte, error) {
	if v.oct != nil {
		out := make([]byte, len(v.oct))
		copy(out, v.oct)
		return out, nil
	}
	return x509.MarshalPKCS8PrivateKey(v.priv)
}

func rsaFromJWK(k *jwk) (*rsa.PrivateKey, error) {
	get := func(name, v string) (*big.Int, error) {
		b, err := decodeB64URL(v)
		if err != nil || len(b) == 0 {
			return nil, fmt.Errorf("%s must be non-empty base64url", name)
		}
		return new(big.Int).SetBytes(b), nil
	}
	var err error
	fields := map[string]**big.Int{}
	var n, e, d, p, q *big.Int
	fields["n"], fields["e"], fields["d"], fields["p"], fields["q"] = &n, &e, &d, &p, &q
	vals := map[string]string{"n": k.N, "e": k.E, "d": k.D, "p": k.P, "q": k.Q}
	for _, name := range []string{"n", "e", "d", "p", "q"} {
		if *fields[name], err = get(name, vals[name]); err != nil {
			return nil, err
		}
	}
	if !e.IsInt64() || e.Int64() > 1<<31-1 || n.BitLen() < 2048 || n.BitLen() > 8192 {
		return nil, fmt.Errorf("modulus must be 2048-8192 bits with a small public exponent")
	}
	priv := &rsa.PrivateKey{PublicKey: rsa.PublicKey{N: n, E: int(e.Int64())}, D: d, Primes: []*big.Int{p, q}}
	if err := priv.Validate(); err != nil {
		return nil, fmt.Errorf("inconsistent private key: %v", err)
	}
	priv.Precompute()
	return priv, nil
}

func b64url(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }
func b64std(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

func decodeB64URL(s string) ([]byte, error) {
	return base64.RawURLEncoding.DecodeString(strings.TrimRight(s, "="))
}
