#!/usr/bin/env bash
# End-to-end benchmark: blobseal mount vs the raw SDK download, an rclone
# crypt mount and blobfuse2 (Azure's FUSE driver), all against one private
# Azurite, cold caches, on loopback and through a proxy that behaves like
# Azure (50 MB/s per connection, 2 ms each way). Prints a Markdown table
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

# blobfuse2, Azure's FUSE driver, built as ../shared/peers/README.md says.
peers=()
bf2="${BLOBFUSE2:-$(pwd)/../shared/peers/blobfuse2}"
if [ -x "$bf2" ]; then
	peers=(-blobfuse2 "$bf2")
	echo "blobfuse2: $("$bf2" --version --disable-version-check 2>/dev/null | head -1)" >&2
else
	echo "$0: no blobfuse2 at $bf2 (set BLOBFUSE2=PATH); its cases are left out" >&2
fi

"$tmp/e2e" "${peers[@]}" -blobseal "$tmp/blobseal" -azurite "http://127.0.0.1:$port/devstoreaccount1" \
	-azurite-pid "$az_pid" -workdir "$tmp/work" "$@"
