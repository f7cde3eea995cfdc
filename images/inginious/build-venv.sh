#!/usr/bin/env bash
# Builds a Python virtual environment with INGInious (backend, docker agent, client library) from
# PyPI, on Debian's python3. The result is cached outside the checkout, keyed by a hash of its
# inputs (INGInious version, the interpreter, this script), so a second run only prints where it is.
#
# Usage: images/inginious/build-venv.sh      -> prints the venv directory (bin/inginious-backend,
#                                               bin/inginious-agent-docker, bin/python)
# Env:   ROOTCELL_CACHE (default /var/cache/rootcell), INGINIOUS_VERSION (default 0.9.2)
set -euo pipefail
cache=${ROOTCELL_CACHE:-/var/cache/rootcell}
version=${INGINIOUS_VERSION:-0.9.2}
python=/usr/bin/python3
name=build-inginious-venv
[ -x "$python" ] || { echo "$name: $python missing: scripts/install-deps.sh installs python3-venv" >&2; exit 1; }
"$python" -c 'import venv, ensurepip' 2>/dev/null ||
    { echo "$name: python3 has no venv/ensurepip: scripts/install-deps.sh installs python3-venv" >&2; exit 1; }

key=$( { echo "inginious==$version"; "$python" --version; sha256sum "$0" | cut -d' ' -f1; } | sha256sum | cut -c1-16)
out="$cache/inginious-venv-$key"
# A venv's scripts name its directory in their #! lines, so it is built in place; .complete is
# written last and marks a usable one. Concurrent builds wait for each other.
if [ -f "$out/.complete" ]; then
    echo "$out"
    exit 0
fi
mkdir -p "$cache"
exec 9>"$out.lock"
flock 9
if [ -f "$out/.complete" ]; then
    echo "$out"
    exit 0
fi
rm -rf "$out"
echo "$name: creating $out" >&2
"$python" -m venv "$out"
echo "$name: pip install inginious==$version (from PyPI)" >&2
"$out/bin/pip" install --quiet --disable-pip-version-check --no-input "inginious==$version" >"$out.log" 2>&1 ||
    { tail -30 "$out.log" >&2; exit 1; }
for tool in inginious-backend inginious-agent-docker; do
    [ -x "$out/bin/$tool" ] || { echo "$name: $tool missing after install" >&2; exit 1; }
done
"$out/bin/python" -c 'import inginious.client.client, inginious.frontend.course_factory' ||
    { echo "$name: the INGInious client library does not import" >&2; exit 1; }
"$out/bin/pip" freeze --disable-pip-version-check > "$out/requirements.lock"
rm -f "$out.log"
touch "$out/.complete"
echo "$out"
