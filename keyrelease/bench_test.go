package keyrelease_test

import (
	"context"
	"testing"

	"github.com/blobseal/blobseal/keyrelease"
	"github.com/blobseal/blobseal/keyrelease/hsm"
)

// BenchmarkChainRelease measures one whole local release: wrapping key
// generation, simulated evidence, local MAA, local key service, unwrap.
func BenchmarkChainRelease(b *testing.B) {
	s := newStack(b, nil)
	s.importOct("fs-key")
	cfg := s.config(s.sim, "fs-key", "", hsm.BearerToken(s.bearer))
	cfg.Logger = nil
	for b.Loop() {
		if _, err := keyrelease.Release(context.Background(), cfg); err != nil {
			b.Fatal(err)
		}
	}
}
