package blob

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/streaming"
	azblobblob "github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/pageblob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/sas"
)

// nonZeroBytes counts the bytes in non-zero 512-byte pages.
func nonZeroBytes(b []byte) int64 {
	data, _ := pageRuns(b, 0)
	var n int64
	for _, r := range data {
		n += r.Len
	}
	return n
}

func writtenBytes(t *testing.T, src Source) int64 {
	t.Helper()
	rs, err := src.(RangeLister).WrittenRanges(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	var n int64
	for _, r := range rs {
		n += r.Len
	}
	return n
}

func readBlob(t *testing.T, s *store, loc string) (Source, []byte) {
	t.Helper()
	src, err := Open(testCtx(t), loc, s.opts())
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, src.Size())
	if _, err := src.ReadAt(testCtx(t), got, 0); err != nil {
		t.Fatal(err)
	}
	return src, got
}

// progressRecorder keeps the last progress report and checks monotonicity.
type progressRecorder struct {
	mu          sync.Mutex
	done, total int64
	calls       int
	backwards   bool
}

func (p *progressRecorder) fn(done, total int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if done < p.done {
		p.backwards = true
	}
	p.done, p.total = done, total
	p.calls++
}

func TestUploadPageSparseAndConverging(t *testing.T) {
	s := newStore(t)
	const mib = 1 << 20
	img := make([]byte, 16*mib)
	copy(img[100*PageSize:], bytes.Repeat([]byte("ext4"), 1000)) // superblock-ish
	copy(img[5*mib:], sparseImage(11, mib))
	copy(img[12*mib+3*PageSize:], bytes.Repeat([]byte{0xFF}, 700*PageSize))
	path := filepath.Join(t.TempDir(), "disk.img")
	writeSparse(t, path, img)
	loc := s.url("img", "up.img")

	var prog progressRecorder
	res, err := Upload(testCtx(t), path, loc, UploadOptions{Options: s.opts(), Type: "page", Concurrency: 4, Verify: true, Progress: prog.fn})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("first upload: %+v", res)
	if want := nonZeroBytes(img); res.Uploaded != want {
		t.Fatalf("uploaded %d bytes, want exactly the %d non-zero page bytes of a %d-byte image", res.Uploaded, want, len(img))
	}
	if !res.Verified || res.ETag == "" || res.Cleared != 0 {
		t.Fatalf("result %+v: want verified, an ETag and nothing cleared", res)
	}
	if prog.done != int64(len(img)) || prog.total != int64(len(img)) || prog.backwards || prog.calls == 0 {
		t.Fatalf("progress ended at %d/%d after %d calls (backwards=%v)", prog.done, prog.total, prog.calls, prog.backwards)
	}
	src, got := readBlob(t, s, loc)
	if !bytes.Equal(got, img) {
		t.Fatal("blob differs from the image")
	}
	if w := writtenBytes(t, src); w != res.Uploaded {
		t.Fatalf("blob has %d written bytes, uploaded %d", w, res.Uploaded)
	}

	// Change the image: zero a written region, fill a hole; a re-run must
	// converge, clearing the stale pages.
	clear(img[12*mib+3*PageSize : 12*mib+403*PageSize])
	copy(img[9*mib:], bytes.Repeat([]byte{1, 2, 3}, 5000))
	writeSparse(t, path, img)
	res, err = Upload(testCtx(t), path, loc, UploadOptions{Options: s.opts(), Concurrency: 3, Verify: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("second upload: %+v", res)
	if res.Cleared != 400*PageSize {
		t.Fatalf("cleared %d bytes, want %d (the zeroed region)", res.Cleared, 400*PageSize)
	}
	src, got = readBlob(t, s, loc)
	if !bytes.Equal(got, img) {
		t.Fatal("re-uploaded blob differs from the changed image")
	}
	if w, want := writtenBytes(t, src), nonZeroBytes(img); w != want {
		t.Fatalf("after re-run the blob has %d written bytes, want %d (the non-zero pages)", w, want)
	}

	// A grown image resizes the blob.
	img = append(img, bytes.Repeat([]byte{9}, 2*mib)...)
	writeSparse(t, path, img)
	if _, err := Upload(testCtx(t), path, loc, UploadOptions{Options: s.opts(), Verify: true}); err != nil {
		t.Fatal(err)
	}
	if _, got = readBlob(t, s, loc); !bytes.Equal(got, img) {
		t.Fatal("grown blob differs")
	}

	// Verify finds a page changed behind our back and names the offset.
	pb, err := pageblob.NewClientFromConnectionString(s.az.ConnectionString(), "img", "up.img", nil)
	if err != nil {
		t.Fatal(err)
	}
	const tampered = 13*mib + 5*PageSize
	if _, err := pb.UploadPages(testCtx(t), streaming.NopCloser(bytes.NewReader(bytes.Repeat([]byte{0x42}, PageSize))),
		azblobblob.HTTPRange{Offset: tampered, Count: PageSize}, nil); err != nil {
		t.Fatal(err)
	}
	err = Verify(testCtx(t), path, loc, s.opts())
	if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("at byte %d ", tampered)) {
		t.Fatalf("Verify after tampering: %v (want the first difference at %d)", err, tampered)
	}
}

func TestUploadBlock(t *testing.T) {
	s := newStore(t)
	img := sparseImage(12, 5<<20+100) // not page aligned: fine for block blobs
	path := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(path, img, 0o600); err != nil {
		t.Fatal(err)
	}
	loc := s.url("img", "blk.img")
	var prog progressRecorder
	res, err := Upload(testCtx(t), path, loc, UploadOptions{Options: s.opts(), Type: "block", BlockSize: 1 << 20, Concurrency: 4, Verify: true, Progress: prog.fn})
	if err != nil {
		t.Fatal(err)
	}
	if res.Uploaded != int64(len(img)) || res.Requests != 7 || !res.Verified {
		t.Fatalf("result %+v: want all %d bytes in 6 blocks + 1 commit, verified", res, len(img))
	}
	if prog.done != int64(len(img)) || prog.backwards {
		t.Fatalf("progress ended at %d of %d", prog.done, len(img))
	}
	src, got := readBlob(t, s, loc)
	if _, ok := src.(RangeLister); ok || !bytes.Equal(got, img) {
		t.Fatalf("block blob: RangeLister=%v, equal=%v", ok, bytes.Equal(got, img))
	}
	// A re-run with a shorter, changed image replaces the content.
	img = sparseImage(13, 3<<20)
	if err := os.WriteFile(path, img, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Upload(testCtx(t), path, loc, UploadOptions{Options: s.opts(), Type: "block", Verify: true}); err != nil {
		t.Fatal(err)
	}
	if _, got = readBlob(t, s, loc); !bytes.Equal(got, img) {
		t.Fatal("re-uploaded block blob differs")
	}

	// Uploading as page onto the block blob names the fix.
	_, err = Upload(testCtx(t), path, loc, UploadOptions{Options: s.opts(), Type: "page"})
	if !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), "--type block") {
		t.Fatalf("page upload onto a block blob: %v", err)
	}
}

func TestUploadErrors(t *testing.T) {
	s := newStore(t)
	dir := t.TempDir()
	odd := filepath.Join(dir, "odd.img")
	if err := os.WriteFile(odd, make([]byte, 1000), 0o600); err != nil {
		t.Fatal(err)
	}
	ok := filepath.Join(dir, "ok.img")
	if err := os.WriteFile(ok, bytes.Repeat([]byte{5}, 64<<10), 0o600); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name, image, loc string
		opts             UploadOptions
		want             string
	}{
		{"unaligned page image", odd, s.url("img", "a"), UploadOptions{Options: s.opts()}, "not a multiple of 512"},
		{"missing image", filepath.Join(dir, "nope"), s.url("img", "a"), UploadOptions{Options: s.opts()}, "does not exist"},
		{"bad type", ok, s.url("img", "a"), UploadOptions{Options: s.opts(), Type: "append"}, "want page or block"},
		{"missing container", ok, s.url("absent", "a"), UploadOptions{Options: s.opts()}, `container "absent" does not exist`},
		{"read-only SAS", ok, s.sas("img", "a", readPerm(), farFuture()), UploadOptions{}, "lacks the needed permission"},
		{"file destination", ok, filepath.Join(dir, "dst"), UploadOptions{}, "not a blob URL"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Upload(testCtx(t), c.image, c.loc, c.opts)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("err = %v, want it to mention %q", err, c.want)
			}
			if strings.Contains(err.Error(), "sig=") {
				t.Fatalf("error leaks the SAS: %v", err)
			}
		})
	}
	t.Run("create container", func(t *testing.T) {
		loc := s.url("fresh", "a.img")
		if _, err := Upload(testCtx(t), ok, loc, UploadOptions{Options: s.opts(), CreateContainer: true, Verify: true}); err != nil {
			t.Fatal(err)
		}
		// Again, now that it exists.
		if _, err := Upload(testCtx(t), ok, loc, UploadOptions{Options: s.opts(), CreateContainer: true, Type: "block"}); err == nil {
			t.Fatal("block upload over the page blob succeeded")
		}
	})
	t.Run("SAS with write permission", func(t *testing.T) {
		loc := s.sas("img", "sas.img", sas.BlobPermissions{Read: true, Create: true, Write: true}, farFuture())
		if _, err := Upload(testCtx(t), ok, loc, UploadOptions{Verify: true}); err != nil {
			t.Fatal(err)
		}
	})
}
