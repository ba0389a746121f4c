#!/usr/bin/env bash
# The main job on built-in defaults: set up this machine (idempotent), bring up the stock QEMU
# COLO pair on the namespace test bed, serve a client, SIGKILL the primary during a 1 MiB
# download, fail over to the secondary, and report what happened. Arguments go to
# `colo-testbed` (try `--help`, `soak`, `failover --kill secondary`).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "integration/demo.sh: run as root (sudo): the test bed needs network namespaces and taps" >&2
  exit 2
fi

integration/setup.sh >&2
cargo build --locked --release -p colo-testbed >&2
exec target/release/colo-testbed "$@"
