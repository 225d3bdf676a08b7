#!/usr/bin/env bash
# Sidecar start-up: process start -> every mount ready (ready file present),
# with the local stack (blobseal dev serve) and Azurite already running and
# the images uploaded beforehand; only the sidecar's start is timed. Both
# filesystems pin their verity root, so the start includes the tree check.
# Median of RUNS runs (default 5). Goal: <= 1 s.
# Usage: bench/sidecar-start.sh   (from the repository root; needs /dev/fuse,
# azurite-blob, mkfs.ext4)
set -euo pipefail
RUNS=${RUNS:-5}
PORT=${PORT:-10471}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/blobseal-bench-start.XXXXXX)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
	rm -rf "$work"
}
trap cleanup EXIT
cd "$root"
go build -o "$work/blobseal" ./cmd/blobseal
bs="$work/blobseal"

mkdir -p "$work/azurite" "$work/stack"
azurite-blob --blobHost 127.0.0.1 --blobPort "$PORT" --location "$work/azurite" \
	--disableTelemetry --skipApiVersionCheck --silent >"$work/azurite.log" 2>&1 &
pids+=($!)
"$bs" dev serve --dir "$work/stack" >"$work/dev.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [[ -f $work/stack/stack.json ]] && break; sleep 0.1; done
[[ -f $work/stack/stack.json ]] || { echo "dev serve did not start:"; cat "$work/dev.log"; exit 1; }

export AZURE_STORAGE_CONNECTION_STRING="DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;BlobEndpoint=http://127.0.0.1:$PORT/devstoreaccount1;"
hostdata=$(sha256sum examples/demo-cce-policy.rego | cut -d' ' -f1)
# The throwaway key lives in the bench's temp dir only until it is imported.
head -c 32 /dev/urandom >"$work/key"
root=$("$bs" image create --json --from examples/demo-data --key-file "$work/key" "$work/demo.img" | sed -n 's/.*"root_hash": *"\([0-9a-f]*\)".*/\1/p')
[[ -n $root ]] || { echo "image create printed no verity root hash"; exit 1; }
"$bs" key import --dev-dir "$work/stack" --key-name bench-key --key-file "$work/key" --host-data "$hostdata" >/dev/null
rm -f "$work/key"
for t in page block; do
	"$bs" image upload --create-container --type "$t" "$work/demo.img" "http://127.0.0.1:$PORT/devstoreaccount1/bench/demo-$t.img" >/dev/null
done

maa=$(sed -n 's/.*"maa_endpoint": *"\([^"]*\)".*/\1/p' "$work/stack/stack.json")
vault=$(sed -n 's/.*"vault_url": *"\([^"]*\)".*/\1/p' "$work/stack/stack.json")
cat >"$work/sidecar.yaml" <<YAML
log: {level: warn, format: text}
health: {address: 127.0.0.1:0, ready_file: $work/ready}
attestation:
  provider: simulated
  simulated_dir: $work/stack
  simulated_host_data: $hostdata
  ca_file: $work/stack/ca.pem
filesystems:
$(for t in page block; do cat <<FS
  - name: $t
    mount_point: $work/mnt-$t
    source: http://127.0.0.1:$PORT/devstoreaccount1/bench/demo-$t.img
    verity_root_hash: $root
    key:
      release: {maa_endpoint: $maa, vault: $vault, key_name: bench-key, bearer_token_file: $work/stack/bearer-token}
FS
done)
YAML

cmd=("$bs" sidecar --config "$work/sidecar.yaml")
times=()
for i in $(seq "$RUNS"); do
	rm -f "$work/ready"
	t0=$(date +%s.%N)
	"${cmd[@]}" 2>"$work/sidecar-$i.log" &
	sp=$!
	until [[ -f $work/ready ]]; do
		kill -0 "$sp" 2>/dev/null || { echo "sidecar exited early:"; cat "$work/sidecar-$i.log"; exit 1; }
		sleep 0.005
	done
	t1=$(date +%s.%N)
	[[ -f $work/mnt-page/README.txt && -f $work/mnt-block/README.txt ]] || { echo "mounts not readable"; exit 1; }
	kill -TERM "$sp"; wait "$sp"
	times+=("$(echo "$t1 - $t0" | bc)")
	echo "run $i: ${times[-1]} s"
done
median=$(printf '%s\n' "${times[@]}" | sort -n | sed -n "$(( (RUNS + 1) / 2 ))p")
echo "sidecar start -> 2 mounts ready (page + block blob, key release via local stack, verity tree checked): median ${median} s of $RUNS runs (goal <= 1 s)"
echo "command: ${cmd[*]}"
