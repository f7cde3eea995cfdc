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

key=$( { sha256sum "$src_tar" | cut -d' ' -f1; cat "$here"/kernel-config/*.config; sha256sum "$0" | cut -d' ' -f1; } | sha256sum | cut -c1-16)
out="$cache/kernel-$key"
if [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then
    echo "$out"
    exit 0
fi

work="$cache/kernel-build-$key"
mkdir -p "$work"
if [ ! -f "$work/.unpacked" ]; then
    echo "build-kernel: unpacking $src_tar" >&2
    tar -C "$work" -xf "$src_tar" --strip-components=1
    touch "$work/.unpacked"
fi
cd "$work"
echo "build-kernel: configuring (tinyconfig + kernel-config/*.config)" >&2
make -s ARCH=x86_64 tinyconfig >/dev/null
scripts/kconfig/merge_config.sh -m .config "$here"/kernel-config/*.config >/dev/null
make -s ARCH=x86_64 olddefconfig >/dev/null
# Every requested option must have survived olddefconfig (a dropped one means a missing dependency).
missing=0
while IFS= read -r line; do
    case "$line" in CONFIG_*=*) grep -qx "$line" .config || { echo "build-kernel: option not applied: $line" >&2; missing=1; } ;; esac
done < <(cat "$here"/kernel-config/*.config)
[ "$missing" = 0 ] || { echo "build-kernel: fix kernel-config/ (an option's dependency is missing)" >&2; exit 1; }

echo "build-kernel: compiling with -j$jobs (several minutes the first time)" >&2
make -s ARCH=x86_64 -j"$jobs" vmlinux bzImage >"$work/build.log" 2>&1 || { tail -30 "$work/build.log" >&2; exit 1; }
mkdir -p "$out.tmp"
cp vmlinux "$out.tmp/vmlinux"
cp arch/x86/boot/bzImage "$out.tmp/bzImage"
cp .config "$out.tmp/config"
make -s kernelrelease > "$out.tmp/release"
rm -rf "$out"; mv "$out.tmp" "$out"
cd /; rm -rf "$work"
echo "$out"
