package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"regexp"
	"sort"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// newRootCmd builds the whole command tree. Each command group builds its
// own subtree in its own file (image.go, mount.go, key.go, ...), so adding
// a command is one AddCommand line here and one file.
func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:   "blobseal",
		Short: "Encrypted ext4 images in Azure Blob Storage, mounted in confidential containers",
		Long: "blobseal builds encrypted ext4 images (LUKS2, AES-XTS, dm-verity), keeps them in Azure Blob\n" +
			"Storage and mounts them read-only with FUSE, with the key released only to an attested TEE.",
		Version:           version,
		SilenceErrors:     true, // run prints errors once, in one format
		SilenceUsage:      true, // usage only on request: errors say what to fix
		PersistentPreRunE: applyAliases,
	}
	root.SetVersionTemplate("blobseal {{.Version}}\n")
	root.SetFlagErrorFunc(flagError)
	root.AddCommand(
		newImageCmd(),
		newMountCmd(),
		newAttestCmd(),
		newKeyCmd(),
		newDevCmd(),
		newSidecarCmd(),
		newSkrCmd(),
		newDemoCmd(),
		newVersionCmd(),
	)
	// Made now rather than on first Execute, so the generated reference
	// documents them too.
	root.InitDefaultVersionFlag()
	root.InitDefaultHelpCmd()
	root.InitDefaultCompletionCmd()
	wrapRunErrors(root)
	return root
}

// execute runs one command line through a fresh tree (no state survives
// between calls) and returns the command it reached.
func execute(ctx context.Context, args []string, stdout, stderr io.Writer) (*cobra.Command, error) {
	root := newRootCmd()
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	// pflag's deprecation warnings go to stderr, never into output a
	// script parses (cobra would print them to the command's output).
	var warnTo func(c *cobra.Command)
	warnTo = func(c *cobra.Command) {
		c.Flags().SetOutput(stderr)
		for _, sub := range c.Commands() {
			warnTo(sub)
		}
	}
	warnTo(root)
	cmd, err := root.ExecuteContextC(ctx)
	var re *runError
	if err != nil && !errors.As(err, &re) && !errors.Is(err, errUsage) {
		// cobra's own complaints about the command line, reworded.
		err = usageErrorf("%s", plainFlagError(err.Error()))
	}
	return cmd, err
}

func newVersionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			_, err := fmt.Fprintln(cmd.OutOrStdout(), "blobseal", version)
			return err
		},
	}
}

// newGroup is a command that only holds subcommands. Without arguments it
// prints its help; with an unknown one it says so and suggests the closest.
func newGroup(use, short string, subs ...*cobra.Command) *cobra.Command {
	g := &cobra.Command{
		Use:   use,
		Short: short,
		Args:  cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 {
				return cmd.Help()
			}
			msg := fmt.Sprintf("unknown command %q for %q", args[0], cmd.CommandPath())
			if s := cmd.SuggestionsFor(args[0]); len(s) > 0 {
				msg += "; did you mean " + strings.Join(s, " or ") + "?"
			}
			return usageErrorf("%s", msg)
		},
	}
	g.SuggestionsMinimumDistance = 2
	g.AddCommand(subs...)
	return g
}

// runError marks an error from a command's work (exit 1), as opposed to
// one from parsing its command line (exit 2).
type runError struct{ err error }

func (e *runError) Error() string { return e.err.Error() }
func (e *runError) Unwrap() error { return e.err }

func wrapRunErrors(c *cobra.Command) {
	if run := c.RunE; run != nil {
		c.RunE = func(cmd *cobra.Command, args []string) error {
			if err := run(cmd, args); err != nil {
				return &runError{err}
			}
			return nil
		}
	}
	for _, sub := range c.Commands() {
		wrapRunErrors(sub)
	}
}

// positional checks the number of positional arguments and names the
// missing or extra ones.
func positional(names ...string) cobra.PositionalArgs {
	return func(_ *cobra.Command, args []string) error {
		if len(args) == len(names) {
			return nil
		}
		return usageErrorf("want %s, got %d argument(s)", strings.Join(names, " and "), len(args))
	}
}

func noArgs(_ *cobra.Command, args []string) error {
	if len(args) > 0 {
		return usageErrorf("unexpected arguments %q", args)
	}
	return nil
}

// aliasAnnotation names the flag a deprecated alias stands for.
const aliasAnnotation = "blobseal/alias-of"

// deprecatedAlias adds old as a hidden name of the flag current, which pflag
// warns about on stderr when it is used.
func deprecatedAlias(fs *pflag.FlagSet, old, current string) {
	f := fs.Lookup(current)
	if f == nil {
		panic("deprecatedAlias: no flag --" + current) // a programming error, caught by any test
	}
	fs.AddFlag(&pflag.Flag{Name: old, Usage: f.Usage, Value: f.Value, DefValue: f.DefValue, NoOptDefVal: f.NoOptDefVal,
		Annotations: map[string][]string{aliasAnnotation: {current}}})
	_ = fs.MarkDeprecated(old, "use --"+current+" instead")
}

// applyAliases marks the flag behind a used alias as set, so the declared
// required and exclusive flag groups see it.
func applyAliases(cmd *cobra.Command, _ []string) error {
	var err error
	cmd.Flags().Visit(func(f *pflag.Flag) {
		if to := f.Annotations[aliasAnnotation]; len(to) == 1 {
			if cur := cmd.Flags().Lookup(to[0]); cur != nil {
				if cur.Changed && err == nil {
					err = usageErrorf("--%s and its old name --%s both given", cur.Name, f.Name)
				}
				cur.Changed = true
			}
		}
	})
	return err
}

// flagError turns a flag parsing error into a usage error that suggests
// the closest flag name.
func flagError(cmd *cobra.Command, err error) error {
	msg := err.Error()
	if name, ok := strings.CutPrefix(msg, "unknown flag: --"); ok {
		if s := closestFlag(cmd, name); s != "" {
			msg += "; did you mean --" + s + "?"
		}
	}
	// The Go flag package accepted -key-file; pflag reads it as -k -e -y ...
	if m := singleDashRE.FindStringSubmatch(msg); m != nil {
		if f := cmd.Flags().Lookup(m[1]); f != nil && !f.Hidden {
			msg += "; long flags take two dashes: --" + m[1]
		}
	}
	return usageErrorf("%s", msg)
}

// closestFlag is the visible flag of cmd nearest to name, if one is near.
func closestFlag(cmd *cobra.Command, name string) string {
	best, bestDist := "", 3 // farther than 2 edits is no suggestion
	visit := func(f *pflag.Flag) {
		if f.Hidden || f.Deprecated != "" {
			return
		}
		d := editDistance(strings.ToLower(name), f.Name)
		if strings.HasPrefix(f.Name, name) && len(name) >= 3 {
			d = 0
		}
		if d < bestDist || d == bestDist && f.Name < best {
			best, bestDist = f.Name, d
		}
	}
	cmd.Flags().VisitAll(visit)
	cmd.InheritedFlags().VisitAll(visit)
	return best
}

// editDistance is the Levenshtein distance of a and b.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur := make([]int, len(b)+1)
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev = cur
	}
	return prev[len(b)]
}

var (
	exclusiveRE   = regexp.MustCompile(`if any flags in the group \[([^\]]*)\] are set none of the others can be; \[([^\]]*)\] were all set`)
	oneRequiredRE = regexp.MustCompile(`at least one of the flags in the group \[([^\]]*)\] is required`)
	togetherRE    = regexp.MustCompile(`if any flags in the group \[([^\]]*)\] are set they must all be set; missing \[([^\]]*)\]`)
	requiredRE    = regexp.MustCompile(`required flag\(s\) (.*) not set`)
	singleDashRE  = regexp.MustCompile(`^unknown shorthand flag: '.' in -([a-z][a-z0-9-]+)`)
	unknownCmdRE  = regexp.MustCompile(`(?s)^(unknown command "[^"]*" for "[^"]*")(?:\s*Did you mean this\?\s*(.*))?$`)
)

// plainFlagError rewords cobra's flag group messages in plain words.
func plainFlagError(msg string) string {
	if m := unknownCmdRE.FindStringSubmatch(msg); m != nil {
		if s := strings.Fields(m[2]); len(s) > 0 {
			return m[1] + "; did you mean " + strings.Join(s, " or ") + "?"
		}
		return m[1]
	}
	if m := exclusiveRE.FindStringSubmatch(msg); m != nil {
		return "give either " + dashed(m[2], " or ") + ", not both"
	}
	if m := oneRequiredRE.FindStringSubmatch(msg); m != nil {
		return "one of " + dashed(m[1], " or ") + " is required"
	}
	if m := togetherRE.FindStringSubmatch(msg); m != nil {
		return dashed(m[1], ", ") + " go together; missing " + dashed(m[2], " and ")
	}
	if m := requiredRE.FindStringSubmatch(msg); m != nil {
		names := strings.Split(strings.ReplaceAll(m[1], `"`, ""), ", ")
		if len(names) == 1 {
			return dashed(names[0], "") + " is required"
		}
		return dashed(strings.Join(names, " "), " and ") + " are required"
	}
	return msg
}

// dashed turns cobra's space-separated flag list into "--a or --b".
func dashed(list, sep string) string {
	names := strings.Fields(list)
	sort.Strings(names)
	for i, n := range names {
		names[i] = "--" + n
	}
	return strings.Join(names, sep)
}

// markRequired declares flags a command cannot run without.
func markRequired(cmd *cobra.Command, names ...string) {
	for _, n := range names {
		if err := cmd.MarkFlagRequired(n); err != nil {
			panic(err) // a misspelt flag name: a programming error any test catches
		}
	}
}

var _ error = (*runError)(nil)

// completeValues offers the fixed values of an enumerated flag to shell
// completion.
func completeValues(cmd *cobra.Command, flag string, values ...string) {
	err := cmd.RegisterFlagCompletionFunc(flag, func(*cobra.Command, []string, string) ([]string, cobra.ShellCompDirective) {
		return values, cobra.ShellCompDirectiveNoFileComp
	})
	if err != nil {
		panic(err) // a misspelt flag name: a programming error any test catches
	}
}
