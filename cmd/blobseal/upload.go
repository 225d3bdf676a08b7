package main

import "context"

func runImageUpload(ctx context.Context, args []string) error { return errNotYet }
