//go:build !amd64 || purego

package verity

const haveSHAx2 = false

func blocksx2(state *[16]uint32, pa, pb *byte, n int) { panic("unreachable") }
