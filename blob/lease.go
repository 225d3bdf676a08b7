package blob

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	azblobblob "github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/bloberror"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/lease"
)

// Lease errors, for errors.Is; the wrapped message says what storage
// reported and what to do.
var (
	// ErrLeased: another writer holds the blob's lease.
	ErrLeased = errors.New("blob is leased by another writer")
	// ErrLeaseLost: this writer's lease expired or was broken; nothing more
	// may be written through it.
	ErrLeaseLost = errors.New("write lease lost")
)

// DefaultLeaseDuration is the lease a writer takes. It is renewed at a
// third of it, so two renewals may fail in a row before it lapses.
const DefaultLeaseDuration = 60 * time.Second

// InfiniteLease, as LeaseOptions.Duration, takes a lease that never lapses
// (storage's -1): a crashed writer then keeps others out until someone
// breaks the lease (az storage blob lease break). It is still renewed
// every RenewEvery (default 20 s), only to notice a break.
const InfiniteLease time.Duration = -1

// infiniteRenewEvery is how often an infinite lease is checked.
const infiniteRenewEvery = 20 * time.Second

// LeaseOptions configures a write lease.
type LeaseOptions struct {
	// Duration of the lease, 15 to 60 s (storage's limits) or
	// InfiniteLease; 0 selects DefaultLeaseDuration.
	Duration time.Duration
	// RenewEvery overrides the renewal interval (default Duration/3).
	RenewEvery time.Duration
	// OnLost, if set, is called once, from the renewal goroutine, when the
	// lease is lost.
	OnLost func(error)
}

// Lease is a renewed, exclusive write lease on one blob. Its ID goes with
// every write; storage refuses writes without it.
type Lease struct {
	lc       *lease.BlobClient
	id       string
	name     string
	duration time.Duration
	onLost   func(error)

	lost    chan struct{} // closed when the lease is lost
	stop    chan struct{} // closed by Release
	renewed chan struct{} // the renewal goroutine has ended

	mu      sync.Mutex
	lostErr error
	stopped bool
}

// acquireLease takes the lease on the blob of c and starts renewing it.
// The lease is taken only while the blob's ETag is ifMatch ("" for any).
func acquireLease(ctx context.Context, c *clients, o LeaseOptions, ifMatch azcore.ETag) (*Lease, error) {
	d := o.Duration
	if d == 0 {
		d = DefaultLeaseDuration
	}
	if d != InfiniteLease && (d < 15*time.Second || d > 60*time.Second || d%time.Second != 0) {
		return nil, fmt.Errorf("lease on %s: duration %s is not whole seconds within storage's 15s..60s (or infinite)", c.loc.redacted(), d)
	}
	every := o.RenewEvery
	switch {
	case every > 0:
	case d == InfiniteLease:
		every = infiniteRenewEvery
	default:
		every = d / 3
	}
	seconds := int32(-1)
	if d != InfiniteLease {
		seconds = int32(d / time.Second)
	}
	id, err := newLeaseID()
	if err != nil {
		return nil, err
	}
	lc, err := lease.NewBlobClient(c.page, &lease.BlobClientOptions{LeaseID: &id})
	if err != nil {
		return nil, fmt.Errorf("lease on %s: %w", c.loc.redacted(), err)
	}
	l := &Lease{lc: lc, id: id, name: c.loc.redacted(), duration: d, onLost: o.OnLost,
		lost: make(chan struct{}), stop: make(chan struct{}), renewed: make(chan struct{})}
	var retries atomic.Int64
	err = retry(ctx, c.opts, &retries, "acquire the lease on "+l.name, func(ctx context.Context) (bool, error) {
		var ao *lease.BlobAcquireOptions
		if ifMatch != "" {
			ao = &lease.BlobAcquireOptions{ModifiedAccessConditions: &lease.ModifiedAccessConditions{IfMatch: &ifMatch}}
		}
		_, err := lc.AcquireLease(ctx, seconds, ao)
		return false, err
	})
	if err != nil {
		var re *azcore.ResponseError
		if errors.As(err, &re) && re.StatusCode == http.StatusConflict {
			return nil, leasedError(ctx, c, l.name)
		}
		if errors.As(err, &re) && re.StatusCode == http.StatusPreconditionFailed {
			return nil, fmt.Errorf("acquire the lease on %s: %w: it changed since it was opened; reopen it", l.name, ErrChanged)
		}
		return nil, describe(err, c.loc, "acquire the lease on")
	}
	go l.renew(c.opts, every)
	return l, nil
}

// leasedError names the lease another writer holds, as storage reports it.
func leasedError(ctx context.Context, c *clients, name string) error {
	props, err := c.blob.GetProperties(ctx, nil)
	if err != nil {
		return fmt.Errorf("acquire the lease on %s: %w; stop the other writer or wait for its lease to lapse", name, ErrLeased)
	}
	state, duration := "unknown", "unknown"
	if props.LeaseState != nil {
		state = string(*props.LeaseState)
	}
	if props.LeaseDuration != nil {
		duration = string(*props.LeaseDuration)
	}
	return fmt.Errorf("acquire the lease on %s: %w (lease state %s, duration %s); stop the other writer or wait for its lease to lapse",
		name, ErrLeased, state, duration)
}

func newLeaseID() (string, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("lease id: %w", err)
	}
	b[6] = b[6]&0x0f | 0x40 // a version 4 UUID, as storage requires
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:]), nil
}

// ID returns the lease id every write must carry.
func (l *Lease) ID() string { return l.id }

// Lost is closed when the lease is lost; Err then says why.
func (l *Lease) Lost() <-chan struct{} { return l.lost }

// Err returns nil while the lease is held, and an error wrapping
// ErrLeaseLost after it was lost.
func (l *Lease) Err() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lostErr
}

// markLost records the loss once and tells whoever listens.
func (l *Lease) markLost(cause error) error {
	l.mu.Lock()
	if l.lostErr != nil {
		err := l.lostErr
		l.mu.Unlock()
		return err
	}
	l.lostErr = fmt.Errorf("%s: %w: %w; the blob may have been changed by someone else: reopen it", l.name, ErrLeaseLost, cause)
	err := l.lostErr
	close(l.lost)
	l.mu.Unlock()
	if l.onLost != nil {
		l.onLost(err)
	}
	return err
}

// renew renews the lease every interval until Release or loss. A transient
// failure is retried within the lease's remaining life; an answer that
// the lease is gone (409, 412) or a lease that lapsed ends it.
func (l *Lease) renew(o Options, every time.Duration) {
	defer close(l.renewed)
	t := time.NewTicker(every)
	defer t.Stop()
	held := time.Now() // when the lease was last known to run for duration
	for {
		select {
		case <-l.stop:
			return
		case <-t.C:
		}
		deadline := held.Add(l.duration)
		if l.duration == InfiniteLease {
			// It cannot lapse: a renewal only asks whether it was broken.
			deadline = time.Now().Add(every)
		}
		ctx, cancel := context.WithDeadline(context.Background(), deadline)
		go func() { // Release cancels a renewal in progress
			select {
			case <-l.stop:
				cancel()
			case <-ctx.Done():
			}
		}()
		start := time.Now()
		var retries atomic.Int64
		err := retry(ctx, o, &retries, "renew the lease on "+l.name, func(ctx context.Context) (bool, error) {
			_, err := l.lc.RenewLease(ctx, nil)
			return false, err
		})
		stopped := l.isStopped()
		cancel()
		if stopped {
			return
		}
		var re *azcore.ResponseError
		if err != nil && l.duration == InfiniteLease && !(errors.As(err, &re) && re.StatusCode < 500) {
			continue // storage did not answer; the lease is still ours
		}
		if err != nil {
			l.markLost(leaseCause(err))
			return
		}
		held = start
	}
}

func (l *Lease) isStopped() bool {
	select {
	case <-l.stop:
		return true
	default:
		return false
	}
}

// leaseCause turns a failed lease operation or write into the reason the
// lease is gone.
func leaseCause(err error) error {
	var re *azcore.ResponseError
	if errors.As(err, &re) {
		return fmt.Errorf("storage answered %d %s", re.StatusCode, re.ErrorCode)
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return errors.New("it could not be renewed before it lapsed")
	}
	return err
}

// isLeaseLoss reports whether a write failed because this writer's lease
// is no longer on the blob.
func isLeaseLoss(err error) bool {
	return bloberror.HasCode(err, bloberror.LeaseIDMismatchWithBlobOperation, bloberror.LeaseNotPresentWithBlobOperation,
		bloberror.LeaseLost, bloberror.LeaseIDMissing)
}

// Release stops renewing and releases the lease so another writer may
// take it at once. It is safe to call more than once.
func (l *Lease) Release(ctx context.Context) error {
	l.mu.Lock()
	if l.stopped {
		l.mu.Unlock()
		return nil
	}
	l.stopped = true
	l.mu.Unlock()
	close(l.stop)
	<-l.renewed
	if l.Err() != nil {
		return nil // nothing to release
	}
	_, err := l.lc.ReleaseLease(ctx, nil)
	if err != nil {
		return fmt.Errorf("release the lease on %s: %w", l.name, leaseCause(err))
	}
	return nil
}

// leaseConditions adds the lease to access conditions.
func leaseConditions(id string, etag *azcore.ETag) *azblobblob.AccessConditions {
	ac := &azblobblob.AccessConditions{LeaseAccessConditions: &azblobblob.LeaseAccessConditions{LeaseID: &id}}
	if etag != nil {
		ac.ModifiedAccessConditions = &azblobblob.ModifiedAccessConditions{IfMatch: etag}
	}
	return ac
}
