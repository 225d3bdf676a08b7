//go:build amd64 && !purego

package xts

import "golang.org/x/sys/cpu"

//go:generate go run gen_amd64.go -out xts_amd64.s

func haveAESNI() bool { return cpu.X86.HasAES }

// haveVAES needs the 512-bit forms of AESENC/AESDEC and PCLMULQDQ, and
// AVX512BW for the per-lane byte shifts that step the tweaks.
func haveVAES() bool {
	return haveAESNI() && cpu.X86.HasAVX512F && cpu.X86.HasAVX512BW &&
		cpu.X86.HasAVX512VAES && cpu.X86.HasAVX512VPCLMULQDQ
}

// haveVAESYMM is VAES and VPCLMULQDQ on 256-bit registers with AVX2, as on
// AMD Zen 3, whose AVX-512-less VAES x/sys/cpu does not report.
func haveVAESYMM() bool {
	if !haveAESNI() || !cpu.X86.HasAVX2 || !cpu.X86.HasPCLMULQDQ {
		return false
	}
	const vaes, vpclmulqdq = 1 << 9, 1 << 10
	ecx := cpuid7ECX() // AVX2 is itself a leaf-7 bit, so leaf 7 exists
	return ecx&vaes != 0 && ecx&vpclmulqdq != 0
}

//go:noescape
func cpuid7ECX() uint32

// encryptBlockAsm encrypts one block with AES-NI.
//
//go:noescape
func encryptBlockAsm(rounds int, rk, dst, src *byte)

// xtsEncAESNI / xtsDecAESNI run XTS over n blocks (any n ≥ 0), 8 at a time,
// and store the tweak following the last block back into *tweak.
//
//go:noescape
func xtsEncAESNI(rounds int, rk *byte, tweak *[16]byte, dst, src *byte, n int)

//go:noescape
func xtsDecAESNI(rounds int, rk *byte, tweak *[16]byte, dst, src *byte, n int)

// xtsEncVAES / xtsDecVAES run XTS over n blocks, n a multiple of 16, and
// store the tweak following the last block back into *tweak.
//
//go:noescape
func xtsEncVAES(rounds int, rk *byte, tweak *[16]byte, dst, src *byte, n int)

//go:noescape
func xtsDecVAES(rounds int, rk *byte, tweak *[16]byte, dst, src *byte, n int)

// xtsEncVAESSectors / xtsDecVAESSectors run whole sectors of sectorBlocks
// blocks (a multiple of 16): sector i's tweak is the plain64 IV
// iv+i*ivStep encrypted with the tweak round keys tk.
//
//go:noescape
func xtsEncVAESSectors(rounds int, rk, tk, dst, src *byte, sectors, sectorBlocks int, iv, ivStep uint64)

//go:noescape
func xtsDecVAESSectors(rounds int, rk, tk, dst, src *byte, sectors, sectorBlocks int, iv, ivStep uint64)

// xtsEncYMMSectors / xtsDecYMMSectors are the same for 256-bit VAES; rk
// holds each round key twice (keySchedules.encWide/decWide).
//
//go:noescape
func xtsEncYMMSectors(rounds int, rk, tk, dst, src *byte, sectors, sectorBlocks int, iv, ivStep uint64)

//go:noescape
func xtsDecYMMSectors(rounds int, rk, tk, dst, src *byte, sectors, sectorBlocks int, iv, ivStep uint64)

// cryptSectorsAsm does a whole run of sectors in one call when a VAES
// implementation is in use and reports whether it did.
func cryptSectorsAsm(im impl, ks *keySchedules, decrypt bool, dst, src []byte, sectorSize int, iv, ivStep uint64) bool {
	if (im != implVAES && im != implVAESYMM) || len(src) == 0 {
		return false
	}
	sectors, blocks := len(src)/sectorSize, sectorSize/16
	if im == implVAESYMM {
		if decrypt {
			xtsDecYMMSectors(ks.rounds, &ks.decWide[0], &ks.tweak[0], &dst[0], &src[0], sectors, blocks, iv, ivStep)
		} else {
			xtsEncYMMSectors(ks.rounds, &ks.encWide[0], &ks.tweak[0], &dst[0], &src[0], sectors, blocks, iv, ivStep)
		}
		return true
	}
	if decrypt {
		xtsDecVAESSectors(ks.rounds, &ks.dec[0], &ks.tweak[0], &dst[0], &src[0], sectors, blocks, iv, ivStep)
	} else {
		xtsEncVAESSectors(ks.rounds, &ks.enc[0], &ks.tweak[0], &dst[0], &src[0], sectors, blocks, iv, ivStep)
	}
	return true
}

func encryptTweakAsm(ks *keySchedules, dst, src *[16]byte) {
	encryptBlockAsm(ks.rounds, &ks.tweak[0], &dst[0], &src[0])
}

// cryptBlocksAsm hands whole batches of 16 blocks to the VAES code (when
// wide is set) and the rest to the AES-NI code, which carries on from the
// tweak the VAES code stored.
func cryptBlocksAsm(wide bool, ks *keySchedules, decrypt bool, dst, src []byte, tweak *[16]byte) {
	n := len(src) / 16
	if n == 0 {
		return
	}
	rk := &ks.enc[0]
	if decrypt {
		rk = &ks.dec[0]
	}
	done := 0
	if wide {
		if bulk := n &^ 15; bulk > 0 {
			if decrypt {
				xtsDecVAES(ks.rounds, rk, tweak, &dst[0], &src[0], bulk)
			} else {
				xtsEncVAES(ks.rounds, rk, tweak, &dst[0], &src[0], bulk)
			}
			done = bulk
		}
	}
	if rest := n - done; rest > 0 {
		d, s := &dst[16*done], &src[16*done]
		if decrypt {
			xtsDecAESNI(ks.rounds, rk, tweak, d, s, rest)
		} else {
			xtsEncAESNI(ks.rounds, rk, tweak, d, s, rest)
		}
	}
}
