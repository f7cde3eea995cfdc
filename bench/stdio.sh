#!/usr/bin/env bash
# stdio throughput between the host and a container through `rootcell run` (and runc for scale).
# The container prints "ready" first, so the clock starts only once the guest is up: boot time is
# not in the figure. stdout: the container writes SIZE bytes, the host reads them. stdin: the host
# writes SIZE bytes, the container reads them and prints "done" at EOF.
#
# Usage: bench/stdio.sh [MIB]   (default 1024, the 1 GiB the issue asks for)
set -euo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
mib=${1:-1024}
make_bundle "$work/out" sh -c "echo ready; dd if=/dev/zero bs=65536 count=$((mib * 16)) 2>/dev/null"
make_bundle "$work/in" sh -c "echo ready; dd of=/dev/null bs=65536 2>/dev/null; echo done"

# pump DIRECTION CMD... : runs CMD with pipes, prints MiB/s for the MIB transfer after "ready".
pump() {
    python3 - "$mib" "$@" <<'PY'
import os, subprocess, sys, time
mib, direction, cmd = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
size = mib << 20
p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(os.environ.get("BENCH_ERR", "/dev/null"), "w"), bufsize=0)
out = p.stdout
line = b""
while not line.endswith(b"ready\n"):
    c = out.read(1)
    if not c:
        sys.exit("container exited before ready")
    line += c
t0 = time.monotonic()
if direction == "out":
    got = 0
    while True:
        b = out.read(1 << 20)
        if not b:
            break
        got += len(b)
    t1 = time.monotonic()
    if got != size:
        sys.exit(f"read {got} bytes, expected {size}")
else:
    chunk = b"\0" * (1 << 20)
    for _ in range(mib):
        p.stdin.write(chunk)
    p.stdin.close()
    rest = out.read()
    t1 = time.monotonic()
    if b"done" not in rest:
        sys.exit("container did not report done")
p.wait()
print(f"{mib / (t1 - t0):.1f} {t1 - t0:.2f}")
PY
}

printf '\nstdio throughput, %d MiB each way (clock starts at the container'"'"'s "ready")\nmachine: %s\n' "$mib" "$(machine)"
printf '%-10s %-8s %10s %10s\n' runtime stream "MiB/s" "seconds"
for dir in out in; do
    read -r rate secs < <(pump "$dir" "$ROOTCELL_BIN" --root "$work/state-rc" run --bundle "$work/$dir" "stdio-$dir-$$")
    printf '%-10s %-8s %10s %10s\n' rootcell "std$dir" "$rate" "$secs"
    if command -v runc >/dev/null; then
        read -r rate secs < <(pump "$dir" runc --root "$work/state-runc" run --bundle "$work/$dir" "stdio-$dir-$$")
        printf '%-10s %-8s %10s %10s\n' runc "std$dir" "$rate" "$secs"
    fi
done
