package evidence

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"log/slog"
	"net/url"
	"strconv"
	"strings"
)

// Kinds of certificate cache, as the Azure sidecars' certcache.endpoint_type
// names them.
const (
	CertCacheAzure = "AzCache"   // Azure's cache: {base}/{tee}/certificates/{chip}/{tcbm}?api-version=
	CertCacheTHIM  = "LocalTHIM" // the host's THIM endpoint on the metadata address (plain http)
	CertCacheAMD   = "AMD"       // AMD KDS: VCEK by chip and SPLs, then cert_chain
)

// CertCache says where VCEK chains come from when the host certificate is
// missing or stale.
type CertCache struct {
	Kind string // CertCacheAzure (default), CertCacheTHIM or CertCacheAMD
	// URL: Azure: the cache's base URL; THIM: the full URL; AMD: the KDS
	// base including the product path (https://kdsintf.amd.com/vcek/v1/Milan).
	URL string
	// TEEType and APIVersion shape Azure cache URLs (defaults SevSnpVM and
	// CertCacheAPIVersion).
	TEEType, APIVersion string
}

// thimPath is where THIM serves the host's certificates.
const thimPath = "/metadata/THIM/amd/certification"

// LegacyCertCache maps the Azure sidecars' certcache object (endpoint_type,
// endpoint, tee_type, api_version) to a CertCache, building URLs the way
// those sidecars do. Their endpoints are bare hosts.
func LegacyCertCache(endpointType, endpoint, teeType, apiVersion string) (CertCache, error) {
	endpoint = strings.TrimRight(strings.TrimSpace(endpoint), "/")
	if endpoint == "" {
		return CertCache{}, nil
	}
	host := endpoint
	if i := strings.Index(host, "://"); i >= 0 {
		host = host[i+3:]
	}
	switch endpointType {
	case CertCacheTHIM:
		// THIM listens on the metadata address without TLS.
		if !strings.Contains(host, "/") {
			host += thimPath
		}
		return CertCache{Kind: CertCacheTHIM, URL: "http://" + host}, nil
	case CertCacheAMD:
		if teeType == "" {
			return CertCache{}, fmt.Errorf("certcache endpoint_type AMD needs tee_type, the KDS product path (e.g. vcek/v1/Milan)")
		}
		return CertCache{Kind: CertCacheAMD, URL: "https://" + host + "/" + strings.Trim(teeType, "/")}, nil
	case CertCacheAzure, "":
		return CertCache{Kind: CertCacheAzure, URL: "https://" + host, TEEType: teeType, APIVersion: strings.TrimPrefix(apiVersion, "api-version=")}, nil
	}
	return CertCache{}, fmt.Errorf("certcache endpoint_type %q is not AzCache, LocalTHIM or AMD", endpointType)
}

// kind resolves the default: a URL on the THIM path is THIM.
func (c CertCache) kind() string {
	if c.Kind != "" {
		return c.Kind
	}
	if strings.Contains(c.URL, "/metadata/THIM/") {
		return CertCacheTHIM
	}
	return CertCacheAzure
}

// RequestURLs are the URLs fetched for a chip and reported TCB: the VCEK
// (or whole chain) and, for AMD KDS, the ASK/ARK chain.
func (c CertCache) RequestURLs(chipID []byte, tcb uint64) (vcek, chain string) {
	base := strings.TrimRight(c.URL, "/")
	switch c.kind() {
	case CertCacheTHIM:
		return base, ""
	case CertCacheAMD:
		// AMD KDS specification: the SPLs are bytes of the TCB version
		// (boot loader 0, TEE 1, SNP 6, microcode 7).
		var b [8]byte
		binary.LittleEndian.PutUint64(b[:], tcb)
		return fmt.Sprintf("%s/%s?ucodeSPL=%d&snpSPL=%d&teeSPL=%d&blSPL=%d", base, hex.EncodeToString(chipID), b[7], b[6], b[1], b[0]), base + "/cert_chain"
	}
	tee := c.TEEType
	if tee == "" {
		tee = "SevSnpVM"
	}
	ver := c.APIVersion
	if ver == "" {
		ver = CertCacheAPIVersion
	}
	return fmt.Sprintf("%s/%s/certificates/%s/%s?api-version=%s", base, url.PathEscape(tee), hex.EncodeToString(chipID), strconv.FormatUint(tcb, 16), url.QueryEscape(ver)), ""
}

// fetchChain gets the chain for chip and TCB and checks the VCEK's TCB.
func fetchChain(ctx context.Context, opts Options, log *slog.Logger, chipID []byte, tcb uint64) ([]byte, error) {
	cc := opts.certCache()
	vcekURL, chainURL := cc.RequestURLs(chipID, tcb)
	body, err := fetchCertCache(ctx, opts, log, vcekURL)
	if err != nil {
		return nil, err
	}
	if cc.kind() == CertCacheAMD {
		// KDS answers the VCEK in DER and the chain (ASK, ARK) in PEM.
		if len(body) > 0 && body[0] != '-' {
			body = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: body})
		}
		rest, err := fetchCertCache(ctx, opts, log, chainURL)
		if err != nil {
			return nil, err
		}
		body = append(body, rest...)
	}
	chain, err := parseCacheResponse(body, tcb)
	if err != nil {
		return nil, fmt.Errorf("GET %s: %w", vcekURL, err)
	}
	return chain, nil
}

// certCache is Options.CertCache, or CertCacheURL as an Azure or THIM URL.
func (o Options) certCache() CertCache {
	if o.CertCache.URL != "" {
		return o.CertCache
	}
	return CertCache{URL: o.CertCacheURL}
}
