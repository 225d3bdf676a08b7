package blob

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestInvalidContainerName: Azurite's real 400 for a container name storage
// does not accept becomes an error that states the naming rule.
func TestInvalidContainerName(t *testing.T) {
	s := newStore(t)
	img := filepath.Join(t.TempDir(), "img")
	if err := os.WriteFile(img, sparseImage(5, 64<<10), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"Bad_Container", "ab", strings.Repeat("a", 64), "a--b"} {
		t.Run(name, func(t *testing.T) {
			_, err := Upload(testCtx(t), img, s.url(name, "x.img"), UploadOptions{Options: s.opts(), CreateContainer: true, Type: "block"})
			if err == nil {
				t.Fatal("upload to an invalid container name succeeded")
			}
			t.Logf("error: %v", err)
			if !errors.Is(err, ErrInvalidName) {
				t.Fatalf("errors.Is(err, ErrInvalidName) is false: %v", err)
			}
			for _, want := range []string{`container name "` + name + `"`, "3 to 63 lowercase letters, digits and hyphens"} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error lacks %q", want)
				}
			}
		})
	}
}
