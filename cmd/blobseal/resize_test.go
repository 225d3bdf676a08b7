package main

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/blobseal/blobseal/internal/testenv"
)

// smallRWImage builds `image create --read-write --size 32M` of src and
// returns the image and key file paths.
func smallRWImage(t *testing.T, src string) (img, key string) {
	t.Helper()
	testenv.RequireTools(t, "mkfs.ext4", "debugfs")
	dir := t.TempDir()
	key = filepath.Join(dir, "key")
	if err := os.WriteFile(key, random(t, 32), 0o600); err != nil {
		t.Fatal(err)
	}
	img = filepath.Join(dir, "small.img")
	if _, stderr, code := blobseal(t, "image", "create", "--read-write", "--size", "32M", "--from", src, "--key-file", key, img); code != 0 {
		t.Fatalf("image create --read-write --size 32M: exit %d: %s", code, stderr)
	}
	return img, key
}

// writeThroughMount mounts loc read-write, writes n bytes into a new file
// and unmounts; it returns the write's error (the file is removed when
// the write failed, so the image stays clean).
func writeThroughMount(t *testing.T, loc, key, name string, n int) error {
	t.Helper()
	mnt := filepath.Join(t.TempDir(), "mnt")
	proc, _ := startMount(t, "--read-write", "--key-file", key, loc, mnt)
	defer proc.stop(t)
	p := filepath.Join(mnt, name)
	err := os.WriteFile(p, make([]byte, n), 0o644)
	if err != nil {
		if rerr := os.Remove(p); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
			t.Fatal(rerr)
		}
	}
	return err
}

// TestImageResize: through the binary, a read-write image (a local file,
// then a page blob on Azurite) refuses a write larger than its free space
// with ENOSPC through a --read-write mount; `image resize --size 160M`
// grows it; the same write then fits, the old files are intact, and the
// decrypted image (the blob downloaded) passes e2fsck -fn.
func TestImageResize(t *testing.T) {
	az := testenv.StartAzurite(t)
	src := testSource(t)
	const big = 40 << 20
	img, key := smallRWImage(t, src)
	t.Setenv("AZURE_STORAGE_CONNECTION_STRING", az.ConnectionString())
	url := az.Endpoint() + "/rwimages/small.img"
	if _, stderr, code := blobseal(t, "image", "upload", "--type", "page", "--create-container", img, url); code != 0 {
		t.Fatalf("image upload --type page: exit %d: %s", code, stderr)
	}

	for _, loc := range []string{img, url} {
		if err := writeThroughMount(t, loc, key, "big", big); !errors.Is(err, syscall.ENOSPC) {
			t.Fatalf("%s: a %d-byte write before the resize: %v, want ENOSPC", loc, big, err)
		}
		args := []string{"image", "resize", "--size", "160M", "--key-file", key, loc}
		if loc == url {
			args = append(args, "--json")
		}
		stdout, stderr, code := blobseal(t, args...)
		if code != 0 {
			t.Fatalf("image resize %s: exit %d: %s", loc, code, stderr)
		}
		t.Logf("%s", stdout)
		if loc == url {
			var res struct {
				NewBytes      int64 `json:"new_bytes"`
				OldFilesystem int64 `json:"old_filesystem_bytes"`
				NewFilesystem int64 `json:"new_filesystem_bytes"`
			}
			if err := json.Unmarshal([]byte(stdout), &res); err != nil || res.NewBytes != 160<<20 || res.NewFilesystem <= res.OldFilesystem {
				t.Errorf("image resize --json printed %q (%v), want the new sizes", stdout, err)
			}
		} else if !strings.Contains(stdout, "-> 167772160 bytes") {
			t.Errorf("image resize printed %q, want the new size", stdout)
		}
		if err := writeThroughMount(t, loc, key, "big", big); err != nil {
			t.Fatalf("%s: the %d-byte write after the resize: %v", loc, big, err)
		}
		mnt := filepath.Join(t.TempDir(), "mnt")
		proc, _ := startMount(t, "--key-file", key, loc, mnt)
		got, err := os.ReadFile(filepath.Join(mnt, "dir", "sub", "file"))
		if err != nil || string(got) != "nested\n" {
			t.Errorf("an old file after the resize: %q, %v", got, err)
		}
		var st syscall.Statfs_t
		if err := syscall.Statfs(mnt, &st); err != nil {
			t.Fatal(err)
		}
		if total := int64(st.Blocks) * st.Bsize; total < 128<<20 {
			t.Errorf("statfs after the resize: %d bytes, want over 128 MiB (it was 32 MiB)", total)
		}
		proc.stop(t)
		plainOf := img
		if loc == url {
			plainOf = downloadBlob(t, az, url)
		}
		e2fsckClean(t, decryptImage(t, plainOf, key))
	}

	// Refusals name what to do, and change nothing.
	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"image", "resize", "--size", "100M", "--key-file", key, img}, 1, "only grows"},
		{[]string{"image", "resize", "--size", "1000000001", "--key-file", key, img}, 2, "multiple of 4096"},
		{[]string{"image", "resize", "--key-file", key, img}, 2, "--size"},
		{[]string{"image", "resize", "--size", "200M", img}, 2, "one of --key-file or --key-name is required"},
	} {
		_, stderr, code := blobseal(t, c.args...)
		if code != c.code || !strings.Contains(stderr, c.want) {
			t.Errorf("%v: exit %d, stderr %q; want exit %d mentioning %q", c.args, code, stderr, c.code, c.want)
		}
	}
}
