#!/usr/bin/env bash
# fs-vs-kernel.sh — blobseal's userspace read path against the kernel's.
#
# One plaintext ext4 image holds a 1 GiB file and a directory of 20,000
# entries. The kernel mounts it through a loop device (ext4 in the kernel);
# blobseal mounts a LUKS2 copy of the same plaintext made by cryptsetup
# (aes-xts-plain64, 4096-byte sectors, as Azure's tooling makes them), so
# blobseal pays for decryption and FUSE and the kernel for neither.
# Caches are dropped before every measurement.
#
# Needs root (loop mount, drop_caches), cryptsetup, e2fsprogs, fuse3, go.
# Usage: bench/fs-vs-kernel.sh [WORKDIR]   (default: a new dir under /var/tmp)
# Environment: SIZE_MIB (default 1024), ENTRIES (default 20000),
#   BLOBSEAL_BIN (use this binary instead of building one).
set -euo pipefail

SIZE_MIB=${SIZE_MIB:-1024}
ENTRIES=${ENTRIES:-20000}
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d /var/tmp/blobseal-bench.XXXXXX)}
mkdir -p "$work"
[ "$(id -u)" = 0 ] || { echo "run as root (loop mount, drop_caches)" >&2; exit 1; }

bin=$work/blobseal
kmnt=$work/kernel-mnt
fmnt=$work/fuse-mnt
mkdir -p "$kmnt" "$fmnt"
pid=
cleanup() {
	[ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
	mountpoint -q "$kmnt" && umount "$kmnt" || true
	mountpoint -q "$fmnt" && fusermount3 -u "$fmnt" 2>/dev/null || true
}
trap cleanup EXIT

if [ -n "${BLOBSEAL_BIN:-}" ]; then
	bin=$BLOBSEAL_BIN
else
	echo "== building blobseal"
	(cd "$repo" && go build -o "$bin" ./cmd/blobseal)
fi

plain=$work/plain.ext4
luks=$work/luks.img
key=$work/key
if [ ! -f "$luks" ]; then
	echo "== making a ${SIZE_MIB} MiB file and ${ENTRIES} entries in a plaintext ext4 image"
	size_mib=$((SIZE_MIB + ENTRIES / 100 + 128))
	rm -f "$plain"
	mkfs.ext4 -q -F -b 4096 -I 256 -m 0 -N $((ENTRIES + 1000)) -O ^resize_inode,^has_journal "$plain" "${size_mib}M"
	mount -o loop "$plain" "$kmnt"
	head -c "${SIZE_MIB}M" /dev/urandom >"$kmnt/big"
	mkdir "$kmnt/many"
	(cd "$kmnt/many" && seq -f "entry-%05g" 1 "$ENTRIES" | xargs touch)
	umount "$kmnt"
	echo "== encrypting a copy with cryptsetup (LUKS2, pbkdf2, 4096-byte sectors)"
	head -c 32 /dev/urandom >"$key"
	cp --sparse=always "$plain" "$luks"
	truncate -s +32M "$luks"
	cryptsetup reencrypt --encrypt --batch-mode --type luks2 --cipher aes-xts-plain64 \
		--sector-size 4096 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
		--reduce-device-size 32M --key-file "$key" "$luks"
fi

mount -o loop,ro,noload "$plain" "$kmnt"
"$bin" mount --ready-file "$work/ready" --key-file "$key" "$luks" "$fmnt" >/dev/null 2>"$work/mount.log" &
pid=$!
for _ in $(seq 300); do [ -f "$work/ready" ] && break; sleep 0.1; done
[ -f "$work/ready" ] || { echo "blobseal mount did not become ready:"; cat "$work/mount.log"; exit 1; }

drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# seconds CMD... — wall time of one run, caches dropped first; "FAILED"
# (and the command's first error line on stderr) when it fails.
seconds() {
	drop
	local t0 t1
	t0=$(date +%s.%N)
	if ! "$@" >/dev/null 2>"$work/cmd.err"; then
		echo "FAILED: $(head -n1 "$work/cmd.err")" >&2
		echo NaN
		return
	fi
	t1=$(date +%s.%N)
	echo "$t0 $t1" | awk '{printf "%.3f", $2 - $1}'
}

echo
echo "== sequential read of ${SIZE_MIB} MiB (caches dropped before each)"
for side in kernel:"$kmnt" blobseal:"$fmnt"; do
	name=${side%%:*} dir=${side#*:}
	cmd=(dd if="$dir/big" of=/dev/null bs=1M)
	s=$(seconds "${cmd[@]}")
	printf '%-9s %8.1f MB/s  %6.2f s   $ %s\n' "$name" "$(echo "$SIZE_MIB $s" | awk '{print $1*1048576/$2/1e6}')" "$s" "${cmd[*]}"
done

echo
echo "== metadata over ${ENTRIES} entries (caches dropped before each)"
for side in kernel:"$kmnt" blobseal:"$fmnt"; do
	name=${side%%:*} dir=${side#*:}
	for cmd in "ls -lR $dir/many" "find $dir/many"; do
		read -ra argv <<<"$cmd"
		s=$(seconds "${argv[@]}")
		printf '%-9s %6.3f s   $ %s\n' "$name" "$s" "$cmd"
	done
done
echo
echo "(kernel: loop mount of $plain; blobseal: FUSE mount of $luks; workdir $work)"
