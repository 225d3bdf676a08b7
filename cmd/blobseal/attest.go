package main

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"time"

	"github.com/blobseal/blobseal/keyrelease/evidence"
	"github.com/blobseal/blobseal/keyrelease/maa"
)

func runAttest(ctx context.Context, args []string) error {
	return attest(ctx, args, os.Stdout, os.Stderr)
}

// attest collects evidence for a fresh wrapping key, gets a token and
// prints its verified claims; it is a diagnosis tool.
func attest(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("attest", flag.ContinueOnError)
	fs.SetOutput(stderr)
	endpoint := fs.String("maa-endpoint", "", "attestation service URL, e.g. https://sharedeus.eus.attest.azure.net (required)")
	provider := fs.String("attestation", evidence.ProviderAuto, "evidence source: sev-guest, configfs-tsm, auto, or simulated (local testing only)")
	caFile := fs.String("ca-file", "", "PEM file of extra trusted TLS roots (for local services)")
	certCache := fs.String("cert-cache-url", "", "certificate cache for a missing or stale VCEK, e.g. https://global.acccache.azure.net")
	simDir := fs.String("simulated-dir", "", "with --attestation simulated: the `blobseal dev serve` directory whose simulated signer to use")
	nonce := fs.String("nonce", "", "nonce to send (default: random)")
	printToken := fs.Bool("print-token", false, "also print the raw token (it is a credential: handle with care)")
	timeout := fs.Duration("timeout", 2*time.Minute, "overall time limit")
	verbose := fs.Bool("v", false, "debug logging (never includes tokens)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usageErrorf("unexpected arguments %q", fs.Args())
	}
	if *endpoint == "" {
		return usageErrorf("--maa-endpoint is required")
	}
	if *simDir != "" && *provider != evidence.ProviderSimulated {
		return usageErrorf("--simulated-dir only applies to --attestation simulated")
	}
	level := slog.LevelInfo
	if *verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))

	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	hc, err := httpClientWithCA(*caFile)
	if err != nil {
		return err
	}
	opts := evidence.Options{CertCacheURL: *certCache, HTTPClient: hc, Logger: log}
	if *provider == evidence.ProviderSimulated && *simDir != "" {
		signer, err := evidence.ReadSimulatedSigner(*simDir)
		if err != nil {
			return err
		}
		opts.Simulated = &evidence.SimulatedConfig{Signer: signer}
	}
	prov, err := evidence.NewProvider(*provider, opts)
	if err != nil {
		return err
	}
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return fmt.Errorf("generate wrapping key: %w", err)
	}
	runtime, err := maa.RuntimeData(&key.PublicKey)
	if err != nil {
		return err
	}
	ev, err := prov.Get(ctx, evidence.ReportData(runtime))
	if err != nil {
		return fmt.Errorf("collect evidence (%s): %w", prov.Name(), err)
	}
	if *nonce == "" {
		b := make([]byte, 16)
		if _, err := rand.Read(b); err != nil {
			return err
		}
		*nonce = base64.RawURLEncoding.EncodeToString(b)
	}
	client := maa.New(*endpoint, maa.Options{HTTPClient: hc, Logger: log, UserAgent: "blobseal/" + version})
	tok, err := client.AttestSevSnpVm(ctx, ev, runtime, *nonce)
	if err != nil {
		return err
	}
	v, err := maa.NewVerifier(maa.VerifierOptions{AllowedIssuers: []string{client.Endpoint()}, HTTPClient: hc, Logger: log})
	if err != nil {
		return err
	}
	claims, err := v.Verify(ctx, tok)
	if err != nil {
		return fmt.Errorf("verify token: %w", err)
	}
	if claims.Nonce != *nonce {
		return errors.New("the token's nonce claim does not match the nonce sent")
	}
	if *printToken {
		if _, err := fmt.Fprintln(stdout, tok.Reveal()); err != nil {
			return err
		}
	}
	out, err := json.MarshalIndent(claims.Raw, "", "  ")
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(stdout, "%s\n", out)
	return err
}

// httpClientWithCA trusts the system roots plus those in caFile.
func httpClientWithCA(caFile string) (*http.Client, error) {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("--ca-file: %w", err)
		}
		pool, err := x509.SystemCertPool()
		if err != nil || pool == nil {
			pool = x509.NewCertPool()
		}
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--ca-file %s holds no PEM certificate", caFile)
		}
		tr.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	}
	return &http.Client{Transport: tr, Timeout: time.Minute}, nil
}
