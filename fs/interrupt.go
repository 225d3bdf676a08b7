package fs

import (
	"context"
	"errors"
	"time"
)

// errInterrupted ends a read the kernel interrupted once its grace is over.
var errInterrupted = errors.New("read interrupted")

// readContext returns the context a read passes down to storage: it keeps
// the request's values but outlives its cancellation (an INTERRUPT from the
// kernel) by the interrupt grace, so that a signal the reader handles and
// goes on from does not fail the read (see DefaultInterruptGrace). Other
// readers waiting for the same fetch keep waiting: the block cache cancels
// a fetch only when every reader waiting for it has given up.
func (v *volume) readContext(req context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancelCause(context.WithoutCancel(req))
	grace := v.interruptGrace
	stop := context.AfterFunc(req, func() {
		t := time.NewTimer(grace)
		defer t.Stop()
		select {
		case <-t.C:
			cancel(errInterrupted)
		case <-ctx.Done(): // the read ended within the grace
		}
	})
	return ctx, func() {
		stop()
		cancel(context.Canceled)
	}
}

// interrupted reports whether a read failed because the kernel interrupted
// it and its grace ran out.
func interrupted(req, read context.Context) bool {
	return req.Err() != nil && errors.Is(context.Cause(read), errInterrupted)
}
