package main

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sort"
	"time"

	"github.com/spf13/cobra"

	"github.com/blobseal/blobseal/keyrelease"
	"github.com/blobseal/blobseal/keyrelease/evidence"
	"github.com/blobseal/blobseal/keyrelease/maa"
)

type attestFlags struct {
	endpoint, provider, caFile, certCache, simDir, nonce string
	printToken, verbose, json                            bool
	timeout                                              time.Duration
}

func newAttestCmd() *cobra.Command {
	var o attestFlags
	cmd := &cobra.Command{
		Use:   "attest --maa-endpoint URL [flags]",
		Short: "Get an attestation token and print its verified claims",
		Long: "Collects SNP evidence for a fresh wrapping key, has the attestation service turn it into a\n" +
			"token, verifies the token and prints its claims: a diagnosis of what a release policy will see.",
		Example: "  blobseal attest --maa-endpoint https://sharedeus.eus.attest.azure.net",
		Args:    noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return attest(cmd.Context(), o, cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.endpoint, "maa-endpoint", "", "attestation service URL, e.g. https://sharedeus.eus.attest.azure.net")
	f.StringVar(&o.provider, "attestation", evidence.ProviderAuto, "evidence source: sev-guest, configfs-tsm, auto, or simulated (local testing only)")
	f.StringVar(&o.caFile, "ca-file", "", "PEM file of extra trusted TLS roots (for local services)")
	f.StringVar(&o.certCache, "cert-cache-url", "", "certificate cache for a missing or stale VCEK, e.g. https://global.acccache.azure.net")
	f.StringVar(&o.simDir, "simulated-dir", "", "with --attestation simulated: the `DIR` of a \"blobseal dev serve\" whose simulated signer to use")
	f.StringVar(&o.nonce, "nonce", "", "nonce to send (default: random)")
	f.BoolVar(&o.printToken, "print-token", false, "also print the raw token (it is a credential: handle with care)")
	f.DurationVar(&o.timeout, "timeout", 2*time.Minute, "overall time limit")
	f.BoolVarP(&o.verbose, "verbose", "v", false, "debug logging (never includes tokens)")
	f.BoolVar(&o.json, "json", false, "print the verified claims as one JSON object (with --print-token: {\"token\", \"claims\"})")
	markRequired(cmd, "maa-endpoint")
	completeValues(cmd, "attestation", evidence.ProviderAuto, evidence.ProviderSevGuest, evidence.ProviderConfigfsTSM, evidence.ProviderSimulated)
	return cmd
}

// attest collects evidence for a fresh wrapping key, gets a token and
// prints its verified claims; it is a diagnosis tool.
func attest(ctx context.Context, o attestFlags, stdout, stderr io.Writer) error {
	if o.simDir != "" && o.provider != evidence.ProviderSimulated {
		return usageErrorf("--simulated-dir only applies to --attestation simulated")
	}
	level := slog.LevelInfo
	if o.verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))

	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	roots, err := keyrelease.TLSRoots(o.caFile)
	if err != nil {
		return fmt.Errorf("--ca-file: %w", err)
	}
	hc := keyrelease.HTTPClient(roots)
	ev, err := keyrelease.NewEvidence(keyrelease.EvidenceConfig{Provider: o.provider, CertCacheURL: o.certCache, HTTPClient: hc, SimulatedDir: o.simDir, Logger: log})
	if err != nil {
		return err
	}
	key, err := rsa.GenerateKey(rand.Reader, keyrelease.WrappingKeyBits)
	if err != nil {
		return fmt.Errorf("generate wrapping key: %w", err)
	}
	runtime, err := maa.RuntimeData(&key.PublicKey)
	if err != nil {
		return err
	}
	nonce := o.nonce
	if nonce == "" {
		b := make([]byte, 16)
		if _, err := rand.Read(b); err != nil {
			return err
		}
		nonce = base64.RawURLEncoding.EncodeToString(b)
	}
	tok, err := keyrelease.Attest(ctx, keyrelease.AttestConfig{Evidence: ev, MAAEndpoint: o.endpoint, Nonce: nonce, HTTPClient: hc, Logger: log}, runtime)
	if err != nil {
		return err
	}
	v, err := maa.NewVerifier(maa.VerifierOptions{AllowedIssuers: []string{o.endpoint}, HTTPClient: hc, Logger: log})
	if err != nil {
		return err
	}
	claims, err := v.Verify(ctx, tok)
	if err != nil {
		return fmt.Errorf("verify token: %w", err)
	}
	if claims.Nonce != nonce {
		return errors.New("the token's nonce claim does not match the nonce sent")
	}
	token := ""
	if o.printToken {
		token = tok.Reveal()
	}
	return printClaims(stdout, claims.Raw, token, o.printToken, o.json)
}

// printClaims writes the verified claims: one "name: value" line each,
// sorted, or one JSON object. The token, a credential, only on request.
func printClaims(w io.Writer, claims map[string]any, token string, withToken, asJSON bool) error {
	if asJSON {
		if withToken {
			return printJSON(w, struct {
				Token  string         `json:"token"`
				Claims map[string]any `json:"claims"`
			}{token, claims})
		}
		return printJSON(w, claims)
	}
	if withToken {
		if _, err := fmt.Fprintln(w, token); err != nil {
			return err
		}
	}
	names := make([]string, 0, len(claims))
	for n := range claims {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		v, err := json.Marshal(claims[n])
		if err != nil {
			return err
		}
		if _, err := fmt.Fprintf(w, "%s: %s\n", n, v); err != nil {
			return err
		}
	}
	return nil
}
