package main

import "context"

func runKeyImport(ctx context.Context, args []string) error { return errNotYet }

func runKeyRelease(ctx context.Context, args []string) error { return errNotYet }
