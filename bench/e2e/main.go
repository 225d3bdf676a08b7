// Command e2e is blobseal's end-to-end benchmark: against one Azurite, cold,
// it compares sequential, random and parallel reads through a blobseal mount
// with the raw SDK download of the same blob and with an rclone crypt mount
// of the same plaintext, with and without injected network latency, and
// prints every figure beside its peer as a Markdown table.
//
// bench/e2e.sh builds blobseal, starts Azurite and runs this; see
// docs/PERFORMANCE.md for the latest figures.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := mainErr(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		if errors.Is(err, errUsage) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

var errUsage = errors.New("usage")

func mainErr(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	f := flag.NewFlagSet("e2e", flag.ContinueOnError)
	f.SetOutput(stderr)
	size := f.String("size", "1G", "size of the plaintext file: 1G, 256M, … (whole MiB, at least 16M)")
	quick := f.Bool("quick", false, "only 4 and 16 MiB × 16 raw variants and 2 s random phases (unless -random-for is given)")
	bin := f.String("blobseal", "", "path of the blobseal binary (required)")
	rclone := f.String("rclone", "", "path of rclone (default: found on PATH)")
	blobfuse2 := f.String("blobfuse2", "", "path of blobfuse2 (Azure's FUSE driver; empty leaves the peer out)")
	bandwidth := f.Int64("bandwidth-kbps", 50000, "per-connection bandwidth cap of the proxy, KB/s each way (0: none)")
	endpoint := f.String("azurite", "", "Azurite blob endpoint, http://127.0.0.1:PORT/devstoreaccount1 (required)")
	azPID := f.Int("azurite-pid", 0, "Azurite's process id, for its CPU time (required)")
	runs := f.Int("runs", 3, "repetitions of each raw-download variant and sequential mount read; the median is reported (-quick: 1)")
	cacheMiB := f.Int64("cache-mib", 256, "blobseal mount --cache-memory, MiB (and the in-process cache bound)")
	randomFor := f.Duration("random-for", 10*time.Second, "duration of each random 4 KiB read phase")
	latency := f.Duration("latency", 2*time.Millisecond, "latency the proxy adds in each direction (phase h)")
	workDir := f.String("workdir", "", "where to put data, images and mount points (default $TMPDIR)")
	out := f.String("out", "", "also write the Markdown report to this file")
	only := f.String("only", "", "run only these phases, comma-separated: "+strings.Join(phases, ", ")+" (default: all)")
	if err := f.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if f.NArg() != 0 {
		return fmt.Errorf("%w: unexpected arguments %q", errUsage, f.Args())
	}
	n, err := parseSize(*size)
	if err != nil {
		return fmt.Errorf("%w: -size: %v", errUsage, err)
	}
	if *rclone == "" {
		if *rclone, err = exec.LookPath("rclone"); err != nil {
			return fmt.Errorf("rclone not found on PATH (apt-get install rclone) or pass -rclone: %w", err)
		}
	}
	rf := *randomFor
	if *quick && !flagSet(f, "random-for") {
		rf = 2 * time.Second
	}
	if *quick && !flagSet(f, "runs") {
		*runs = 1
	}
	var onlySet map[string]bool
	if *only != "" {
		onlySet = map[string]bool{}
		for _, p := range strings.Split(*only, ",") {
			p = strings.TrimSpace(p)
			if !slices.Contains(phases, p) {
				return fmt.Errorf("%w: -only %q: phases are %s", errUsage, p, strings.Join(phases, ", "))
			}
			onlySet[p] = true
		}
	}
	cfg := config{Size: n, Quick: *quick, Runs: *runs, Blobseal: *bin, Rclone: *rclone, Blobfuse2: *blobfuse2, BandwidthKBps: *bandwidth, Endpoint: *endpoint, Only: onlySet,
		AzuritePID: *azPID, CacheMiB: *cacheMiB, RandomFor: rf, Latency: *latency, WorkDir: *workDir,
		Command: "go run ./bench/e2e " + strings.Join(args, " "), Log: stderr}
	fmt.Fprintln(stderr, "e2e: load average at start:", loadavg())
	rep, err := run(ctx, cfg)
	if err != nil {
		return err
	}
	if err := rep.write(stdout); err != nil {
		return err
	}
	if *out != "" {
		fh, err := os.Create(*out)
		if err != nil {
			return err
		}
		if err := rep.write(fh); err != nil {
			fh.Close()
			return err
		}
		if err := fh.Close(); err != nil {
			return err
		}
	}
	if rep.Failed > 0 {
		return fmt.Errorf("%d case(s) failed; see the report", rep.Failed)
	}
	return nil
}

func flagSet(f *flag.FlagSet, name string) bool {
	set := false
	f.Visit(func(fl *flag.Flag) { set = set || fl.Name == name })
	return set
}

// parseSize reads 1G, 256M, 512K or plain bytes.
func parseSize(s string) (int64, error) {
	t := strings.ToUpper(strings.TrimSpace(s))
	t = strings.TrimSuffix(strings.TrimSuffix(t, "B"), "I")
	mult := int64(1)
	switch {
	case strings.HasSuffix(t, "G"):
		mult, t = 1<<30, strings.TrimSuffix(t, "G")
	case strings.HasSuffix(t, "M"):
		mult, t = 1<<20, strings.TrimSuffix(t, "M")
	case strings.HasSuffix(t, "K"):
		mult, t = 1<<10, strings.TrimSuffix(t, "K")
	}
	v, err := strconv.ParseInt(t, 10, 64)
	if err != nil || v <= 0 || v > (1<<50)/mult {
		return 0, fmt.Errorf("%q is not a size like 1G or 256M", s)
	}
	return v * mult, nil
}
