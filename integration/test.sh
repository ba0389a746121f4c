#!/usr/bin/env bash
# Runs every test of the project on this machine: formatting, lints, docs, unit and property
# tests, the QMP client against a fake server and against real QEMU, a short fuzz run, and on the
# namespace test bed the stock COLO pair (30+ checkpoints, failover both ways) and the
# checkpoint-barrier relay and qmp-driver CLI (epoch order, slow and stuck subscribers,
# start/status/checkpoint/failover), and the pair on colo-blockd and on colo-proxyd (failover
# in the middle of a checkpoint, A/B against colo-compare).
#
# Needs root (network namespaces, taps). Installs and builds what it needs first through
# integration/setup.sh (idempotent; QEMU and the guest are cached in $COLO_CACHE, default
# /var/cache/colo). Extra arguments go to cargo nextest (for example a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "integration/test.sh: run as root (sudo): the test bed needs network namespaces and taps" >&2
  exit 2
fi

step() { printf '\n== %s\n' "$*"; }

step "setup (packages, patched QEMU, guest)"
integration/setup.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --locked --workspace --all-targets -- -D warnings

step "cargo doc -D warnings"
RUSTDOCFLAGS="-D warnings" cargo doc --locked --workspace --no-deps

step "release builds of the daemons the test bed runs (qmp-driver relay, colo-blockd, colo-proxyd)"
# The bed runs the daemons as they ship (release builds), so the figures it prints (the relay's
# added pause per checkpoint, HTTP latency through colo-proxyd) are the ones an operator gets.
cargo build --locked --release -p qmp-driver -p colo-blockd -p colo-proxyd
export COLO_QMP_DRIVER="$PWD/target/release/qmp-driver"
export COLO_BLOCKD="$PWD/target/release/colo-blockd"
export COLO_PROXYD="$PWD/target/release/colo-proxyd"

step "tests (unit, property, fake QMP server, real QEMU, COLO pairs on the test bed)"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --workspace --no-fail-fast "$@"
else
  # Without nextest, one test at a time: QEMU tests must not run side by side on two cores.
  echo "cargo-nextest not found; falling back to cargo test with one thread" >&2
  cargo test --locked --workspace --no-fail-fast "$@" -- --test-threads=1
fi
cargo test --locked --workspace --doc

step "fuzz the parsers briefly (fuzz/run-briefly.sh)"
fuzz/run-briefly.sh "${FUZZ_SECONDS:-15}"
