package main

import "context"

func runSidecar(ctx context.Context, args []string) error { return errNotYet }
