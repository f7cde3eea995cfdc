#!/usr/bin/env bash
# From a fresh Debian 12 machine to a container running as root in its own microVM:
# installs packages, builds the guest kernel, agent, initramfs and runtime, installs them
# (/usr/local/bin/rootcell and containerd-shim-rootcell-v2, /usr/local/share/rootcell/), and runs the example bundle.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
scripts/build.sh
install -D -m 0755 target/release/rootcell /usr/local/bin/rootcell
# containerd finds io.containerd.rootcell.v2 as containerd-shim-rootcell-v2 on its PATH; the shim
# runs the rootcell binary beside it.
install -D -m 0755 target/release/containerd-shim-rootcell-v2 /usr/local/bin/containerd-shim-rootcell-v2
install -D -m 0644 build/bzImage /usr/local/share/rootcell/bzImage
install -D -m 0644 build/vmlinux /usr/local/share/rootcell/vmlinux
install -D -m 0644 build/initramfs.cpio /usr/local/share/rootcell/initramfs.cpio
echo "setup: installed /usr/local/bin/rootcell, /usr/local/bin/containerd-shim-rootcell-v2 and /usr/local/share/rootcell/" >&2

id=demo-$$
echo "setup: host kernel: $(uname -r)"
echo "setup: running build/bundle in a microVM: rootcell run --bundle build/bundle $id"
/usr/local/bin/rootcell run --bundle build/bundle "$id"
