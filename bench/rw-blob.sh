#!/usr/bin/env bash
# rw-blob.sh — writes through `blobseal mount --read-write` of a page blob
# in a private Azurite on loopback: what the lease, the write-back cache and
# Put Page cost compared with a local image file mounted the same way.
#
# An empty `image create --read-write` image (SIZE_MIB of data room) is
# mounted twice: as a local file and, uploaded with `image upload --type
# page`, as a blob URL. Workloads, each ending in an fsync (which returns
# only once storage acknowledged every write):
#   sequential write of DATA_MIB in 1 MiB writes + fsync;
#   FILES files of 4 KiB, then one fsync;
#   FILES files of 4 KiB, each fsynced (FSYNC_FILES of them).
# Printed: wall seconds and MB/s per workload and side.
#
# Needs root (FUSE), azurite-blob, mkfs.ext4, debugfs, go, python3.
# Usage: bench/rw-blob.sh   Environment: DATA_MIB (256), FILES (2000),
#   FSYNC_FILES (200), BLOBSEAL_BIN (use this binary instead of building one).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_MIB=${DATA_MIB:-256}
FILES=${FILES:-2000}
FSYNC_FILES=${FSYNC_FILES:-200}
for tool in go azurite-blob fusermount3 mkfs.ext4 python3; do
	command -v "$tool" >/dev/null || { echo "$0: $tool not found: run scripts/install-deps.sh" >&2; exit 1; }
done

tmp="$(mktemp -d)"
az_pid=""
declare -a mounts=()
cleanup() {
	set +e
	for p in "${mounts[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
	grep -o " $tmp/[^ ]*" /proc/self/mountinfo 2>/dev/null | while read -r m; do fusermount3 -uz "$m" 2>/dev/null; done
	if [ -n "$az_pid" ]; then
		kill "$az_pid" 2>/dev/null
		for _ in $(seq 50); do kill -0 "$az_pid" 2>/dev/null || break; sleep 0.1; done
		kill -9 "$az_pid" 2>/dev/null
		wait "$az_pid" 2>/dev/null
	fi
	rm -rf "$tmp"
}
trap cleanup EXIT INT TERM

bin=${BLOBSEAL_BIN:-$tmp/blobseal}
[ -n "${BLOBSEAL_BIN:-}" ] || go build -o "$bin" ./cmd/blobseal

port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
mkdir -p "$tmp/azurite" "$tmp/empty"
azurite-blob --blobHost 127.0.0.1 --blobPort "$port" --location "$tmp/azurite" \
	--disableTelemetry --skipApiVersionCheck --silent --loose >"$tmp/azurite.log" 2>&1 &
az_pid=$!
for _ in $(seq 100); do
	if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
	kill -0 "$az_pid" 2>/dev/null || { echo "$0: azurite-blob exited:" >&2; cat "$tmp/azurite.log" >&2; exit 1; }
	sleep 0.1
done
# Azurite's well-known development account key (public, for local use only).
export AZURE_STORAGE_CONNECTION_STRING="DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;BlobEndpoint=http://127.0.0.1:$port/devstoreaccount1;"

head -c 32 /dev/urandom >"$tmp/key"
"$bin" image create --read-write --from "$tmp/empty" --key-file "$tmp/key" --size "$((DATA_MIB * 2 + 64))M" "$tmp/rw.img" >/dev/null
url="http://127.0.0.1:$port/devstoreaccount1/bench/rw.img"
"$bin" image upload --type page --create-container "$tmp/rw.img" "$url" >/dev/null
cp --sparse=always "$tmp/rw.img" "$tmp/local.img"

run() { # side source
	local side=$1 src=$2 mnt=$tmp/mnt-$1
	mkdir -p "$mnt"
	"$bin" mount --read-write --key-file "$tmp/key" --ready-file "$tmp/ready-$side" "$src" "$mnt" 2>"$tmp/$side.log" >/dev/null &
	local pid=$!
	mounts+=("$pid")
	for _ in $(seq 600); do [ -e "$tmp/ready-$side" ] && break; kill -0 "$pid" || { cat "$tmp/$side.log" >&2; exit 1; }; sleep 0.1; done
	python3 - "$mnt" "$side" "$DATA_MIB" "$FILES" "$FSYNC_FILES" <<'PY'
import os, sys, time
mnt, side, data_mib, files, fsync_files = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
def timed(name, fn, nbytes=None):
    t = time.monotonic(); fn(); d = time.monotonic() - t
    rate = f"{nbytes / d / 1e6:8.1f} MB/s" if nbytes else " " * 13
    print(f"{side:8} {name:34} {d:7.2f} s {rate}", flush=True)
def seq():
    buf = os.urandom(1 << 20)
    with open(os.path.join(mnt, "seq"), "wb") as f:
        for _ in range(data_mib): f.write(buf)
        f.flush(); os.fsync(f.fileno())
def small(sync_each, n, d):
    os.mkdir(os.path.join(mnt, d)); buf = os.urandom(4096)
    for i in range(n):
        with open(os.path.join(mnt, d, str(i)), "wb") as f:
            f.write(buf)
            if sync_each: f.flush(); os.fsync(f.fileno())
    fd = os.open(mnt, os.O_RDONLY); os.fsync(fd); os.close(fd)
timed(f"write {data_mib} MiB + fsync", seq, data_mib << 20)
timed(f"{files} x 4 KiB + one fsync", lambda: small(False, files, "a"), files * 4096)
timed(f"{fsync_files} x 4 KiB, each fsynced", lambda: small(True, fsync_files, "b"), fsync_files * 4096)
PY
	local t0 t1
	t0=$(date +%s.%N)
	kill -TERM "$pid"
	wait "$pid"
	t1=$(date +%s.%N)
	printf '%-8s %-34s %7.2f s\n' "$side" "SIGTERM: flush, unmount, release" "$(python3 -c "print($t1 - $t0)")"
}
echo "side     workload                            wall       rate"
run local "$tmp/local.img"
run blob "$url"
