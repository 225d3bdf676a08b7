package demo

import (
	"bytes"
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/blobseal/blobseal/internal/testenv"
)

// TestDemoRuns runs the whole demo with --exit: image, local stack, Azurite,
// key import, sidecar, mount, listing, unmount.
func TestDemoRuns(t *testing.T) {
	testenv.RequireFUSE(t)
	testenv.RequireTools(t, "mkfs.ext4", "azurite-blob")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var out bytes.Buffer
	dir := t.TempDir()
	err := Run(ctx, Options{Data: "../examples/demo-data", CCEPolicy: "../examples/demo-cce-policy.rego", Dir: dir, Exit: true, Out: &out})
	t.Log(out.String())
	if err != nil {
		t.Fatal(err)
	}
	readme, _ := os.ReadFile("../examples/demo-data/README.txt")
	for _, want := range []string{"Azurite on 127.0.0.1", "SKR API (Azure SKR sidecar compatible)", "simulated AMD SEV-SNP", "config/app.yaml", "models/weights-sample.b64", string(readme)} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q", want)
		}
	}
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	if strings.Contains(string(mounts), dir) {
		t.Fatal("demo left its mount behind")
	}
}
