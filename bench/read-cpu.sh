#!/usr/bin/env bash
# One cold read of FILE through a fresh blobseal mount of BLOB_URL, printing
# MB/s and CPU seconds per GiB of the mount process, of the reader's kernel
# time and of Azurite: the client-CPU figure issue 16 is about. MODE is seq
# (dd bs=1M) or mmap (every page touched in a shuffled order, like
# bench/e2e's mmap case). Extra arguments go to blobseal mount, e.g.
# --verity-root-hash HEX, --cpuprofile FILE (go tool pprof), --log-level info
# (the image statistics line: requests, bytes fetched, bytes decrypted).
# Needs root (drop_caches, FUSE) and AZURE_STORAGE_CONNECTION_STRING.
#
# Usage: bench/read-cpu.sh BIN KEY_FILE BLOB_URL FILE AZURITE_PID seq|mmap [mount flags]
set -euo pipefail
[ $# -ge 6 ] || { sed -n 2,11p "$0" >&2; exit 2; }
bin=$1 key=$2 url=$3 file=$4 azpid=$5 mode=$6
shift 6
tmp="$(mktemp -d)"
mnt="$tmp/mnt"
mkdir "$mnt"
pid=""
cleanup() {
	set +e
	[ -n "$pid" ] && kill -INT "$pid" 2>/dev/null && wait "$pid"
	fusermount3 -uz "$mnt" 2>/dev/null
	rm -rf "$tmp"
}
trap cleanup EXIT
if [ "$mode" = mmap ]; then
	# The reader must be its own process: a fault served by this mount
	# must not wait on a process the mount waits on.
	mkdir "$tmp/mm"
	cat >"$tmp/mm/main.go" <<'GO'
package main

import (
	"math/rand"
	"os"
	"runtime"
	"syscall"
)

func main() {
	f, err := os.Open(os.Args[1])
	if err != nil {
		panic(err)
	}
	st, err := f.Stat()
	if err != nil {
		panic(err)
	}
	m, err := syscall.Mmap(int(f.Fd()), 0, int(st.Size()), syscall.PROT_READ, syscall.MAP_SHARED)
	if err != nil {
		panic(err)
	}
	var sum byte
	for _, p := range rand.Perm(int(st.Size()) / 4096) {
		sum ^= m[p*4096]
	}
	runtime.KeepAlive(sum)
}
GO
	(cd "$tmp/mm" && go mod init mm >/dev/null 2>&1 && go build -o "$tmp/mmapper" .)
fi
"$bin" mount --key-file "$key" "$@" "$url" "$mnt" >/dev/null &
pid=$!
for _ in $(seq 600); do
	mountpoint -q "$mnt" && break
	kill -0 "$pid" 2>/dev/null || { pid=""; echo "$0: blobseal mount exited" >&2; exit 1; }
	sleep 0.05
done
mountpoint -q "$mnt" || { echo "$0: the mount did not come up" >&2; exit 1; }
sync
echo 3 >/proc/sys/vm/drop_caches
cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }
a0=$(cpu "$azpid") c0=$(cpu "$pid") t0=$(date +%s.%N)
if [ "$mode" = seq ]; then
	/usr/bin/time -f "%S" -o "$tmp/rtime" dd if="$mnt/$file" of=/dev/null bs=1M status=none
else
	/usr/bin/time -f "%S" -o "$tmp/rtime" "$tmp/mmapper" "$mnt/$file"
fi
t1=$(date +%s.%N) a1=$(cpu "$azpid") c1=$(cpu "$pid")
bytes=$(stat -c %s "$mnt/$file")
kill -INT "$pid"
wait "$pid" || true
pid=""
python3 - "$bytes" "$t0" "$t1" "$c0" "$c1" "$a0" "$a1" "$(cat "$tmp/rtime")" "$mode" <<'PY'
import sys
b, t0, t1, c0, c1, a0, a1, rsys = map(float, sys.argv[1:9])
g = b / 2**30
mount, azurite = (c1 - c0) / 100, (a1 - a0) / 100
print(f"{sys.argv[9]}: {b/(t1-t0)/1e6:.0f} MB/s, client {(mount+rsys)/g:.2f} CPU-s/GiB "
      f"(mount {mount/g:.2f}, reader kernel {rsys/g:.2f}), Azurite {azurite/g:.2f} CPU-s/GiB")
PY
