package main

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/go-jose/go-jose/v4"

	"github.com/blobseal/blobseal/internal/secret"
	"github.com/blobseal/blobseal/keyrelease"
	"github.com/blobseal/blobseal/keyrelease/maa"
)

// TestSkrCommand runs `blobseal skr` against the local stack and talks to
// it as an application written for Azure's SKR sidecar would.
func TestSkrCommand(t *testing.T) {
	dev := startDevStack(t)
	st, err := readDevStack(dev)
	if err != nil {
		t.Fatal(err)
	}
	bearer, err := keyrelease.ReadBearerFile(st.BearerTokenFile)
	if err != nil {
		t.Fatal(err)
	}
	work := t.TempDir()
	hostData := strings.Repeat("0", 64) // what the simulated reports carry
	keys := map[string][]byte{}
	for _, name := range []string{"app-key", "other-key"} {
		key := make([]byte, 32)
		rand.Read(key)
		keyFile := filepath.Join(work, name)
		os.WriteFile(keyFile, key, 0o600)
		if _, stderr, code := blobseal(t, "key", "import", "--dev-dir", dev, "--key-name", name, "--key-file", keyFile, "--host-data", hostData); code != 0 {
			t.Fatalf("key import %s: exit %d\n%s", name, code, stderr)
		}
		keys[name] = key
	}

	// The Azure sidecar's own configuration (Microsoft's Kafka sample) is
	// read as that sidecar reads it.
	p := startLogged(t, []string{"SkrSideCarArgs=" + kafkaSampleSkrArgs}, "skr", "--address", "127.0.0.1:0",
		"--allowed-key", "app-key", "--allowed-key", "elsewhere.example/other-key",
		"--attestation", "simulated", "--simulated-dir", filepath.Dir(st.SimulatedSignerFile), "--ca-file", st.CAPEMFile)
	base := "http://" + p.await(t, skrServing)[1]

	call := func(method, path, body string) (int, map[string]string) {
		t.Helper()
		req, err := http.NewRequestWithContext(t.Context(), method, base+path, strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		raw, _ := io.ReadAll(resp.Body)
		var out map[string]string
		if err := json.Unmarshal(raw, &out); err != nil {
			t.Fatalf("%s %s: %d, body not a JSON object of strings: %s", method, path, resp.StatusCode, raw)
		}
		return resp.StatusCode, out
	}
	if code, out := call("GET", "/status", ""); code != 200 || out["message"] != "Status OK" {
		t.Fatalf("GET /status: %d %v", code, out)
	}

	// /attest/maa: a token from the local MAA, bound to our runtime data.
	runtimeData := []byte(`{"app":"skr command test"}`)
	code, out := call("POST", "/attest/maa", `{"maa_endpoint":"`+st.MAAEndpoint+`","runtime_data":"`+base64.StdEncoding.EncodeToString(runtimeData)+`"}`)
	if code != 200 || out["token"] == "" {
		t.Fatalf("POST /attest/maa: %d %v", code, out)
	}
	roots, err := keyrelease.TLSRoots(st.CAPEMFile)
	if err != nil {
		t.Fatal(err)
	}
	v, err := maa.NewVerifier(maa.VerifierOptions{AllowedIssuers: []string{st.MAAEndpoint}, HTTPClient: keyrelease.HTTPClient(roots)})
	if err != nil {
		t.Fatal(err)
	}
	token := out["token"]
	claims, err := v.Verify(t.Context(), secret.Token(token))
	if err != nil {
		t.Fatalf("the token does not verify: %v", err)
	}
	sum := sha256.Sum256(runtimeData)
	if !strings.HasPrefix(claims.ReportData, hex.EncodeToString(sum[:])) || claims.HostData != hostData {
		t.Fatalf("token claims: report data %s, host data %s", claims.ReportData, claims.HostData)
	}

	// /key/release: the allowed key comes back as a JWK holding its bytes.
	release := func(kid string) (int, map[string]string) {
		return call("POST", "/key/release", `{"maa_endpoint":"`+st.MAAEndpoint+`","akv_endpoint":"`+st.VaultURL+`","kid":"`+kid+`","access_token":"`+bearer.Reveal()+`"}`)
	}
	code, out = release("app-key")
	if code != 200 {
		t.Fatalf("POST /key/release app-key: %d %v", code, out)
	}
	var jwk jose.JSONWebKey
	if err := jwk.UnmarshalJSON([]byte(out["key"])); err != nil {
		t.Fatalf("released key is not a JWK: %v", err)
	}
	if k, ok := jwk.Key.([]byte); !ok || !bytes.Equal(k, keys["app-key"]) || !strings.Contains(jwk.KeyID, "/keys/app-key/") {
		t.Fatalf("released JWK %q does not hold app-key's bytes", jwk.KeyID)
	}
	// other-key is allowed only on another vault: refused before any release.
	if code, out = release("other-key"); code != http.StatusForbidden || !strings.Contains(out["error"], "allowed keys") {
		t.Fatalf("POST /key/release other-key: %d %v, want 403", code, out)
	}
	if code := p.stop(t); code != 0 {
		t.Fatalf("exit %d after SIGTERM; log:\n%s", code, p)
	}
	// stdout names the bound address, for scripts that ask for port 0.
	if got := p.out.String(); got != "serving the SKR API on "+base+"\n" {
		t.Fatalf("stdout %q", got)
	}
	if log := p.String(); strings.Contains(log, bearer.Reveal()) || strings.Contains(log, token) {
		t.Fatal("the log shows a credential")
	}
}

// kafkaSampleSkrArgs is SkrSideCarArgs of Microsoft's confidential AKS Kafka
// sample (mcr.microsoft.com/aci/skr:2.7), verbatim: a LocalTHIM certcache.
const kafkaSampleSkrArgs = "ewogICAgImNlcnRjYWNoZSI6IHsKCQkiZW5kcG9pbnRfdHlwZSI6ICJMb2NhbFRISU0iLAoJCSJlbmRwb2ludCI6ICIxNjkuMjU0LjE2OS4yNTQvbWV0YWRhdGEvVEhJTS9hbWQvY2VydGlmaWNhdGlvbiIKCX0gIAp9"

// Bad configuration is a usage error naming what to fix.
func TestSkrCommandUsage(t *testing.T) {
	cases := []struct {
		env  string
		args []string
		want string
	}{
		{"%%%", nil, "SkrSideCarArgs is not base64"},
		{"", []string{"--cert-cache-kind", "Other", "--cert-cache-url", "https://c.example"}, "--cert-cache-kind is \"Other\""},
		{"", []string{"--cert-cache-kind", "AMD"}, "--cert-cache-kind needs --cert-cache-url"},
		{"", []string{"--simulated-dir", "d"}, "--attestation simulated"},
		{"", []string{"--log-level", "loud"}, "log level"},
	}
	for _, c := range cases {
		cmd := exec.Command(binary, append([]string{"skr"}, c.args...)...)
		cmd.Env = append(os.Environ(), "SkrSideCarArgs="+c.env)
		out, err := cmd.CombinedOutput()
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() != 2 || !strings.Contains(string(out), c.want) {
			t.Errorf("%v: %v, want exit 2 with %q:\n%s", c.args, err, c.want, out)
		}
	}
}
