package blob

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"syscall"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/bloberror"
)

// Errors callers can test for with errors.Is. The wrapped message names what
// to fix.
var (
	ErrNotFound     = errors.New("blob not found")
	ErrAccessDenied = errors.New("access denied")
	ErrChanged      = errors.New("blob changed while open")
	ErrUnsupported  = errors.New("unsupported blob")
)

// errShortBody marks a response body that ended before the requested length.
var errShortBody = errors.New("response body shorter than requested")

// describe turns an Azure or transport error into one that says what to fix.
// It never includes the SAS or any key.
func describe(err error, l location, op string) error {
	if err == nil {
		return nil
	}
	where := l.redacted()
	var re *azcore.ResponseError
	if errors.As(err, &re) {
		if named := describeInvalidName(re, l, op); named != nil {
			return named
		}
		code := bloberror.Code(re.ErrorCode)
		switch {
		case re.StatusCode == http.StatusNotFound && code == bloberror.ContainerNotFound:
			return fmt.Errorf("%s %s: %w: container %q does not exist in account %q; create it (image upload --create-container does)", op, where, ErrNotFound, l.container, l.account)
		case re.StatusCode == http.StatusNotFound && (code == bloberror.BlobNotFound || code == ""):
			if !l.sas && code == "" {
				// A private container answers anonymous requests with a bare 404.
				return fmt.Errorf("%s %s: %w (or the container is not public: add a SAS to the URL or use a credential)", op, where, ErrNotFound)
			}
			return fmt.Errorf("%s %s: %w: check the container and blob name", op, where, ErrNotFound)
		case re.StatusCode == http.StatusNotFound && code == bloberror.ResourceNotFound:
			return fmt.Errorf("%s %s: %w: the container is not public or the blob does not exist; add a SAS to the URL or use a credential", op, where, ErrNotFound)
		case re.StatusCode == http.StatusConflict && code == "PublicAccessNotPermitted":
			return fmt.Errorf("%s %s: %w: anonymous access is disabled on the storage account; add a SAS to the URL or use an identity", op, where, ErrAccessDenied)
		case re.StatusCode == http.StatusForbidden || re.StatusCode == http.StatusUnauthorized:
			return fmt.Errorf("%s %s: %w: %s", op, where, ErrAccessDenied, accessHint(code, l))
		case re.StatusCode == http.StatusPreconditionFailed:
			return fmt.Errorf("%s %s: %w: its ETag no longer matches; reopen it (the image was replaced)", op, where, ErrChanged)
		case code == bloberror.InvalidBlobType:
			return fmt.Errorf("%s %s: %w: the blob exists with a different type; delete it or choose the matching --type", op, where, ErrUnsupported)
		case re.StatusCode == http.StatusRequestedRangeNotSatisfiable:
			return fmt.Errorf("%s %s: range outside the blob (it may have shrunk): %s", op, where, code)
		default:
			return fmt.Errorf("%s %s: storage answered %d %s", op, where, re.StatusCode, code)
		}
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return fmt.Errorf("%s %s: %w", op, where, err)
	}
	if errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("%s %s: connection refused: is the storage endpoint running and the URL's host and port right? (%s)", op, where, errText(err))
	}
	var dnsErr *net.DNSError
	if errors.As(err, &dnsErr) {
		return fmt.Errorf("%s %s: cannot resolve %s: check the account name in the URL", op, where, dnsErr.Name)
	}
	return fmt.Errorf("%s %s: %s", op, where, errText(err))
}

// attemptError is a failed try described for people (describe) that keeps
// its cause for the retry policy, which classifies it. Its text never
// includes the cause's (which may hold a URL with a SAS).
type attemptError struct {
	described error
	cause     error
}

func (e *attemptError) Error() string   { return e.described.Error() }
func (e *attemptError) Unwrap() []error { return []error{e.described, e.cause} }

// describeAttempt is describe for one try of an operation that RetrySource
// may repeat.
func describeAttempt(err error, l location, op string) error {
	if err == nil {
		return nil
	}
	return &attemptError{described: describe(err, l, op), cause: err}
}

// accessHint explains a 401/403 in terms of what to change.
func accessHint(code bloberror.Code, l location) string {
	if l.sas {
		if l.sasExpiry != "" {
			if t, err := time.Parse(time.RFC3339, l.sasExpiry); err == nil && time.Now().After(t) {
				return fmt.Sprintf("the SAS expired at %s; generate a new SAS", t.UTC().Format(time.RFC3339))
			}
		}
		switch code {
		case bloberror.AuthorizationPermissionMismatch, bloberror.AuthorizationFailure:
			return "the SAS lacks the needed permission (read needs r; upload needs r, c, w); generate a SAS with those permissions"
		case bloberror.AuthenticationFailed:
			return "the SAS was rejected (expired, not yet valid, or signed with another key); generate a new SAS"
		}
		return "SAS expired or lacks permission (" + string(code) + "); generate a new SAS"
	}
	switch l.auth {
	case "anonymous":
		return "the container is not public (or anonymous access is disabled on the account); add a SAS to the URL, or use a managed/workload identity or a connection string"
	case "shared key":
		return "the shared key was rejected; check the account key / connection string (" + string(code) + ")"
	case "token":
		if code == bloberror.AuthorizationPermissionMismatch {
			return "the identity lacks the role Storage Blob Data Reader (read) or Storage Blob Data Contributor (upload) on the container"
		}
		if code == bloberror.AuthenticationFailed || code == bloberror.InvalidAuthenticationInfo {
			return "the identity's token was rejected (expired, wrong tenant or audience); check the managed/workload identity configuration"
		}
		return "the identity lacks Storage Blob Data Reader (" + string(code) + "); check its role assignment on the container"
	}
	return "SAS expired or identity lacks Storage Blob Data Reader (" + string(code) + ")"
}

// errText renders an error without any URL query string (SAS).
func errText(err error) string {
	s := redactErr(err)
	// Transport errors embed the request URL as `Get "http://...?sig=..."`.
	if i := strings.Index(s, "?"); i >= 0 {
		if j := strings.IndexAny(s[i:], "\" "); j >= 0 {
			s = s[:i] + s[i+j:]
		} else {
			s = s[:i]
		}
	}
	return s
}

// retryable reports whether a failed attempt may succeed when repeated.
func retryable(err error) bool {
	if err == nil {
		return false
	}
	var re *azcore.ResponseError
	if errors.As(err, &re) {
		switch re.StatusCode {
		case http.StatusRequestTimeout, http.StatusTooManyRequests:
			return true
		}
		return re.StatusCode >= 500
	}
	if errors.Is(err, errShortBody) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
		return true
	}
	if errors.Is(err, context.Canceled) {
		// Either the caller's context (checked separately) or a per-try timeout.
		return true
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	var ne net.Error
	if errors.As(err, &ne) {
		return true
	}
	if errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNABORTED) {
		return true
	}
	// net/http reports some connection failures only as text.
	s := err.Error()
	for _, t := range []string{"connection reset", "broken pipe", "server closed idle connection", "EOF", "transport connection broken", "unexpected EOF"} {
		if strings.Contains(s, t) {
			return true
		}
	}
	return false
}
