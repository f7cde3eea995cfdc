#!/usr/bin/env bash
# Builds everything a guest needs into build/: the guest kernel (cached outside the checkout), the
# static agent and its initramfs, the runtime, and an example busybox bundle. Writes build/env with
# the ROOTCELL_* variables that point the runtime and the tests at these files.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
scripts/install-deps.sh

kdir=$(images/build-kernel.sh)
echo "build: guest kernel $(cat "$kdir/release") in $kdir" >&2

echo "build: agent (static) and runtime" >&2
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --quiet -p rootcell-agent --target x86_64-unknown-linux-gnu
cargo build --release --quiet -p rootcell -p containerd-shim-rootcell-v2
mkdir -p build
images/build-initramfs.sh target/x86_64-unknown-linux-gnu/release/rootcell-agent build/initramfs.cpio >/dev/null
cp "$kdir/bzImage" "$kdir/vmlinux" build/
cp "$kdir/release" build/kernel-release
rm -rf build/bundle && images/make-bundle.sh build/bundle >/dev/null

cat > build/env <<ENV
export ROOTCELL_BIN=$top/target/release/rootcell
export ROOTCELL_KERNEL=$top/build/bzImage
export ROOTCELL_VMLINUX=$top/build/vmlinux
export ROOTCELL_INITRD=$top/build/initramfs.cpio
export ROOTCELL_KERNEL_RELEASE=$(cat "$kdir/release")
ENV
echo "build: done (build/env)" >&2
