//go:build amd64 && !purego

package verity

import "golang.org/x/sys/cpu"

//go:generate go run gen_amd64.go -out sha256x2_amd64.s

// blocksx2 runs the SHA-256 compression function over n 64-byte blocks of
// two messages at once: state[0:8] with pa, state[8:16] with pb.
//
//go:noescape
func blocksx2(state *[16]uint32, pa, pb *byte, n int)

//go:noescape
func cpuid7EBX() uint32

// haveSHAx2 reports the SHA extensions (CPUID leaf 7, EBX bit 29) and the
// SSSE3/SSE4.1 shuffles the rounds use.
var haveSHAx2 = cpu.X86.HasSSSE3 && cpu.X86.HasSSE41 && cpuid7EBX()&(1<<29) != 0
