#!/usr/bin/env bash
# Packs the guest initramfs: the static agent as /init plus the empty directories it mounts on.
# Nothing else: the container's root filesystem arrives over virtio-fs.
#
# Usage: images/build-initramfs.sh AGENT_BINARY OUTPUT.cpio
#
# The archive is left uncompressed: gunzip in the guest kernel cost ~88 M guest instructions at
# every boot (bench/boot-insns.sh), far more than reading a few MiB more from the host.
set -euo pipefail
agent=${1:?usage: build-initramfs.sh AGENT_BINARY OUTPUT.cpio}
out=${2:?usage: build-initramfs.sh AGENT_BINARY OUTPUT.cpio}
[ -x "$agent" ] || { echo "build-initramfs: agent binary $agent missing or not executable" >&2; exit 1; }
if ! file "$agent" 2>/dev/null | grep -q 'statically linked\|static-pie'; then
    # A dynamic agent would fail as /init with a bare "no init found" panic; catch it here.
    ldd "$agent" >/dev/null 2>&1 && { echo "build-initramfs: $agent is dynamically linked; build it with RUSTFLAGS='-C target-feature=+crt-static'" >&2; exit 1; }
fi
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{proc,sys,dev,run,tmp,mnt,etc}
install -m 0755 "$agent" "$stage/init"
# The kernel opens /dev/console for init's stdio before devtmpfs is mounted.
mknod -m 600 "$stage/dev/console" c 5 1
mkdir -p "$(dirname "$out")"
# Fixed timestamps and owners so the same agent gives the same image.
(cd "$stage" && find . -mindepth 1 -exec touch -h -d @0 {} + && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) > "$out.tmp"
mv "$out.tmp" "$out"
echo "$out"
