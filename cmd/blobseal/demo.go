package main

import (
	"context"
	"flag"
	"os"

	"github.com/blobseal/blobseal/demo"
	"github.com/blobseal/blobseal/internal/logging"
)

func runDemo(ctx context.Context, args []string) error {
	fl := flag.NewFlagSet("demo", flag.ContinueOnError)
	exit := fl.Bool("exit", false, "stop after printing the tree instead of serving until Ctrl-C")
	data := fl.String("data", "examples/demo-data", "directory to pack into the demo image")
	cce := fl.String("cce-policy", "examples/demo-cce-policy.rego", "CCE policy whose SHA-256 the simulated VM reports as host data")
	dir := fl.String("dir", "", "working directory to keep (default: a temporary one, removed at the end)")
	logLevel := fl.String("log-level", "warn", "log level of the services: debug, info, warn or error")
	if err := fl.Parse(args); err != nil {
		return err
	}
	if fl.NArg() != 0 {
		return usageErrorf("unexpected arguments %q", fl.Args())
	}
	log, err := logging.New(os.Stderr, *logLevel, "text")
	if err != nil {
		return usageErrorf("%v", err)
	}
	return demo.Run(ctx, demo.Options{Data: *data, CCEPolicy: *cce, Dir: *dir, Exit: *exit, Out: os.Stdout, Log: log})
}
