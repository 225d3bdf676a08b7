// Command blobseal mounts encrypted ext4 images kept in Azure Blob Storage,
// with the key released to an attested confidential VM. This file only
// dispatches; each command lives in its own file and the work in packages.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"
)

// command is one CLI verb. run gets the arguments after the verb.
type command struct {
	name    string // "image create"
	summary string
	run     func(ctx context.Context, args []string) error
}

func commands() []command {
	return []command{
		{"image create", "build an encrypted ext4 image from a directory", runImageCreate},
		{"image check", "unlock an image, read every entry and print a manifest", runImageCheck},
		{"image verity", "append a dm-verity hash tree to an image and print its root hash", runImageVerity},
		{"image upload", "upload an image to a page or block blob", runImageUpload},
		{"mount", "mount an encrypted image (file or blob URL) with FUSE; key from a file or a secure key release", runMount},
		{"attest", "get an attestation token and print its verified claims", runAttest},
		{"key import", "create or import a key with a release policy", runKeyImport},
		{"key release", "run attestation and key release; write the secret to a file", runKeyRelease},
		{"dev serve", "run the local attestation and key services", runDevServe},
		{"sidecar", "run as the confidential container sidecar", runSidecar},
		{"demo", "build, serve and mount a sample image with the local stack", runDemo},
		{"version", "print the version", runVersion},
	}
}

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func runVersion(context.Context, []string) error {
	fmt.Println("blobseal", version)
	return nil
}

// errUsage marks errors that should print usage and exit 2.
var errUsage = errors.New("usage")

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stderr))
}

func run(ctx context.Context, args []string, stderr io.Writer) int {
	cmd, rest, ok := pick(args)
	if !ok {
		usage(stderr)
		if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
			return 0
		}
		return 2
	}
	err := cmd.run(ctx, rest)
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		fmt.Fprintf(stderr, "blobseal %s: %v\n", cmd.name, err)
		return 2
	default:
		fmt.Fprintf(stderr, "blobseal %s: %v\n", cmd.name, err)
		return 1
	}
}

// pick finds the longest command name matching the leading arguments.
func pick(args []string) (command, []string, bool) {
	cmds := commands()
	sort.Slice(cmds, func(i, j int) bool { return len(cmds[i].name) > len(cmds[j].name) })
	for _, c := range cmds {
		words := strings.Fields(c.name)
		if len(args) >= len(words) && strings.Join(args[:len(words)], " ") == c.name {
			return c, args[len(words):], true
		}
	}
	return command{}, nil, false
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: blobseal COMMAND [flags] [args]\n\ncommands:")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-14s %s\n", c.name, c.summary)
	}
	fmt.Fprintln(w, "\nRun 'blobseal COMMAND -h' for the flags of a command.")
}

// usageErrorf builds an error that exits with status 2.
func usageErrorf(format string, args ...any) error {
	return fmt.Errorf("%w: %s", errUsage, fmt.Sprintf(format, args...))
}
