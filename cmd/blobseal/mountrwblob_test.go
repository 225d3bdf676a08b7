package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/lease"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/pageblob"
	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/blobseal/blobseal/blob"
	"github.com/blobseal/blobseal/internal/fusetest"
	"github.com/blobseal/blobseal/internal/testenv"
)

// rwBlob builds `image create --read-write` of src, uploads it with
// `image upload --type page` to Azurite (whose connection string the
// environment then carries for the mounts) and returns the blob URL and
// key file.
func rwBlob(t *testing.T, az *testenv.Azurite, src, name string) (url, key string) {
	t.Helper()
	img, key := rwImage(t, src)
	t.Setenv("AZURE_STORAGE_CONNECTION_STRING", az.ConnectionString())
	url = az.Endpoint() + "/rwimages/" + name
	if _, stderr, code := blobseal(t, "image", "upload", "--type", "page", "--create-container", img, url); code != 0 {
		t.Fatalf("image upload --type page: exit %d: %s", code, stderr)
	}
	return url, key
}

// downloadBlob copies the blob's bytes (ciphertext) to a local file.
func downloadBlob(t *testing.T, az *testenv.Azurite, url string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	src, err := blob.Open(ctx, url, blob.Options{ConnectionString: az.ConnectionString()})
	if err != nil {
		t.Fatal(err)
	}
	raw := make([]byte, src.Size())
	if _, err := src.ReadAt(ctx, raw, 0); err != nil {
		t.Fatalf("download %s: %v", url, err)
	}
	p := filepath.Join(t.TempDir(), "downloaded.img")
	if err := os.WriteFile(p, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// breakLease breaks the blob's lease from outside, as another party
// (an operator, a second host taking over) would.
func breakLease(t *testing.T, az *testenv.Azurite, url string) {
	t.Helper()
	name := url[strings.LastIndex(url, "/")+1:]
	pb, err := pageblob.NewClientFromConnectionString(az.ConnectionString(), "rwimages", name, nil)
	if err != nil {
		t.Fatal(err)
	}
	lc, err := lease.NewBlobClient(pb, nil)
	if err != nil {
		t.Fatal(err)
	}
	zero := int32(0)
	if _, err := lc.BreakLease(t.Context(), &lease.BlobBreakOptions{BreakPeriod: &zero}); err != nil {
		t.Fatalf("break the lease: %v", err)
	}
}

// TestMountReadWriteBlob: a page blob mounted read-write by the binary
// takes changes; a second read-write mount is refused naming the lease;
// after SIGTERM a fresh, cold mount shows the same tree, and the
// downloaded, decrypted blob passes e2fsck -fn.
func TestMountReadWriteBlob(t *testing.T) {
	az := testenv.StartAzurite(t)
	src := testSource(t)
	url, key := rwBlob(t, az, src, "tree.img")
	ref := copyTree(t, src)
	changeTree(t, ref)
	mnt := filepath.Join(t.TempDir(), "mnt")
	cmp := fusetest.Compare{Xattrs: true, Ignore: []string{"lost+found"}}

	proc, _ := startMount(t, "--read-write", "--key-file", key, url, mnt)
	changeTree(t, mnt)
	fusetest.CompareTrees(t, ref, mnt, cmp)

	_, stderr, code := blobseal(t, "mount", "--read-write", "--key-file", key, url, filepath.Join(t.TempDir(), "mnt2"))
	if code == 0 || !strings.Contains(stderr, "lease") {
		t.Errorf("second read-write mount: exit %d, stderr %q; want a refusal naming the lease", code, stderr)
	}

	proc.stop(t)
	if !strings.Contains(proc.stderr.String(), "flushed and clean") {
		t.Errorf("no flush log line:\n%s", proc.stderr)
	}
	// Cold: a new process, a new cache, the lease released by the first.
	proc, _ = startMount(t, "--read-write", "--key-file", key, url, mnt)
	fusetest.CompareTrees(t, ref, mnt, cmp)
	proc.stop(t)

	e2fsckClean(t, decryptImage(t, downloadBlob(t, az, url), key))
}

// TestMountReadWriteBlobLeaseBroken: when the lease is broken from outside,
// the mount logs it and turns read-only: writes get EROFS, reads go on.
func TestMountReadWriteBlobLeaseBroken(t *testing.T) {
	az := testenv.StartAzurite(t)
	src := testSource(t)
	url, key := rwBlob(t, az, src, "broken.img")
	mnt := filepath.Join(t.TempDir(), "mnt")
	proc, _ := startMount(t, "--read-write", "--lease-duration", "15s", "--key-file", key, url, mnt)
	if err := os.WriteFile(filepath.Join(mnt, "before"), []byte("stored"), 0o644); err != nil {
		t.Fatal(err)
	}
	breakLease(t, az, url)

	// The renewal (every 5 s for a 15 s lease) sees the loss.
	deadline := time.Now().Add(20 * time.Second)
	var err error
	for i := 0; time.Now().Before(deadline); i++ {
		err = os.WriteFile(filepath.Join(mnt, fmt.Sprintf("after%d", i)), []byte("must not be stored"), 0o644)
		if errors.Is(err, syscall.EROFS) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if !errors.Is(err, syscall.EROFS) {
		t.Fatalf("write after the lease was broken: %v; want EROFS", err)
	}
	if got, err := os.ReadFile(filepath.Join(mnt, "big")); err != nil || len(got) != 3<<20+5 {
		t.Errorf("read after the lease was lost: %d bytes, %v", len(got), err)
	}
	if err := syscall.Mkdir(filepath.Join(mnt, "newdir"), 0o755); !errors.Is(err, syscall.EROFS) {
		t.Errorf("mkdir after the lease was lost: %v; want EROFS", err)
	}
	// Unmounting cannot flush any more; the process says so and exits.
	_ = proc.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-proc.done:
	case <-time.After(30 * time.Second):
		t.Fatalf("mount did not exit after SIGTERM")
	}
	if !strings.Contains(proc.stderr.String(), "write lease lost") { // read once the process is gone
		t.Errorf("no log line about the lost lease:\n%s", proc.stderr)
	}
}

// TestMountReadWriteBlobCrash: kill -9 of the mount during a workload
// with fsyncs; once the lease is broken a new mount replays the journal,
// every fsynced file is intact, and the downloaded, decrypted blob passes
// e2fsck -fn.
func TestMountReadWriteBlobCrash(t *testing.T) {
	az := testenv.StartAzurite(t)
	url, key := rwBlob(t, az, t.TempDir(), "crash.img")
	mnt := filepath.Join(t.TempDir(), "mnt")
	proc, _ := startMount(t, "--read-write", "--lease-duration", "15s", "--key-file", key, url, mnt)

	content := func(i int) []byte { return bytes.Repeat([]byte(fmt.Sprintf("file %d;", i)), 200+i%300) }
	synced := 0 // files 0..synced-1 were fsynced
	for i := 0; synced < 40; i++ {
		f, err := os.Create(filepath.Join(mnt, fmt.Sprintf("f%04d", i)))
		if err != nil {
			t.Fatal(err)
		}
		_, err = f.Write(content(i))
		if err == nil && i%2 == 0 { // every other file is fsynced
			err = f.Sync()
		}
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		if i%2 == 0 {
			synced = i + 1
		}
	}
	// Unsynced writes in flight at the kill.
	f, err := os.Create(filepath.Join(mnt, "unsynced"))
	if err != nil {
		t.Fatal(err)
	}
	f.Write(bytes.Repeat([]byte("x"), 1<<20))
	f.Close()
	if err := proc.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-proc.done
	// The dead mount stays in the table until it is detached.
	if out, err := exec.Command(testenv.RequireTools(t, "fusermount3")[0], "-u", "-z", mnt).CombinedOutput(); err != nil {
		t.Logf("fusermount3 -u -z: %v: %s", err, out)
	}

	// The dead mount's lease still holds: a new mount is refused until it
	// is broken (or lapses).
	_, stderr, code := blobseal(t, "mount", "--read-write", "--key-file", key, url, filepath.Join(t.TempDir(), "mnt2"))
	if code == 0 || !strings.Contains(stderr, "lease") {
		t.Errorf("mount while the crashed mount's lease holds: exit %d, %q; want a refusal naming the lease", code, stderr)
	}
	breakLease(t, az, url)
	proc, _ = startMount(t, "--read-write", "--key-file", key, url, mnt)
	for i := 0; i < synced; i += 2 {
		got, err := os.ReadFile(filepath.Join(mnt, fmt.Sprintf("f%04d", i)))
		if err != nil || !bytes.Equal(got, content(i)) {
			t.Errorf("fsynced file f%04d: %d bytes, %v", i, len(got), err)
		}
	}
	proc.stop(t)
	if !strings.Contains(proc.stderr.String(), "replayed the journal") { // read once the process is gone
		t.Errorf("the remount did not replay a journal:\n%s", proc.stderr)
	}
	e2fsckClean(t, decryptImage(t, downloadBlob(t, az, url), key))
}

// TestMountReadWriteBlobOutage: with storage stalled (toxiproxy in front of
// Azurite), fsync fails with EIO within --flush-timeout while reads of
// cached data go on; once storage answers, a later fsync succeeds, and a
// cold remount finds everything that was acknowledged.
func TestMountReadWriteBlobOutage(t *testing.T) {
	az := testenv.StartAzurite(t)
	src := testSource(t)
	url, key := rwBlob(t, az, src, "outage.img")
	proxy := toxiproxy.NewProxy(toxiproxy.NewServer(toxiproxy.NewMetricsContainer(prometheus.NewRegistry()), zerolog.Nop()),
		"azurite", "127.0.0.1:0", "127.0.0.1:"+strconv.Itoa(az.Port))
	if err := proxy.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(proxy.Stop)
	proxied := strings.Replace(url, "127.0.0.1:"+strconv.Itoa(az.Port), proxy.Listen, 1)
	const flushTimeout = 2 * time.Second
	mnt := filepath.Join(t.TempDir(), "mnt")
	proc, _ := startMount(t, "--read-write", "--flush-timeout", flushTimeout.String(), "--request-timeout", "500ms",
		"--key-file", key, proxied, mnt)

	writeSynced := func(name string, data []byte) error {
		f, err := os.Create(filepath.Join(mnt, name))
		if err != nil {
			return err
		}
		defer f.Close()
		if _, err := f.Write(data); err != nil {
			return err
		}
		return f.Sync()
	}
	before := random(t, 1<<20)
	if err := writeSynced("before", before); err != nil {
		t.Fatalf("fsync with storage up: %v", err)
	}
	big, err := os.ReadFile(filepath.Join(mnt, "big")) // now cached
	if err != nil {
		t.Fatal(err)
	}

	stall, err := proxy.Toxics.AddToxicJson(strings.NewReader(`{"type":"timeout","attributes":{"timeout":0}}`))
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	err = writeSynced("during", random(t, 256<<10))
	took := time.Since(start)
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("fsync with storage stalled: %v after %v; want EIO", err, took)
	}
	if took > 3*flushTimeout {
		t.Errorf("fsync failed after %v; the flush timeout is %v", took, flushTimeout)
	}
	t.Logf("fsync failed with EIO after %v", took.Round(time.Millisecond))
	if got, err := os.ReadFile(filepath.Join(mnt, "big")); err != nil || !bytes.Equal(got, big) {
		t.Errorf("read of cached data during the outage: %d bytes, %v", len(got), err)
	}

	if err := proxy.Toxics.RemoveToxic(t.Context(), stall.Name); err != nil {
		t.Fatal(err)
	}
	after := random(t, 1<<20)
	if err := writeSynced("after", after); err != nil {
		t.Fatalf("fsync once storage answers again: %v", err)
	}
	proc.stop(t)

	proc, _ = startMount(t, "--key-file", key, url, mnt) // read-only, cold, straight to Azurite
	for name, want := range map[string][]byte{"before": before, "after": after, "big": big} {
		if got, err := os.ReadFile(filepath.Join(mnt, name)); err != nil || !bytes.Equal(got, want) {
			t.Errorf("%s after the outage: %d bytes, %v", name, len(got), err)
		}
	}
	proc.stop(t)
	e2fsckClean(t, decryptImage(t, downloadBlob(t, az, url), key))
}

// TestMountReadWriteBlobDirtyMemoryOutage: a mount with --dirty-memory 4Mi
// and --lease-duration infinite (the blob shows an infinite lease), its
// storage stalled: writes fill the 4 MiB until one fails with EIO within
// --flush-timeout, and fsync fails with EIO; once storage answers, the
// same mount takes the data again, more writes and fsyncs, without a
// remount; after unmount the downloaded, decrypted blob is e2fsck -fn clean
// and a cold mount reads every fsynced byte.
func TestMountReadWriteBlobDirtyMemoryOutage(t *testing.T) {
	az := testenv.StartAzurite(t)
	url, key := rwBlob(t, az, t.TempDir(), "dirty.img")
	proxy := toxiproxy.NewProxy(toxiproxy.NewServer(toxiproxy.NewMetricsContainer(prometheus.NewRegistry()), zerolog.Nop()),
		"azurite", "127.0.0.1:0", "127.0.0.1:"+strconv.Itoa(az.Port))
	if err := proxy.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(proxy.Stop)
	proxied := strings.Replace(url, "127.0.0.1:"+strconv.Itoa(az.Port), proxy.Listen, 1)
	const flushTimeout = 2 * time.Second
	mnt := filepath.Join(t.TempDir(), "mnt")
	proc, _ := startMount(t, "--read-write", "--dirty-memory", "4Mi", "--lease-duration", "infinite",
		"--flush-timeout", flushTimeout.String(), "--request-timeout", "500ms", "--key-file", key, proxied, mnt)

	pb, err := pageblob.NewClientFromConnectionString(az.ConnectionString(), "rwimages", "dirty.img", nil)
	if err != nil {
		t.Fatal(err)
	}
	props, err := pb.GetProperties(t.Context(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if props.LeaseDuration == nil || *props.LeaseDuration != lease.DurationTypeInfinite {
		t.Errorf("lease duration of the mounted blob: %v, want infinite", props.LeaseDuration)
	}

	// Written before the outage, so the allocator's metadata is in memory:
	// during the outage only the write-back path is stalled, not reads.
	before := random(t, 1<<20)
	if err := os.WriteFile(filepath.Join(mnt, "before"), before, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(filepath.Join(mnt, "during"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	stall, err := proxy.Toxics.AddToxicJson(strings.NewReader(`{"type":"timeout","attributes":{"timeout":0}}`))
	if err != nil {
		t.Fatal(err)
	}
	// Writes past the dirty bound wait for storage, then fail with EIO
	// (the mount's own write cache may take them first: then the fsync
	// reports it); the fsync during the outage fails with EIO either way.
	const chunk = 1 << 20
	var failed error
	for i := range 16 { // four times the dirty memory
		start := time.Now()
		if _, failed = f.WriteAt(random(t, chunk), int64(i)*chunk); failed != nil {
			if took := time.Since(start); took > 4*flushTimeout {
				t.Errorf("the write failed after %v; the flush timeout is %v", took, flushTimeout)
			}
			t.Logf("write at %d MiB failed: %v", i, failed)
			break
		}
	}
	if failed != nil && !errors.Is(failed, syscall.EIO) {
		t.Fatalf("write with storage stalled: %v; want EIO", failed)
	}
	if err := f.Sync(); !errors.Is(err, syscall.EIO) {
		t.Fatalf("fsync with storage stalled: %v; want EIO", err)
	}
	if err := proxy.Toxics.RemoveToxic(t.Context(), stall.Name); err != nil {
		t.Fatal(err)
	}

	// Storage is back: the same mount goes on. What the outage refused is
	// written again, as an application does after EIO, and more.
	want := random(t, 16*chunk)
	if _, err := f.WriteAt(want, 0); err != nil {
		t.Fatalf("write once storage is back: %v", err)
	}
	if err := f.Sync(); err != nil {
		t.Fatalf("fsync once storage is back: %v", err)
	}
	more := random(t, 3*chunk)
	if _, err := f.WriteAt(more, int64(len(want))); err != nil {
		t.Fatalf("write after the outage: %v", err)
	}
	want = append(want, more...)
	if err := f.Sync(); err != nil {
		t.Fatalf("fsync after the outage: %v", err)
	}
	f.Close()
	proc.stop(t)

	e2fsckClean(t, decryptImage(t, downloadBlob(t, az, url), key))
	proc, _ = startMount(t, "--key-file", key, url, mnt) // read-only, cold, straight to Azurite
	for name, want := range map[string][]byte{"before": before, "during": want} {
		if got, err := os.ReadFile(filepath.Join(mnt, name)); err != nil || !bytes.Equal(got, want) {
			t.Errorf("%s after the outage: %d bytes, %v; want the %d written", name, len(got), err, len(want))
		}
	}
	proc.stop(t)
}
