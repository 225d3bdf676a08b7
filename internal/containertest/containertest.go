// Package containertest proves the container image where no container
// engine runs: it reads the go build line of the repository's Dockerfile,
// so a test builds the very binary the image holds, and lays out the root
// filesystem the image gives that binary (itself, the CA bundle, /dev/fuse)
// for the test to chroot into.
package containertest

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"

	"golang.org/x/sys/unix"
)

// BuildLine is the go build command of a Dockerfile, with its ARGs filled in.
type BuildLine struct {
	Env  []string // the NAME=VALUE assignments before "go"
	Args []string // the arguments after "go", starting with "build"
	Out  string   // the -o path inside the build stage
}

var argRE = regexp.MustCompile(`\$\{(\w+)\}|\$(\w+)`)

// ParseDockerfile finds the one RUN line that runs go build and expands its
// ${ARG}s from args (missing ones from the ARG defaults in the file).
func ParseDockerfile(r io.Reader, args map[string]string) (BuildLine, error) {
	vals := map[string]string{}
	var run string
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if rest, ok := strings.CutPrefix(line, "ARG "); ok {
			name, def, _ := strings.Cut(rest, "=")
			if _, set := vals[name]; !set {
				vals[name] = def
			}
		}
		if rest, ok := strings.CutPrefix(line, "RUN "); ok && strings.Contains(rest, " go build ") {
			if run != "" {
				return BuildLine{}, fmt.Errorf("Dockerfile: more than one RUN line runs go build")
			}
			run = rest
		}
	}
	if err := sc.Err(); err != nil {
		return BuildLine{}, err
	}
	if run == "" {
		return BuildLine{}, fmt.Errorf("Dockerfile: no RUN line runs go build")
	}
	for k, v := range args {
		vals[k] = v
	}
	var missing []string
	expanded := argRE.ReplaceAllStringFunc(run, func(m string) string {
		name := strings.Trim(m, "${}")
		v, ok := vals[name]
		if !ok {
			missing = append(missing, name)
		}
		return v
	})
	if len(missing) > 0 {
		return BuildLine{}, fmt.Errorf("Dockerfile: go build uses undeclared ARGs %v", missing)
	}
	words, err := splitWords(expanded)
	if err != nil {
		return BuildLine{}, err
	}
	var b BuildLine
	for i, w := range words {
		if w == "go" {
			b.Args = words[i+1:]
			break
		}
		if !strings.Contains(w, "=") {
			return BuildLine{}, fmt.Errorf("Dockerfile: %q before go build is not an assignment", w)
		}
		b.Env = append(b.Env, w)
	}
	for i, a := range b.Args {
		if a == "-o" && i+1 < len(b.Args) {
			b.Out = b.Args[i+1]
		}
	}
	if len(b.Args) == 0 || b.Args[0] != "build" || b.Out == "" {
		return BuildLine{}, fmt.Errorf("Dockerfile: want go build ... -o OUT, got %q", expanded)
	}
	return b, nil
}

// splitWords splits a shell command line of plain words and double-quoted
// strings, which is all the Dockerfile's build line uses.
func splitWords(s string) ([]string, error) {
	var words []string
	var cur strings.Builder
	inWord, quoted := false, false
	for _, r := range s {
		switch {
		case r == '"':
			quoted, inWord = !quoted, true
		case (r == ' ' || r == '\t') && !quoted:
			if inWord {
				words = append(words, cur.String())
				cur.Reset()
				inWord = false
			}
		case r == '\\' || r == '\'' || r == '`' || (!quoted && strings.ContainsRune("|&;<>()", r)):
			return nil, fmt.Errorf("Dockerfile: the go build line uses shell syntax %q this parser does not follow", r)
		default:
			cur.WriteRune(r)
			inWord = true
		}
	}
	if quoted {
		return nil, fmt.Errorf("Dockerfile: unterminated quote in the go build line")
	}
	if inWord {
		words = append(words, cur.String())
	}
	return words, nil
}

// Build runs the build line in the module at repo, writing the binary to
// out instead of the image's path.
func (b BuildLine) Build(repo, out string) ([]byte, error) {
	args := append([]string(nil), b.Args...)
	for i := range args {
		if args[i] == "-o" {
			args[i+1] = out
		}
	}
	cmd := exec.Command("go", args...)
	cmd.Dir = repo
	cmd.Env = append(os.Environ(), b.Env...)
	return cmd.CombinedOutput()
}

// Binary is where the image holds the binary (its ENTRYPOINT).
const Binary = "/blobseal"

// CABundle is where distroless/static keeps the CA certificates, and the
// first place Go's crypto/x509 looks on Linux.
const CABundle = "/etc/ssl/certs/ca-certificates.crt"

// MakeRoot lays out dir as a container of the image sees its root
// filesystem: the binary at Binary, caPEM at CABundle, the FUSE device and
// the runtime's default devices (/dev/null...), and an empty /tmp. Nothing
// else: no shell, no libc, no fusermount3. Making devices needs root.
func MakeRoot(dir, binary string, caPEM []byte) error {
	for _, d := range []string{"etc/ssl/certs", "dev", "tmp"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return err
		}
	}
	if err := os.Chmod(filepath.Join(dir, "tmp"), 0o1777); err != nil {
		return err
	}
	bin, err := os.ReadFile(binary)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, Binary), bin, 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, CABundle), caPEM, 0o644); err != nil {
		return err
	}
	// /dev/fuse is character device 10,229 (Documentation/admin-guide/
	// devices.txt); the others are the OCI runtime specification's default
	// devices, which every container gets (go-fuse splices to /dev/null).
	for _, d := range []struct {
		name         string
		major, minor uint32
	}{{"fuse", 10, 229}, {"null", 1, 3}, {"zero", 1, 5}, {"full", 1, 7}, {"random", 1, 8}, {"urandom", 1, 9}, {"tty", 5, 0}} {
		if err := unix.Mknod(filepath.Join(dir, "dev", d.name), unix.S_IFCHR|0o666, int(unix.Mkdev(d.major, d.minor))); err != nil {
			return fmt.Errorf("mknod /dev/%s: %w", d.name, err)
		}
	}
	return nil
}
