package blob

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	azblobblob "github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blockblob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/container"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/pageblob"

	"github.com/blobseal/blobseal/internal/azcred"
	"github.com/blobseal/blobseal/internal/secret"
)

// Options configure how a blob is reached. The zero value is usable.
type Options struct {
	// Credential is used when the URL carries no SAS (managed or workload
	// identity; see DefaultCredential). It needs an https endpoint.
	Credential azcore.TokenCredential
	// ConnectionString supplies a shared key (Azurite, tooling). When empty,
	// AZURE_STORAGE_CONNECTION_STRING is consulted.
	ConnectionString string
	// AccountKey is a shared key for the URL's account. When empty,
	// AZURE_STORAGE_KEY is consulted.
	AccountKey string

	// RequestTimeout bounds one HTTP request including its body (default 60s).
	RequestTimeout time.Duration
	// MaxRetries is the number of consecutive failed tries without
	// progress before RetrySource gives up (default 8). The context
	// deadline (the block cache's read deadline) always wins.
	MaxRetries int
	// RetryDelay and MaxRetryDelay shape the exponential backoff with jitter
	// (defaults 200ms and 10s).
	RetryDelay, MaxRetryDelay time.Duration
	// HTTPClient replaces the tuned default transport (tests, proxies).
	HTTPClient *http.Client

	// Writable opens local files read-write so the Source implements
	// WriterAt. Page blobs are always writable given a credential that allows it.
	Writable bool
}

// Defaults of Options, exported for the flags that override them.
const (
	DefaultRequestTimeout = 60 * time.Second
	DefaultMaxRetries     = 8
)

func (o Options) withDefaults() Options {
	if o.RequestTimeout <= 0 {
		o.RequestTimeout = DefaultRequestTimeout
	}
	if o.MaxRetries <= 0 {
		o.MaxRetries = DefaultMaxRetries
	}
	if o.RetryDelay <= 0 {
		o.RetryDelay = 200 * time.Millisecond
	}
	if o.MaxRetryDelay <= 0 {
		o.MaxRetryDelay = 10 * time.Second
	}
	if o.MaxRetryDelay < o.RetryDelay {
		o.MaxRetryDelay = o.RetryDelay
	}
	return o
}

// backoff returns the delay before retry number attempt (1-based):
// exponential, capped, with ±25% jitter so parallel readers spread out.
func (o Options) backoff(attempt int) time.Duration {
	d := o.RetryDelay
	for i := 1; i < attempt && d < o.MaxRetryDelay; i++ {
		d *= 2
	}
	if d > o.MaxRetryDelay {
		d = o.MaxRetryDelay
	}
	jitter := 0.75 + rand.Float64()/2
	return time.Duration(float64(d) * jitter)
}

// NewHTTPClient returns the transport blobseal uses for storage: keep-alive
// with a large idle pool so many parallel range reads reuse connections, no
// transparent gzip (image data does not compress), bounded dial and TLS time.
func NewHTTPClient() *http.Client {
	tr := &http.Transport{
		Proxy: http.ProxyFromEnvironment,
		DialContext: (&net.Dialer{
			Timeout:   10 * time.Second,
			KeepAlive: 30 * time.Second,
		}).DialContext,
		MaxIdleConns:          256,
		MaxIdleConnsPerHost:   64,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ExpectContinueTimeout: time.Second,
		DisableCompression:    true,
		ReadBufferSize:        64 << 10,
		WriteBufferSize:       64 << 10,
	}
	return &http.Client{Transport: tr}
}

// Open opens a blob URL or a local path. Credentials: SAS in the URL, else
// opts.Credential (azcore.TokenCredential), else a shared key from
// opts.ConnectionString / opts.AccountKey / AZURE_STORAGE_CONNECTION_STRING /
// AZURE_STORAGE_KEY (for Azurite), else anonymous (public container).
//
// Azure sources detect page or block blob from the blob's properties; page
// blobs also load their written-range map here. They come wrapped in a
// RetrySource, the one retry policy of reads (the SDK's retries are off).
func Open(ctx context.Context, loc string, opts Options) (Source, error) {
	l, err := parseLocation(loc)
	if err != nil {
		return nil, err
	}
	opts = opts.withDefaults()
	if l.isFile() {
		return openFile(l.path, opts.Writable)
	}
	c, err := newClients(l, opts, false)
	if err != nil {
		return nil, err
	}
	var src Source
	var retries atomic.Int64
	err = retry(ctx, opts, &retries, "open "+l.redacted(), func(ctx context.Context) (bool, error) {
		src, err = openAzure(ctx, c)
		return false, err
	})
	if err != nil {
		return nil, err
	}
	return NewRetrySource(src, opts), nil
}

// clients bundles the azblob clients for one blob URL.
type clients struct {
	loc   location
	opts  Options
	blob  *azblobblob.Client
	page  *pageblob.Client
	block *blockblob.Client
	cont  *container.Client

	ownedHTTP *http.Client // created here, so Close may drop its idle connections
}

// newClients builds the clients for l. sdkRetries keeps azcore's own retry
// policy (uploads, which are not Sources); sources use RetrySource instead.
func newClients(l location, opts Options, sdkRetries bool) (*clients, error) {
	hc := opts.HTTPClient
	owned := hc == nil
	if owned {
		hc = NewHTTPClient()
	}
	co := azcore.ClientOptions{
		Transport: hc,
		Retry:     policy.RetryOptions{MaxRetries: -1, TryTimeout: opts.RequestTimeout},
		Telemetry: policy.TelemetryOptions{ApplicationID: "blobseal"},
	}
	if sdkRetries {
		co.Retry = policy.RetryOptions{
			MaxRetries:    int32(opts.MaxRetries),
			TryTimeout:    opts.RequestTimeout,
			RetryDelay:    opts.RetryDelay,
			MaxRetryDelay: opts.MaxRetryDelay,
		}
	}
	c := &clients{loc: l, opts: opts}
	if owned {
		c.ownedHTTP = hc
	}
	var err error
	blobOpts := &azblobblob.ClientOptions{ClientOptions: co}
	pageOpts := &pageblob.ClientOptions{ClientOptions: co}
	blockOpts := &blockblob.ClientOptions{ClientOptions: co}
	contOpts := &container.ClientOptions{ClientOptions: co}
	contURL := containerURL(l)
	key, err := pickSharedKey(l, opts)
	if err != nil {
		return nil, err
	}
	switch {
	case l.sas:
		c.loc.auth = "sas"
		c.blob, err = azblobblob.NewClientWithNoCredential(l.blobURL, blobOpts)
		if err == nil {
			c.page, err = pageblob.NewClientWithNoCredential(l.blobURL, pageOpts)
		}
		if err == nil {
			c.block, err = blockblob.NewClientWithNoCredential(l.blobURL, blockOpts)
		}
		if err == nil {
			c.cont, err = container.NewClientWithNoCredential(contURL, contOpts)
		}
	case opts.Credential != nil:
		c.loc.auth = "token"
		if !strings.HasPrefix(strings.ToLower(l.blobURL), "https://") {
			return nil, fmt.Errorf("%s: an identity token needs an https endpoint; use a SAS or a connection string for http (Azurite)", l.redacted())
		}
		c.blob, err = azblobblob.NewClient(l.blobURL, opts.Credential, blobOpts)
		if err == nil {
			c.page, err = pageblob.NewClient(l.blobURL, opts.Credential, pageOpts)
		}
		if err == nil {
			c.block, err = blockblob.NewClient(l.blobURL, opts.Credential, blockOpts)
		}
		if err == nil {
			c.cont, err = container.NewClient(contURL, opts.Credential, contOpts)
		}
	case key != nil:
		c.loc.auth = "shared key"
		cred, kerr := azblobblob.NewSharedKeyCredential(key.account, key.key.Reveal())
		if kerr != nil {
			return nil, fmt.Errorf("shared key for account %q is not valid base64; check the AccountKey", key.account)
		}
		c.blob, err = azblobblob.NewClientWithSharedKeyCredential(l.blobURL, cred, blobOpts)
		if err == nil {
			c.page, err = pageblob.NewClientWithSharedKeyCredential(l.blobURL, cred, pageOpts)
		}
		if err == nil {
			c.block, err = blockblob.NewClientWithSharedKeyCredential(l.blobURL, cred, blockOpts)
		}
		if err == nil {
			c.cont, err = container.NewClientWithSharedKeyCredential(contURL, cred, contOpts)
		}
	default:
		c.loc.auth = "anonymous"
		c.blob, err = azblobblob.NewClientWithNoCredential(l.blobURL, blobOpts)
		if err == nil {
			c.page, err = pageblob.NewClientWithNoCredential(l.blobURL, pageOpts)
		}
		if err == nil {
			c.block, err = blockblob.NewClientWithNoCredential(l.blobURL, blockOpts)
		}
		if err == nil {
			c.cont, err = container.NewClientWithNoCredential(contURL, contOpts)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("blob client for %s: %s", l.redacted(), errText(err))
	}
	return c, nil
}

// pickSharedKey returns the shared key to use, or nil for none. Explicit
// options that name another account are an error; environment values for
// another account are ignored (they are likely meant for something else).
func pickSharedKey(l location, opts Options) (*sharedKey, error) {
	if opts.ConnectionString != "" {
		k, err := parseConnectionString(opts.ConnectionString)
		if err != nil {
			return nil, err
		}
		if !strings.EqualFold(k.account, l.account) {
			return nil, fmt.Errorf("the connection string is for account %q but the URL names account %q", k.account, l.account)
		}
		return &k, nil
	}
	if opts.AccountKey != "" {
		return &sharedKey{account: l.account, key: secret.Token(opts.AccountKey)}, nil
	}
	if cs := os.Getenv("AZURE_STORAGE_CONNECTION_STRING"); cs != "" {
		k, err := parseConnectionString(cs)
		if err != nil {
			return nil, fmt.Errorf("AZURE_STORAGE_CONNECTION_STRING: %w", err)
		}
		if strings.EqualFold(k.account, l.account) {
			return &k, nil
		}
	}
	if key := os.Getenv("AZURE_STORAGE_KEY"); key != "" {
		acct := os.Getenv("AZURE_STORAGE_ACCOUNT")
		if acct == "" || strings.EqualFold(acct, l.account) {
			return &sharedKey{account: l.account, key: secret.Token(key)}, nil
		}
	}
	return nil, nil
}

// CredentialOptions select the identity DefaultCredential uses.
type CredentialOptions struct {
	// ManagedIdentityClientID picks a user-assigned managed identity.
	ManagedIdentityClientID string
	// AllowCLI adds the Azure CLI login last (tooling on a workstation).
	AllowCLI bool
}

// DefaultCredential returns the storage credential used without a SAS:
// blobseal's one identity chain (internal/azcred: workload identity, then
// managed identity, then optionally the Azure CLI).
func DefaultCredential(o CredentialOptions) (azcore.TokenCredential, error) {
	cred, err := azcred.New(azcred.Options{ManagedIdentityClientID: o.ManagedIdentityClientID, AllowCLI: o.AllowCLI})
	if err != nil {
		return nil, fmt.Errorf("storage credential: %w", err)
	}
	return cred, nil
}

// containerURL is the blob URL without the blob name, keeping any SAS.
func containerURL(l location) string {
	base, query, _ := strings.Cut(l.blobURL, "?")
	if i := strings.Index(base, "/"+l.container+"/"); i >= 0 {
		base = base[:i+1+len(l.container)]
	}
	if query != "" {
		return base + "?" + query
	}
	return base
}
