package progress

import (
	"os"
	"strings"
	"testing"
	"time"
)

func TestPlainLinesAtInterval(t *testing.T) {
	var sb strings.Builder
	p := New(&sb, "upload", false, 5*time.Second)
	clock := time.Unix(1000, 0)
	p.now = func() time.Time { return clock }
	p.Update(0, 100<<20)
	clock = clock.Add(2 * time.Second)
	p.Update(10<<20, 100<<20)
	if sb.Len() != 0 {
		t.Fatalf("printed before the interval: %q", sb.String())
	}
	clock = clock.Add(4 * time.Second)
	p.Update(50<<20, 100<<20)
	if got := sb.String(); !strings.Contains(got, " 50.0% 50.0 MiB / 100.0 MiB") || strings.Count(got, "\n") != 1 || strings.Contains(got, "\r") {
		t.Fatalf("line after the interval = %q", got)
	}
	clock = clock.Add(time.Second)
	p.Update(100<<20, 100<<20)
	p.Update(100<<20, 100<<20)
	if got := sb.String(); strings.Count(got, "\n") != 2 || !strings.Contains(got, "100.0%") {
		t.Fatalf("completion must print exactly one final line: %q", got)
	}
}

func TestTerminalBar(t *testing.T) {
	var sb strings.Builder
	p := New(&sb, "upload", true, 0)
	p.Update(25, 100)
	p.Update(100, 100)
	got := sb.String()
	if !strings.HasPrefix(got, "\rupload [#######.......................]") || !strings.HasSuffix(got, "\n") || strings.Count(got, "\r") != 2 {
		t.Fatalf("terminal output = %q", got)
	}
}

func TestIsTerminal(t *testing.T) {
	f, err := os.CreateTemp(t.TempDir(), "x")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if IsTerminal(f) {
		t.Fatal("a regular file is not a terminal")
	}
}
