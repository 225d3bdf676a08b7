package testenv

import (
	"net/http"
	"testing"
)

func TestAzuriteStartsAndAnswers(t *testing.T) {
	a := StartAzurite(t)
	resp, err := http.Get(a.Endpoint() + "?comp=list")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	// Unauthenticated list is refused, which proves a storage server answered.
	if resp.StatusCode != http.StatusForbidden && resp.StatusCode != http.StatusUnauthorized && resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("unexpected status %d from Azurite", resp.StatusCode)
	}
	a.Stop()
	if err := a.Start(); err != nil {
		t.Fatalf("restart: %v", err)
	}
	if _, err := http.Get(a.Endpoint() + "?comp=list"); err != nil {
		t.Fatalf("after restart: %v", err)
	}
}
