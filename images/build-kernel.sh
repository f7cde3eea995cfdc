#!/usr/bin/env bash
# Builds the guest kernel (vmlinux + bzImage) from Debian's linux-source-6.12 and the fragments in
# kernel-config/. The result is cached outside the checkout, keyed by a hash of every input, so a
# second run only prints where it is.
#
# Usage: images/build-kernel.sh            -> prints the cache directory holding vmlinux, bzImage
# Env:   ROOTCELL_CACHE (default /var/cache/rootcell), JOBS (default nproc)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${ROOTCELL_CACHE:-/var/cache/rootcell}
jobs=${JOBS:-$(nproc)}
src_tar=/usr/src/linux-source-6.12.tar.xz
[ -f "$src_tar" ] || { echo "build-kernel: $src_tar missing; run scripts/setup.sh (installs linux-source-6.12)" >&2; exit 1; }

name=build-kernel
# shellcheck source=images/kernel-common.sh
. "$here/images/kernel-common.sh"

key=$( { sha256sum "$src_tar" | cut -d' ' -f1; cat "$here"/kernel-config/*.config; sha256sum "$0" "$here/images/kernel-common.sh" | cut -d' ' -f1; } | sha256sum | cut -c1-16)
out="$cache/kernel-$key"
kernel_use_cached "$out"

work="$cache/kernel-build-$key"
kernel_unpack "$work" "$src_tar"
echo "build-kernel: configuring (tinyconfig + kernel-config/*.config)" >&2
make -s ARCH=x86_64 tinyconfig >/dev/null
kernel_merge_config 'CONFIG_*=*' "$here"/kernel-config/*.config

echo "build-kernel: compiling with -j$jobs (several minutes the first time)" >&2
kernel_compile_store "$work" "$out" vmlinux bzImage
