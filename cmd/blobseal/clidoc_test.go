package main

import (
	"bytes"
	"flag"
	"os"
	"strings"
	"testing"

	"github.com/spf13/cobra"
	"github.com/spf13/cobra/doc"
)

var updateDoc = flag.Bool("update", false, "rewrite docs/CLI.md from the command tree")

const cliDocPath = "../../docs/CLI.md"

// cliReference renders the whole command tree with cobra's markdown
// generator into one page; links between commands become anchors.
func cliReference(t *testing.T) []byte {
	t.Helper()
	var buf bytes.Buffer
	buf.WriteString("# CLI reference\n\n" +
		"Generated from the command tree by cobra's doc generator: after changing a command or flag, run\n" +
		"`go test ./cmd/blobseal -run TestCLIDoc -update` (TestCLIDoc fails while this page is stale).\n\n")
	root := newRootCmd()
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		if !c.IsAvailableCommand() && c != root {
			return
		}
		c.DisableAutoGenTag = true // no date: the page must be reproducible
		var one bytes.Buffer
		if err := doc.GenMarkdownCustom(c, &one, func(file string) string {
			return "#" + strings.ReplaceAll(strings.TrimSuffix(file, ".md"), "_", "-")
		}); err != nil {
			t.Fatal(err)
		}
		buf.WriteString(strings.ReplaceAll(one.String(), "\n\n\n", "\n\n"))
		buf.WriteString("\n")
		for _, sub := range c.Commands() {
			walk(sub)
		}
	}
	walk(root)
	return bytes.TrimRight(buf.Bytes(), "\n")
}

// TestCLIDoc fails when docs/CLI.md no longer matches the command tree.
func TestCLIDoc(t *testing.T) {
	want := append(cliReference(t), '\n')
	if *updateDoc {
		if err := os.WriteFile(cliDocPath, want, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	got, err := os.ReadFile(cliDocPath)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("docs/CLI.md is stale: run go test ./cmd/blobseal -run TestCLIDoc -update")
	}
	for _, cmd := range []string{"## blobseal image create", "## blobseal key release", "## blobseal completion bash", "--verity-root-hash string"} {
		if !bytes.Contains(got, []byte(cmd)) {
			t.Errorf("docs/CLI.md lacks %q", cmd)
		}
	}
	if bytes.Contains(got, []byte("--sim-host-data")) || bytes.Contains(got, []byte("--name string")) {
		t.Error("docs/CLI.md documents a deprecated flag name")
	}
}
