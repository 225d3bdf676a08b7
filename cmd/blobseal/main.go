// Command blobseal mounts encrypted ext4 images kept in Azure Blob Storage,
// with the key released to an attested confidential VM. This file only
// starts the command tree (root.go); each command group lives in its own
// file and the work in packages.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// errUsage marks command-line errors: they exit 2 and point at --help.
var errUsage = errors.New("usage")

// usageErrorf builds an error that exits with status 2.
func usageErrorf(format string, args ...any) error {
	return fmt.Errorf("%w: %s", errUsage, fmt.Sprintf(format, args...))
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

// run executes one command line and returns the exit status: 0 on
// success, 1 when the work failed, 2 when the command line was wrong.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	cmd, err := execute(ctx, args, stdout, stderr)
	if err == nil {
		return 0
	}
	path := "blobseal"
	if cmd != nil {
		path = cmd.CommandPath()
	}
	if !errors.Is(err, errUsage) {
		fmt.Fprintf(stderr, "%s: %v\n", path, err)
		return 1
	}
	fmt.Fprintf(stderr, "%s: %s\nRun '%s --help' for usage.\n", path, strings.TrimPrefix(err.Error(), errUsage.Error()+": "), path)
	return 2
}
