#!/usr/bin/env bash
# Builds a Debian 13 (trixie) root file system with its QEMU (10.x) and Docker (26.x, with containerd
# 1.7 and runc), for running rootcell's guests under the QEMU, and rootcell under the Docker, that
# Debian 13 users have, on a Debian 12 host and without changing any host package: debootstrap
# --variant=minbase trixie, then `apt-get install qemu-system-x86 docker.io` in it (Docker's
# daemons run from the root by tests/support/docker.rs, chrooted, on the host's kernel). The
# root also gets `rootcell-qemu`, a wrapper to point ROOTCELL_QEMU at: it starts the root's
# qemu-system-x86_64 through the root's own dynamic loader and libraries, with the root's QEMU
# modules and firmware (QEMU_MODULE_DIR, -L).
#
# The result is cached outside the checkout, keyed by a hash of its inputs (debootstrap version,
# suite, variant, mirror, packages, this script); concurrent builds wait for each other on a flock.
# A second run only prints the directory.
#
# Usage: images/build-trixie-root.sh   -> prints DIR; DIR/rootfs is the root, DIR/rootcell-qemu the
#                                         wrapper, DIR/qemu-version what it reports,
#                                         DIR/docker-version what dockerd, containerd, runc report
# Env:   ROOTCELL_CACHE (default /var/cache/rootcell), DEBIAN_MIRROR (default
#        http://deb.debian.org/debian)
set -euo pipefail
cache=${ROOTCELL_CACHE:-/var/cache/rootcell}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=trixie
variant=minbase
packages="qemu-system-x86 docker.io containerd runc iptables procps"
name=build-trixie-root
[ "$(id -u)" = 0 ] || { echo "$name: needs root (debootstrap, chroot)" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "$name: debootstrap missing: scripts/install-deps.sh installs it" >&2; exit 1; }
[ -f "/usr/share/debootstrap/scripts/$suite" ] || { echo "$name: this debootstrap does not know $suite: scripts/install-deps.sh (debootstrap >= 1.0.128)" >&2; exit 1; }

debootstrap_version=$(dpkg-query -W -f='${Version}' debootstrap)
key=$( { echo "debootstrap $debootstrap_version --variant=$variant $suite $mirror; apt-get install $packages"; sha256sum "$0" | cut -d' ' -f1; } | sha256sum | cut -c1-16)
out="$cache/$suite-$key"
done_() { [ -x "$out/rootcell-qemu" ] && [ -s "$out/qemu-version" ] && [ -s "$out/docker-version" ]; }
if done_; then echo "$out"; exit 0; fi
mkdir -p "$cache"
# Concurrent builds wait for each other (the first one's result serves the others).
exec 9>"$out.lock"
flock 9
if done_; then echo "$out"; exit 0; fi

work=$(mktemp -d "$cache/$name.XXXXXX")
cleanup() {
    # debootstrap and apt mount proc/sys/dev in the target; never leave them behind.
    local m
    for m in $(grep -F " $work/" /proc/self/mounts | cut -d' ' -f2 | sort -r); do umount -l "$m" || true; done
    rm -rf "$work"
}
trap cleanup EXIT
root="$work/rootfs"
start=$(date +%s)
echo "$name: debootstrap --variant=$variant $suite from $mirror (a few minutes the first time)" >&2
debootstrap --variant="$variant" "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 ||
    { tail -30 "$work/debootstrap.log" >&2; [ -f "$root/debootstrap/debootstrap.log" ] && tail -30 "$root/debootstrap/debootstrap.log" >&2; exit 1; }
echo "$name: apt-get install $packages in the root" >&2
# No service starts inside the chroot.
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"; chmod 755 "$root/usr/sbin/policy-rc.d"
cp /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
{ chroot "$root" apt-get update -qq &&
  DEBIAN_FRONTEND=noninteractive chroot "$root" apt-get install -y -qq --no-install-recommends $packages; } >"$work/apt.log" 2>&1 ||
    { tail -30 "$work/apt.log" >&2; exit 1; }
rm -f "$root/usr/sbin/policy-rc.d"
rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*

# The wrapper: the root's QEMU on the root's own loader and libraries, whatever the host has.
cat > "$work/rootcell-qemu" <<'WRAP'
#!/bin/sh
# Runs the qemu-system-x86_64 of the Debian root next to this script with that root's own loader,
# libraries, modules and firmware (made by rootcell's images/build-trixie-root.sh).
d=$(dirname "$(readlink -f "$0")")/rootfs
lib=$d/usr/lib/x86_64-linux-gnu
QEMU_MODULE_DIR=$lib/qemu
export QEMU_MODULE_DIR
exec "$lib/ld-linux-x86-64.so.2" --library-path "$lib:$d/usr/lib" "$d/usr/bin/qemu-system-x86_64" -L "$d/usr/share/qemu" "$@"
WRAP
chmod 755 "$work/rootcell-qemu"
"$work/rootcell-qemu" --version | head -1 > "$work/qemu-version" ||
    { echo "$name: the root's QEMU does not start through the wrapper" >&2; exit 1; }
{ chroot "$root" dockerd --version && chroot "$root" containerd --version && chroot "$root" runc --version | head -1; } \
    > "$work/docker-version" || { echo "$name: the root's dockerd, containerd or runc does not start" >&2; exit 1; }
for m in $(grep -F " $work/" /proc/self/mounts | cut -d' ' -f2 | sort -r); do umount -l "$m" || true; done
rm -rf "$out"; mkdir -p "$out"
mv "$root" "$work/rootcell-qemu" "$work/qemu-version" "$work/docker-version" "$out/"
echo "$name: $(cat "$out/qemu-version"), $(head -1 "$out/docker-version") in $out ($(( $(date +%s) - start )) s)" >&2
echo "$out"
