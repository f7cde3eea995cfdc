#!/usr/bin/env bash
# Builds what the nested-KVM lane (scripts/l1.sh) boots as L1: Debian 12's cloud kernel (apt-get
# download + dpkg-deb -x, no install) and a small initramfs holding busybox, the modules L1 needs
# (virtio-pci, virtio-fs, overlay, irqbypass/kvm/kvm_amd, tun and the network pieces). The result
# is cached outside the checkout, keyed by a hash of every input (the kernel package's name and
# version, busybox, this script), so a second run only prints where it is. The /init
# (images/l1-init.sh) is not in it: scripts/l1.sh appends it to every boot.
#
# Usage: images/build-l1.sh          -> prints the cache directory (vmlinuz, initramfs.cpio, release)
# Env:   ROOTCELL_CACHE (default /var/cache/rootcell), ROOTCELL_L1_KERNEL_PKG (default: what
#        linux-image-cloud-amd64 depends on)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${ROOTCELL_CACHE:-/var/cache/rootcell}
busybox=/bin/busybox

# Modules L1 loads, in this order after their dependencies (resolved from modules.dep).
# The netfilter ones are what dockerd's iptables rules (iptables-nft: NAT for the default bridge
# and -p, conntrack, addrtype) need, and xt_comment for Podman's CNI bridge and firewall plugins
# (every rule they add has `-m comment`), and xt_physdev for the FORWARD rule the tests' Docker
# 26 daemon adds where bridged frames pass iptables (br_netfilter); L1 cannot modprobe them (the
# host's /lib/modules is not L1's).
modules=(virtio_pci virtiofs overlay irqbypass kvm kvm-amd tun veth bridge sch_ingress act_mirred
         cls_u32 cls_bpf vsock nf_tables nft_compat nft_chain_nat xt_MASQUERADE xt_addrtype
         xt_conntrack xt_nat xt_tcpudp xt_comment br_netfilter xt_physdev)

pkg=${ROOTCELL_L1_KERNEL_PKG:-$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    awk '/Depends: linux-image-[0-9]/ {print $2; exit}')}
[ -n "$pkg" ] || { echo "build-l1: cannot resolve linux-image-cloud-amd64 (apt-get update?)" >&2; exit 1; }
ver=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}')
[ -n "$ver" ] && [ "$ver" != "(none)" ] || { echo "build-l1: no candidate version of $pkg" >&2; exit 1; }
[ -x "$busybox" ] || { echo "build-l1: $busybox missing (busybox-static)" >&2; exit 1; }

key=$( { echo "$pkg=$ver ${modules[*]}"; sha256sum "$0" "$busybox" | cut -d' ' -f1; } |
    sha256sum | cut -c1-16)
out="$cache/l1-$key"
if [ -f "$out/initramfs.cpio" ]; then echo "$out"; exit 0; fi

mkdir -p "$cache"
exec 9>"$out.lock"
flock 9
if [ -f "$out/initramfs.cpio" ]; then echo "$out"; exit 0; fi

work=$(mktemp -d "$cache/l1-build-XXXXXX")
trap 'rm -rf "$work"' EXIT
# The package itself is kept too (the same version need not be fetched again).
deb="$cache/l1-deb/${pkg}_${ver}.deb"
if [ ! -f "$deb" ]; then
    echo "build-l1: fetching $pkg $ver" >&2
    mkdir -p "$work/dl" "$cache/l1-deb"
    (cd "$work/dl" && apt-get download -q "$pkg=$ver" >/dev/null 2>"$work/apt.err") ||
        { cat "$work/apt.err" >&2; echo "build-l1: apt-get download $pkg=$ver failed" >&2; exit 1; }
    mv "$work"/dl/*.deb "$deb"
fi
dpkg-deb -x "$deb" "$work/deb"
release=$(ls "$work/deb/lib/modules")
moddir="$work/deb/lib/modules/$release"
# Appends a module's .ko path to `order` after its dependencies, each once. The package ships
# no modules.dep (its postinst runs depmod): the dependencies come from each module's .modinfo.
declare -A path_of=() seen=()
while read -r p; do
    n=$(basename "$p"); n=${n%%.ko*}; path_of[${n//-/_}]=$p
done < <(cd "$moddir" && find kernel -name '*.ko*')
order=()
resolve() {
    local name=${1//-/_} path dep
    path=${path_of[$name]:-}
    [ -n "$path" ] || { echo "build-l1: module $1 not in $pkg" >&2; exit 1; }
    [ -n "${seen[$path]:-}" ] && return 0
    seen[$path]=1
    for dep in $(objcopy -O binary --only-section=.modinfo "$moddir/$path" /dev/stdout |
            tr '\0' '\n' | sed -n 's/^depends=//p' | tr ',' ' '); do
        resolve "$dep"
    done
    order+=("$path")
}
for m in "${modules[@]}"; do resolve "$m"; done

stage="$work/stage"
mkdir -p "$stage"/{bin,proc,sys,dev,run,tmp,newroot,modules}
cp "$busybox" "$stage/bin/busybox"
ln -s busybox "$stage/bin/sh"
: > "$stage/modules/order"
for p in "${order[@]}"; do
    f=$(basename "$p")
    case "$f" in
        *.ko) cp "$moddir/$p" "$stage/modules/$f" ;;
        *.ko.xz) xz -dc "$moddir/$p" > "$stage/modules/${f%.xz}"; f=${f%.xz} ;;
        *.ko.zst) zstd -qdc "$moddir/$p" > "$stage/modules/${f%.zst}"; f=${f%.zst} ;;
        *) echo "build-l1: unexpected module file $p" >&2; exit 1 ;;
    esac
    echo "${f%.ko}" >> "$stage/modules/order"
done
mknod -m 600 "$stage/dev/console" c 5 1
mkdir -p "$work/out"
(cd "$stage" && find . -mindepth 1 -exec touch -h -d @0 {} + && find . -mindepth 1 | LC_ALL=C sort |
    cpio -o -H newc -R 0:0 --quiet) > "$work/out/initramfs.cpio"
cp "$work/deb/boot/vmlinuz-$release" "$work/out/vmlinuz"
echo "$release" > "$work/out/release"
echo "$pkg=$ver" > "$work/out/package"
rm -rf "$out"
mv "$work/out" "$out"
echo "build-l1: L1 kernel $release and initramfs in $out" >&2
echo "$out"
