package main

import "context"

func runAttest(ctx context.Context, args []string) error { return errNotYet }
