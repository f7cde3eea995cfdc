#!/usr/bin/env bash
# Builds the comparison guest kernel for the benchmarks: Debian's own cloud kernel config
# (config.amd64_none_cloud-amd64, what a user would otherwise reach for) from the same
# linux-source-6.12, with the drivers a rootcell guest needs switched from modules to built in
# (there is no module loading in the rootcell initramfs). Cached like images/build-kernel.sh,
# keyed by a hash of every input; this never touches build-kernel.sh's cache entries.
#
# Usage: images/build-cloud-kernel.sh      -> prints the cache directory holding bzImage, vmlinux
# Env:   ROOTCELL_CACHE (default /var/cache/rootcell), JOBS (default nproc)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
name=build-cloud-kernel
# shellcheck source=images/kernel-common.sh
. "$here/images/kernel-common.sh"
cache=${ROOTCELL_CACHE:-/var/cache/rootcell}
jobs=${JOBS:-$(nproc)}
src_tar=/usr/src/linux-source-6.12.tar.xz
cloud_cfg=/usr/src/linux-config-6.12/config.amd64_none_cloud-amd64.xz
for f in "$src_tar" "$cloud_cfg"; do
    [ -f "$f" ] || { echo "build-cloud-kernel: $f missing; apt-get install linux-source-6.12" >&2; exit 1; }
done

# What a rootcell guest needs built in. Debug info is off only to keep the build time sane here:
# it does not change what the kernel executes at boot (and BTF is dropped anyway without pahole).
# The Debian certificate paths point into the Debian packaging tree, absent from the plain source.
fragment='CONFIG_VIRTIO=y
CONFIG_VIRTIO_MENU=y
CONFIG_VIRTIO_MMIO=y
CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y
CONFIG_VSOCKETS=y
CONFIG_VIRTIO_VSOCKETS=y
CONFIG_VIRTIO_VSOCKETS_COMMON=y
CONFIG_FUSE_FS=y
CONFIG_VIRTIO_FS=y
CONFIG_OVERLAY_FS=y
CONFIG_SERIAL_8250=y
CONFIG_SERIAL_8250_CONSOLE=y
CONFIG_BLK_DEV_INITRD=y
CONFIG_RD_GZIP=y
CONFIG_DEVTMPFS=y
CONFIG_VIRTIO_NET=y
CONFIG_HW_RANDOM_VIRTIO=y
CONFIG_DEBUG_INFO_NONE=y
CONFIG_SYSTEM_TRUSTED_KEYS=""
CONFIG_SYSTEM_REVOCATION_KEYS=""'

# The build recipe, part of the cache key: change it with anything that changes the output. The
# script's own hash is not in the key, so editing a comment does not cost a 1-2 hour rebuild.
recipe='make ARCH=x86_64 bzImage (vmlinux as a side product); recipe 1'
key=$( { sha256sum "$src_tar" "$cloud_cfg" | cut -d' ' -f1; echo "$fragment"; echo "$recipe"; } | sha256sum | cut -c1-16)
out="$cache/cloud-kernel-$key"
kernel_use_cached "$out"

work="$cache/cloud-kernel-build-$key"
kernel_unpack "$work" "$src_tar"
echo "build-cloud-kernel: configuring (Debian cloud-amd64 config + rootcell drivers built in)" >&2
xz -dc "$cloud_cfg" > .config
echo "$fragment" > rootcell.fragment
kernel_merge_config 'CONFIG_*=y' rootcell.fragment

# Only bzImage (and vmlinux on the way): modules are not built, the guest cannot load them anyway.
echo "build-cloud-kernel: compiling with -j$jobs (~3000 objects: about 1 h on 2 idle cores, 2 h shared; modules are not built)" >&2
kernel_compile_store "$work" "$out" bzImage
