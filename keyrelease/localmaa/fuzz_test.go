package localmaa_test

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/blobseal/blobseal/keyrelease/evidence"
	"github.com/blobseal/blobseal/keyrelease/localmaa"
	"github.com/blobseal/blobseal/keyrelease/maa"
)

// FuzzAttestHandler feeds request bodies to the attest endpoint: whatever
// the input, the answer is a token or a 400 with MAA's error body.
func FuzzAttestHandler(f *testing.F) {
	sim, err := evidence.NewSimulated(evidence.SimulatedConfig{})
	if err != nil {
		f.Fatal(err)
	}
	srv, err := localmaa.New(localmaa.Options{Roots: sim.Roots(), BaseURL: "https://maa.test"})
	if err != nil {
		f.Fatal(err)
	}
	rt := []byte(`{"keys":[]}`)
	ev, err := sim.Get(context.Background(), evidence.ReportData(rt))
	if err != nil {
		f.Fatal(err)
	}
	good, err := maa.EncodeSevSnpVmRequest(ev, rt, "n")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add([]byte(`{"report":"e30"}`))
	f.Add([]byte(`{}`))
	h := srv.Handler()
	f.Fuzz(func(t *testing.T, body []byte) {
		req := httptest.NewRequest(http.MethodPost, "/attest/SevSnpVm?api-version=2022-08-01", bytes.NewReader(body))
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		switch rec.Code {
		case http.StatusOK:
			if !bytes.Contains(rec.Body.Bytes(), []byte(`"token"`)) {
				t.Fatalf("200 without a token: %s", rec.Body.Bytes())
			}
		case http.StatusBadRequest:
			if !bytes.Contains(rec.Body.Bytes(), []byte(`"error"`)) {
				t.Fatalf("400 without an error body: %s", rec.Body.Bytes())
			}
		default:
			t.Fatalf("status %d: %s", rec.Code, rec.Body.Bytes())
		}
	})
}
