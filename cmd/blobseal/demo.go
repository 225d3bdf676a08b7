package main

import (
	"github.com/spf13/cobra"

	"github.com/blobseal/blobseal/demo"
	"github.com/blobseal/blobseal/internal/logging"
)

func newDemoCmd() *cobra.Command {
	var o demo.Options
	var logLevel string
	cmd := &cobra.Command{
		Use:   "demo [flags]",
		Short: "Build, serve and mount a sample image with the local stack",
		Long: "Builds an encrypted image from --data, starts the local stack (simulated SNP, attestation and\n" +
			"key services, Azurite), releases the key, mounts the image and lists it.",
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := logging.New(cmd.ErrOrStderr(), logLevel, "text")
			if err != nil {
				return usageErrorf("%v", err)
			}
			o.Out, o.Log = cmd.OutOrStdout(), log
			return demo.Run(cmd.Context(), o)
		},
	}
	f := cmd.Flags()
	f.BoolVar(&o.Exit, "exit", false, "stop after printing the tree instead of serving until Ctrl-C")
	f.StringVar(&o.Data, "data", "examples/demo-data", "directory to pack into the demo image")
	f.StringVar(&o.CCEPolicy, "cce-policy", "examples/demo-cce-policy.rego", "CCE policy whose SHA-256 the simulated VM reports as host data")
	f.StringVar(&o.Dir, "dir", "", "working directory to keep (default: a temporary one, removed at the end)")
	f.StringVar(&logLevel, "log-level", "warn", "log level of the services: debug, info, warn or error")
	return cmd
}
