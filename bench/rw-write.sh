#!/usr/bin/env bash
# rw-write.sh — the write benchmark (issue 14): one Azurite on loopback,
# every side run one after the other against it, each figure printed with
# the exact command that produced it.
#
#   raw       `blobseal image upload --type page` of DATA_MIB random bytes:
#             parallel 4 MiB Put Page, no mount, no encryption (the ceiling);
#   blobseal  `blobseal mount --read-write` of an encrypted page blob;
#   blobfuse2 Azure's FUSE driver, block blob, its block cache (plaintext).
#
# Workloads:
#   seq    sequential write of DATA_MIB in 1 MiB writes, one fsync, close:
#          MB/s and client CPU (utime+stime of the mount process from
#          /proc/PID/stat, plus the writer's own);
#   fsync  FSYNCS times: 4 KiB written, fsync — latency p50/p99 with
#          LATENCY_MS added each way by toxiproxy (as bench/e2e does);
#   fio    random 4 KiB, 70 % reads / 30 % writes, iodepth 16 (libaio),
#          FIO_SECS seconds on a FIO_MIB file, end_fsync: IOPS.
#
# Needs root (FUSE), azurite-blob, fusermount3, python3, curl, fio, go;
# blobfuse2 from /work/shared/peers (or BLOBFUSE2=path; BLOBFUSE2= skips it).
# Usage: bench/rw-write.sh   Environment: DATA_MIB (1024), FSYNCS (200),
#   LATENCY_MS (2), FIO_MIB (256), FIO_SECS (30), BLOBSEAL_BIN.
# Develop with e.g. DATA_MIB=64 FSYNCS=20 FIO_MIB=32 FIO_SECS=3.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_MIB=${DATA_MIB:-1024}
FSYNCS=${FSYNCS:-200}
LATENCY_MS=${LATENCY_MS:-2}
FIO_MIB=${FIO_MIB:-256}
FIO_SECS=${FIO_SECS:-30}
BLOBFUSE2=${BLOBFUSE2-/work/shared/peers/blobfuse2}
for tool in go azurite-blob fusermount3 python3 curl fio; do
	command -v "$tool" >/dev/null || { echo "$0: $tool not found: run scripts/install-deps.sh" >&2; exit 1; }
done
if [ -n "$BLOBFUSE2" ] && [ ! -x "$BLOBFUSE2" ]; then
	echo "$0: blobfuse2 not found at $BLOBFUSE2 (set BLOBFUSE2= to leave it out)" >&2
	exit 1
fi

tmp="$(mktemp -d)"
declare -a pids=()
cleanup() {
	set +e
	grep -o " $tmp/[^ ]*" /proc/self/mountinfo 2>/dev/null | while read -r m; do fusermount3 -uz "$m" 2>/dev/null; done
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
	rm -rf "$tmp"
}
trap cleanup EXIT INT TERM
freeport() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
waitport() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "$0: nothing listens on $1" >&2; exit 1; }

bin=${BLOBSEAL_BIN:-$tmp/blobseal}
[ -n "${BLOBSEAL_BIN:-}" ] || go build -o "$bin" ./cmd/blobseal
# toxiproxy's server from the module the tests already use (no download).
go build -o "$tmp/toxiproxy-server" github.com/Shopify/toxiproxy/v2/cmd/server

port=$(freeport)
mkdir -p "$tmp/azurite" "$tmp/empty"
azurite-blob --blobHost 127.0.0.1 --blobPort "$port" --location "$tmp/azurite" \
	--disableTelemetry --skipApiVersionCheck --silent --loose >"$tmp/azurite.log" 2>&1 &
pids+=($!)
waitport "$port"
tport=$(freeport)
pport=$(freeport)
"$tmp/toxiproxy-server" -host 127.0.0.1 -port "$tport" >"$tmp/toxiproxy.log" 2>&1 &
pids+=($!)
waitport "$tport"
curl -fsS -o /dev/null "http://127.0.0.1:$tport/proxies" -d "{\"name\":\"azurite\",\"listen\":\"127.0.0.1:$pport\",\"upstream\":\"127.0.0.1:$port\"}"
for dir in upstream downstream; do
	curl -fsS -o /dev/null "http://127.0.0.1:$tport/proxies/azurite/toxics" \
		-d "{\"name\":\"latency_$dir\",\"type\":\"latency\",\"stream\":\"$dir\",\"attributes\":{\"latency\":$LATENCY_MS}}"
done
waitport "$pport"

# Azurite's well-known development account key (public, for local use only).
key='Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=='
export AZURE_STORAGE_CONNECTION_STRING="DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=$key;BlobEndpoint=http://127.0.0.1:$port/devstoreaccount1;"
direct="http://127.0.0.1:$port/devstoreaccount1"
proxied="http://127.0.0.1:$pport/devstoreaccount1"

echo "# write benchmark $(date -u +%FT%TZ), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) (shared machine)"
echo "# DATA_MIB=$DATA_MIB FSYNCS=$FSYNCS LATENCY_MS=$LATENCY_MS FIO_MIB=$FIO_MIB FIO_SECS=$FIO_SECS; blobseal $(git rev-parse --short HEAD)"

# --- raw: parallel Put Page of the same number of random bytes ---
head -c "$((DATA_MIB << 20))" /dev/urandom >"$tmp/data.bin"
echo "\$ blobseal image upload --type page --no-verify --concurrency 16 --create-container data.bin $direct/raw/data.bin"
(python3 - "$DATA_MIB" "$bin" image upload --type page --no-verify --concurrency 16 --create-container "$tmp/data.bin" "$direct/raw/data.bin" <<'PY'
import resource, subprocess, sys, time
mib, argv = int(sys.argv[1]), sys.argv[2:]
t = time.monotonic(); subprocess.run(argv, check=True, stdout=subprocess.DEVNULL); d = time.monotonic() - t
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(f"RESULT raw seq {mib << 20} {d:.3f} {ru.ru_utime + ru.ru_stime:.3f} 0")
PY
) | tee -a "$tmp/results"
rm -f "$tmp/data.bin"

# measure.py: the workloads, run against a mount point; pid is the mount's.
cat >"$tmp/measure.py" <<'PY'
import os, sys, time
def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
def own():
    t = os.times(); return t.user + t.system
side, work, mnt, pid = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if work == "seq":
    mib = int(sys.argv[5]); buf = os.urandom(1 << 20)
    c0, o0, t = cpu(pid), own(), time.monotonic()
    fd = os.open(os.path.join(mnt, "seq.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for _ in range(mib): os.write(fd, buf)
    os.fsync(fd); os.close(fd)
    d = time.monotonic() - t
    print(f"RESULT {side} seq {mib << 20} {d:.3f} {cpu(pid) - c0:.3f} {own() - o0:.3f}")
elif work == "fsync":
    n = int(sys.argv[5]); buf = os.urandom(4096); lat = []
    fd = os.open(os.path.join(mnt, "fsync.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for i in range(n):
        t = time.monotonic(); os.pwrite(fd, buf, i * 4096); os.fsync(fd); lat.append(time.monotonic() - t)
    os.close(fd); lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000
    print(f"RESULT {side} fsync {n} {q(0.5):.2f} {q(0.99):.2f} {lat[-1] * 1000:.2f}")
PY

start_blobseal() { # name url mnt
	mkdir -p "$3"
	"$bin" mount --read-write --key-file "$tmp/key" --cache-memory 256 --ready-file "$tmp/ready-$1" "$2" "$3" 2>"$tmp/$1.log" >/dev/null &
	mpid=$!
	pids+=("$mpid")
	for _ in $(seq 600); do [ -e "$tmp/ready-$1" ] && return 0; kill -0 "$mpid" 2>/dev/null || { cat "$tmp/$1.log" >&2; exit 1; }; sleep 0.1; done
	echo "$0: $1 did not become ready" >&2; exit 1
}
stop_blobseal() { kill -TERM "$mpid"; wait "$mpid" || { cat "$tmp/$1.log" >&2; exit 1; }; }
start_bf2() { # name endpoint container mnt
	cat >"$tmp/$1.yaml" <<EOF
logging:
  type: silent
components: [libfuse, block_cache, attr_cache, azstorage]
libfuse:
  attribute-expiration-sec: 120
  entry-expiration-sec: 120
block_cache:
  block-size-mb: 16
  mem-size-mb: 256
  prefetch: 12
  parallelism: 16
azstorage:
  type: block
  account-name: devstoreaccount1
  account-key: $key
  endpoint: $2
  use-http: true
  mode: key
  container: $3
EOF
	mkdir -p "$4" "$tmp/$1-tmp"
	head -c 512 /dev/zero >"$tmp/seed"
	"$bin" image upload --type block --no-verify --create-container "$tmp/seed" "$direct/$3/seed" >/dev/null
	(cd "$tmp/$1-tmp" && exec "$BLOBFUSE2" mount "$4" --config-file="$tmp/$1.yaml" --foreground --disable-version-check) >"$tmp/$1.log" 2>&1 &
	mpid=$!
	pids+=("$mpid")
	for _ in $(seq 300); do grep -q " $4 " /proc/self/mountinfo && return 0; kill -0 "$mpid" 2>/dev/null || { cat "$tmp/$1.log" >&2; exit 1; }; sleep 0.1; done
	echo "$0: blobfuse2 did not mount" >&2; exit 1
}
stop_bf2() { fusermount3 -u "$1"; wait "$mpid" || true; }
fio_run() { # side mnt
	local cmd=(fio --name=randrw --directory="$2" --filename=fio.dat --size="${FIO_MIB}M" --rw=randrw --rwmixread=70
		--bs=4k --ioengine=libaio --iodepth=16 --direct="$FIO_DIRECT" --time_based --runtime="$FIO_SECS" --end_fsync=1
		--randrepeat=0 --output-format=terse --terse-version=3)
	echo "\$ ${cmd[*]}"
	# terse v3: field 8 read IOPS, 49 write IOPS.
	"${cmd[@]}" | awk -F';' -v s="$1" '{ printf "RESULT %s fio %d %d\n", s, $8, $49 }' | tee -a "$tmp/results"
}

head -c 32 /dev/urandom >"$tmp/key"
img_mib=$((DATA_MIB + FIO_MIB + FSYNCS / 64 + 128))
mkimage() { # url
	"$bin" image create --read-write --from "$tmp/empty" --key-file "$tmp/key" --size "${img_mib}M" "$tmp/rw.img" >/dev/null
	"$bin" image upload --type page --no-verify --create-container "$tmp/rw.img" "$1" >/dev/null
	rm -f "$tmp/rw.img"
}
echo "\$ blobseal image create --read-write --size ${img_mib}M rw.img && blobseal image upload --type page rw.img URL"
echo "\$ blobseal mount --read-write --key-file KEY --cache-memory 256 URL MNT   (defaults: 64 MiB dirty, 1m flush timeout)"
echo "\$ blobfuse2 mount MNT --config-file=bf2.yaml --foreground   (block_cache 16 MiB blocks, mem 256 MiB, prefetch 12, parallelism 16)"
echo "\$ python3 measure.py seq: 1 MiB os.write x DATA_MIB, fsync, close  |  fsync: 4 KiB pwrite + fsync x FSYNCS"

# blobseal answers O_DIRECT; blobfuse2 is run with the page cache (direct=0) when it refuses it.
mkimage "$direct/bseq/rw.img"
start_blobseal bs "$direct/bseq/rw.img" "$tmp/mnt-bs"
python3 "$tmp/measure.py" blobseal seq "$tmp/mnt-bs" "$mpid" "$DATA_MIB" | tee -a "$tmp/results"
rm -f "$tmp/mnt-bs/seq.bin"
FIO_DIRECT=1 fio_run blobseal "$tmp/mnt-bs"
stop_blobseal bs

mkimage "$direct/bslat/rw.img"
start_blobseal bslat "$proxied/bslat/rw.img" "$tmp/mnt-bslat"
python3 "$tmp/measure.py" blobseal fsync "$tmp/mnt-bslat" "$mpid" "$FSYNCS" | tee -a "$tmp/results"
stop_blobseal bslat

if [ -n "$BLOBFUSE2" ]; then
	start_bf2 bf2 "$direct" bf2 "$tmp/mnt-bf2"
	python3 "$tmp/measure.py" blobfuse2 seq "$tmp/mnt-bf2" "$mpid" "$DATA_MIB" | tee -a "$tmp/results"
	rm -f "$tmp/mnt-bf2/seq.bin"
	FIO_DIRECT=1
	if ! (exec 3>"$tmp/mnt-bf2/probe" && python3 -c "import os,sys; os.close(os.open(sys.argv[1], os.O_RDWR|os.O_DIRECT))" "$tmp/mnt-bf2/probe") 2>/dev/null; then
		FIO_DIRECT=0
	fi
	rm -f "$tmp/mnt-bf2/probe"
	FIO_DIRECT=$FIO_DIRECT fio_run blobfuse2 "$tmp/mnt-bf2"
	stop_bf2 "$tmp/mnt-bf2"
	start_bf2 bf2lat "$proxied" bf2lat "$tmp/mnt-bf2lat"
	python3 "$tmp/measure.py" blobfuse2 fsync "$tmp/mnt-bf2lat" "$mpid" "$FSYNCS" | tee -a "$tmp/results"
	stop_bf2 "$tmp/mnt-bf2lat"
fi

echo
echo "## summary (client CPU = utime+stime of the mount process + the writer's own; raw: the uploader's)"
python3 - "$tmp/results" <<'PY'
import sys
r = {}
for line in open(sys.argv[1]):
    f = line.split()
    if f and f[0] == "RESULT":
        r[(f[1], f[2])] = [float(x) for x in f[3:]]
seq = {s: v for (s, w), v in r.items() if w == "seq"}
print("| sequential write + fsync | MB/s | client CPU s/GiB |")
print("|---|---|---|")
for s, (n, d, mcpu, wcpu) in seq.items():
    print(f"| {s} | {n / d / 1e6:.0f} | {(mcpu + wcpu) / (n / 2**30):.2f} |")
mbps = {s: v[0] / v[1] for s, v in seq.items()}
cpu = {s: (v[2] + v[3]) / (v[0] / 2**30) for s, v in seq.items()}
if "raw" in mbps and "blobseal" in mbps:
    print(f"\nblobseal / raw Put Page throughput: {mbps['blobseal'] / mbps['raw']:.2f} (goal >= 0.8)")
if "blobfuse2" in mbps and "blobseal" in mbps:
    print(f"blobseal / blobfuse2 throughput: {mbps['blobseal'] / mbps['blobfuse2']:.2f}x (goal >= 1.5), "
          f"CPU per GiB: {cpu['blobseal'] / cpu['blobfuse2']:.2f}x (goal <= 0.5)")
print("\n| fsync of a 4 KiB write, +latency each way | n | p50 ms | p99 ms | max ms |")
print("|---|---|---|---|---|")
for (s, w), v in r.items():
    if w == "fsync":
        print(f"| {s} | {v[0]:.0f} | {v[1]:.2f} | {v[2]:.2f} | {v[3]:.2f} |")
print("\n| fio randrw 70/30 4 KiB iodepth 16 | read IOPS | write IOPS | total |")
print("|---|---|---|---|")
for (s, w), v in r.items():
    if w == "fio":
        print(f"| {s} | {v[0]:.0f} | {v[1]:.0f} | {v[0] + v[1]:.0f} |")
PY
