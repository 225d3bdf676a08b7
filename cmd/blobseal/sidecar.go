package main

import (
	"context"
	"flag"
	"os"

	"github.com/blobseal/blobseal/internal/logging"
	"github.com/blobseal/blobseal/sidecar"
)

func runSidecar(ctx context.Context, args []string) error {
	fl := flag.NewFlagSet("sidecar", flag.ContinueOnError)
	configFile := fl.String("config", "", "configuration file (JSON or YAML); without it, the "+sidecar.EncfsEnv+" environment variable (base64 JSON of the Azure encfs sidecar) is used")
	logLevel := fl.String("log-level", "", "debug, info, warn or error (overrides the config)")
	logFormat := fl.String("log-format", "", "text or json (overrides the config)")
	health := fl.String("health-address", "", "address for /healthz, /readyz and /metrics, or off (overrides the config)")
	readyFile := fl.String("ready-file", "", "file created once every filesystem is mounted (overrides the config)")
	// The legacy EncfsSideCarArgs form has no field for these; they let
	// tests and the local stack run it unchanged.
	attestation := fl.String("attestation", "", "evidence provider: auto, sev-guest, configfs-tsm, or simulated (simulated is for local testing only) (overrides the config)")
	simDir := fl.String("simulated-dir", "", "directory holding the local stack's simulated signer (testing only, with --attestation simulated)")
	simHostData := fl.String("simulated-host-data", "", "hex SHA-256 HOST_DATA the simulated reports carry (testing only, with --attestation simulated)")
	caFile := fl.String("ca-file", "", "PEM file of extra trusted TLS roots, e.g. the local stack's CA (overrides the config)")
	if err := fl.Parse(args); err != nil {
		return err
	}
	if fl.NArg() != 0 {
		return usageErrorf("unexpected arguments %q", fl.Args())
	}
	var cfg *sidecar.Config
	var err error
	switch env := os.Getenv(sidecar.EncfsEnv); {
	case *configFile != "":
		cfg, err = sidecar.LoadFile(*configFile)
	case env != "":
		cfg, err = sidecar.ParseEncfsArgs(env)
	default:
		return usageErrorf("no configuration: pass --config FILE or set %s", sidecar.EncfsEnv)
	}
	if err != nil {
		return err
	}
	for dst, v := range map[*string]string{&cfg.Log.Level: *logLevel, &cfg.Log.Format: *logFormat, &cfg.Health.Address: *health, &cfg.Health.ReadyFile: *readyFile,
		&cfg.Attestation.Provider: *attestation, &cfg.Attestation.SimulatedDir: *simDir, &cfg.Attestation.SimulatedHostData: *simHostData, &cfg.Attestation.CAFile: *caFile} {
		if v != "" {
			*dst = v
		}
	}
	if err := cfg.Validate(); err != nil { // the overrides must pass the same checks
		return usageErrorf("%v", err)
	}
	log, err := logging.New(os.Stderr, cfg.Log.Level, cfg.Log.Format)
	if err != nil {
		return usageErrorf("%v", err)
	}
	return sidecar.New(cfg, log, nil).Run(ctx)
}
