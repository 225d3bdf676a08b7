package blob

import (
	"net/http"
	"testing"
	"time"
)

// FuzzRetryAfter: whatever a server puts in its throttling headers, the
// wait stays within [0, maxRetryAfter].
func FuzzRetryAfter(f *testing.F) {
	f.Add("120", "")
	f.Add("", "250")
	f.Add("Wed, 21 Oct 2015 07:28:00 GMT", "")
	f.Add("-1", "-1")
	f.Add("99999999999999999999", "99999999999999999999")
	f.Fuzz(func(t *testing.T, retryAfterHeader, ms string) {
		h := http.Header{}
		if retryAfterHeader != "" {
			h.Set("Retry-After", retryAfterHeader)
		}
		if ms != "" {
			h.Set("x-ms-retry-after-ms", ms)
		}
		d := retryAfter(responseError(http.StatusServiceUnavailable, h))
		if d < 0 || d > maxRetryAfter {
			t.Fatalf("retryAfter(Retry-After %q, x-ms-retry-after-ms %q) = %v, outside [0, %v]", retryAfterHeader, ms, d, time.Duration(maxRetryAfter))
		}
	})
}
