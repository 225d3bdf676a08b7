//go:build purego || !amd64

package xts

// Without the amd64 assembly only the portable implementation exists; these
// keep the dispatch compiling and simply do the portable work.

func haveAESNI() bool   { return false }
func haveVAES() bool    { return false }
func haveVAESYMM() bool { return false }

func encryptTweakAsm(ks *keySchedules, dst, src *[16]byte) {
	encryptBlockGeneric(ks.rounds, ks.tweak[:], dst[:], src[:])
}

func cryptBlocksAsm(_ bool, ks *keySchedules, decrypt bool, dst, src []byte, tweak *[16]byte) {
	cryptBlocksGeneric(ks, decrypt, dst, src, tweak)
}

func cryptSectorsAsm(impl, *keySchedules, bool, []byte, []byte, int, uint64, uint64) bool {
	return false
}
