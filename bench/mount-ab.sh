#!/usr/bin/env bash
# A/B of two blobseal builds on one blob: N alternating cold sequential reads
# of FILE through a fresh mount each (page cache dropped before every read),
# printing MB/s and the CPU seconds of the blobseal process and of Azurite.
# Needs root (drop_caches, FUSE) and AZURE_STORAGE_CONNECTION_STRING for the
# blob. Used for changes too small to see above the noise of one e2e run.
#
# Usage: bench/mount-ab.sh OLD_BIN NEW_BIN KEY_FILE BLOB_URL FILE AZURITE_PID [N]
set -euo pipefail
[ $# -ge 6 ] || { sed -n 2,9p "$0" >&2; exit 2; }
old=$1 new=$2 key=$3 url=$4 file=$5 azpid=$6 n=${7:-5}
mnt="$(mktemp -d)"
trap 'fusermount3 -uz "$mnt" 2>/dev/null || true; rmdir "$mnt"' EXIT
cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }
one() {
	local bin=$1 label=$2 pid a0 c0 t0 t1 a1 c1
	"$bin" mount --key-file "$key" --log-level warn "$url" "$mnt" >/dev/null &
	pid=$!
	for _ in $(seq 200); do mountpoint -q "$mnt" && break; sleep 0.05; done
	sync; echo 3 >/proc/sys/vm/drop_caches
	a0=$(cpu "$azpid"); c0=$(cpu "$pid"); t0=$(date +%s.%N)
	dd if="$mnt/$file" of=/dev/null bs=1M status=none
	t1=$(date +%s.%N); a1=$(cpu "$azpid"); c1=$(cpu "$pid")
	local bytes; bytes=$(stat -c %s "$mnt/$file")
	kill "$pid"; wait "$pid" || true
	python3 -c "print(f'$label {$bytes/($t1-$t0)/1e6:6.0f} MB/s  client {($c1-$c0)/100:.2f} CPU-s  Azurite {($a1-$a0)/100:.2f} CPU-s')"
}
for _ in $(seq "$n"); do one "$old" old; one "$new" new; done
