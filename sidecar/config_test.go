package sidecar

import (
	"encoding/base64"
	"fmt"
	"github.com/blobseal/blobseal/blob"
	blobfs "github.com/blobseal/blobseal/fs"
	"os"
	"strings"
	"testing"
	"time"
)

func TestExampleConfigsParse(t *testing.T) {
	cfg, err := LoadFile("../examples/sidecar.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.Filesystems) != 2 || cfg.Cache.MemoryBytes != 512<<20 || cfg.Filesystems[0].Key.Release.KeyName != "models-key" {
		t.Fatalf("unexpected parse: %+v", cfg)
	}
	if cfg.Filesystems[1].Key.Release.Kty != "RSA-HSM" || *cfg.Filesystems[0].AllowOther != true ||
		cfg.Filesystems[0].DirectIO != "auto" || cfg.Filesystems[1].directIO != blobfs.DirectIOAuto ||
		cfg.Filesystems[0].ReadTimeout != Duration(2*time.Minute) || cfg.Filesystems[1].ReadTimeout != 0 {
		t.Fatal("defaults or fields wrong")
	}
	if len(cfg.Filesystems[0].verityRoot) != 32 || !*cfg.Filesystems[0].RequireIntegrity || *cfg.Filesystems[1].RequireIntegrity {
		t.Fatal("integrity fields wrong")
	}

	raw, err := os.ReadFile("../examples/encfs-sidecar-args.json")
	if err != nil {
		t.Fatal(err)
	}
	legacy, err := ParseEncfsArgs(base64.StdEncoding.EncodeToString(raw))
	if err != nil {
		t.Fatal(err)
	}
	f := legacy.Filesystems[1]
	if f.MountPoint != "/mnt/remote/share2" || f.Identity != "managed" ||
		f.Key.Release.MAAEndpoint != "https://sharedeus2.eus2.attest.azure.net" ||
		f.Key.Release.Vault != "https://myvault.vault.azure.net" || f.Key.Release.KeyName != "RSAKeyForShare2" ||
		f.Key.Release.Salt == "" || f.Key.Release.Label != "Encryption Key" || legacy.Attestation.Provider != "auto" {
		t.Fatalf("legacy mapping wrong: %+v %+v", f, f.Key.Release)
	}
	// Existing configurations have no root hash and stay valid.
	if *f.RequireIntegrity || f.verityRoot != nil {
		t.Fatal("a legacy filesystem without verity_root_hash must mount without integrity, as before")
	}
}

// The native format requires integrity unless told otherwise; the legacy
// one takes blobseal's optional fields.
func TestIntegrityConfig(t *testing.T) {
	root := strings.Repeat("0f", 32)
	base := "filesystems:\n  - mount_point: /m\n    source: /x\n    key: {file: k}\n"
	cases := map[string]string{
		base:                                 "require_integrity is on but verity_root_hash is empty",
		base + "    verity_root_hash: xyz\n": "verity_root_hash must be 64 hex digits",
		base + "    require_integrity: false\n    verity_hash_offset: 4096\n":      "verity_hash_offset is set without verity_root_hash",
		base + "    verity_root_hash: " + root + "\n    verity_hash_offset: 100\n": "multiple of 4096",
	}
	for in, want := range cases {
		if _, err := Parse([]byte(in)); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("config %q: got %v, want an error containing %q", in, err, want)
		}
	}
	for _, ok := range []string{base + "    require_integrity: false\n", base + "    verity_root_hash: " + root + "\n    verity_hash_offset: 8192\n"} {
		if _, err := Parse([]byte(ok)); err != nil {
			t.Errorf("config %q: %v", ok, err)
		}
	}
	js := `{"azure_filesystems":[{"mount_point":"/m/a","azure_url":"https://a.blob.core.windows.net/c/i.img","raw_key":"00",
	"verity_root_hash":"` + root + `","verity_hash_offset":4096,"require_integrity":true},
	{"mount_point":"/m/b","azure_url":"https://a.blob.core.windows.net/c/j.img","raw_key":"00","require_integrity":true}]}`
	_, err := ParseEncfsArgs(base64.StdEncoding.EncodeToString([]byte(js)))
	if err == nil || !strings.Contains(err.Error(), "filesystems[1]: require_integrity is on") || strings.Contains(err.Error(), "filesystems[0]") {
		t.Fatalf("legacy integrity fields: %v", err)
	}
}

func TestLegacyBearerTokenNeverPrinted(t *testing.T) {
	js := `{"azure_filesystems":[{"mount_point":"/m/a","azure_url":"https://a.blob.core.windows.net/c/i.img",
	"key":{"kid":"k","authority":{"endpoint":"x.attest.azure.net"},"akv":{"endpoint":"v.vault.azure.net","bearer_token":"SUPERSECRETBEARER"}}}]}`
	cfg, err := ParseEncfsArgs(base64.StdEncoding.EncodeToString([]byte(js)))
	if err != nil {
		t.Fatal(err)
	}
	if s := fmt.Sprintf("%+v %v", *cfg.Filesystems[0].Key.Release, cfg); strings.Contains(s, "SUPERSECRETBEARER") {
		t.Fatalf("bearer token printed: %s", s)
	}
	if cfg.Filesystems[0].Key.Release.BearerToken.Reveal() != "SUPERSECRETBEARER" {
		t.Fatal("bearer token lost")
	}
}

func TestConfigErrorsNameTheField(t *testing.T) {
	cases := map[string]string{
		"filesystems: []": "no filesystems configured",
		"filesystems:\n  - source: /x\n    key: {file: k}":      "mount_point \"\" must be an absolute path",
		"filesystems:\n  - mount_point: /m\n    key: {file: k}": "source (azure_url) is empty",
		"filesystems:\n  - mount_point: /m\n    source: /x\n    read_write: true\n    verity_root_hash: \"" + strings.Repeat("ab", 32) + "\"\n    key: {file: k}": "read_write cannot keep a verity tree valid",
		"filesystems:\n  - mount_point: /m\n    source: /x":                                                                                  "exactly one key source",
		"filesystems:\n  - mount_point: /m\n    source: /x\n    key: {file: k, raw_hex: aa}":                                                 "exactly one key source",
		"on_failure: sometimes\nfilesystems:\n  - mount_point: /m\n    source: /x\n    key: {file: k}":                                       "on_failure is \"sometimes\"",
		"cache: {memory: lots}\nfilesystems: []":                                                                                             "not a size",
		"filesystems:\n  - mount_point: /m\n    source: /x\n    colour: blue\n    key: {file: k}":                                            "field colour not found",
		"filesystems:\n  - mount_point: /m\n    source: /x\n    key: {release: {vault: https://v}}":                                          "attestation endpoint",
		"attestation: {provider: simulated, simulated_host_data: zz}\nfilesystems:\n  - mount_point: /m\n    source: /x\n    key: {file: k}": "64 hex digits",
	}
	for mp, want := range map[string]string{
		"/mnt/../etc/x": `must not contain ".."`,
		"/":             "must not be /",
		"/etc/blobseal": "inside the system directory /etc",
		"/proc":         "inside the system directory /proc",
		"/usr/local/d":  "inside the system directory /usr",
		"mnt/data":      "must be an absolute path",
	} {
		cases["filesystems:\n  - mount_point: "+mp+"\n    source: /x\n    key: {file: k}"] = want
	}
	for in, want := range cases {
		_, err := Parse([]byte(in))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("config %q: got %v, want an error containing %q", in, err, want)
		}
	}
	if _, err := ParseEncfsArgs("%%%not base64"); err == nil || !strings.Contains(err.Error(), "not base64") {
		t.Errorf("bad base64: %v", err)
	}
	if _, err := ParseEncfsArgs(base64.StdEncoding.EncodeToString([]byte("{"))); err == nil || !strings.Contains(err.Error(), "valid JSON") {
		t.Errorf("bad JSON: %v", err)
	}
}

func TestParseByteSize(t *testing.T) {
	for in, want := range map[string]int64{"4096": 4096, "64Ki": 64 << 10, "256Mi": 256 << 20, "1Gi": 1 << 30, "5M": 5e6} {
		if got, err := ParseByteSize(in); err != nil || got != want {
			t.Errorf("%s: %d %v", in, got, err)
		}
	}
	for _, in := range []string{"", "-1", "1.5Gi", "Mi", "12 parsecs"} {
		if _, err := ParseByteSize(in); err == nil {
			t.Errorf("%q accepted", in)
		}
	}
}

func FuzzParseConfig(f *testing.F) {
	for _, p := range []string{"../examples/sidecar.yaml"} {
		if b, err := os.ReadFile(p); err == nil {
			f.Add(b)
		}
	}
	f.Add([]byte("filesystems:\n  - mount_point: /m\n    source: /x\n    require_integrity: false\n    key: {file: k}"))
	f.Add([]byte("skr:\n  address: 127.0.0.1:8080\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := Parse(data)
		if err == nil && len(cfg.Filesystems) == 0 && cfg.SKR.Address == "" {
			t.Fatal("valid config that serves nothing (no filesystem, no SKR API)")
		}
	})
}

func FuzzParseEncfsArgs(f *testing.F) {
	if b, err := os.ReadFile("../examples/encfs-sidecar-args.json"); err == nil {
		f.Add(base64.StdEncoding.EncodeToString(b))
	}
	f.Add("e30=")
	f.Fuzz(func(t *testing.T, s string) {
		cfg, err := ParseEncfsArgs(s)
		if err == nil {
			for _, fs := range cfg.Filesystems {
				if fs.MountPoint == "" || fs.Source == "" {
					t.Fatal("accepted an incomplete filesystem")
				}
			}
		}
	})
}

// The legacy certcache object maps to the URL the Azure sidecar builds for
// each endpoint_type.
func TestLegacyCertCacheEndpointTypes(t *testing.T) {
	for typ, want := range map[string]string{
		"LocalTHIM": "http://169.254.169.254/metadata/THIM/amd/certification",
		"AzCache":   "https://169.254.169.254",
	} {
		js := `{"azure_info":{"certcache":{"endpoint":"169.254.169.254","endpoint_type":"` + typ + `","tee_type":"SevSnpVM","api_version":"api-version=2020-10-15-preview"}},
		"azure_filesystems":[{"mount_point":"/mnt/a","azure_url":"https://a.blob.core.windows.net/c/i.img","raw_key":"00"}]}`
		cfg, err := ParseEncfsArgs(base64.StdEncoding.EncodeToString([]byte(js)))
		if err != nil {
			t.Fatalf("%s: %v", typ, err)
		}
		if cc := cfg.Attestation.CertCache(); cc.URL != want || cc.Kind != typ {
			t.Errorf("%s: %+v, want %s", typ, cc, want)
		}
	}
	js := `{"azure_info":{"certcache":{"endpoint":"kdsintf.amd.com","endpoint_type":"AMD","tee_type":"vcek/v1/Milan"}},
		"azure_filesystems":[{"mount_point":"/mnt/a","azure_url":"https://a.blob.core.windows.net/c/i.img","raw_key":"00"}]}`
	cfg, err := ParseEncfsArgs(base64.StdEncoding.EncodeToString([]byte(js)))
	if err != nil {
		t.Fatal(err)
	}
	if cc := cfg.Attestation.CertCache(); cc.URL != "https://kdsintf.amd.com/vcek/v1/Milan" || cc.Kind != "AMD" {
		t.Errorf("AMD: %+v", cc)
	}
	bad := strings.Replace(js, `"AMD"`, `"Azure"`, 1)
	if _, err := ParseEncfsArgs(base64.StdEncoding.EncodeToString([]byte(bad))); err == nil || !strings.Contains(err.Error(), "AzCache, LocalTHIM or AMD") {
		t.Errorf("unknown endpoint_type: %v", err)
	}
}

// Groups that ran both Azure sidecars keep both configurations: the SKR
// sidecar's SkrSideCarArgs adds its identity and certificate cache.
func TestEnableSKRWithSkrSideCarArgs(t *testing.T) {
	js := `{"azure_filesystems":[{"mount_point":"/mnt/a","azure_url":"https://a.blob.core.windows.net/c/i.img","raw_key":"00"}]}`
	cfg, err := ParseEncfsArgs(base64.StdEncoding.EncodeToString([]byte(js)))
	if err != nil {
		t.Fatal(err)
	}
	args := base64.StdEncoding.EncodeToString([]byte(`{"certcache":{"endpoint_type":"LocalTHIM","endpoint":"169.254.169.254/metadata/THIM/amd/certification"},"identity":{"client_id":"abc"}}`))
	if err := cfg.EnableSKR("", args); err != nil {
		t.Fatal(err)
	}
	if cfg.SKR.Address != "127.0.0.1:8080" || cfg.SKR.IdentityClientID != "abc" || cfg.Attestation.CertCache().URL != "http://169.254.169.254/metadata/THIM/amd/certification" {
		t.Fatalf("%+v %+v", cfg.SKR, cfg.Attestation.CertCache())
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	if err := cfg.EnableSKR("8080", ""); err == nil || !strings.Contains(err.Error(), "HOST:PORT") {
		t.Fatalf("bad address: %v", err)
	}
	if err := cfg.EnableSKR("", "%%"); err == nil || !strings.Contains(err.Error(), "not base64") {
		t.Fatalf("bad args: %v", err)
	}
}

// TestReadTimeoutConfig: read_timeout in the native format (YAML and JSON)
// and, optionally, in each EncfsSideCarArgs filesystem becomes the block
// cache's read deadline; leaving it out keeps the cache's default.
func TestReadTimeoutConfig(t *testing.T) {
	base := "filesystems:\n  - mount_point: /m\n    source: /x\n    require_integrity: false\n    key: {file: k}\n"
	native := map[string]time.Duration{
		base:                             0,
		base + "    read_timeout: 30s\n": 30 * time.Second,
		`{"filesystems":[{"mount_point":"/m","source":"/x","require_integrity":false,"key":{"file":"k"},"read_timeout":"1m30s"}]}`: 90 * time.Second,
	}
	for in, want := range native {
		cfg, err := Parse([]byte(in))
		if err != nil {
			t.Fatalf("config %q: %v", in, err)
		}
		// Zero leaves blockcache.DefaultReadDeadline in force.
		got := (&Sidecar{cfg: cfg}).cacheOptions(cfg.Filesystems[0]).ReadDeadline
		if got != want {
			t.Errorf("config %q: read deadline %v, want %v", in, got, want)
		}
	}
	for in, msg := range map[string]string{
		base + "    read_timeout: -5s\n":  "read_timeout -5s must be positive",
		base + "    read_timeout: soon\n": `"soon" is not a duration`,
	} {
		if _, err := Parse([]byte(in)); err == nil || !strings.Contains(err.Error(), msg) {
			t.Errorf("config %q: got %v, want an error containing %q", in, err, msg)
		}
	}

	legacy := func(extra string) string {
		return base64.StdEncoding.EncodeToString([]byte(`{"azure_filesystems":[{"mount_point":"/m/a","azure_url":"https://a.blob.core.windows.net/c/i.img","raw_key":"00"` + extra + `}]}`))
	}
	cfg, err := ParseEncfsArgs(legacy(`,"read_timeout":"45s"`))
	if err != nil || cfg.Filesystems[0].ReadTimeout != Duration(45*time.Second) {
		t.Fatalf("legacy read_timeout: %v %+v", err, cfg)
	}
	if cfg, err := ParseEncfsArgs(legacy("")); err != nil || cfg.Filesystems[0].ReadTimeout != 0 {
		t.Fatalf("legacy config without read_timeout: %v", err)
	}
	if _, err := ParseEncfsArgs(legacy(`,"read_timeout":"45"`)); err == nil || !strings.Contains(err.Error(), `azure_filesystems[0]: read_timeout "45" is not a duration`) {
		t.Fatalf("legacy bad read_timeout: %v", err)
	}
}

// TestReadWriteConfig: read_write needs no root hash (a writable image has
// no tree) and drops the native default integrity requirement; asking for
// integrity on a read-write filesystem is refused, saying why.
func TestReadWriteConfig(t *testing.T) {
	base := "filesystems:\n  - mount_point: /m\n    source: /x\n    key: {file: k}\n    read_write: true\n"
	c, err := Parse([]byte(base))
	if err != nil {
		t.Fatalf("read_write without a root hash: %v", err)
	}
	if f := c.Filesystems[0]; !f.ReadWrite || f.RequireIntegrity == nil || *f.RequireIntegrity {
		t.Errorf("read_write filesystem: ReadWrite %v, RequireIntegrity %v; want true, false", f.ReadWrite, f.RequireIntegrity)
	}
	for _, extra := range []string{"    require_integrity: true\n", "    verity_root_hash: " + strings.Repeat("0f", 32) + "\n"} {
		if _, err := Parse([]byte(base + extra)); err == nil || !strings.Contains(err.Error(), "read_write cannot keep a verity tree valid") {
			t.Errorf("read_write with %q: %v", extra, err)
		}
	}
	js := `{"azure_filesystems":[{"mount_point":"/m/a","azure_url":"https://a.blob.core.windows.net/c/i.img","raw_key":"00","read_write":true}]}`
	lc, err := ParseEncfsArgs(base64.StdEncoding.EncodeToString([]byte(js)))
	if err != nil || !lc.Filesystems[0].ReadWrite {
		t.Fatalf("EncfsSideCarArgs with read_write: %v", err)
	}
}

// TestReadWriteSettings: lease_duration, flush_timeout and dirty_memory
// parse in both formats, reach the filesystem, and out-of-range values or
// settings on a read-only filesystem are refused, naming the field.
func TestReadWriteSettings(t *testing.T) {
	base := "filesystems:\n  - name: w\n    mount_point: /m\n    source: /x\n    key: {file: k}\n    read_write: true\n"
	c, err := Parse([]byte(base + "    lease_duration: 30s\n    flush_timeout: 10s\n    dirty_memory: 32Mi\n    write_cache: 16Mi\n"))
	if err != nil {
		t.Fatal(err)
	}
	f := c.Filesystems[0]
	if f.leaseDuration != 30*time.Second || time.Duration(f.FlushTimeout) != 10*time.Second || f.DirtyMemory != 32<<20 || f.WriteCache != 16<<20 {
		t.Errorf("parsed lease %s, flush timeout %s, dirty memory %d, write cache %d", f.leaseDuration, time.Duration(f.FlushTimeout), f.DirtyMemory, f.WriteCache)
	}
	c, err = Parse([]byte(base + "    lease_duration: infinite\n"))
	if err != nil || c.Filesystems[0].leaseDuration != blob.InfiniteLease {
		t.Errorf("lease_duration infinite: %v", err)
	}
	for extra, want := range map[string]string{
		"    lease_duration: 10s\n":     "lease_duration \"10s\" must be whole seconds from 15s to 60s",
		"    lease_duration: 90s\n":     "lease_duration \"90s\" must be",
		"    lease_duration: 20.5s\n":   "lease_duration \"20.5s\" must be",
		"    lease_duration: forever\n": "or infinite",
		"    flush_timeout: 100ms\n":    "flush_timeout 100ms must be from 1s to 1h0m0s",
		"    dirty_memory: 64Ki\n":      "dirty_memory 65536 must hold at least two cache blocks (131072 bytes)",
		"    write_cache: 1Mi\n":        "write_cache 1048576 must be from 4Mi to 64Gi",
	} {
		if _, err := Parse([]byte(base + extra)); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v; want an error containing %q", strings.TrimSpace(extra), err, want)
		}
	}
	ro := strings.Replace(base, "    read_write: true\n", "    require_integrity: false\n", 1)
	if _, err := Parse([]byte(ro + "    write_cache: 8Mi\n")); err == nil || !strings.Contains(err.Error(), "apply to read_write filesystems only") {
		t.Errorf("write_cache on a read-only filesystem: %v", err)
	}
	if _, err := Parse([]byte(ro + "    flush_timeout: 10s\n")); err == nil || !strings.Contains(err.Error(), "apply to read_write filesystems only") {
		t.Errorf("flush_timeout on a read-only filesystem: %v", err)
	}

	js := `{"azure_filesystems":[{"mount_point":"/m/a","azure_url":"https://a.blob.core.windows.net/c/i.img","raw_key":"00","read_write":true,` +
		`"lease_duration":"infinite","flush_timeout":"45s","dirty_memory":"128Mi"}]}`
	lc, err := ParseEncfsArgs(base64.StdEncoding.EncodeToString([]byte(js)))
	if err != nil {
		t.Fatal(err)
	}
	if f := lc.Filesystems[0]; f.leaseDuration != blob.InfiniteLease || time.Duration(f.FlushTimeout) != 45*time.Second || f.DirtyMemory != 128<<20 {
		t.Errorf("EncfsSideCarArgs: lease %s, flush timeout %s, dirty memory %d", f.leaseDuration, time.Duration(f.FlushTimeout), f.DirtyMemory)
	}
	for field, want := range map[string]string{`"flush_timeout":"soon"`: "flush_timeout \"soon\" is not a duration", `"dirty_memory":"lots"`: "dirty_memory"} {
		js := `{"azure_filesystems":[{"mount_point":"/m/a","azure_url":"https://a.blob.core.windows.net/c/i.img","raw_key":"00","read_write":true,` + field + `}]}`
		if _, err := ParseEncfsArgs(base64.StdEncoding.EncodeToString([]byte(js))); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("EncfsSideCarArgs with %s: %v", field, err)
		}
	}
}
