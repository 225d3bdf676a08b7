package blob

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"

	"github.com/blobseal/blobseal/internal/secret"
)

// location is a parsed blob URL or local path.
type location struct {
	path string // local file path; empty for a blob

	blobURL   string // full URL including any SAS query (secret when sas is true)
	account   string
	container string
	name      string
	sas       bool   // the URL carries a SAS token
	sasExpiry string // value of the SAS "se" parameter, safe to show
	auth      string // "sas", "token", "shared key" or "anonymous" once a client is built
}

// isFile reports whether the location is a local file.
func (l location) isFile() bool { return l.path != "" }

// redacted is the location without credentials, for logs and errors.
func (l location) redacted() string {
	if l.isFile() {
		return l.path
	}
	base, _, _ := strings.Cut(l.blobURL, "?")
	if l.sas {
		return base + " (SAS)"
	}
	return base
}

const urlForm = "https://ACCOUNT.blob.core.windows.net/CONTAINER/BLOB[?SAS], http://127.0.0.1:10000/devstoreaccount1/CONTAINER/BLOB (Azurite) or a local path"

// parseLocation accepts a blob URL (virtual-host style for Azure, path style
// for Azurite and other loopback/IP endpoints), a file:// URL or a plain path.
func parseLocation(raw string) (location, error) {
	if strings.TrimSpace(raw) == "" {
		return location{}, fmt.Errorf("empty location: want %s", urlForm)
	}
	if strings.ContainsRune(raw, 0) {
		return location{}, errors.New("location contains a NUL byte")
	}
	scheme, _, hasScheme := strings.Cut(raw, "://")
	if !hasScheme {
		return location{path: raw}, nil
	}
	switch strings.ToLower(scheme) {
	case "file":
		u, err := url.Parse(raw)
		if err != nil {
			return location{}, fmt.Errorf("bad file URL: %v", redactErr(err))
		}
		if u.Host != "" && u.Host != "localhost" {
			return location{}, fmt.Errorf("file URL %q names a remote host; use file:///path", stripQuery(raw))
		}
		if u.Path == "" {
			return location{}, errors.New("file URL has no path; use file:///path")
		}
		return location{path: u.Path}, nil
	case "http", "https":
	default:
		return location{}, fmt.Errorf("unsupported URL scheme %q: want %s", scheme, urlForm)
	}
	u, err := url.Parse(raw)
	if err != nil {
		// The error text would repeat the URL, SAS included.
		return location{}, fmt.Errorf("malformed blob URL %s: want %s", stripQuery(raw), urlForm)
	}
	if u.User != nil {
		return location{}, fmt.Errorf("blob URL %s must not contain user info; put a SAS in the query or use a credential", stripQuery(raw))
	}
	host := u.Hostname()
	if host == "" {
		return location{}, fmt.Errorf("blob URL %s has no host: want %s", stripQuery(raw), urlForm)
	}
	loopback := isLoopback(host)
	if strings.EqualFold(u.Scheme, "http") && !loopback {
		return location{}, fmt.Errorf("refusing plain http to %s: credentials and data would cross the network unencrypted; use https", host)
	}
	segs := strings.Split(strings.TrimPrefix(u.Path, "/"), "/")
	var l location
	if net.ParseIP(host) != nil || strings.EqualFold(host, "localhost") {
		// Path style: /ACCOUNT/CONTAINER/BLOB (Azurite, IP endpoints).
		if len(segs) < 3 || segs[0] == "" {
			return location{}, fmt.Errorf("blob URL %s must name an account, a container and a blob: /ACCOUNT/CONTAINER/BLOB", stripQuery(raw))
		}
		l.account, segs = segs[0], segs[1:]
	} else {
		// Virtual-host style: ACCOUNT.blob.core.windows.net/CONTAINER/BLOB.
		acct, rest, ok := strings.Cut(host, ".")
		if !ok || acct == "" || !strings.HasPrefix(strings.ToLower(rest), "blob.") {
			return location{}, fmt.Errorf("blob URL host %q is not a blob endpoint (ACCOUNT.blob.core.windows.net)", host)
		}
		l.account = acct
	}
	if len(segs) < 2 || segs[0] == "" {
		return location{}, fmt.Errorf("blob URL %s must name a container and a blob: %s", stripQuery(raw), urlForm)
	}
	l.container = segs[0]
	l.name = strings.Join(segs[1:], "/")
	if l.name == "" || strings.HasSuffix(l.name, "/") {
		return location{}, fmt.Errorf("blob URL %s names a container or directory, not a blob", stripQuery(raw))
	}
	q := u.Query()
	l.sas = q.Has("sig")
	l.sasExpiry = q.Get("se")
	u.Fragment = ""
	l.blobURL = u.String()
	return l, nil
}

func isLoopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// sharedKey is an account name and key from a connection string or env.
type sharedKey struct {
	account string
	key     secret.Token
}

// parseConnectionString extracts AccountName and AccountKey from an Azure
// storage connection string. It never includes the key in an error.
func parseConnectionString(cs string) (sharedKey, error) {
	var k sharedKey
	for _, part := range strings.Split(cs, ";") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		name, value, ok := strings.Cut(part, "=")
		if !ok {
			return sharedKey{}, errors.New("connection string: each part must be Name=Value separated by ';'")
		}
		switch strings.ToLower(strings.TrimSpace(name)) {
		case "accountname":
			k.account = strings.TrimSpace(value)
		case "accountkey":
			k.key = secret.Token(strings.TrimSpace(value))
		case "sharedaccesssignature":
			return sharedKey{}, errors.New("connection string holds a SAS; put the SAS in the blob URL instead")
		}
	}
	switch {
	case k.account == "" && k.key == "":
		return sharedKey{}, errors.New("connection string has neither AccountName nor AccountKey")
	case k.account == "":
		return sharedKey{}, errors.New("connection string has no AccountName")
	case k.key == "":
		return sharedKey{}, errors.New("connection string has no AccountKey")
	}
	return k, nil
}

// redactErr returns an error text with any URL query removed.
func redactErr(err error) string {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Op + " " + stripQuery(ue.URL) + ": " + redactErr(ue.Err)
	}
	return err.Error()
}

// stripQuery drops the query and fragment of a URL for messages: any query
// parameter may be part of a SAS.
func stripQuery(raw string) string {
	if i := strings.IndexAny(raw, "?#"); i >= 0 {
		return raw[:i]
	}
	return raw
}
