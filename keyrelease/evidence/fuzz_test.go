package evidence

import (
	"testing"
)

func FuzzParseHostAMDCertificate(f *testing.F) {
	sim, err := NewSimulated(SimulatedConfig{})
	if err != nil {
		f.Fatal(err)
	}
	good, err := sim.HostAMDCertificateJSON(sim.TCB())
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add([]byte(`{"vcekCert":"x","certificateChain":"","tcbm":"0x12"}`))
	f.Add([]byte(`{"vcekCert":"","tcbm":""}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, data []byte) {
		h, err := ParseHostAMDCertificate(data)
		if err != nil {
			return
		}
		if _, err := h.TCB(); err != nil {
			t.Fatalf("parsed certificate has a bad TCB: %v", err)
		}
		// The cache-response path shares the parser; it must not panic.
		tcb, _ := h.TCB()
		_, _ = parseCacheResponse(data, tcb)
	})
}

func FuzzSplitCertChain(f *testing.F) {
	sim, err := NewSimulated(SimulatedConfig{})
	if err != nil {
		f.Fatal(err)
	}
	chain, err := sim.VCEKChainPEM(sim.TCB())
	if err != nil {
		f.Fatal(err)
	}
	f.Add(chain)
	f.Add(sim.Roots())
	f.Add([]byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := SplitCertChain(data)
		if err != nil {
			return
		}
		if c.VCEK == nil {
			t.Fatal("no error but no VCEK")
		}
		_, _ = VCEKTCB(c.VCEK)
	})
}
