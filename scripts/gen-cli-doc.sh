#!/usr/bin/env bash
# Regenerates docs/CLI.md from the command tree with cobra's doc generator
# (cmd/blobseal/clidoc_test.go); TestCLIDoc fails whenever it is stale.
set -euo pipefail
cd "$(dirname "$0")/.."
go test ./cmd/blobseal -run '^TestCLIDoc$' -count=1 -update
echo "wrote docs/CLI.md"
