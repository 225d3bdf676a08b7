// Package sidecar runs blobseal as the storage sidecar of a confidential
// container group: it releases each filesystem's key, opens the image,
// mounts it, publishes the mount atomically at its mount point, serves
// health and metrics, and unmounts cleanly on SIGTERM.
package sidecar

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	blobfs "github.com/blobseal/blobseal/fs"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/blobseal/blobseal/blob"
	"github.com/blobseal/blobseal/blockcache"
	"github.com/blobseal/blobseal/internal/secret"
	"github.com/blobseal/blobseal/keyrelease/evidence"
	"github.com/blobseal/blobseal/skr"
)

// Config is the sidecar's configuration (JSON or YAML; see
// examples/sidecar.yaml for a commented sample).
type Config struct {
	Log         LogConfig    `yaml:"log" json:"log"`
	Health      HealthConfig `yaml:"health" json:"health"`
	Attestation Attestation  `yaml:"attestation" json:"attestation"`
	Cache       CacheConfig  `yaml:"cache" json:"cache"`
	// SKR serves the REST API of Azure's secure key release sidecar, so one
	// blobseal sidecar replaces both Azure sidecars.
	SKR SKRConfig `yaml:"skr" json:"skr"`
	// OnFailure is "exit" (default: the sidecar exits non-zero when any
	// filesystem cannot be mounted) or "retry" (keep retrying with backoff
	// while the others serve).
	OnFailure     string        `yaml:"on_failure" json:"on_failure"`
	RetryMaxDelay Duration      `yaml:"retry_max_delay" json:"retry_max_delay"`
	UnmountGrace  Duration      `yaml:"unmount_grace" json:"unmount_grace"`
	Filesystems   []*Filesystem `yaml:"filesystems" json:"filesystems"`
}

// LogConfig selects log level and format.
type LogConfig struct {
	Level  string `yaml:"level" json:"level"`   // debug, info (default), warn, error
	Format string `yaml:"format" json:"format"` // text (default) or json
}

// HealthConfig places the health and metrics endpoints.
type HealthConfig struct {
	// Address serves /healthz, /readyz and /metrics; default 127.0.0.1:9090,
	// "off" disables.
	Address string `yaml:"address" json:"address"`
	// ReadyFile, when set, is created once every filesystem is mounted, and
	// removed when a read-write filesystem loses its write lease.
	ReadyFile string `yaml:"ready_file" json:"ready_file"`
}

// Attestation configures the evidence used for key release.
type Attestation struct {
	// Provider: "auto" (default: /dev/sev-guest or configfs-tsm), "sev-guest",
	// "configfs-tsm", or "simulated" (local testing only; never chosen
	// unless named here).
	Provider     string `yaml:"provider" json:"provider"`
	CertCacheURL string `yaml:"cert_cache_url" json:"cert_cache_url"`
	// CertCacheKind is AzCache (default), LocalTHIM or AMD, as the Azure
	// sidecars' certcache.endpoint_type; with AMD, cert_cache_url is the KDS
	// base with the product path (https://kdsintf.amd.com/vcek/v1/Milan).
	CertCacheKind string `yaml:"cert_cache_kind" json:"cert_cache_kind"`
	// CAFile adds trusted TLS roots (the local stack's CA in tests and the demo).
	CAFile string `yaml:"ca_file" json:"ca_file"`
	// SimulatedDir holds the local stack's simulated signer (provider
	// "simulated"; written by `blobseal dev serve`).
	SimulatedDir string `yaml:"simulated_dir" json:"simulated_dir"`
	// SimulatedHostData is the HOST_DATA (hex SHA-256 of a CCE policy) the
	// simulated reports carry.
	SimulatedHostData string `yaml:"simulated_host_data" json:"simulated_host_data"`

	certCache evidence.CertCache // from the legacy certcache object
}

// CertCache is the certificate cache the attestation uses.
func (a Attestation) CertCache() evidence.CertCache {
	if a.certCache.URL != "" {
		return a.certCache
	}
	return evidence.CertCache{Kind: a.CertCacheKind, URL: a.CertCacheURL}
}

// SKRConfig places the SKR-compatible API (package skr).
type SKRConfig struct {
	// Address is HOST:PORT; empty disables the API. The Azure sidecar's
	// is localhost:8080 (skr.DefaultAddress); a non-loopback address is
	// served with a warning.
	Address string `yaml:"address" json:"address"`
	// AllowedKeys, when set, limits /key/release to these keys: NAME or
	// VAULTHOST/NAME.
	AllowedKeys []string `yaml:"allowed_keys" json:"allowed_keys"`
	// IdentityClientID picks the user-assigned managed identity used for
	// requests without access_token.
	IdentityClientID string `yaml:"identity_client_id" json:"identity_client_id"`
}

// CacheConfig bounds the read cache shared by all filesystems.
type CacheConfig struct {
	MemoryBytes ByteSize `yaml:"memory" json:"memory"` // default 256Mi
	BlockSize   ByteSize `yaml:"block_size" json:"block_size"`
	MaxFetches  int      `yaml:"max_fetches" json:"max_fetches"`
	DiskDir     string   `yaml:"disk_dir" json:"disk_dir"` // optional ciphertext-only disk tier
	DiskBytes   ByteSize `yaml:"disk_size" json:"disk_size"`
}

// Filesystem is one image to mount.
type Filesystem struct {
	Name       string `yaml:"name" json:"name"`
	MountPoint string `yaml:"mount_point" json:"mount_point"`
	// Source is a blob URL (a SAS in its query is a secret and never
	// logged) or a local path.
	Source string `yaml:"source" json:"source"`
	// Identity: "" (SAS or anonymous), "managed" or "workload" (azidentity).
	Identity         string   `yaml:"identity" json:"identity"`
	IdentityClientID string   `yaml:"identity_client_id" json:"identity_client_id"`
	Format           string   `yaml:"format" json:"format"` // luks (default) or plain
	Ciphers          []string `yaml:"ciphers" json:"ciphers"`
	SectorSizes      []int    `yaml:"sector_sizes" json:"sector_sizes"`
	AllowOther       *bool    `yaml:"allow_other" json:"allow_other"` // default true
	ReadWrite        bool     `yaml:"read_write" json:"read_write"`
	// DirectIO: auto (default), on or off; see fs.DirectIOMode.
	DirectIO string `yaml:"direct_io" json:"direct_io"`
	// ReadTimeout is how long one read may wait for storage, the source's
	// retries included, before it fails with EIO; the mount stays up
	// (default blockcache.DefaultReadDeadline, 2m).
	ReadTimeout Duration `yaml:"read_timeout" json:"read_timeout"`
	Key         Key      `yaml:"key" json:"key"`

	// Read-write settings (read_write only).
	//
	// LeaseDuration is the blob's write lease: 15s to 60s in whole seconds
	// (storage's limits; default 60s), renewed at a third of it, or
	// "infinite" (a crashed sidecar then keeps other writers out until
	// the lease is broken). It is how long a crash blocks the next writer.
	LeaseDuration string `yaml:"lease_duration" json:"lease_duration"`
	// FlushTimeout bounds how long one fsync, and a write waiting for
	// dirty memory, waits for storage before failing with EIO; the data
	// stays in memory for the next flush (default 1m).
	FlushTimeout Duration `yaml:"flush_timeout" json:"flush_timeout"`
	// DirtyMemory bounds written data not yet stored, on top of the read
	// cache (default 64Mi; at least two cache blocks).
	DirtyMemory ByteSize `yaml:"dirty_memory" json:"dirty_memory"`
	// WriteCache bounds file data written through the mount and held in
	// memory before it reaches the filesystem, so small writes leave as
	// large runs (default 64Mi, from 4Mi to 64Gi). fsync, close and the
	// periodic commit flush it.
	WriteCache ByteSize `yaml:"write_cache" json:"write_cache"`

	// VerityRootHash pins the image's dm-verity tree (hex, as `blobseal
	// image create` printed it): every block is verified before use. The
	// configuration reaches the sidecar through its command line or
	// environment, which the CCE policy measures into HOST_DATA, so the
	// pinned root is part of what the key release policy attests.
	VerityRootHash string `yaml:"verity_root_hash" json:"verity_root_hash"`
	// VerityHashOffset is where the tree's superblock is; 0 finds it at
	// the end of the image. Giving it pins the image's data size too.
	VerityHashOffset int64 `yaml:"verity_hash_offset" json:"verity_hash_offset"`
	// KDFMaxIterations and KDFMaxMemory bound the keyslot key derivation a
	// LUKS header may ask for (defaults: luks.DefaultMaxIterations, 1 GiB).
	KDFMaxIterations int      `yaml:"kdf_max_iterations" json:"kdf_max_iterations"`
	KDFMaxMemory     ByteSize `yaml:"kdf_max_memory" json:"kdf_max_memory"`
	// RequireIntegrity refuses to mount without VerityRootHash. Default on
	// in this configuration format; off for EncfsSideCarArgs (whose
	// existing configurations have no root hash).
	RequireIntegrity *bool `yaml:"require_integrity" json:"require_integrity"`

	directIO      blobfs.DirectIOMode // parsed DirectIO
	verityRoot    []byte              // parsed VerityRootHash
	leaseDuration time.Duration       // parsed LeaseDuration (blob.InfiniteLease for infinite)
}

// Key says where a filesystem's key comes from: exactly one of File,
// RawHex (testing) or Release.
type Key struct {
	File    string   `yaml:"file" json:"file"`
	RawHex  string   `yaml:"raw_hex" json:"raw_hex"`
	Release *Release `yaml:"release" json:"release"`

	raw secret.Bytes // RawHex decoded by Validate; wiped by Wipe
}

// Release is secure key release: attest, get an MAA token, release the key
// from Managed HSM or Key Vault Premium.
type Release struct {
	MAAEndpoint string `yaml:"maa_endpoint" json:"maa_endpoint"` // https://….attest.azure.net
	Vault       string `yaml:"vault" json:"vault"`               // https://….managedhsm.azure.net
	KeyName     string `yaml:"key_name" json:"key_name"`
	KeyVersion  string `yaml:"key_version" json:"key_version"`
	Kty         string `yaml:"kty" json:"kty"`           // oct-HSM (default) or RSA-HSM
	WrapAlg     string `yaml:"wrap_alg" json:"wrap_alg"` // default CKM_RSA_AES_KEY_WRAP
	Salt        string `yaml:"salt" json:"salt"`         // RSA-HSM: hex HKDF salt
	Label       string `yaml:"label" json:"label"`       // RSA-HSM: HKDF info
	// BearerTokenFile holds an Entra token for the vault; without it the
	// identity of the filesystem (or the default chain) is used.
	BearerTokenFile string       `yaml:"bearer_token_file" json:"bearer_token_file"`
	BearerToken     secret.Token `yaml:"-" json:"-"` // from the legacy config only
}

// Duration is a time.Duration written as "30s".
type Duration time.Duration

// UnmarshalYAML parses "30s"-style durations.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	v, err := time.ParseDuration(n.Value)
	if err != nil {
		return fmt.Errorf("line %d: %q is not a duration like 30s or 2m", n.Line, n.Value)
	}
	*d = Duration(v)
	return nil
}

// ByteSize is a size written as 256Mi, 1Gi, 4096 or 64M.
type ByteSize int64

// UnmarshalYAML parses sizes with binary (Ki, Mi, Gi) or decimal suffixes.
func (b *ByteSize) UnmarshalYAML(n *yaml.Node) error {
	v, err := ParseByteSize(n.Value)
	if err != nil {
		return fmt.Errorf("line %d: %v", n.Line, err)
	}
	*b = ByteSize(v)
	return nil
}

// ParseByteSize parses 256Mi, 1Gi, 64M, 4096.
func ParseByteSize(s string) (int64, error) {
	units := []struct {
		suffix string
		mult   int64
	}{{"Ki", 1 << 10}, {"Mi", 1 << 20}, {"Gi", 1 << 30}, {"Ti", 1 << 40}, {"K", 1e3}, {"M", 1e6}, {"G", 1e9}, {"T", 1e12}}
	mult := int64(1)
	num := strings.TrimSpace(s)
	for _, u := range units {
		if strings.HasSuffix(num, u.suffix) {
			num, mult = strings.TrimSuffix(num, u.suffix), u.mult
			break
		}
	}
	var v int64
	if _, err := fmt.Sscanf(num, "%d", &v); err != nil || v < 0 || fmt.Sprint(v) != num {
		return 0, fmt.Errorf("%q is not a size like 256Mi, 1Gi or 4096", s)
	}
	return v * mult, nil
}

// LoadFile reads a JSON or YAML configuration file.
func LoadFile(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	cfg, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	return cfg, nil
}

// Parse decodes JSON or YAML, refusing unknown fields, and validates.
func Parse(data []byte) (*Config, error) {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	var cfg Config
	if err := dec.Decode(&cfg); err != nil {
		return nil, fmt.Errorf("not valid configuration: %v", err)
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &cfg, nil
}

// EncfsEnv is the environment variable of the existing Azure encfs sidecar.
const EncfsEnv = "EncfsSideCarArgs"

// legacyConfig is the existing sidecar's schema, accepted unchanged.
type legacyConfig struct {
	AzureInfo struct {
		CertCache struct {
			Endpoint     string `json:"endpoint"`
			TEEType      string `json:"tee_type"`
			APIVersion   string `json:"api_version"`
			EndpointType string `json:"endpoint_type"`
		} `json:"certcache"`
		Identity struct {
			ClientID string `json:"client_id"`
		} `json:"identity"`
	} `json:"azure_info"`
	AzureFilesystems []struct {
		MountPoint      string `json:"mount_point"`
		AzureURL        string `json:"azure_url"`
		AzureURLPrivate bool   `json:"azure_url_private"`
		ReadWrite       bool   `json:"read_write"`
		RawKey          string `json:"raw_key"`
		Key             struct {
			KID       string `json:"kid"`
			KTY       string `json:"kty"`
			Authority struct {
				Endpoint string `json:"endpoint"`
			} `json:"authority"`
			AKV struct {
				Endpoint    string `json:"endpoint"`
				APIVersion  string `json:"api_version"`
				BearerToken string `json:"bearer_token"`
			} `json:"akv"`
		} `json:"key"`
		KeyDerivation struct {
			Salt  string `json:"salt"`
			Label string `json:"label"`
		} `json:"key_derivation"`
		// blobseal's optional additions; configurations without them keep
		// working as before (without integrity protection).
		VerityRootHash   string `json:"verity_root_hash"`
		VerityHashOffset int64  `json:"verity_hash_offset"`
		RequireIntegrity *bool  `json:"require_integrity"`
		ReadTimeout      string `json:"read_timeout"` // "30s"
		// Read-write settings, as in the native configuration.
		LeaseDuration string `json:"lease_duration"` // "30s" or "infinite"
		FlushTimeout  string `json:"flush_timeout"`  // "30s"
		DirtyMemory   string `json:"dirty_memory"`   // "64Mi"
	} `json:"azure_filesystems"`
}

// ParseEncfsArgs converts the existing sidecar's base64 JSON configuration
// (environment variable EncfsSideCarArgs) into a Config.
func ParseEncfsArgs(b64 string) (*Config, error) {
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(b64))
	if err != nil {
		if raw, err = base64.RawStdEncoding.DecodeString(strings.TrimSpace(b64)); err != nil {
			return nil, fmt.Errorf("%s is not base64 (encode the JSON with `base64 -w0`): %v", EncfsEnv, err)
		}
	}
	var lc legacyConfig
	dec := json.NewDecoder(bytes.NewReader(raw))
	if err := dec.Decode(&lc); err != nil {
		return nil, fmt.Errorf("%s does not hold valid JSON: %v", EncfsEnv, err)
	}
	cfg := &Config{Attestation: Attestation{Provider: "auto"}}
	if cc := lc.AzureInfo.CertCache; cc.Endpoint != "" {
		// The URL the Azure sidecar builds for its endpoint_type.
		c, err := evidence.LegacyCertCache(cc.EndpointType, cc.Endpoint, cc.TEEType, cc.APIVersion)
		if err != nil {
			return nil, fmt.Errorf("%s: azure_info: %w", EncfsEnv, err)
		}
		cfg.Attestation.certCache = c
		cfg.Attestation.CertCacheURL, cfg.Attestation.CertCacheKind = c.URL, c.Kind
	}
	for i, lf := range lc.AzureFilesystems {
		requireIntegrity := false
		if lf.RequireIntegrity != nil {
			requireIntegrity = *lf.RequireIntegrity
		}
		f := &Filesystem{
			Name:             fmt.Sprintf("fs%d", i),
			MountPoint:       lf.MountPoint,
			Source:           lf.AzureURL,
			ReadWrite:        lf.ReadWrite,
			VerityRootHash:   lf.VerityRootHash,
			VerityHashOffset: lf.VerityHashOffset,
			RequireIntegrity: &requireIntegrity,
		}
		if lf.ReadTimeout != "" {
			d, err := time.ParseDuration(lf.ReadTimeout)
			if err != nil {
				return nil, fmt.Errorf("%s: azure_filesystems[%d]: read_timeout %q is not a duration like 30s or 2m", EncfsEnv, i, lf.ReadTimeout)
			}
			f.ReadTimeout = Duration(d)
		}
		f.LeaseDuration = lf.LeaseDuration
		if lf.FlushTimeout != "" {
			d, err := time.ParseDuration(lf.FlushTimeout)
			if err != nil {
				return nil, fmt.Errorf("%s: azure_filesystems[%d]: flush_timeout %q is not a duration like 30s or 2m", EncfsEnv, i, lf.FlushTimeout)
			}
			f.FlushTimeout = Duration(d)
		}
		if lf.DirtyMemory != "" {
			n, err := ParseByteSize(lf.DirtyMemory)
			if err != nil {
				return nil, fmt.Errorf("%s: azure_filesystems[%d]: dirty_memory: %v", EncfsEnv, i, err)
			}
			f.DirtyMemory = ByteSize(n)
		}
		if lf.AzureURLPrivate {
			f.Identity = "managed"
			f.IdentityClientID = lc.AzureInfo.Identity.ClientID
		}
		if lf.RawKey != "" {
			f.Key.RawHex = lf.RawKey
		} else {
			f.Key.Release = &Release{
				MAAEndpoint: withScheme(lf.Key.Authority.Endpoint),
				Vault:       withScheme(lf.Key.AKV.Endpoint),
				KeyName:     lf.Key.KID,
				Kty:         lf.Key.KTY,
				Salt:        lf.KeyDerivation.Salt,
				Label:       lf.KeyDerivation.Label,
				BearerToken: secret.Token(lf.Key.AKV.BearerToken),
			}
		}
		cfg.Filesystems = append(cfg.Filesystems, f)
	}
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("%s: %w", EncfsEnv, err)
	}
	return cfg, nil
}

// Wipe clears the key bytes the configuration holds (decoded raw keys).
// The Go strings they came from cannot be cleared; see docs/SECURITY.md.
func (c *Config) Wipe() {
	for _, f := range c.Filesystems {
		if f != nil {
			f.Key.raw.Wipe()
			f.Key.raw = nil
		}
	}
}

// systemDirs may not be, or contain, a mount point: publishing there would
// shadow the container's own system files.
var systemDirs = []string{"/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/sbin", "/sys", "/usr", "/var/run", "/run"}

// checkMountPoint refuses relative paths, ".." segments (the path must mean
// what it says before cleaning) and system locations.
func checkMountPoint(mp string) error {
	if mp == "" || !filepath.IsAbs(mp) {
		return fmt.Errorf("mount_point %q must be an absolute path", mp)
	}
	for _, seg := range strings.Split(mp, "/") {
		if seg == ".." {
			return fmt.Errorf("mount_point %q must not contain \"..\"", mp)
		}
	}
	clean := filepath.Clean(mp)
	if clean == "/" {
		return errors.New("mount_point must not be /")
	}
	for _, d := range systemDirs {
		if clean == d || strings.HasPrefix(clean, d+"/") {
			return fmt.Errorf("mount_point %s is inside the system directory %s; use a path in a shared volume such as /mnt/data", clean, d)
		}
	}
	return nil
}

func withScheme(endpoint string) string {
	if endpoint == "" || strings.Contains(endpoint, "://") {
		return endpoint
	}
	return "https://" + endpoint
}

// Validate fills defaults and checks every field, naming what to fix.
func (c *Config) Validate() error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if c.Health.Address == "" {
		c.Health.Address = "127.0.0.1:9090"
	}
	switch c.OnFailure {
	case "":
		c.OnFailure = "exit"
	case "exit", "retry":
	default:
		bad("on_failure is %q; use exit or retry", c.OnFailure)
	}
	if c.RetryMaxDelay <= 0 {
		c.RetryMaxDelay = Duration(time.Minute)
	}
	if c.UnmountGrace <= 0 {
		c.UnmountGrace = Duration(10 * time.Second)
	}
	switch c.Attestation.Provider {
	case "":
		c.Attestation.Provider = "auto"
	case "auto", "sev-guest", "configfs-tsm":
	case "simulated":
		if h := c.Attestation.SimulatedHostData; h != "" {
			if b, err := hex.DecodeString(h); err != nil || len(b) != 32 {
				bad("attestation.simulated_host_data must be 64 hex digits (a SHA-256)")
			}
		}
	default:
		bad("attestation.provider is %q; use auto, sev-guest, configfs-tsm or simulated", c.Attestation.Provider)
	}
	switch c.Attestation.CertCacheKind {
	case "", evidence.CertCacheAzure, evidence.CertCacheTHIM, evidence.CertCacheAMD:
	default:
		bad("attestation.cert_cache_kind is %q; use AzCache, LocalTHIM or AMD", c.Attestation.CertCacheKind)
	}
	if a := c.SKR.Address; a != "" {
		if _, port, err := net.SplitHostPort(a); err != nil || port == "" {
			bad("skr.address %q must be HOST:PORT, e.g. %s", a, skr.DefaultAddress)
		}
	}
	for _, k := range c.SKR.AllowedKeys {
		if strings.TrimSpace(k) == "" || strings.Count(k, "/") > 1 {
			bad("skr.allowed_keys entry %q must be NAME or VAULTHOST/NAME", k)
		}
	}
	if len(c.Filesystems) == 0 && c.SKR.Address == "" {
		bad("no filesystems configured: add at least one entry under filesystems (or azure_filesystems in %s)", EncfsEnv)
	}
	names := map[string]bool{}
	mounts := map[string]bool{}
	for i, f := range c.Filesystems {
		if f == nil {
			bad("filesystems[%d] is empty", i)
			continue
		}
		where := fmt.Sprintf("filesystems[%d]", i)
		if f.Name == "" {
			f.Name = fmt.Sprintf("fs%d", i)
		}
		if names[f.Name] {
			bad("%s: name %q is used twice", where, f.Name)
		}
		names[f.Name] = true
		if err := checkMountPoint(f.MountPoint); err != nil {
			bad("%s: %v", where, err)
		} else {
			f.MountPoint = filepath.Clean(f.MountPoint)
			if mounts[f.MountPoint] {
				bad("%s: mount_point %s is used twice", where, f.MountPoint)
			}
			mounts[f.MountPoint] = true
		}
		if f.Source == "" {
			bad("%s: source (azure_url) is empty", where)
		} else if strings.Contains(f.Source, "://") {
			if u, err := url.Parse(f.Source); err != nil || u.Host == "" {
				bad("%s: source %s is not a valid URL", where, secret.RedactURL(f.Source))
			}
		}
		if f.ReadWrite {
			// A dm-verity tree cannot follow writes: a read-write image
			// has confidentiality (XTS) but no integrity protection.
			if f.VerityRootHash != "" || (f.RequireIntegrity != nil && *f.RequireIntegrity) {
				bad("%s: read_write cannot keep a verity tree valid: remove verity_root_hash and require_integrity (a read-write image is encrypted but not integrity-protected, see docs/SECURITY.md), or mount it read-only", where)
			}
			off := false
			f.RequireIntegrity = &off
		}
		switch f.Identity {
		case "", "managed", "workload":
		default:
			bad("%s: identity is %q; use managed, workload or leave it empty", where, f.Identity)
		}
		if f.AllowOther == nil {
			t := true
			f.AllowOther = &t
		}
		if f.RequireIntegrity == nil {
			t := true
			f.RequireIntegrity = &t
		}
		switch {
		case f.VerityRootHash != "":
			root, err := hex.DecodeString(f.VerityRootHash)
			if err != nil || (len(root) != 32 && len(root) != 64) {
				bad("%s: verity_root_hash must be 64 hex digits (the sha256 root `blobseal image create` printed)", where)
			}
			f.verityRoot = root
		case *f.RequireIntegrity:
			bad("%s: require_integrity is on but verity_root_hash is empty: add the root hash `blobseal image create` (or `blobseal image verity`) printed for this image, or set require_integrity: false to mount it without integrity protection (storage could then modify it undetected)", where)
		case f.VerityHashOffset != 0:
			bad("%s: verity_hash_offset is set without verity_root_hash", where)
		}
		if f.KDFMaxIterations < 0 || f.KDFMaxMemory < 0 || f.KDFMaxMemory > 64<<30 {
			bad("%s: kdf_max_iterations must not be negative and kdf_max_memory at most 64Gi", where)
		}
		if f.VerityHashOffset < 0 || f.VerityHashOffset%4096 != 0 {
			bad("%s: verity_hash_offset %d must be a non-negative multiple of 4096", where, f.VerityHashOffset)
		}
		if f.ReadTimeout < 0 {
			bad("%s: read_timeout %v must be positive (or left out for the default, 2m)", where, time.Duration(f.ReadTimeout))
		}
		c.validateWriteSettings(f, where, bad)
		if mode, err := blobfs.ParseDirectIO(f.DirectIO); err != nil {
			bad("%s: direct_io: %v", where, err)
		} else {
			f.directIO = mode
		}
		sources := 0
		if f.Key.File != "" {
			sources++
		}
		if f.Key.RawHex != "" {
			sources++
			if b, err := hex.DecodeString(f.Key.RawHex); err != nil || len(b) == 0 {
				bad("%s: raw_key is not hex", where)
			} else {
				f.Key.raw.Wipe()
				f.Key.raw = secret.Bytes(b)
			}
		}
		if r := f.Key.Release; r != nil {
			sources++
			if r.MAAEndpoint == "" {
				bad("%s: key release needs the attestation endpoint (key.authority.endpoint / maa_endpoint)", where)
			}
			if r.Vault == "" {
				bad("%s: key release needs the vault (key.akv.endpoint / vault)", where)
			}
			if r.KeyName == "" {
				bad("%s: key release needs the key name (key.kid / key_name)", where)
			}
			if r.Kty == "" {
				r.Kty = "oct-HSM"
			}
			switch r.Kty {
			case "oct-HSM", "oct", "RSA-HSM", "RSA":
			default:
				bad("%s: key type %q is not supported; use oct-HSM or RSA-HSM", where, r.Kty)
			}
			if r.Salt != "" {
				if _, err := hex.DecodeString(r.Salt); err != nil {
					bad("%s: key_derivation.salt must be hex", where)
				}
			}
		}
		if sources != 1 {
			bad("%s: give exactly one key source (key.file, key.raw_hex or key.release); found %d", where, sources)
		}
	}
	return errors.Join(errs...)
}

// Limits of the read-write settings.
const (
	minFlushTimeout = time.Second
	maxFlushTimeout = time.Hour
	maxDirtyMemory  = 64 << 30
)

// validateWriteSettings checks lease_duration, flush_timeout and
// dirty_memory, which only a read_write filesystem uses.
func (c *Config) validateWriteSettings(f *Filesystem, where string, bad func(string, ...any)) {
	if !f.ReadWrite {
		if f.LeaseDuration != "" || f.FlushTimeout != 0 || f.DirtyMemory != 0 || f.WriteCache != 0 {
			bad("%s: lease_duration, flush_timeout, dirty_memory and write_cache apply to read_write filesystems only; remove them or set read_write: true", where)
		}
		return
	}
	if f.LeaseDuration != "" {
		d, err := ParseLeaseDuration(f.LeaseDuration)
		if err != nil {
			bad("%s: lease_duration %v", where, err)
		}
		f.leaseDuration = d
	}
	if ft := time.Duration(f.FlushTimeout); ft != 0 {
		if err := CheckFlushTimeout(ft); err != nil {
			bad("%s: flush_timeout %v", where, err)
		}
	}
	if d := int64(f.DirtyMemory); d != 0 {
		if err := CheckDirtyMemory(d, int64(c.Cache.BlockSize)); err != nil {
			bad("%s: dirty_memory %v", where, err)
		}
	}
	if n := int64(f.WriteCache); n != 0 {
		if err := CheckWriteCache(n); err != nil {
			bad("%s: write_cache %v", where, err)
		}
	}
}

// CheckWriteCache checks the bound of file data a writable mount buffers
// before the filesystem (write_cache, --write-cache). The floor is the
// fs package's (room for a few 1 MiB FUSE writes); the ceiling that of
// dirty_memory.
func CheckWriteCache(n int64) error {
	if n < blobfs.MinDirtyLimit || n > maxDirtyMemory {
		return fmt.Errorf("%d must be from %dMi to 64Gi (or left out for the default, %dMi)", n, blobfs.MinDirtyLimit>>20, blobfs.DefaultDirtyLimit>>20)
	}
	return nil
}

// ParseLeaseDuration parses a blob write lease as the configuration
// (lease_duration) and the CLI (--lease-duration) take it: whole seconds
// from 15s to 60s, storage's limits, or "infinite" (blob.InfiniteLease).
// The error says what is accepted, for the caller to prefix with the
// setting's name.
func ParseLeaseDuration(s string) (time.Duration, error) {
	if s == "infinite" {
		return blob.InfiniteLease, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d < 15*time.Second || d > 60*time.Second || d%time.Second != 0 {
		return 0, fmt.Errorf("%q must be whole seconds from 15s to 60s (storage's limits), or infinite", s)
	}
	return d, nil
}

// CheckFlushTimeout checks how long one flush may wait for storage (the
// limits of flush_timeout and --flush-timeout).
func CheckFlushTimeout(d time.Duration) error {
	if d < minFlushTimeout || d > maxFlushTimeout {
		return fmt.Errorf("%s must be from %s to %s (or left out for the default, %s)", d, minFlushTimeout, maxFlushTimeout, blockcache.DefaultFlushTimeout)
	}
	return nil
}

// CheckDirtyMemory checks the bound of written, not yet stored data
// (dirty_memory, --dirty-memory) against the cache block size (0: the
// default): the write-back cache needs two blocks.
func CheckDirtyMemory(n, cacheBlock int64) error {
	if cacheBlock == 0 {
		cacheBlock = blockcache.DefaultBlockSize
	}
	if n < 2*cacheBlock || n > maxDirtyMemory {
		return fmt.Errorf("%d must hold at least two cache blocks (%d bytes) and at most 64Gi (or be left out for the default, 64Mi)", n, 2*cacheBlock)
	}
	return nil
}
