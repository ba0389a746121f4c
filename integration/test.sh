#!/usr/bin/env bash
# Runs every test of the project on this machine: formatting, lints, docs, unit and property
# tests, the QMP client against a fake server and against real QEMU, a short fuzz run, and on the
# namespace test bed the stock COLO pair (30+ checkpoints, failover both ways) and the
# checkpoint-barrier relay and qmp-driver CLI (epoch order, slow and stuck subscribers,
# start/status/checkpoint/failover), and the pair on colo-blockd and on colo-proxyd (failover
# in the middle of a checkpoint, A/B against colo-compare), the pair with mutual TLS on every
# link (NBD, migration, colo-proxyd's link; strangers refused; the checkpoint pause with and
# without TLS); then the relay's added pause against fake QEMUs.
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

# No incremental compilation: CI builds once from a clean clone, and the incremental caches would
# double the target directory's size on disk.
export CARGO_INCREMENTAL=0

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
cargo build --locked --release -p colo-relay --example relay_pause
export COLO_QMP_DRIVER="$PWD/target/release/qmp-driver"
export COLO_BLOCKD="$PWD/target/release/colo-blockd"
export COLO_PROXYD="$PWD/target/release/colo-proxyd"

# The COLO pairs on the test bed (the colo-testbed package's tests) run last and alone: they
# print pauses, latencies and the relay's added pause per checkpoint, and on two cores any test
# running beside them (proptests, real-QEMU QMP tests) would be in those figures.
#
# Every tier is selected: the unit, property and fake-peer tests that a plain `cargo test` runs,
# and the tiers marked #[ignore = "tier ..."] that need this machine's setup (qemu: the patched
# QEMU; clients: qemu-io, qemu-img, nbdinfo; bed: root, namespaces, QEMU and the guest). A
# selected tier that cannot find what it needs fails.
BED='package(colo-testbed) & kind(test)'
if cargo nextest --version >/dev/null 2>&1; then
  step "tests (unit, property, fake peers; real QEMU and real NBD clients)"
  status=0
  cargo nextest run --locked --workspace --no-fail-fast --no-tests=pass --run-ignored all -E "not ($BED)" "$@" || status=$?
  step "tests: COLO pairs on the test bed, one at a time, nothing beside them"
  cargo nextest run --locked --workspace --no-fail-fast --no-tests=pass --run-ignored all -E "$BED" -j 1 "$@" || status=$?
  if [ "$status" != 0 ]; then
    echo "integration/test.sh: tests failed (see above)" >&2
    exit "$status"
  fi
else
  step "tests (unit, property, fake QMP server, real QEMU, COLO pairs on the test bed)"
  # Without nextest, one test at a time: QEMU tests must not run side by side on two cores.
  echo "cargo-nextest not found; falling back to cargo test with one thread" >&2
  cargo test --locked --workspace --no-fail-fast "$@" -- --include-ignored --test-threads=1
fi
cargo test --locked --workspace --doc

step "the relay's added pause per checkpoint against fake QEMUs (a benchmark; it fails only if the relay misbehaves)"
# The bed's pairs measure it too (relay-epochs), but their pauses vary by tens of milliseconds
# from one checkpoint to the next; this times the relay alone, checkpoint by checkpoint.
target/release/examples/relay_pause --rounds 300

step "fuzz the parsers briefly (fuzz/run-briefly.sh)"
fuzz/run-briefly.sh "${FUZZ_SECONDS:-15}"
