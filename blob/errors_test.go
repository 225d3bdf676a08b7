package blob

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/sas"
)

// TestActionableErrors provokes real 403/404 answers from Azurite and checks
// that each error says what to fix and never carries the SAS signature.
func TestActionableErrors(t *testing.T) {
	s := newStore(t)
	data := sparseImage(3, 64<<10)
	s.putBlock("img", "private.img", data)
	s.putBlock("pub", "public.img", data)

	cases := []struct {
		name     string
		url      string
		opts     Options
		is       error
		contains []string
	}{
		{"blob not found", s.url("img", "missing.img"), s.opts(), ErrNotFound, []string{"blob not found", "check the container and blob name"}},
		{"container not found", s.url("nocontainer", "x.img"), s.opts(), ErrNotFound, []string{`container "nocontainer" does not exist`}},
		{"expired SAS", s.sas("img", "private.img", readPerm(), time.Now().Add(-time.Minute)), Options{}, ErrAccessDenied, []string{"SAS expired at", "generate a new SAS"}},
		{"SAS without read", s.sas("img", "private.img", sas.BlobPermissions{Write: true}, farFuture()), Options{}, ErrAccessDenied, []string{"lacks the needed permission"}},
		{"private container anonymous", s.url("img", "private.img"), Options{}, ErrAccessDenied, []string{"not public"}},
		{"wrong account key", s.url("img", "private.img"), Options{AccountKey: "d3Jvbmcga2V5IHdyb25nIGtleQ=="}, ErrAccessDenied, []string{"check the account key"}},
		{"connection string for another account", s.url("img", "private.img"), Options{ConnectionString: "AccountName=other;AccountKey=eA=="}, nil, []string{`for account "other"`}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Open(testCtx(t), c.url, c.opts)
			if err == nil {
				t.Fatal("Open succeeded")
			}
			t.Logf("error: %v", err)
			if c.is != nil && !errors.Is(err, c.is) {
				t.Errorf("errors.Is(err, %v) is false", c.is)
			}
			for _, want := range c.contains {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q lacks %q", err, want)
				}
			}
			if strings.Contains(err.Error(), "sig=") || strings.Contains(err.Error(), "AccountKey") {
				t.Errorf("error leaks a credential: %q", err)
			}
		})
	}

	t.Run("public container anonymous works", func(t *testing.T) {
		src, err := Open(testCtx(t), s.url("pub", "public.img"), Options{})
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(data))
		if _, err := src.ReadAt(testCtx(t), got, 0); err != nil || string(got) != string(data) {
			t.Fatalf("read public blob: %v", err)
		}
	})

	t.Run("blob replaced after open", func(t *testing.T) {
		src, err := Open(testCtx(t), s.url("img", "private.img"), s.opts())
		if err != nil {
			t.Fatal(err)
		}
		s.putBlock("img", "private.img", sparseImage(4, 64<<10))
		_, err = src.ReadAt(testCtx(t), make([]byte, 4096), 0)
		if !errors.Is(err, ErrChanged) || !strings.Contains(err.Error(), "reopen") {
			t.Fatalf("read after replace: err = %v, want ErrChanged", err)
		}
	})
}
