package blob

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/lease"
)

// TestInfiniteLease: storage records an infinite lease; a second writer is
// refused naming it; renewals that storage does not answer for a while do
// not lose it (it cannot lapse), but a break from outside is noticed.
func TestInfiniteLease(t *testing.T) {
	s := newStore(t)
	s.putPage("img", "i.img", randomBytes(1, 1<<20))
	p := startProxy(t, s)
	reported := make(chan error, 1)
	_, w := openWriter(t, s, proxiedURL(p, s, "i.img"), LeaseOptions{Duration: InfiniteLease, RenewEvery: 200 * time.Millisecond,
		OnLost: func(err error) { reported <- err }})
	props, err := s.pageClient("i.img").GetProperties(testCtx(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	if props.LeaseDuration == nil || string(*props.LeaseDuration) != "infinite" {
		t.Fatalf("storage records lease duration %v, want infinite", props.LeaseDuration)
	}
	src2, err := Open(testCtx(t), s.url("img", "i.img"), s.opts())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := NewPageWriter(testCtx(t), src2, WriterOptions{}); !errors.Is(err, ErrLeased) || !strings.Contains(err.Error(), "infinite") {
		t.Fatalf("second writer: %v; want ErrLeased naming the infinite lease", err)
	}

	down := addToxic(t, p, `{"type":"timeout","attributes":{"timeout":0}}`)
	time.Sleep(time.Second) // several renewals go unanswered
	if err := p.Toxics.RemoveToxic(context.Background(), down); err != nil {
		t.Fatal(err)
	}
	if err := w.Lease().Err(); err != nil {
		t.Fatalf("an infinite lease was given up because storage did not answer: %v", err)
	}
	if _, err := w.WriteAt(testCtx(t), randomBytes(2, 4096), 0); err != nil {
		t.Fatalf("write after the outage: %v", err)
	}

	lc, err := lease.NewBlobClient(s.pageClient("i.img"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := lc.BreakLease(testCtx(t), &lease.BlobBreakOptions{BreakPeriod: ptr(int32(0))}); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-reported:
		if !errors.Is(err, ErrLeaseLost) {
			t.Fatalf("reported loss: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the broken infinite lease was not noticed within 10s")
	}
}

// TestLeaseDurationLimits: durations storage would refuse are refused
// before asking it, naming the limits.
func TestLeaseDurationLimits(t *testing.T) {
	s := newStore(t)
	s.putPage("img", "l.img", randomBytes(1, 1<<20))
	src, err := Open(testCtx(t), s.url("img", "l.img"), s.opts())
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []time.Duration{10 * time.Second, 61 * time.Second, 20*time.Second + time.Millisecond, -2} {
		if _, err := NewPageWriter(testCtx(t), src, WriterOptions{Lease: LeaseOptions{Duration: d}}); err == nil || !strings.Contains(err.Error(), "15s..60s") {
			t.Errorf("lease duration %s: %v; want a refusal naming 15s..60s", d, err)
		}
	}
}
