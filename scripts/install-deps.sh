#!/usr/bin/env bash
# Installs the Debian packages rootcell needs to build its guest and boot it (idempotent: apt runs
# only when something is missing).
set -euo pipefail
pkgs=(
    qemu-system-x86                                      # the VMM that boots guests where KVM is unusable
    linux-source-6.12 flex bison bc libelf-dev libssl-dev cpio lz4   # guest kernel build
    busybox-static                                       # example and test root filesystems
    libcap-ng-dev libseccomp-dev                         # -sys crates of the device back ends
    iproute2 jq file
    binutils                                             # nested-KVM lane: objcopy reads module dependencies
    docker.io containerd runc                            # Docker end-to-end tests and runc comparisons
    runsc                                                # gVisor, compared in bench/pool.sh
    debootstrap python3-venv                             # INGInious test: grading image, INGInious venv
    podman containernetworking-plugins catatonit        # Podman pods sharing a VM (tests/e2e/shared_vm.rs)
    protobuf-compiler                                    # CRI bindings (k8s-cri) of the containerd CRI test
    gdb                                                  # the shims' backtraces in a stuck ctr call's report (tests/support)
)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || { echo "install-deps: need root to install: ${missing[*]}" >&2; exit 1; }
    echo "install-deps: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "install-deps: cargo not found; install a Rust toolchain (rustup) first" >&2; exit 1; }
