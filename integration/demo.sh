#!/usr/bin/env bash
# The main job on built-in defaults: set up this machine (idempotent), then the whole life of a
# protected VM on colo's own daemons (the checkpoint-barrier relay, colo-proxyd on both hosts,
# colo-blockd) with the HA agents on a real corosync cluster: clients stream and download, the
# primary's host dies and the secondary's agent takes over, the host comes back, the running VM
# moves home (failback) and the secondary is re-protected online, the primary's host dies again
# and the secondary's agent takes over once more; then the report (checkpoints, divergences by
# reason, failover, failback and re-protect times, what was lost).
# Arguments go to `colo-testbed` (try `--help`, `demo` for the operator's view with the
# `qmp-driver` commands, `soak`, `failover --kill secondary`, `reprotect`, `relay-epochs`,
# `relay-barrier`; `demo --network colo-compare --disk replication` for QEMU's own COLO stack).
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
