#!/usr/bin/env bash
# End-to-end benchmark: blobseal mount vs the raw SDK download and vs an
# rclone crypt mount, all against one private Azurite, cold caches, with and
# without 2 ms of injected latency each way. Prints a Markdown table
# (figure | blobseal | peer | ratio | goal | met?) and every measurement with
# its exact command. Needs root (drop_caches, FUSE), azurite-blob, rclone,
# fusermount3, mkfs.ext4.
#
# Usage: bench/e2e.sh [flags for bench/e2e]   e.g.  bench/e2e.sh -size 256M -quick
#        bench/e2e.sh -out docs/perf-latest.md
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in go azurite-blob rclone fusermount3 mkfs.ext4; do
	command -v "$tool" >/dev/null || { echo "$0: $tool not found in PATH" >&2; exit 1; }
done

tmp="$(mktemp -d)"
az_pid=""
cleanup() {
	# No errexit here: a failing step (grep finding no mount) must not skip
	# stopping Azurite.
	set +e
	# Unmount anything the harness left behind (it normally cleans up itself).
	grep -o " $tmp/[^ ]*" /proc/self/mountinfo 2>/dev/null | while read -r m; do
		fusermount3 -uz "$m" 2>/dev/null
	done
	if [ -n "$az_pid" ]; then
		# Azurite does not always exit on SIGTERM; escalate to SIGKILL.
		kill "$az_pid" 2>/dev/null || true
		for _ in $(seq 50); do kill -0 "$az_pid" 2>/dev/null || break; sleep 0.1; done
		kill -9 "$az_pid" 2>/dev/null || true
		wait "$az_pid" 2>/dev/null || true
	fi
	rm -rf "$tmp"
}
trap cleanup EXIT INT TERM

go build -o "$tmp/blobseal" ./cmd/blobseal
go build -o "$tmp/e2e" ./bench/e2e

# A free loopback port for Azurite.
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
mkdir -p "$tmp/azurite" "$tmp/work"
azurite-blob --blobHost 127.0.0.1 --blobPort "$port" --location "$tmp/azurite" \
	--disableTelemetry --skipApiVersionCheck --silent --loose >"$tmp/azurite.log" 2>&1 &
az_pid=$!
for _ in $(seq 100); do
	if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
	kill -0 "$az_pid" 2>/dev/null || { echo "$0: azurite-blob exited:" >&2; cat "$tmp/azurite.log" >&2; exit 1; }
	sleep 0.1
done
# azurite-blob is a node script; its pid is the node process doing the work.
echo "azurite-blob pid $az_pid on 127.0.0.1:$port ($(azurite-blob --version 2>/dev/null || echo version unknown))" >&2
echo "rclone: $(rclone version 2>/dev/null | head -1)" >&2

"$tmp/e2e" -blobseal "$tmp/blobseal" -azurite "http://127.0.0.1:$port/devstoreaccount1" \
	-azurite-pid "$az_pid" -workdir "$tmp/work" "$@"
