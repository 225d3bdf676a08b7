// Package testenv gives tests the real components they need (external tools,
// FUSE, Azurite) and makes their absence a failure under CI=true rather than
// a silent skip.
package testenv

import (
	"os"
	"os/exec"
	"testing"
)

// InCI reports whether the tests run under CI (CI=true), where a missing
// component is a failure, not a reason to skip.
func InCI() bool { return os.Getenv("CI") == "true" }

// Unavailable fails the test under CI and skips it elsewhere.
func Unavailable(t testing.TB, format string, args ...any) {
	t.Helper()
	if InCI() {
		t.Fatalf("required component missing under CI=true: "+format, args...)
	}
	t.Skipf("skipping: "+format, args...)
}

// RequireTools returns the absolute paths of the named programs, failing (CI)
// or skipping the test when one is not installed.
func RequireTools(t testing.TB, names ...string) []string {
	t.Helper()
	paths := make([]string, 0, len(names))
	for _, n := range names {
		p, err := exec.LookPath(n)
		if err != nil {
			// sbin is often not on a non-root PATH.
			for _, dir := range []string{"/usr/sbin/", "/sbin/"} {
				if _, serr := os.Stat(dir + n); serr == nil {
					p, err = dir+n, nil
					break
				}
			}
		}
		if err != nil {
			Unavailable(t, "program %q not found (install it; see .ci/run)", n)
		}
		paths = append(paths, p)
	}
	return paths
}

// RequireFUSE fails (CI) or skips unless /dev/fuse can be opened and
// fusermount3 is installed.
func RequireFUSE(t testing.TB) {
	t.Helper()
	f, err := os.OpenFile("/dev/fuse", os.O_RDWR, 0)
	if err != nil {
		Unavailable(t, "cannot open /dev/fuse: %v", err)
		return
	}
	f.Close()
	RequireTools(t, "fusermount3")
}

// RequireRoot fails (CI) or skips unless the test runs as root (loop mounts).
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Unavailable(t, "needs root")
	}
}
