# Steps shared by the guest kernel builds, sourced by images/build-kernel.sh (rootcell's kernel)
# and images/build-cloud-kernel.sh (the benchmark's comparison kernel). Each prints progress to
# stderr under the calling script's name ($name) and exits on failure.

# Prints the cache entry $1 and exits if it is complete.
kernel_use_cached() {
    if [ -f "$1/vmlinux" ] && [ -f "$1/bzImage" ]; then
        echo "$1"
        exit 0
    fi
}

# Unpacks the kernel source tarball $2 into the work directory $1 (once) and enters it.
kernel_unpack() {
    mkdir -p "$1"
    if [ ! -f "$1/.unpacked" ]; then
        echo "$name: unpacking $2" >&2
        tar -C "$1" -xf "$2" --strip-components=1
        touch "$1/.unpacked"
    fi
    cd "$1"
}

# Merges the fragment files "$@" into .config, resolves it, and checks that every option line
# matching the pattern $1 survived (a dropped one means a missing dependency).
kernel_merge_config() {
    local pattern=$1 missing=0 line
    shift
    scripts/kconfig/merge_config.sh -m .config "$@" >/dev/null
    make -s ARCH=x86_64 olddefconfig >/dev/null
    while IFS= read -r line; do
        # shellcheck disable=SC2254 # the pattern is meant to match
        case "$line" in $pattern) grep -qx "$line" .config || { echo "$name: option not applied: $line" >&2; missing=1; } ;; esac
    done < <(cat "$@")
    [ "$missing" = 0 ] || { echo "$name: fix the config fragment (an option's dependency is missing)" >&2; exit 1; }
}

# Builds the make targets "${@:3}" in the work directory $1 with $JOBS jobs and stores vmlinux,
# bzImage, config and release in the cache entry $2, then removes the work directory.
kernel_compile_store() {
    local work=$1 out=$2
    shift 2
    make -s ARCH=x86_64 -j"$jobs" "$@" >"$work/build.log" 2>&1 || { tail -30 "$work/build.log" >&2; exit 1; }
    mkdir -p "$out.tmp"
    cp vmlinux "$out.tmp/vmlinux"
    cp arch/x86/boot/bzImage "$out.tmp/bzImage"
    cp .config "$out.tmp/config"
    make -s kernelrelease > "$out.tmp/release"
    rm -rf "$out"; mv "$out.tmp" "$out"
    cd /; rm -rf "$work"
    echo "$out"
}
