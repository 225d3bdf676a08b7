package crypto

import (
	"encoding/binary"
	"encoding/json"
)

// Sparse images. Images blobseal creates leave all-zero plaintext regions
// out: they are never encrypted or stored (the file is sparse there, a page
// blob has no pages there), so their ciphertext reads as zeros. A volume
// with zero sectors enabled reads an all-zero ciphertext sector as zero
// plaintext (dm-crypt would decrypt it to noise); real ciphertext is all
// zeros with probability 2^-4096 per sector.
//
// Whether those zeros can be trusted is the integrity layer's business: with
// a verity tree (the default for new images) every stored block, zeros
// included, is checked against the pinned root before it is decrypted, so
// storage cannot zero real data to make it read as zeros. Without one,
// storage can change any sector anyway (see docs/SECURITY.md). The LUKS2
// token SparseTokenType only marks an image as sparse, so that images made
// by other tools keep dm-crypt's exact reading unless a tree vouches.

// SparseTokenType is the LUKS2 token type that marks a sparse image.
const SparseTokenType = "blobseal-sparse"

// legacyHoleTokenType marked sparse images (with an authenticated hole
// map, which the verity tree replaced) before; such images are sparse too.
const legacyHoleTokenType = "blobseal-holes"

// Run is a byte range [Off, Off+Len).
type Run struct{ Off, Len int64 }

// End returns the first offset after the run.
func (r Run) End() int64 { return r.Off + r.Len }

func sparseToken() json.RawMessage {
	b, _ := json.Marshal(struct {
		Type     string   `json:"type"`
		Keyslots []string `json:"keyslots"`
	}{SparseTokenType, []string{}})
	return b
}

// isSparseToken reports whether a LUKS2 token marks the image as sparse.
func isSparseToken(raw json.RawMessage) bool {
	var t struct {
		Type string `json:"type"`
	}
	return json.Unmarshal(raw, &t) == nil && (t.Type == SparseTokenType || t.Type == legacyHoleTokenType)
}

func isZero(p []byte) bool {
	for len(p) >= 8 {
		if binary.LittleEndian.Uint64(p) != 0 {
			return false
		}
		p = p[8:]
	}
	for _, b := range p {
		if b != 0 {
			return false
		}
	}
	return true
}

func wipe(p []byte) {
	for i := range p {
		p[i] = 0
	}
}
