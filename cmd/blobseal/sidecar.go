package main

import (
	"os"

	"github.com/spf13/cobra"

	"github.com/blobseal/blobseal/internal/logging"
	"github.com/blobseal/blobseal/sidecar"
	"github.com/blobseal/blobseal/skr"
)

// sidecarFlags override the configuration file's settings.
type sidecarFlags struct {
	configFile, logLevel, logFormat, health, readyFile string
	skrAddress                                         string
	// The legacy EncfsSideCarArgs form has no field for these; they let
	// tests and the local stack run it unchanged.
	attestation, simDir, simHostData, caFile string
}

func newSidecarCmd() *cobra.Command {
	var o sidecarFlags
	cmd := &cobra.Command{
		Use:   "sidecar [--config FILE] [flags]",
		Short: "Run as the confidential container sidecar",
		Long: "Mounts every filesystem of the configuration concurrently, publishes each with an atomic\n" +
			"symlink rename once it is servable, serves /healthz, /readyz and /metrics, and unmounts\n" +
			"everything on SIGTERM. Without --config, the " + sidecar.EncfsEnv + " environment variable\n" +
			"(base64 JSON of the Azure encfs sidecar) is the configuration. With --skr-address or " + skr.SkrEnv + "\n" +
			"(the Azure SKR sidecar's configuration) it also serves that sidecar's API (see blobseal skr).",
		Example: "  blobseal sidecar --config sidecar.yaml\n  EncfsSideCarArgs=<base64 JSON> blobseal sidecar\n" +
			"  EncfsSideCarArgs=<base64 JSON> SkrSideCarArgs=<base64 JSON> blobseal sidecar",
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runSidecar(cmd, o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.configFile, "config", "", "configuration file (JSON or YAML); without it, the "+sidecar.EncfsEnv+" environment variable (base64 JSON of the Azure encfs sidecar) is used")
	f.StringVar(&o.logLevel, "log-level", "", "debug, info, warn or error (overrides the config)")
	f.StringVar(&o.logFormat, "log-format", "", "text or json (overrides the config)")
	f.StringVar(&o.health, "health-address", "", "address for /healthz, /readyz and /metrics, or off (overrides the config)")
	f.StringVar(&o.readyFile, "ready-file", "", "file created once every filesystem is mounted (overrides the config)")
	f.StringVar(&o.attestation, "attestation", "", "evidence provider: auto, sev-guest, configfs-tsm, or simulated (simulated is for local testing only) (overrides the config)")
	f.StringVar(&o.simDir, "simulated-dir", "", "directory holding the local stack's simulated signer (testing only, with --attestation simulated)")
	f.StringVar(&o.simHostData, "simulated-host-data", "", "hex SHA-256 HOST_DATA the simulated reports carry (testing only, with --attestation simulated)")
	f.StringVar(&o.skrAddress, "skr-address", "", "also serve the API of Azure's SKR sidecar on HOST:PORT (default "+skr.DefaultAddress+" when "+skr.SkrEnv+" is set; then no filesystem is needed)")
	f.StringVar(&o.caFile, "ca-file", "", "PEM file of extra trusted TLS roots, e.g. the local stack's CA (overrides the config)")
	return cmd
}

func runSidecar(cmd *cobra.Command, o sidecarFlags) error {
	var cfg *sidecar.Config
	var err error
	// The Azure SKR sidecar's configuration turns the SKR API on, as one
	// blobseal sidecar stands in for both Azure sidecars.
	skrArgs := os.Getenv(skr.SkrEnv)
	withSKR := o.skrAddress != "" || skrArgs != ""
	switch env := os.Getenv(sidecar.EncfsEnv); {
	case o.configFile != "":
		cfg, err = sidecar.LoadFile(o.configFile)
	case env != "":
		cfg, err = sidecar.ParseEncfsArgs(env)
	case withSKR:
		cfg = &sidecar.Config{} // the SKR API alone
	default:
		return usageErrorf("no configuration: pass --config FILE, set %s, or serve the SKR API alone with --skr-address or %s", sidecar.EncfsEnv, skr.SkrEnv)
	}
	if err != nil {
		return err
	}
	if withSKR {
		addr := o.skrAddress
		if addr == "" {
			addr = cfg.SKR.Address // the configuration's, else the default
		}
		if err := cfg.EnableSKR(addr, skrArgs); err != nil {
			return usageErrorf("%v", err)
		}
	}
	for dst, v := range map[*string]string{&cfg.Log.Level: o.logLevel, &cfg.Log.Format: o.logFormat, &cfg.Health.Address: o.health, &cfg.Health.ReadyFile: o.readyFile,
		&cfg.Attestation.Provider: o.attestation, &cfg.Attestation.SimulatedDir: o.simDir, &cfg.Attestation.SimulatedHostData: o.simHostData, &cfg.Attestation.CAFile: o.caFile} {
		if v != "" {
			*dst = v
		}
	}
	if err := cfg.Validate(); err != nil { // the overrides must pass the same checks
		return usageErrorf("%v", err)
	}
	log, err := logging.New(cmd.ErrOrStderr(), cfg.Log.Level, cfg.Log.Format)
	if err != nil {
		return usageErrorf("%v", err)
	}
	return sidecar.New(cfg, log, nil).Run(cmd.Context())
}
