package sidecar

import (
	"fmt"
	"net"

	"github.com/blobseal/blobseal/skr"
)

// EnableSKR turns on the SKR-compatible API, for `blobseal sidecar
// --skr-address` and for groups that also set the Azure SKR sidecar's
// SkrSideCarArgs: address ("" = skr.DefaultAddress) and that configuration's
// identity and certificate cache (used when this configuration names none).
func (c *Config) EnableSKR(address, skrSideCarArgs string) error {
	if address == "" {
		address = skr.DefaultAddress
	}
	if _, port, err := net.SplitHostPort(address); err != nil || port == "" {
		return fmt.Errorf("SKR address %q must be HOST:PORT, e.g. %s", address, skr.DefaultAddress)
	}
	sc, err := skr.ParseSkrSideCarArgs(skrSideCarArgs)
	if err != nil {
		return err
	}
	c.SKR.Address = address
	if c.SKR.IdentityClientID == "" {
		c.SKR.IdentityClientID = sc.IdentityClientID
	}
	if c.Attestation.CertCache().URL == "" && sc.Evidence.CertCache.URL != "" {
		c.Attestation.certCache = sc.Evidence.CertCache
		c.Attestation.CertCacheURL, c.Attestation.CertCacheKind = sc.Evidence.CertCache.URL, sc.Evidence.CertCache.Kind
	}
	return nil
}
