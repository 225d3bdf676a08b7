package localhsm

import (
	"crypto/ecdsa"
	"crypto/rsa"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"

	"github.com/go-jose/go-jose/v4"

	"github.com/blobseal/blobseal/keyrelease/hsm"
	"github.com/blobseal/blobseal/keyrelease/policy"
)

type releaseRequest struct {
	Target string `json:"target"`
	Enc    string `json:"enc"`
	Nonce  string `json:"nonce,omitempty"`
}

// releasePayload is the signed body of a release response.
type releasePayload struct {
	Request  releaseEcho `json:"request"`
	Response struct {
		Key keyBundle `json:"key"`
	} `json:"response"`
}

type releaseEcho struct {
	APIVersion string `json:"api-version"`
	Enc        string `json:"enc"`
	KID        string `json:"kid"`
	Nonce      string `json:"nonce,omitempty"`
}

type keyHSM struct {
	SchemaVersion string `json:"schema_version"`
	Header        struct {
		KID string `json:"kid"`
		Alg string `json:"alg"`
		Enc string `json:"enc"`
	} `json:"header"`
	Ciphertext string `json:"ciphertext"`
}

func (s *Server) handleRelease(w http.ResponseWriter, r *http.Request, name, version string) {
	var req releaseRequest
	if !readJSON(w, r, &req) {
		return
	}
	v := s.lookup(name, version)
	if v == nil {
		writeError(w, http.StatusNotFound, "KeyNotFound", fmt.Sprintf("A key with (name/id) %s/%s was not found in this key vault.", name, version))
		return
	}
	s.mu.Lock()
	exportable, enabled, pol := v.exportable, v.enabled, v.policy
	s.mu.Unlock()
	if !enabled {
		writeError(w, http.StatusForbidden, "Forbidden", "Operation release is not allowed on a disabled key.")
		return
	}
	if !exportable || pol == nil {
		writeError(w, http.StatusForbidden, "Forbidden", "The key is not exportable; only keys created with exportable=true and a release policy can be released.")
		return
	}
	enc := req.Enc
	if enc == "" {
		enc = hsm.AlgCKMRSAAESKeyWrap
	}
	if !knownAlg(enc) {
		writeError(w, http.StatusBadRequest, "BadParameter", fmt.Sprintf("Invalid enc %q: supported key wrap algorithms are %v", enc, hsm.Algorithms()))
		return
	}
	if req.Target == "" {
		writeError(w, http.StatusBadRequest, "BadParameter", "target (the attestation token) is required")
		return
	}
	claims, iss, err := s.issuer.verify(r.Context(), req.Target)
	if err != nil {
		code := "BadParameter"
		if errors.Is(err, errTokenExpired) {
			code = "TokenExpired"
		}
		s.log.Info("localhsm release refused: token", "name", name, "reason", err.Error())
		writeError(w, http.StatusBadRequest, code, "Target environment attestation statement cannot be verified: "+err.Error())
		return
	}
	p, err := policy.Parse(pol)
	if err != nil {
		writeError(w, http.StatusInternalServerError, "InternalError", "stored release policy is invalid")
		return
	}
	if ok, mm := p.Evaluate(iss, claims); !ok {
		s.log.Info("localhsm release refused: policy", "name", name, "mismatches", len(mm))
		writeError(w, http.StatusForbidden, "Forbidden", "Target environment attestation statement does not satisfy the key release policy.")
		return
	}
	pub, err := runtimeKey(claims)
	if err != nil {
		writeError(w, http.StatusBadRequest, "BadParameter", "Target environment attestation statement has no usable wrapping key: "+err.Error())
		return
	}
	material, err := v.material()
	if err != nil {
		writeError(w, http.StatusInternalServerError, "InternalError", "key material could not be encoded")
		return
	}
	ct, err := hsm.WrapKeyHSM(nil, material, pub, enc)
	wipe(material)
	if err != nil {
		writeError(w, http.StatusInternalServerError, "InternalError", "wrapping failed")
		return
	}
	var kh keyHSM
	kh.SchemaVersion = "1.0"
	kh.Header.KID, kh.Header.Alg, kh.Header.Enc = "TargetKey", "dir", enc
	kh.Ciphertext = b64url(ct)
	khJSON, err := json.Marshal(kh)
	if err != nil {
		writeError(w, http.StatusInternalServerError, "InternalError", "encoding failed")
		return
	}
	s.mu.Lock()
	bundle := bundleOf(baseURL(r), name, v)
	s.mu.Unlock()
	bundle.Key.KeyHSM = b64url(khJSON)
	var payload releasePayload
	requestedKID := baseURL(r) + "/keys/" + name
	if version != "" {
		requestedKID += "/" + version
	}
	payload.Request = releaseEcho{APIVersion: r.URL.Query().Get("api-version"), Enc: enc, KID: requestedKID, Nonce: req.Nonce}
	payload.Response.Key = bundle
	body, err := json.Marshal(payload)
	if err != nil {
		writeError(w, http.StatusInternalServerError, "InternalError", "encoding failed")
		return
	}
	jws, err := s.sign(body)
	if err != nil {
		writeError(w, http.StatusInternalServerError, "InternalError", "signing failed")
		return
	}
	s.log.Info("localhsm key released", "name", name, "version", v.version, "enc", enc)
	writeJSON(w, http.StatusOK, map[string]string{"value": jws})
}

func knownAlg(a string) bool {
	for _, k := range hsm.Algorithms() {
		if a == k {
			return true
		}
	}
	return false
}

// runtimeKey finds the RSA wrapping key in x-ms-runtime.keys.
func runtimeKey(claims map[string]any) (*rsa.PublicKey, error) {
	rt, ok := claims["x-ms-runtime"].(map[string]any)
	if !ok {
		return nil, errors.New("claim x-ms-runtime is missing")
	}
	keys, ok := rt["keys"].([]any)
	if !ok || len(keys) == 0 {
		return nil, errors.New("claim x-ms-runtime.keys is missing or empty")
	}
	for _, k := range keys {
		raw, err := json.Marshal(k)
		if err != nil {
			continue
		}
		var jk jose.JSONWebKey
		if err := jk.UnmarshalJSON(raw); err != nil {
			continue
		}
		if pub, ok := jk.Key.(*rsa.PublicKey); ok {
			if pub.N.BitLen() < 2048 {
				return nil, fmt.Errorf("runtime RSA key is %d bits; at least 2048 are required", pub.N.BitLen())
			}
			return pub, nil
		}
	}
	return nil, errors.New("x-ms-runtime.keys holds no RSA public key")
}

// sign makes the compact JWS of a release response, x5c in the header.
func (s *Server) sign(payload []byte) (string, error) {
	alg := jose.RS256
	if _, ok := s.signer.Public().(*ecdsa.PublicKey); ok {
		alg = jose.ES256
	}
	opts := (&jose.SignerOptions{}).WithHeader("x5c", s.x5c)
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: alg, Key: s.signer}, opts)
	if err != nil {
		return "", err
	}
	obj, err := signer.Sign(payload)
	if err != nil {
		return "", err
	}
	return obj.CompactSerialize()
}

func wipe(b []byte) {
	for i := range b {
		b[i] = 0
	}
}
