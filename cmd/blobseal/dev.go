package main

import "context"

func runDevServe(ctx context.Context, args []string) error { return errNotYet }
