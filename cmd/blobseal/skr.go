package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/blobseal/blobseal/internal/logging"
	"github.com/blobseal/blobseal/keyrelease/evidence"
	"github.com/blobseal/blobseal/skr"
)

// skrFlags override what SkrSideCarArgs configures.
type skrFlags struct {
	address, attestation, certCacheURL, certCacheKind string
	caFile, identityClientID, simDir                  string
	logLevel, logFormat                               string
	allowedKeys                                       []string
}

func newSkrCmd() *cobra.Command {
	var o skrFlags
	cmd := &cobra.Command{
		Use:   "skr [flags]",
		Short: "Serve the REST API of Azure's secure key release (SKR) sidecar",
		Long: "Serves GET /status and POST /attest/raw, /attest/combined, /attest/maa and /key/release with\n" +
			"the JSON of Azure's SKR sidecar, so applications written for it keep working, until SIGTERM.\n" +
			"The " + skr.SkrEnv + " environment variable (base64 JSON {certcache, identity}, as that sidecar\n" +
			"takes it) is read first; flags override it.",
		Example: "  blobseal skr --allowed-key app-key\n  " + skr.SkrEnv + "=<base64 JSON> blobseal skr --address 127.0.0.1:8080",
		Args:    noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runSkr(cmd, o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.address, "address", skr.DefaultAddress, "HOST:PORT to listen on; anything beyond loopback exposes key release to other hosts")
	f.StringArrayVar(&o.allowedKeys, "allowed-key", nil, "key /key/release may release: NAME or VAULTHOST/NAME (repeatable; default: any key)")
	f.StringVar(&o.attestation, "attestation", evidence.ProviderAuto, "evidence provider: auto, sev-guest, configfs-tsm, or simulated (local testing only)")
	f.StringVar(&o.certCacheURL, "cert-cache-url", "", "certificate cache for a missing or stale VCEK (overrides "+skr.SkrEnv+"'s certcache)")
	f.StringVar(&o.certCacheKind, "cert-cache-kind", "", "kind of --cert-cache-url: AzCache (default), LocalTHIM or AMD")
	f.StringVar(&o.caFile, "ca-file", "", "PEM file of extra trusted TLS roots for the attestation service and the vault (local stack)")
	f.StringVar(&o.identityClientID, "identity-client-id", "", "client ID of the user-assigned managed identity for requests without access_token (overrides "+skr.SkrEnv+"'s identity)")
	f.StringVar(&o.simDir, "simulated-dir", "", "with --attestation simulated: the `DIR` holding the simulated signer (a \"blobseal dev serve\" directory)")
	f.StringVar(&o.logLevel, "log-level", "info", "debug, info, warn or error")
	f.StringVar(&o.logFormat, "log-format", "text", "text or json")
	completeValues(cmd, "attestation", evidence.ProviderAuto, evidence.ProviderSevGuest, evidence.ProviderConfigfsTSM, evidence.ProviderSimulated)
	completeValues(cmd, "cert-cache-kind", evidence.CertCacheAzure, evidence.CertCacheTHIM, evidence.CertCacheAMD)
	completeValues(cmd, "log-level", "debug", "info", "warn", "error")
	completeValues(cmd, "log-format", "text", "json")
	return cmd
}

func runSkr(cmd *cobra.Command, o skrFlags) error {
	cfg, err := skr.ParseSkrSideCarArgs(os.Getenv(skr.SkrEnv))
	if err != nil {
		return usageErrorf("%v", err)
	}
	switch o.certCacheKind {
	case "", evidence.CertCacheAzure, evidence.CertCacheTHIM, evidence.CertCacheAMD:
	default:
		return usageErrorf("--cert-cache-kind is %q; use %s, %s or %s", o.certCacheKind, evidence.CertCacheAzure, evidence.CertCacheTHIM, evidence.CertCacheAMD)
	}
	if o.certCacheKind != "" && o.certCacheURL == "" {
		return usageErrorf("--cert-cache-kind needs --cert-cache-url")
	}
	if o.simDir != "" && o.attestation != evidence.ProviderSimulated {
		return usageErrorf("--simulated-dir only applies to --attestation simulated")
	}
	cfg.Address = o.address
	cfg.AllowedKeys = o.allowedKeys
	cfg.CAFile = o.caFile
	cfg.Evidence.Provider = o.attestation
	cfg.Evidence.SimulatedDir = o.simDir
	if o.certCacheURL != "" {
		cfg.Evidence.CertCache = evidence.CertCache{Kind: o.certCacheKind, URL: o.certCacheURL}
	}
	if o.identityClientID != "" {
		cfg.IdentityClientID = o.identityClientID
	}
	log, err := logging.New(cmd.ErrOrStderr(), o.logLevel, o.logFormat)
	if err != nil {
		return usageErrorf("%v", err)
	}
	// The bound address on stdout: with port 0, the only way to learn it.
	out := cmd.OutOrStdout()
	cfg.Ready = func(addr string) { fmt.Fprintf(out, "serving the SKR API on http://%s\n", addr) }
	return skr.Run(cmd.Context(), cfg, log)
}
