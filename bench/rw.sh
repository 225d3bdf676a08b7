#!/usr/bin/env bash
# rw.sh — read-write workloads on three ext4 implementations, side by side.
#
# One empty journaled ext4 image (mkfs.ext4) is copied three times:
#   kernel   — the kernel's ext4 on a loop device,
#   fuse2fs  — e2fsprogs' FUSE driver (libext2fs) on the plaintext file,
#   blobseal — `blobseal mount --read-write` of a LUKS2 copy encrypted by
#              cryptsetup (aes-xts-plain64, 4096-byte sectors), so blobseal
#              also pays for encryption.
# Workloads, each ending in an fsync that commits the journal:
#   sequential write of SIZE_MIB + fsync; FILES files of 4 KiB, each
#   created, written and fsynced; untar of a tarball of $(go env GOROOT)/src
#   + fsync; rm -rf of it + fsync.
# Caches are dropped before each. Printed: MB/s (where it means something),
# wall seconds, CPU seconds (the command's, plus the FUSE server's, which
# for blobseal is also the ext4 writer and the encryption; the kernel's own
# work in kworkers is not counted), and that CPU per GiB of file data.
#
# Needs root (loop mount, drop_caches), cryptsetup, e2fsprogs, fuse2fs,
# fuse3, go, python3.
# Usage: bench/rw.sh [WORKDIR]   (default: a new dir under /var/tmp)
# Environment: SIZE_MIB (default 1024), FILES (default 10000),
#   BLOBSEAL_BIN (use this binary instead of building one),
#   BASELINE_BIN (also measure this blobseal binary, on a fourth copy, as
#   side "baseline": an earlier build, for before/after in one run).
set -euo pipefail

SIZE_MIB=${SIZE_MIB:-1024}
FILES=${FILES:-10000}
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d /var/tmp/blobseal-rw.XXXXXX)}
mkdir -p "$work"
[ "$(id -u)" = 0 ] || { echo "run as root (loop mount, drop_caches)" >&2; exit 1; }
for tool in cryptsetup mkfs.ext4 fuse2fs fusermount3 python3 go; do
	command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || { echo "$tool missing: run scripts/install-deps.sh" >&2; exit 1; }
done

bin=$work/blobseal
declare -A mnt=([kernel]=$work/kernel-mnt [fuse2fs]=$work/fuse2fs-mnt [blobseal]=$work/blobseal-mnt [baseline]=$work/baseline-mnt)
declare -A server=()
sides="kernel fuse2fs blobseal"
[ -n "${BASELINE_BIN:-}" ] && sides="$sides baseline"
mkdir -p "${mnt[@]}"
cleanup() {
	for side in baseline blobseal fuse2fs; do
		if mountpoint -q "${mnt[$side]}"; then fusermount3 -u "${mnt[$side]}" || true; fi
	done
	for side in baseline blobseal fuse2fs; do
		[ -n "${server[$side]:-}" ] && wait "${server[$side]}" 2>/dev/null || true
	done
	if mountpoint -q "${mnt[kernel]}"; then umount "${mnt[kernel]}" || true; fi
}
trap cleanup EXIT

if [ -n "${BLOBSEAL_BIN:-}" ]; then
	bin=$BLOBSEAL_BIN
else
	echo "== building blobseal"
	(cd "$repo" && go build -o "$bin" ./cmd/blobseal)
fi

tarball=$work/gosrc.tar
[ -f "$tarball" ] || tar -cf "$tarball" -C "$(go env GOROOT)" src
tar_mib=$(($(stat -c %s "$tarball") >> 20))
# Room for the file, the small files, twice the tree, and the journal.
size_mib=$((SIZE_MIB + FILES * 8 / 1024 + tar_mib * 3 + 256))

echo "== ${size_mib} MiB journaled ext4 image; three copies"
key=$work/key
head -c 32 /dev/urandom >"$key"
rm -f "$work"/*.ext4 "$work/luks.img" "$work/baseline.img" "$work/ready" "$work/baseline-ready"
mkfs.ext4 -q -F -b 4096 -I 256 -m 0 -O ^resize_inode "$work/kernel.ext4" "${size_mib}M" >/dev/null
cp --sparse=always "$work/kernel.ext4" "$work/fuse2fs.ext4"
cp --sparse=always "$work/kernel.ext4" "$work/luks.img"
truncate -s +32M "$work/luks.img"
cryptsetup reencrypt --encrypt --batch-mode --type luks2 --cipher aes-xts-plain64 \
	--sector-size 4096 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
	--reduce-device-size 32M --key-file "$key" "$work/luks.img"

[ -n "${BASELINE_BIN:-}" ] && cp --sparse=always "$work/luks.img" "$work/baseline.img"

mount -o loop "$work/kernel.ext4" "${mnt[kernel]}"
fuse2fs "$work/fuse2fs.ext4" "${mnt[fuse2fs]}" -f -o rw >"$work/fuse2fs.log" 2>&1 &
server[fuse2fs]=$!
"$bin" mount --read-write --ready-file "$work/ready" --key-file "$key" "$work/luks.img" "${mnt[blobseal]}" \
	>/dev/null 2>"$work/blobseal.log" &
server[blobseal]=$!
for _ in $(seq 300); do
	[ -f "$work/ready" ] && mountpoint -q "${mnt[fuse2fs]}" && break
	sleep 0.1
done
[ -f "$work/ready" ] || { echo "blobseal mount did not become ready:"; cat "$work/blobseal.log"; exit 1; }
if [ -n "${BASELINE_BIN:-}" ]; then
	"$BASELINE_BIN" mount --read-write --ready-file "$work/baseline-ready" --key-file "$key" "$work/baseline.img" "${mnt[baseline]}" \
		>/dev/null 2>"$work/baseline.log" &
	server[baseline]=$!
	for _ in $(seq 300); do [ -f "$work/baseline-ready" ] && break; sleep 0.1; done
	[ -f "$work/baseline-ready" ] || { echo "baseline mount did not become ready:"; cat "$work/baseline.log"; exit 1; }
fi
mountpoint -q "${mnt[fuse2fs]}" || { echo "fuse2fs did not mount:"; cat "$work/fuse2fs.log"; exit 1; }

drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
ticks=$(getconf CLK_TCK)
cpu_ticks() { [ -n "$1" ] && awk '{print $14 + $15}' "/proc/$1/stat" || echo 0; }

# fsync_path PATH — fsync a file or directory (a directory's commits the
# journal on all three).
fsync_path() { python3 -c 'import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); os.fsync(fd)' "$1"; }

# measure SIDE LABEL MIB CMD... — runs CMD (a shell snippet) with caches
# dropped first and prints one result line. MIB is the file data written
# (MiB, or bytes with a B suffix: no MB/s then), 0 for none.
measure() {
	local side=$1 label=$2 mib=$3 script=$4
	local spid=${server[$side]:-}
	drop
	local c0 t0 t1 c1
	c0=$(cpu_ticks "$spid")
	t0=$(date +%s.%N)
	TIMEFORMAT='%U %S'
	local tm
	if ! tm=$({ time bash -c "$script" >/dev/null 2>"$work/cmd.err"; } 2>&1); then
		printf '%-9s %-22s FAILED: %s\n' "$side" "$label" "$(head -n1 "$work/cmd.err")"
		return
	fi
	t1=$(date +%s.%N)
	c1=$(cpu_ticks "$spid")
	awk -v side="$side" -v label="$label" -v mib="$mib" -v t0="$t0" -v t1="$t1" -v tm="$tm" \
		-v c0="$c0" -v c1="$c1" -v hz="$ticks" 'BEGIN {
		split(tm, u, " "); s = t1 - t0; cpu = u[1] + u[2] + (c1 - c0) / hz
		bytes = mib ~ /B$/ ? substr(mib, 1, length(mib) - 1) : mib * 1048576
		rate = bytes > 0 && mib !~ /B$/ ? sprintf("%8.1f MB/s", bytes / s / 1e6) : sprintf("%13s", "")
		perGiB = bytes > 0 ? sprintf("%7.2f CPU-s/GiB", cpu / (bytes / 1073741824)) : ""
		printf "%-9s %-24s %s  %7.2f s  %6.2f CPU-s  %s\n", side, label, rate, s, cpu, perGiB }'
}

fsync_py=$(declare -f fsync_path)
echo
echo "== workloads (SIZE_MIB=$SIZE_MIB, FILES=$FILES, tarball ${tar_mib} MiB; caches dropped before each)"
echo "== load average before: $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) CPUs"
for side in $sides; do
	d=${mnt[$side]}
	measure "$side" "write ${SIZE_MIB} MiB + fsync" "$SIZE_MIB" \
		"dd if=/dev/zero of=$d/seq bs=1M count=$SIZE_MIB conv=fsync status=none"
	measure "$side" "${FILES} files, fsync each" "$((FILES * 4096))B" \
		"python3 -c 'import os, sys
d = sys.argv[1]; os.mkdir(d); data = b\"s\" * 4096
for i in range(int(sys.argv[2])):
    with open(os.path.join(d, \"f%05d\" % i), \"wb\") as f: f.write(data); os.fsync(f.fileno())
fd = os.open(d, os.O_RDONLY); os.fsync(fd)' $d/small $FILES"
	measure "$side" "untar Go src + fsync" "$tar_mib" "$fsync_py; tar -xf $tarball -C $d && fsync_path $d/src"
	measure "$side" "rm -rf it + fsync" 0 "$fsync_py; rm -rf $d/src && fsync_path $d"
	echo
done
echo "== load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

# Unmount and check the images.
fusermount3 -u "${mnt[blobseal]}"
wait "${server[blobseal]}" && server[blobseal]=
if [ -n "${BASELINE_BIN:-}" ]; then
	fusermount3 -u "${mnt[baseline]}"
	wait "${server[baseline]}" && server[baseline]=
fi
fusermount3 -u "${mnt[fuse2fs]}"
wait "${server[fuse2fs]}" || true
server[fuse2fs]=
umount "${mnt[kernel]}"
echo "== e2fsck -fn after unmount"
for img in kernel.ext4 fuse2fs.ext4; do
	e2fsck -fn "$work/$img" >/dev/null 2>&1 && echo "$img: clean" || echo "$img: e2fsck found errors"
done
for side in blobseal baseline; do
	[[ " $sides " == *" $side "* ]] || continue
	grep -q "flushed and clean" "$work/$side.log" && echo "$side: flushed and clean" || echo "$side: NOT flushed clean (see $work/$side.log)"
done
# blobseal's image: unlocked, every entry and byte read back (e2fsck needs
# the plaintext; the fs tests run it on plaintext images).
"$bin" image check --key-file "$key" "$work/luks.img" >/dev/null 2>"$work/check.err" &&
	echo "luks.img: blobseal image check read every entry" || echo "luks.img: image check failed: $(tail -n1 "$work/check.err")"
echo "(workdir $work)"
