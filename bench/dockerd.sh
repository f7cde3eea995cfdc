# A private dockerd for the Docker benchmarks (sourced after lib.sh, not run): its own data-root,
# exec-root and socket under $work, rootcell registered by path, the busybox image imported as
# rootcell-bench:busybox; stopped (with every container it still has) on exit. Set
# dockerd_extra_args before sourcing for more dockerd flags (e.g. another --add-runtime).
docker_bin=/usr/bin/docker
[ -x /usr/sbin/dockerd ] && [ -x "$docker_bin" ] || { echo "bench: Debian's docker.io is needed (scripts/install-deps.sh)" >&2; exit 1; }

d="$work/docker"
mkdir -p "$d"
sock="$d/docker.sock"
/usr/sbin/dockerd --data-root "$d/data" --exec-root "$d/exec" --pidfile "$d/dockerd.pid" \
    --host "unix://$sock" --add-runtime "rootcell=$ROOTCELL_BIN" ${dockerd_extra_args:-} >"$d/dockerd.log" 2>&1 &
dockerd_pid=$!
stop_dockerd() {
    local ids
    ids=$("$docker_bin" --host "unix://$sock" ps -aq 2>/dev/null || true)
    [ -n "$ids" ] && "$docker_bin" --host "unix://$sock" rm -f $ids >/dev/null 2>&1 || true
    kill "$dockerd_pid" 2>/dev/null || true
    wait "$dockerd_pid" 2>/dev/null || true
    for m in "$d"/exec/netns/*; do umount -l "$m" 2>/dev/null || true; done
    umount -R -l "$d/data" "$d/exec" 2>/dev/null || true
    bench_cleanup
}
trap stop_dockerd EXIT
# dk ARG... : the docker client against the private daemon.
dk() { "$docker_bin" --host "unix://$sock" "$@"; }
for _ in $(seq 300); do dk version >/dev/null 2>&1 && break; sleep 0.2; done
dk version >/dev/null 2>&1 || { echo "bench: dockerd did not start; see $d/dockerd.log" >&2; tail -5 "$d/dockerd.log" >&2; exit 1; }

"$top/images/make-rootfs.sh" "$d/rootfs" >/dev/null
tar -C "$d/rootfs" -c . | dk import - rootcell-bench:busybox >/dev/null
