package main

import (
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/blobseal/blobseal/blob"
)

type uploadFlags struct {
	typ, connStr, clientID string
	concurrency            int
	blockMiB               int64
	noVerify, create, json bool
	timeout                time.Duration
}

func newImageUploadCmd() *cobra.Command {
	var o uploadFlags
	cmd := &cobra.Command{
		Use:   "upload [flags] IMAGE URL",
		Short: "Upload an image to a page or block blob",
		Long: "Uploads IMAGE to the blob at URL and reads it back to compare.\n\n" +
			"URL: https://ACCOUNT.blob.core.windows.net/CONTAINER/BLOB[?SAS] or\n" +
			"http://127.0.0.1:10000/devstoreaccount1/CONTAINER/BLOB (Azurite).",
		Example: `  blobseal image upload --type block data.img "https://ACCOUNT.blob.core.windows.net/images/data.img?SAS"`,
		Args:    positional("IMAGE", "URL"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runImageUpload(cmd, o, args[0], args[1])
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.typ, "type", "page", "blob type: page (sparse, read-write) or block (read-only, faster reads)")
	f.IntVar(&o.concurrency, "concurrency", 8, "requests in flight")
	f.Int64Var(&o.blockMiB, "block-size", 8, "block blobs: staged block size in MiB (1-4000; raised to stay within 50,000 blocks)")
	f.BoolVar(&o.noVerify, "no-verify", false, "skip reading the blob back and comparing it with the image")
	f.StringVar(&o.connStr, "connection-string", "", "storage connection string with a shared key (default $AZURE_STORAGE_CONNECTION_STRING); not needed with a SAS URL")
	f.StringVar(&o.clientID, "identity-client-id", "", "client id of a user-assigned managed identity (https URLs without SAS or shared key)")
	f.BoolVar(&o.create, "create-container", false, "create the container if it does not exist")
	f.DurationVar(&o.timeout, "request-timeout", 2*time.Minute, "timeout of one request")
	f.BoolVar(&o.json, "json", false, "print the upload summary as JSON")
	completeValues(cmd, "type", "page", "block")
	return cmd
}

// uploadJSON is image upload's --json summary.
type uploadJSON struct {
	Image        string  `json:"image"`
	Type         string  `json:"type"`
	Size         int64   `json:"size"`
	Uploaded     int64   `json:"uploaded_bytes"`
	Cleared      int64   `json:"cleared_bytes"`
	Requests     int64   `json:"requests"`
	Verified     bool    `json:"verified"`
	ETag         string  `json:"etag"`
	ElapsedSecs  float64 `json:"elapsed_seconds"`
	ThroughputMB float64 `json:"mb_per_second"`
}

func runImageUpload(cmd *cobra.Command, o uploadFlags, image, url string) error {
	if o.typ != "page" && o.typ != "block" {
		return usageErrorf("--type %q: want page or block", o.typ)
	}
	if o.concurrency < 1 || o.concurrency > 256 {
		return usageErrorf("--concurrency %d: want 1..256", o.concurrency)
	}
	if o.blockMiB < 1 || o.blockMiB > 4000 {
		return usageErrorf("--block-size %d: want 1..4000 (MiB)", o.blockMiB)
	}
	opts := blob.UploadOptions{
		Options:     blob.Options{ConnectionString: o.connStr, RequestTimeout: o.timeout},
		Type:        o.typ,
		Concurrency: o.concurrency,
		Verify:      !o.noVerify,
		BlockSize:   o.blockMiB << 20,

		CreateContainer: o.create,
	}
	if needsIdentity(url, o.connStr) {
		cred, err := blob.DefaultCredential(blob.CredentialOptions{ManagedIdentityClientID: o.clientID, AllowCLI: true})
		if err != nil {
			return err
		}
		opts.Credential = cred
	}
	bar := newProgress(cmd.ErrOrStderr(), "uploading")
	opts.Progress = bar.update
	res, err := blob.Upload(cmd.Context(), image, url, opts)
	bar.finish()
	if err != nil {
		return err
	}
	out := cmd.OutOrStdout()
	if o.json {
		secs := res.Elapsed.Seconds()
		mbps := 0.0
		if secs > 0 {
			mbps = float64(res.Uploaded) / 1e6 / secs
		}
		return printJSON(out, uploadJSON{Image: image, Type: res.Type, Size: res.Size, Uploaded: res.Uploaded,
			Cleared: res.Cleared, Requests: res.Requests, Verified: res.Verified, ETag: res.ETag,
			ElapsedSecs: secs, ThroughputMB: mbps})
	}
	verified := "not verified"
	if res.Verified {
		verified = "verified"
	}
	_, err = fmt.Fprintf(out, "uploaded %s to a %s blob: %d of %d bytes sent, %d stale bytes cleared, %d requests, %s, %s (ETag %s)\n",
		image, res.Type, res.Uploaded, res.Size, res.Cleared, res.Requests, res.Elapsed.Round(time.Millisecond), verified, res.ETag)
	return err
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
