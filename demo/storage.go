package demo

import (
	"context"
	"fmt"
	"path/filepath"
	"time"

	azblobblob "github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/sas"

	"github.com/blobseal/blobseal/blob"
	"github.com/blobseal/blobseal/internal/azurite"
)

// storage is where the demo image lives: a page blob in Azurite when it is
// installed, else the local file (said so in the output).
type storage struct {
	location string // what the sidecar opens (a SAS URL or a path)
	describe string
	close    func()
}

func startStorage(ctx context.Context, dir, img string) (*storage, error) {
	srv, err := azurite.New(filepath.Join(dir, "azurite"))
	if err != nil {
		return &storage{location: img, close: func() {},
			describe: "Azurite is not installed, so the image is served from the local file " + img + " (scripts/install-deps.sh installs Azurite)"}, nil
	}
	if err := srv.Start(ctx); err != nil {
		return nil, err
	}
	url := srv.Endpoint() + "/demo/demo.img"
	res, err := blob.Upload(ctx, img, url, blob.UploadOptions{
		Options: blob.Options{ConnectionString: srv.ConnectionString()}, Type: "page", CreateContainer: true, Verify: true,
	})
	if err != nil {
		srv.Stop()
		return nil, err
	}
	sasURL, err := readSAS(url)
	if err != nil {
		srv.Stop()
		return nil, err
	}
	return &storage{
		location: sasURL,
		close:    srv.Stop,
		describe: fmt.Sprintf("Azurite on 127.0.0.1:%d, page blob demo/demo.img: %d of %d bytes uploaded (holes skipped), verified", srv.Port, res.Uploaded, res.Size),
	}, nil
}

// readSAS signs a read-only SAS for the blob, as a user would hand one to
// the sidecar; the sidecar never logs its query string.
func readSAS(url string) (string, error) {
	cred, err := azblobblob.NewSharedKeyCredential(azurite.Account, azurite.Key)
	if err != nil {
		return "", err
	}
	q, err := sas.BlobSignatureValues{
		Protocol:      sas.ProtocolHTTPSandHTTP,
		StartTime:     time.Now().Add(-time.Minute).UTC(),
		ExpiryTime:    time.Now().Add(24 * time.Hour).UTC(),
		Permissions:   (&sas.BlobPermissions{Read: true}).String(),
		ContainerName: "demo",
		BlobName:      "demo.img",
	}.SignWithSharedKey(cred)
	if err != nil {
		return "", err
	}
	return url + "?" + q.Encode(), nil
}
