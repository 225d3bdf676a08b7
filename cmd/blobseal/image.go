package main

import "context"

func runImageCreate(ctx context.Context, args []string) error { return errNotYet }

func runImageCheck(ctx context.Context, args []string) error { return errNotYet }
