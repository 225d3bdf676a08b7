package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/blobseal/blobseal/blob"
	uploadprogress "github.com/blobseal/blobseal/blob/progress"
)

// runImageUpload: blobseal image upload [--type page|block] [--concurrency N] IMAGE URL
func runImageUpload(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("image upload", flag.ContinueOnError)
	typ := fs.String("type", "page", "blob type: page (sparse, read-write) or block (read-only, faster reads)")
	conc := fs.Int("concurrency", 8, "requests in flight")
	blockMiB := fs.Int64("block-size", 8, "block blobs: staged block size in MiB (1-4000; raised to stay within 50,000 blocks)")
	noVerify := fs.Bool("no-verify", false, "skip reading the blob back and comparing it with the image")
	connStr := fs.String("connection-string", "", "storage connection string with a shared key (default $AZURE_STORAGE_CONNECTION_STRING); not needed with a SAS URL")
	clientID := fs.String("identity-client-id", "", "client id of a user-assigned managed identity (https URLs without SAS or shared key)")
	create := fs.Bool("create-container", false, "create the container if it does not exist")
	timeout := fs.Duration("request-timeout", 2*time.Minute, "timeout of one request")
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "usage: blobseal image upload [flags] IMAGE URL\n\nURL: https://ACCOUNT.blob.core.windows.net/CONTAINER/BLOB[?SAS] or http://127.0.0.1:10000/devstoreaccount1/CONTAINER/BLOB (Azurite)")
		fs.PrintDefaults()
	}
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 2 {
		return usageErrorf("want IMAGE and URL, got %d arguments", len(pos))
	}
	if *typ != "page" && *typ != "block" {
		return usageErrorf("--type %q: want page or block", *typ)
	}
	if *conc < 1 || *conc > 256 {
		return usageErrorf("--concurrency %d: want 1..256", *conc)
	}
	if *blockMiB < 1 || *blockMiB > 4000 {
		return usageErrorf("--block-size %d: want 1..4000 (MiB)", *blockMiB)
	}
	image, url := pos[0], pos[1]
	opts := blob.UploadOptions{
		Options:     blob.Options{ConnectionString: *connStr, RequestTimeout: *timeout},
		Type:        *typ,
		Concurrency: *conc,
		Verify:      !*noVerify,
		BlockSize:   *blockMiB << 20,

		CreateContainer: *create,
	}
	if needsIdentity(url, *connStr) {
		cred, err := blob.DefaultCredential(blob.CredentialOptions{ManagedIdentityClientID: *clientID, AllowCLI: true})
		if err != nil {
			return err
		}
		opts.Credential = cred
	}
	pr := uploadprogress.New(os.Stderr, "upload", uploadprogress.IsTerminal(os.Stderr), 5*time.Second)
	opts.Progress = pr.Update
	res, err := blob.Upload(ctx, image, url, opts)
	if err != nil {
		return err
	}
	verified := "not verified"
	if res.Verified {
		verified = "verified"
	}
	fmt.Printf("uploaded %s to a %s blob: %d of %d bytes sent, %d stale bytes cleared, %d requests, %s, %s (ETag %s)\n",
		image, res.Type, res.Uploaded, res.Size, res.Cleared, res.Requests, res.Elapsed.Round(time.Millisecond), verified, res.ETag)
	return nil
}

// needsIdentity reports whether no SAS or shared key is available, so an
// Entra identity must authorize the upload.
func needsIdentity(url, connStr string) bool {
	if connStr != "" || os.Getenv("AZURE_STORAGE_CONNECTION_STRING") != "" || os.Getenv("AZURE_STORAGE_KEY") != "" {
		return false
	}
	if strings.Contains(url, "sig=") {
		return false
	}
	return strings.HasPrefix(strings.ToLower(url), "https://")
}

// parseInterspersed parses flags that may follow positional arguments
// ("IMAGE URL --type block") and returns the positional ones.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		if fs.NArg() == 0 {
			return pos, nil
		}
		pos = append(pos, fs.Arg(0))
		args = fs.Args()[1:]
	}
}
