package main

import "context"

func runMount(ctx context.Context, args []string) error { return errNotYet }
