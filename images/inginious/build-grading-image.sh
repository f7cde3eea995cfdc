#!/usr/bin/env bash
# Builds the root file system of an INGInious grading image ("default" environment) from Debian
# packages, for `docker import` (no registry can be reached): Debian bookworm (debootstrap, minbase)
# with python3 and what INGInious' container side needs, plus INGInious' own
# base-containers/base from its PyPI sdist, put in place as its Dockerfile does (rockylinux there,
# Debian here):
#   - the tools in bin/ (INGInious, run_student, feedback-*, ...) in /bin, INGInious mode 700;
#   - inginious_container_api in python3's dist-packages, also under the old name `inginious`,
#     each with a .pth file as the Dockerfile writes;
#   - the `worker` user and group (4242), home /task; the locale lines in /etc/environment;
#   - labels, environment and command (base + default Dockerfiles) in `changes`, one
#     `docker import --change` each.
# Not carried over: ipython and mypy (pip-installed there; only bin/inginious-ipython uses
# IPython), openssh-server (ssh debugging sessions), man/screen/nano.
#
# Two cache entries outside the checkout, each keyed by a hash of its inputs:
#   debootstrap-<key>/rootfs.tar       Debian's part (suite, variant, mirror, packages, debootstrap)
#   inginious-image-<key>/rootfs.tar   + changes (one Dockerfile instruction a line) + name
# A second run only prints the image directory.
#
# Usage: images/inginious/build-grading-image.sh   -> prints the image directory
# Then:  docker import $(sed 's/^/--change=/' DIR/changes ...) DIR/rootfs.tar "$(cat DIR/name)"
#        (tests/e2e/inginious.rs does this with the lines of DIR/changes)
# Env:   ROOTCELL_CACHE (default /var/cache/rootcell), DEBIAN_MIRROR (default
#        http://deb.debian.org/debian), INGINIOUS_VERSION (default 0.9.2; with another version
#        set INGINIOUS_SDIST_SHA256 too)
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
cache=${ROOTCELL_CACHE:-/var/cache/rootcell}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
version=${INGINIOUS_VERSION:-0.9.2}
sdist_sha256=${INGINIOUS_SDIST_SHA256:-dcfdd96171a7ad2a059549ce78bfa9e4bd7171ceea931581912312349cfcf43f}
suite=bookworm
variant=minbase
name=build-grading-image
# python3 and the modules the container side imports (msgpack, zmq, jinja2, yaml,
# timeout-decorator; Debian's packages where the Dockerfile uses pip; python3-cffi-backend by name,
# as debootstrap does not resolve the virtual package python3-zmq needs), then the Dockerfile's
# tools that Debian packages under these names.
packages=python3,python3-msgpack,python3-zmq,python3-cffi-backend,python3-jinja2,python3-yaml,python3-timeout-decorator,locales,iproute2,procps,file,jq,bc,zip,unzip,openssl,curl,net-tools,ca-certificates
[ "$(id -u)" = 0 ] || { echo "$name: needs root (debootstrap, chroot, file owners)" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "$name: debootstrap missing: scripts/install-deps.sh installs it" >&2; exit 1; }

debootstrap_version=$(dpkg-query -W -f='${Version}' debootstrap)
base_key=$(echo "debootstrap $debootstrap_version --variant=$variant --include=$packages $suite $mirror" | sha256sum | cut -c1-16)
base="$cache/debootstrap-$base_key"
key=$( { echo "$base_key inginious-$version $sdist_sha256"; sha256sum "$0" | cut -d' ' -f1; } | sha256sum | cut -c1-16)
out="$cache/inginious-image-$key"
if [ -f "$out/rootfs.tar" ] && [ -f "$out/changes" ]; then
    echo "$out"
    exit 0
fi
mkdir -p "$cache"
# Concurrent builds wait for each other (the first one's result serves the others).
exec 9>"$cache/inginious-image.lock"
flock 9
if [ -f "$out/rootfs.tar" ] && [ -f "$out/changes" ]; then
    echo "$out"
    exit 0
fi

work=$(mktemp -d "$cache/$name.XXXXXX")
cleanup() {
    # debootstrap mounts proc and sys in the target; never leave them behind.
    local m
    for m in $(grep -F " $work/" /proc/self/mounts | cut -d' ' -f2 | sort -r); do umount -l "$m" || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# 1. Debian's part, cached as a tarball.
if [ ! -f "$base/rootfs.tar" ]; then
    echo "$name: debootstrap --variant=$variant $suite from $mirror (a few minutes the first time)" >&2
    debootstrap --variant="$variant" --include="$packages" "$suite" "$work/deb" "$mirror" >"$work/debootstrap.log" 2>&1 ||
        { tail -30 "$work/debootstrap.log" >&2; [ -f "$work/deb/debootstrap/debootstrap.log" ] && tail -30 "$work/deb/debootstrap/debootstrap.log" >&2; exit 1; }
    # Package lists and downloaded .debs are not part of an image.
    rm -rf "$work/deb/var/cache/apt/archives/"*.deb "$work/deb/var/lib/apt/lists/"*
    mkdir -p "$base.tmp"
    tar -C "$work/deb" --numeric-owner -cf "$base.tmp/rootfs.tar" .
    rm -rf "$base"; mv "$base.tmp" "$base"
    rm -rf "$work/deb"
fi

# 2. INGInious' sdist from PyPI (base-containers/ ships in it), checked against its known digest.
sdist_dir="$cache/inginious-sdist-$version"
sdist="$sdist_dir/inginious-$version.tar.gz"
if [ ! -f "$sdist" ] || [ "$(sha256sum "$sdist" | cut -d' ' -f1)" != "$sdist_sha256" ]; then
    echo "$name: downloading the INGInious $version sdist from PyPI" >&2
    venv=$("$here/images/inginious/build-venv.sh")
    mkdir -p "$work/sdist"
    "$venv/bin/pip" download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
        -d "$work/sdist" "inginious==$version" >"$work/pip.log" 2>&1 || { tail -20 "$work/pip.log" >&2; exit 1; }
    got=$(find "$work/sdist" -maxdepth 1 -iname "inginious-$version.tar.gz" | head -1)
    [ -n "$got" ] || { echo "$name: pip did not download inginious-$version.tar.gz" >&2; exit 1; }
    digest=$(sha256sum "$got" | cut -d' ' -f1)
    [ "$digest" = "$sdist_sha256" ] || { echo "$name: $got has sha256 $digest, expected $sdist_sha256" >&2; exit 1; }
    mkdir -p "$sdist_dir"; mv "$got" "$sdist"
fi

# 3. The image: Debian's part + base-containers/base, as its Dockerfile builds it.
echo "$name: adding INGInious $version base-containers/base" >&2
root="$work/rootfs"
mkdir -p "$root"
tar -C "$root" --numeric-owner -xf "$base/rootfs.tar"
mkdir -p "$work/src"
tar -C "$work/src" -xzf "$sdist" --strip-components=1 --wildcards '*/base-containers/base/*'
src="$work/src/base-containers/base"
grep -q '^LABEL org.inginious.grading.agent_version=3$' "$src/Dockerfile" ||
    { echo "$name: base-containers/base/Dockerfile no longer says agent_version=3; update this script" >&2; exit 1; }
# ADD . /INGInious; chmod -R 755 /INGInious/bin; chmod 700 /INGInious/bin/INGInious; mv /INGInious/bin/* /bin
install -m 0755 "$src"/bin/* "$root/usr/bin/"
chmod 0700 "$root/usr/bin/INGInious"
# The container API in python3's path, with the .pth files the Dockerfile writes.
site="$root/usr/lib/python3/dist-packages"
for pkg in inginious_container_api inginious; do
    install -d -m 0755 "$site/$pkg"
    install -m 0644 "$src"/inginious_container_api/*.py "$site/$pkg/"
    echo "$pkg" > "$site/$pkg.pth"
done
# groupadd --gid 4242 worker; useradd --uid 4242 --gid 4242 worker --home-dir /task
chroot "$root" groupadd --gid 4242 worker
chroot "$root" useradd --uid 4242 --gid 4242 --home-dir /task worker
# The locale the Dockerfile's ENV names, and its /etc/environment lines (for ssh sessions).
echo 'en_US.UTF-8 UTF-8' > "$root/etc/locale.gen"
chroot "$root" locale-gen >/dev/null
printf 'LANG=en_US.UTF-8\nLANGUAGE=en_US:en\nLC_ALL=en_US.UTF-8\n' >> "$root/etc/environment"
# Checks that the grading entry point's imports resolve inside the image.
chroot "$root" /usr/bin/python3 -c 'import msgpack, zmq, zmq.asyncio, jinja2, yaml, inginious_container_api.feedback, inginious_container_api.run_student, feedback' ||
    { echo "$name: INGInious' container side does not import in the image" >&2; exit 1; }
rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"* "$root/tmp/"*

mkdir -p "$out.tmp"
tar -C "$root" --numeric-owner -cf "$out.tmp/rootfs.tar" .
cat > "$out.tmp/changes" <<'CHANGES'
LABEL org.opencontainers.image.description="INGInious grading environment (Debian bookworm + base-containers/base), built by rootcell's images/inginious/build-grading-image.sh"
LABEL org.inginious.grading.agent_version=3
LABEL org.inginious.grading.name=default
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
ENV LANG=en_US.UTF-8
ENV LANGUAGE=en_US:en
ENV LC_ALL=en_US.UTF-8
CMD ["INGInious"]
CHANGES
echo "rootcell/inginious-c-default:$version" > "$out.tmp/name"
rm -rf "$out"; mv "$out.tmp" "$out"
echo "$out"
