#!/usr/bin/env bash
# Runs every test: builds what the guests need (scripts/build.sh), then the unit tests of every
# crate and the end-to-end tests in tests/, which boot real guests with the runtime just built.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
scripts/build.sh
# The workspace lints (Cargo.toml: missing docs, unsafe without SAFETY, broken doc links) and
# clippy's defaults hold everywhere.
cargo clippy --quiet --workspace --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --quiet --workspace --no-deps
# One formatting (rustfmt's defaults) everywhere.
cargo fmt --all -- --check || { echo "test: cargo fmt --all would change the files above" >&2; exit 1; }
# shellcheck disable=SC1091
source build/env
export ROOTCELL_E2E=1
# The runtime's unit tests linked statically, for tests/e2e/cgroup_v2.rs to run in a guest.
ROOTCELL_STATIC_UNIT_TESTS=$(RUSTFLAGS="-C target-feature=+crt-static" cargo test --release \
    -p rootcell --lib --target x86_64-unknown-linux-gnu --no-run --message-format=json |
    jq -r 'select(.executable != null) | .executable')
export ROOTCELL_STATIC_UNIT_TESTS
cargo test --release --workspace --no-fail-fast -- --test-threads="${TEST_THREADS:-2}"
