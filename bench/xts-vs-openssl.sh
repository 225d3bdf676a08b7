#!/usr/bin/env bash
# Compares blobseal's AES-256-XTS decryption of 4 KiB sectors (crypto/xts,
# one core) with `openssl speed -evp aes-256-xts -decrypt -bytes 4096` on the
# same machine, and prints GB/s (10^9 bytes/s) and ratios.
#
# openssl speed divides by the CPU *user time* it used unless given -elapsed,
# while Go benchmarks divide by wall-clock time; on a shared machine the two
# differ a lot. So both are measured on both bases:
#   cpu  - openssl speed as is; the Go test binary timed with bash `time`
#          (user seconds) over a fixed number of iterations.
#   wall - openssl speed -elapsed; go test -bench as is.
# Every measurement runs ROUNDS times, alternating, and the best is kept.
#
# Usage: bench/xts-vs-openssl.sh [seconds-per-run] [rounds]   (default 3 3)
set -euo pipefail

secs="${1:-3}"
rounds="${2:-3}"
for n in "$secs" "$rounds"; do
	case "$n" in ''|*[!0-9]*|0) echo "usage: $0 [seconds-per-run] [rounds]  (whole numbers > 0)" >&2; exit 2 ;; esac
done
cd "$(dirname "$0")/.."
for tool in go openssl awk; do
	command -v "$tool" >/dev/null || { echo "$0: $tool not found in PATH" >&2; exit 1; }
done

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
test_bin="$tmp/xts.test"
go test -c -o "$test_bin" ./crypto/xts

# ossl_gbs [extra flags...]: one openssl speed run, printed as GB/s.
ossl_gbs() {
	local out kbs
	out="$(openssl speed "$@" -evp aes-256-xts -decrypt -bytes 4096 -seconds "$secs" 2>/dev/null)"
	# The result line is "AES-256-XTS  <n>k": thousands of bytes per second.
	kbs="$(printf '%s\n' "$out" | awk 'tolower($1) == "aes-256-xts" { v = $2 } END { sub(/k$/, "", v); print v }')"
	if [ -z "$kbs" ]; then
		echo "$0: no aes-256-xts result in openssl output:" >&2
		printf '%s\n' "$out" >&2
		exit 1
	fi
	awk -v k="$kbs" 'BEGIN { printf "%.3f", k / 1e6 }'
}

# go_cpu_gbs IMPL: decrypts a fixed number of sectors and divides the bytes
# by the user CPU seconds the process took.
go_cpu_gbs() {
	local iters=$((secs * 1000000)) user
	user="$( { TIMEFORMAT=%U; time "$test_bin" -test.run '^$' -test.bench "Decrypt4K/$1\$" \
		-test.benchtime "${iters}x" -test.cpu 1 >/dev/null; } 2>&1 )"
	awk -v n="$iters" -v u="$user" 'BEGIN { printf "%.3f", n * 4096 / u / 1e9 }'
}

max() { awk -v a="$1" -v b="$2" 'BEGIN { print (b > a ? b : a) }'; }

echo "openssl: $(openssl version)"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)"
best_impl="$("$test_bin" -test.run '^TestImplementationsPresent$' -test.v 2>&1 | sed -n 's/.*(default \([a-z]*\)).*/\1/p')"
[ -n "$best_impl" ] || best_impl=vaes
ossl_cpu=0 ossl_wall=0 go_cpu=0
go_all=""
for ((r = 1; r <= rounds; r++)); do
	c="$(ossl_gbs)"; ossl_cpu="$(max "$ossl_cpu" "$c")"
	w="$(ossl_gbs -elapsed)"; ossl_wall="$(max "$ossl_wall" "$w")"
	g="$(go_cpu_gbs "$best_impl")"; go_cpu="$(max "$go_cpu" "$g")"
	go_out="$("$test_bin" -test.run '^$' -test.bench 'Decrypt4K' -test.benchtime "${secs}s" -test.cpu 1)"
	go_all+="$go_out"$'\n'
	echo "round $r: openssl cpu $c, openssl wall $w, blobseal $best_impl cpu $g GB/s"
	printf '%s\n' "$go_out" | grep '^BenchmarkDecrypt4K' | sed 's/^/    /'
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)"

printf '\nbest of %d runs; AES-256-XTS decrypt, 4096-byte sectors, one core\n' "$rounds"
printf '%-34s %8s %10s\n' "measurement" "GB/s" "vs openssl"
printf '%-34s %8.2f %10s\n' "openssl speed (cpu time)" "$ossl_cpu" "1.00"
printf '%-34s %8.2f %10.2f\n' "blobseal $best_impl (cpu time)" "$go_cpu" "$(awk -v a="$go_cpu" -v b="$ossl_cpu" 'BEGIN { print a / b }')"
printf '%-34s %8.2f %10s\n' "openssl speed -elapsed (wall)" "$ossl_wall" "1.00"
# Benchmark lines end in "<n> MB/s" (10^6 bytes/s).
printf '%s' "$go_all" | awk -v o="$ossl_wall" '
	/^BenchmarkDecrypt4K\// && $(NF) == "MB/s" {
		name = $1; sub(/^BenchmarkDecrypt4K\//, "", name); sub(/-[0-9]+$/, "", name)
		g = $(NF-1) / 1000
		if (!(name in best)) order[n++] = name
		if (g > best[name]) best[name] = g
	}
	END { for (i = 0; i < n; i++) printf "%-34s %8.2f %10.2f\n", "blobseal " order[i] " (wall)", best[order[i]], best[order[i]] / o }'
