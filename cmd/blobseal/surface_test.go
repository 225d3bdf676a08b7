package main

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blobseal/blobseal/internal/testenv"
)

// TestCLISurface runs the built binary the way a user does and checks what
// the command line promises: help, version, completion, suggestions, exit
// codes, declared flag groups and deprecated names.
func TestCLISurface(t *testing.T) {
	cases := []struct {
		name   string
		args   []string
		code   int
		stdout []string // substrings of stdout
		stderr []string // substrings of stderr
	}{
		{"version flag", []string{"--version"}, 0, []string{"blobseal dev\n"}, nil},
		{"version command", []string{"version"}, 0, []string{"blobseal dev\n"}, nil},
		{"help layout", []string{"attest", "--help"}, 0, []string{"Usage:\n  blobseal attest --maa-endpoint URL [flags]", "      --maa-endpoint string", "  -v, --verbose"}, nil},
		{"group help", []string{"image"}, 0, []string{"Available Commands:", "create", "upload"}, nil},
		{"bash completion", []string{"completion", "bash"}, 0, []string{"__start_blobseal"}, nil},
		{"zsh completion", []string{"completion", "zsh"}, 0, []string{"#compdef blobseal"}, nil},
		{"fish completion", []string{"completion", "fish"}, 0, []string{"complete -c blobseal"}, nil},
		{"flag completion", []string{"__complete", "image", "create", "--fo"}, 0, []string{"--format\t"}, nil},
		{"value completion", []string{"__complete", "mount", "--direct-io", ""}, 0, []string{"auto\non\noff\n:4\n"}, nil},
		{"group completion", []string{"__complete", "key", ""}, 0, []string{"import\t", "release\t"}, nil},
		{"unknown command", []string{"mont"}, 2, nil, []string{`unknown command "mont"`, "did you mean mount?", "Run 'blobseal --help'"}},
		{"unknown subcommand", []string{"image", "craete"}, 2, nil, []string{"did you mean create?"}},
		{"unknown flag", []string{"image", "create", "--form", "x"}, 2, nil, []string{"unknown flag: --form; did you mean --format?"}},
		{"single dash", []string{"image", "check", "-key-file", "k", "img"}, 2, nil, []string{"long flags take two dashes: --key-file"}},
		{"required flag", []string{"image", "create", "out.img"}, 2, nil, []string{"--from and --key-file are required"}},
		{"arguments", []string{"image", "check", "--key-file", "k"}, 2, nil, []string{"want IMAGE, got 0 argument(s)"}},
		{"exclusive flags", []string{"mount", "--key-file", "k", "--key-name", "n", "img", "mnt"}, 2, nil, []string{"give either --key-file or --key-name, not both"}},
		{"one key source", []string{"mount", "img", "mnt"}, 2, nil, []string{"one of --key-file or --key-name is required"}},
		{"deprecated alias", []string{"key", "release", "--vault", "https://v.example", "--maa-endpoint", "https://m.example", "--name", "k", "--sim-debuggable", "--out", "f"}, 2, nil,
			[]string{"Flag --name has been deprecated, use --key-name instead", "Flag --sim-debuggable has been deprecated, use --simulated-debuggable instead", "--attestation simulated"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			stdout, stderr, code := blobseal(t, c.args...)
			if code != c.code {
				t.Errorf("exit %d, want %d\nstdout: %s\nstderr: %s", code, c.code, stdout, stderr)
			}
			for _, s := range c.stdout {
				if !strings.Contains(stdout, s) {
					t.Errorf("stdout lacks %q:\n%s", s, stdout)
				}
			}
			for _, s := range c.stderr {
				if !strings.Contains(stderr, s) {
					t.Errorf("stderr lacks %q:\n%s", s, stderr)
				}
			}
		})
	}
	// Old names work but are not offered.
	stdout, _, _ := blobseal(t, "key", "release", "--help")
	for _, old := range []string{"--name ", "--version ", "--sim-host-data", "--sim-cce-policy", "--sim-debuggable"} {
		if strings.Contains(stdout, old) {
			t.Errorf("key release --help shows the deprecated %s", old)
		}
	}
}

// TestImageCheckJSON: image check --json holds the same manifest as the
// text form, and a summary a script can act on.
func TestImageCheckJSON(t *testing.T) {
	testenv.RequireTools(t, "mkfs.ext4", "debugfs")
	src := testSource(t)
	dir := t.TempDir()
	key := writeKey(t, dir, 32)
	img := filepath.Join(dir, "img")
	v := createVerity(t, src, key, img)
	text, stderr, code := blobseal(t, "image", "check", "--key-file", key, "--verity-root-hash", v.RootHash, img)
	if code != 0 {
		t.Fatalf("image check: exit %d: %s", code, stderr)
	}
	js, stderr, code := blobseal(t, "image", "check", "--json", "--key-file", key, "--verity-root-hash", v.RootHash, img)
	if code != 0 {
		t.Fatalf("image check --json: exit %d: %s", code, stderr)
	}
	var got struct {
		Image      string   `json:"image"`
		Entries    int      `json:"entries"`
		Consistent bool     `json:"consistent"`
		Problems   []string `json:"problems"`
		Manifest   []struct {
			Path, Type, Mode, Digest string
			UID, GID                 uint32
			Size                     uint64
		} `json:"manifest"`
	}
	if err := json.Unmarshal([]byte(js), &got); err != nil {
		t.Fatalf("not JSON: %v\n%s", err, js)
	}
	lines := strings.Split(strings.TrimSuffix(text, "\n"), "\n")
	if !got.Consistent || len(got.Problems) != 0 || got.Entries != len(lines) || len(got.Manifest) != len(lines) {
		t.Fatalf("summary: consistent %v, problems %q, entries %d, manifest %d; text has %d lines",
			got.Consistent, got.Problems, got.Entries, len(got.Manifest), len(lines))
	}
	for i, e := range got.Manifest {
		// The text line's fields, rebuilt from the JSON entry.
		f := strings.Fields(lines[i])
		if f[0] != e.Type || f[1] != e.Mode || f[2] != formatUIDGID(e.UID, e.GID) {
			t.Errorf("entry %d: JSON %+v, text %q", i, e, lines[i])
		}
		if e.Type == "f" && !strings.Contains(lines[i], " "+e.Digest+" ") {
			t.Errorf("entry %d: digest %s not in %q", i, e.Digest, lines[i])
		}
	}
}

func formatUIDGID(uid, gid uint32) string {
	b, _ := json.Marshal(uid)
	c, _ := json.Marshal(gid)
	return string(b) + ":" + string(c)
}

// TestUploadInvalidContainerName: storage's bare 400 for a container name
// it refuses reaches the user as the naming rule.
func TestUploadInvalidContainerName(t *testing.T) {
	az := testenv.StartAzurite(t)
	t.Setenv("AZURE_STORAGE_CONNECTION_STRING", az.ConnectionString())
	img := filepath.Join(t.TempDir(), "img")
	writeTestFile(t, img, random(t, 64<<10), 0o644)
	_, stderr, code := blobseal(t, "image", "upload", "--create-container", img, az.Endpoint()+"/My_Images/x.img")
	if code != 1 || !strings.Contains(stderr, `container name "My_Images"`) || !strings.Contains(stderr, "3 to 63 lowercase letters, digits and hyphens") {
		t.Fatalf("exit %d: %s", code, stderr)
	}
}
