//! What colo's tests share, and nothing ships: a dev-dependency only.
//!
//! * [`binaries`]: the workspace's binaries a test runs (colo-blockd, colo-proxyd).
//! * [`cli`]: checks of the daemons' clap definitions (every option's environment variable).
//! * [`fake_qmp`]: the one fake QMP server of every test.
//! * [`qemu`]: the real QEMU of the `qemu` tier (its binary, a paused VM with a QMP monitor).
//! * [`rerun`]: a test run again in child processes, each with its own environment (the
//!   flag > env > file > default tests).

pub mod binaries;
pub mod cli;
pub mod fake_qmp;
pub mod qemu;
pub mod rerun;
