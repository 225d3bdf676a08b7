#!/usr/bin/env bash
# Installs what blobseal's tests, benchmarks and demo use on Debian 12:
# cryptsetup, veritysetup and e2fsprogs as independent references, fuse3 for mounts,
# rclone and fuse2fs as benchmark peers, fio for the write benchmark, and Azurite (npm) as the blob storage server.
#
# Run it as yourself: it elevates only the steps that need root (apt-get,
# npm -g), with sudo when you are not root and sudo exists; as root (minimal
# images and CI have no sudo) it runs them directly. Go modules land in the
# invoking user's cache.
set -euo pipefail

as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo -E "$@"
  else
    echo "install-deps: '$*' needs root: run this script as root or install sudo" >&2
    return 1
  fi
}

need_apt=()
for tool in cryptsetup:cryptsetup-bin veritysetup:cryptsetup-bin mkfs.ext4:e2fsprogs debugfs:e2fsprogs fusermount3:fuse3 fuse2fs:fuse2fs rclone:rclone openssl:openssl curl:curl fio:fio; do
  cmd=${tool%%:*} pkg=${tool#*:}
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || [ -x "/sbin/$cmd" ] || need_apt+=("$pkg")
done
# OpenSSL's XTS is reached from the xts tests through Debian's python3-cryptography.
/usr/bin/python3 -c 'import cryptography' 2>/dev/null || need_apt+=(python3-cryptography)
# keyrelease/hsm verifies a recorded Managed HSM response against the system DigiCert root.
[ -f /etc/ssl/certs/DigiCert_Global_Root_G2.pem ] || need_apt+=(ca-certificates)
if [ ${#need_apt[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  for attempt in 1 2 3; do
    as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" && break
    echo "apt-get failed (attempt $attempt), retrying" >&2; sleep $((attempt * 5))
  done
fi

if ! command -v azurite-blob >/dev/null 2>&1; then
  # 3.35.0 is the newest Azurite that runs on Node 20.
  for attempt in 1 2 3; do
    as_root npm install -g --no-audit --no-fund azurite@3.35.0 && break
    echo "npm install failed (attempt $attempt), retrying" >&2; sleep $((attempt * 5))
  done
fi

for attempt in 1 2 3; do go mod download && break; sleep $((attempt * 5)); done
