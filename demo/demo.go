// Package demo runs blobseal's whole flow on one machine, offline: it builds
// an encrypted image from examples/demo-data, starts the local stack
// (simulated SNP, local attestation and key services over TLS, Azurite when
// installed), imports the key with a release policy bound to the demo's
// host data, and runs the sidecar, which attests, has the key released,
// mounts and publishes the image. Simulated attestation is used because it
// is asked for by name here, and said so in the output.
package demo

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/blobseal/blobseal/image"
	"github.com/blobseal/blobseal/internal/secret"
	"github.com/blobseal/blobseal/keyrelease"
	"github.com/blobseal/blobseal/keyrelease/evidence"
	"github.com/blobseal/blobseal/keyrelease/localstack"
	"github.com/blobseal/blobseal/sidecar"
)

// Options configure a demo run.
type Options struct {
	Data      string // directory packed into the image (default examples/demo-data)
	CCEPolicy string // file whose SHA-256 is the host data (default examples/demo-cce-policy.rego)
	Dir       string // working directory; default a fresh temporary one, removed at the end
	Exit      bool   // stop after printing instead of serving until ctx ends
	Out       io.Writer
	Log       *slog.Logger
}

// Run performs the demo. It returns when ctx ends (or at once with Exit),
// after unmounting and stopping everything it started.
func Run(ctx context.Context, o Options) (err error) {
	if o.Data == "" {
		o.Data = "examples/demo-data"
	}
	if o.CCEPolicy == "" {
		o.CCEPolicy = "examples/demo-cce-policy.rego"
	}
	if o.Out == nil {
		o.Out = os.Stdout
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	for _, p := range []string{o.Data, o.CCEPolicy} {
		if _, err := os.Stat(p); err != nil {
			return fmt.Errorf("%s not found: run the demo from the repository root (or pass --data / --cce-policy): %w", p, err)
		}
	}
	s := &steps{out: o.Out, start: time.Now()}
	dir := o.Dir
	if dir == "" {
		if dir, err = os.MkdirTemp("", "blobseal-demo-"); err != nil {
			return err
		}
		defer os.RemoveAll(dir)
	}

	// 1. The image, with a random 32-byte secret that only the key service keeps.
	s.begin("build the encrypted image from %s", o.Data)
	pass := make(secret.Bytes, 32)
	rand.Read(pass)
	defer pass.Wipe()
	imgPath := filepath.Join(dir, "demo.img")
	res, err := image.Create(ctx, image.CreateOptions{From: o.Data, Out: imgPath, Key: pass, Label: "demo"})
	if err != nil {
		return s.fail(err)
	}
	s.done("%d entries, %d KiB ext4 in LUKS2/AES-256-XTS, %d KiB left out as holes; verity root hash %s…",
		res.Entries, res.FilesystemBytes>>10, res.HoleBytes>>10, res.Verity.RootHash[:16])

	// 2. The local stack.
	s.begin("start the local attestation and key services (TLS, simulated AMD SEV-SNP — for local use only)")
	hostData, err := keyrelease.HostDataFile(o.CCEPolicy)
	if err != nil {
		return s.fail(err)
	}
	st, err := localstack.Start(localstack.Options{SignerDir: dir, Simulated: evidence.SimulatedConfig{HostData: hostData}, Logger: o.Log})
	if err != nil {
		return s.fail(err)
	}
	defer st.Close()
	files, err := st.WriteStackFile(dir)
	if err != nil {
		return s.fail(err)
	}
	s.done("attestation %s, key service %s", st.MAAEndpoint, st.VaultURL)

	// 3. The key, with a release policy bound to the demo's host data.
	s.begin("import the key with a release policy (host data %s…, not debuggable)", hex.EncodeToString(hostData[:])[:16])
	if err := st.ImportOctKey(ctx, "demo-key", pass, hostData); err != nil {
		return s.fail(err)
	}
	pass.Wipe()
	s.done("the secret now exists only in the key service's memory")

	// 4. Storage.
	s.begin("start local blob storage and upload the image")
	store, err := startStorage(ctx, dir, imgPath)
	if err != nil {
		return s.fail(err)
	}
	defer store.close()
	s.done("%s", store.describe)

	// 5. The sidecar flow.
	mountPoint := filepath.Join(dir, "mnt", "demo")
	cfg := &sidecar.Config{
		Health: sidecar.HealthConfig{Address: "127.0.0.1:0"},
		// The same sidecar serves the Azure SKR sidecar's API for the app.
		SKR: sidecar.SKRConfig{Address: "127.0.0.1:0"},
		Attestation: sidecar.Attestation{
			Provider:          "simulated",
			CAFile:            files.CAPEMFile,
			SimulatedDir:      dir,
			SimulatedHostData: hex.EncodeToString(hostData[:]),
		},
		Filesystems: []*sidecar.Filesystem{{
			Name:       "demo",
			MountPoint: mountPoint,
			Source:     store.location,
			// Pinned here, in the configuration the CCE policy measures:
			// the key is released only to a group that reads exactly
			// this image, and every block is verified before use.
			VerityRootHash: res.Verity.RootHash,
			Key: sidecar.Key{Release: &sidecar.Release{
				MAAEndpoint: st.MAAEndpoint, Vault: st.VaultURL, KeyName: "demo-key", BearerTokenFile: files.BearerTokenFile,
			}},
		}},
	}
	if err := cfg.Validate(); err != nil {
		return err
	}
	s.begin("run the sidecar: attest → token → key release → verify the tree → unlock → mount → publish")
	sc := sidecar.New(cfg, o.Log, nil)
	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	runErr := make(chan error, 1)
	go func() { runErr <- sc.Run(runCtx) }()
	defer func() {
		stop()
		if e := <-runErr; e != nil && err == nil {
			err = e
		}
	}()
	if err := waitPublished(ctx, mountPoint, runErr); err != nil {
		return s.fail(err)
	}
	s.done("mounted at %s", mountPoint)

	// 6. Show it.
	fmt.Fprintf(o.Out, "\n%s:\n", mountPoint)
	if err := printTree(o.Out, mountPoint); err != nil {
		return err
	}
	readme, err := os.ReadFile(filepath.Join(mountPoint, "README.txt"))
	if err != nil {
		return err
	}
	fmt.Fprintf(o.Out, "\n--- %s ---\n%s\n", filepath.Join(mountPoint, "README.txt"), readme)
	if addr := sc.HealthAddr(); addr != "" {
		fmt.Fprintf(o.Out, "health: http://%s/readyz   metrics: http://%s/metrics\n", addr, addr)
	}
	if err := showSKR(ctx, o.Out, sc, st.MAAEndpoint); err != nil {
		return err
	}
	if o.Exit {
		fmt.Fprintf(o.Out, "stopping (--exit); total %s\n", time.Since(s.start).Round(time.Millisecond))
		return nil
	}
	fmt.Fprintf(o.Out, "serving; press Ctrl-C to unmount and stop\n")
	select {
	case <-ctx.Done():
	case e := <-runErr:
		runErr <- e
	}
	return nil
}

// steps prints numbered steps with their durations.
type steps struct {
	out   io.Writer
	start time.Time
	n     int
	t     time.Time
}

func (s *steps) begin(format string, args ...any) {
	s.n++
	s.t = time.Now()
	fmt.Fprintf(s.out, "[%d] %s\n", s.n, fmt.Sprintf(format, args...))
}

func (s *steps) done(format string, args ...any) {
	fmt.Fprintf(s.out, "    ok in %s: %s\n", time.Since(s.t).Round(time.Millisecond), fmt.Sprintf(format, args...))
}

func (s *steps) fail(err error) error {
	fmt.Fprintf(s.out, "    failed after %s\n", time.Since(s.t).Round(time.Millisecond))
	return err
}

// waitPublished waits until the mount point shows the tree, or the sidecar fails.
func waitPublished(ctx context.Context, mountPoint string, runErr chan error) error {
	deadline := time.After(2 * time.Minute)
	for {
		if _, err := os.Stat(filepath.Join(mountPoint, "README.txt")); err == nil {
			return nil
		}
		select {
		case e := <-runErr:
			runErr <- e
			if e == nil {
				e = errors.New("sidecar stopped")
			}
			return e
		case <-ctx.Done():
			return ctx.Err()
		case <-deadline:
			return fmt.Errorf("%s did not appear within 2 minutes", mountPoint)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func printTree(w io.Writer, root string) error {
	return filepath.WalkDir(root+"/", func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if rel == "." {
			return nil
		}
		fmt.Fprintf(w, "  %s %8d  %s\n", info.Mode(), info.Size(), rel)
		return nil
	})
}

// showSKR asks the sidecar's SKR API for an attestation token, as an
// application written for Azure's SKR sidecar would.
func showSKR(ctx context.Context, out io.Writer, sc *sidecar.Sidecar, maaEndpoint string) error {
	addr := ""
	for deadline := time.Now().Add(30 * time.Second); addr == ""; addr = sc.SKRAddr() {
		if time.Now().After(deadline) {
			return errors.New("the SKR API did not start")
		}
		time.Sleep(50 * time.Millisecond)
	}
	body := `{"maa_endpoint": "` + strings.TrimPrefix(maaEndpoint, "https://") + `", "runtime_data": "` + base64.StdEncoding.EncodeToString([]byte(`{"app":"demo"}`)) + `"}`
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+addr+"/attest/maa", strings.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("SKR API: %w", err)
	}
	defer resp.Body.Close()
	var r struct{ Token, Error string }
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil || resp.StatusCode != http.StatusOK {
		return fmt.Errorf("SKR API /attest/maa: HTTP %d %s %v", resp.StatusCode, r.Error, err)
	}
	fmt.Fprintf(out, "SKR API (Azure SKR sidecar compatible): http://%s  — POST /attest/maa returned a %d-byte token\n", addr, len(r.Token))
	return nil
}
