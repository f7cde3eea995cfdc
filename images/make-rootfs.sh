#!/usr/bin/env bash
# Makes a minimal root filesystem from Debian's busybox-static: /bin/busybox, its applet links,
# /etc/passwd and /etc/group, and the usual empty directories.
#
# Usage: images/make-rootfs.sh ROOTFS_DIR
set -euo pipefail
rootfs=${1:?usage: make-rootfs.sh ROOTFS_DIR}
busybox=${BUSYBOX:-/bin/busybox}
[ -x "$busybox" ] || { echo "make-rootfs: $busybox missing: apt-get install busybox-static (scripts/setup.sh does)" >&2; exit 1; }
mkdir -p "$rootfs"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,root,home,mnt,var,run}
chmod 1777 "$rootfs/tmp"
cp "$busybox" "$rootfs/bin/busybox"
for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$rootfs/bin/$applet"
done
cat > "$rootfs/etc/passwd" <<'P'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
P
cat > "$rootfs/etc/group" <<'G'
root:x:0:
nogroup:x:65534:
G
echo "$rootfs"
