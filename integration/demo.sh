#!/usr/bin/env bash
# The main job on built-in defaults: set up this machine (idempotent), start the COLO pair on
# colo's own daemons (colo-proxyd on both hosts, colo-blockd, the checkpoint-barrier relay) on
# the namespace test bed the way an operator does (`qmp-driver start`, `status`,
# `checkpoint`), serve a client, SIGKILL the primary during a 1 MiB download,
# `qmp-driver failover --survivor secondary`, and report what happened.
# Arguments go to `colo-testbed` (try `--help`, `soak`, `failover --kill secondary`,
# `relay-epochs`, `relay-barrier`; `--network colo-compare --disk replication` for QEMU's own
# COLO stack).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "integration/demo.sh: run as root (sudo): the test bed needs network namespaces and taps" >&2
  exit 2
fi

integration/setup.sh >&2
# colo-testbed runs the qmp-driver, colo-blockd and colo-proxyd binaries built next to it.
cargo build --locked --release -p colo-testbed -p qmp-driver -p colo-blockd -p colo-proxyd >&2
exec target/release/colo-testbed "$@"
