package blob

import (
	"bytes"
	"context"
	"math/rand/v2"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/streaming"
	azblobblob "github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blockblob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/container"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/pageblob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/sas"

	"github.com/blobseal/blobseal/internal/testenv"
)

// store is an Azurite instance with a private container "img" and a public
// container "pub", plus helpers that write blobs with the real SDK.
type store struct {
	t  testing.TB
	az *testenv.Azurite
}

func newStore(t testing.TB) *store {
	t.Helper()
	az := testenv.StartAzurite(t)
	s := &store{t: t, az: az}
	ctx := testCtx(t)
	for name, access := range map[string]*container.PublicAccessType{"img": nil, "pub": ptr(container.PublicAccessTypeBlob)} {
		cc, err := container.NewClientFromConnectionString(az.ConnectionString(), name, nil)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := cc.Create(ctx, &container.CreateOptions{Access: access}); err != nil {
			t.Fatalf("create container %s: %v", name, err)
		}
	}
	return s
}

func ptr[T any](v T) *T { return &v }

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// url is the plain (credential-free) URL of a blob.
func (s *store) url(containerName, name string) string {
	return s.az.Endpoint() + "/" + containerName + "/" + name
}

// opts are Options with the Azurite shared key.
func (s *store) opts() Options {
	return Options{ConnectionString: s.az.ConnectionString(), RetryDelay: 20 * time.Millisecond, MaxRetryDelay: 200 * time.Millisecond}
}

// putBlock writes data as a block blob.
func (s *store) putBlock(containerName, name string, data []byte) {
	s.t.Helper()
	bb, err := blockblob.NewClientFromConnectionString(s.az.ConnectionString(), containerName, name, nil)
	if err != nil {
		s.t.Fatal(err)
	}
	if _, err := bb.UploadBuffer(testCtx(s.t), data, &blockblob.UploadBufferOptions{BlockSize: 1 << 20}); err != nil {
		s.t.Fatalf("upload block blob: %v", err)
	}
}

// putPage creates a page blob of len(data) bytes and writes only its
// non-zero pages, each page with its own Put Page call so that Azurite
// keeps adjacent ranges unmerged.
func (s *store) putPage(containerName, name string, data []byte) {
	s.t.Helper()
	pb, err := pageblob.NewClientFromConnectionString(s.az.ConnectionString(), containerName, name, nil)
	if err != nil {
		s.t.Fatal(err)
	}
	ctx := testCtx(s.t)
	if _, err := pb.Create(ctx, int64(len(data)), nil); err != nil {
		s.t.Fatalf("create page blob: %v", err)
	}
	const chunk = 64 << 10 // several adjacent Put Page calls per run
	for off := 0; off < len(data); off += chunk {
		end := min(off+chunk, len(data))
		runs, _ := pageRuns(data[off:end], int64(off))
		for _, r := range runs {
			body := streaming.NopCloser(bytes.NewReader(data[r.Off:r.End()]))
			if _, err := pb.UploadPages(ctx, body, azblobblob.HTTPRange{Offset: r.Off, Count: r.Len}, nil); err != nil {
				s.t.Fatalf("upload pages: %v", err)
			}
		}
	}
}

// sas signs a blob SAS with the Azurite key.
func (s *store) sas(containerName, name string, perms sas.BlobPermissions, expiry time.Time) string {
	s.t.Helper()
	cred, err := azblobblob.NewSharedKeyCredential(testenv.AzuriteAccount, testenv.AzuriteKey)
	if err != nil {
		s.t.Fatal(err)
	}
	q, err := sas.BlobSignatureValues{
		Protocol:      sas.ProtocolHTTPSandHTTP,
		StartTime:     time.Now().Add(-time.Hour).UTC(),
		ExpiryTime:    expiry.UTC(),
		Permissions:   perms.String(),
		ContainerName: containerName,
		BlobName:      name,
	}.SignWithSharedKey(cred)
	if err != nil {
		s.t.Fatal(err)
	}
	return s.url(containerName, name) + "?" + q.Encode()
}

// sparseImage returns size bytes of random data with zero holes of varied
// lengths (page aligned), like a real ext4 image.
func sparseImage(seed uint64, size int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, size)
	for off := 0; off < size; {
		n := (1 + r.IntN(600)) * PageSize
		end := min(off+n, size)
		if r.IntN(2) == 0 {
			for i := off; i < end; i++ {
				b[i] = byte(r.Uint32())
			}
		}
		off = end
	}
	return b
}

// countingClient counts HTTP requests by method.
type countingClient struct {
	next http.RoundTripper
	gets atomic.Int64
	all  atomic.Int64
}

func (c *countingClient) RoundTrip(r *http.Request) (*http.Response, error) {
	c.all.Add(1)
	if r.Method == http.MethodGet && !r.URL.Query().Has("comp") {
		c.gets.Add(1)
	}
	return c.next.RoundTrip(r)
}

func newCountingClient() (*http.Client, *countingClient) {
	base := NewHTTPClient()
	cc := &countingClient{next: base.Transport}
	return &http.Client{Transport: cc}, cc
}

func readPerm() sas.BlobPermissions { return sas.BlobPermissions{Read: true} }

func farFuture() time.Time { return time.Now().Add(24 * time.Hour) }
