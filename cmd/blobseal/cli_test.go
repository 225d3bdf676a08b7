package main

import (
	"bytes"
	"context"
)

// runIn runs one command line in this process, as the binary would, and
// returns the command's error; its output is discarded.
func runIn(ctx context.Context, args ...string) error {
	var out, errOut bytes.Buffer
	_, err := execute(ctx, args, &out, &errOut)
	return err
}

// runOut is runIn that returns what the command wrote.
func runOut(ctx context.Context, args ...string) (stdout, stderr string, err error) {
	var out, errOut bytes.Buffer
	_, err = execute(ctx, args, &out, &errOut)
	return out.String(), errOut.String(), err
}
