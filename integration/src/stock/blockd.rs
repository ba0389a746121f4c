//! colo-blockd on the secondary host: the secondary's disk replica in place of QEMU's block
//! replication.
//!
//! It runs in the secondary's namespace (the primary's quorum child reaches it over the bridge
//! at `secondary.host:disk.nbd_port`, the SVM's disk over its Unix socket), follows the
//! relay's epochs as a synchronous subscriber, and asks the primary for a checkpoint over the
//! primary's operator QMP socket (`disk.blockd_primary_qmp`) when its PVM log fills.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use qmp_driver::config::PairConfig as DriverConfig;
use qmp_driver::daemon_args::{Daemon, daemon_args};

use super::daemon::DaemonProcess;
use super::driver::workspace_binary;
use crate::topology::Topology;

/// The name colo-blockd subscribes under (its default).
pub const SUBSCRIBER_NAME: &str = "colo-blockd";

/// Starts `colo-blockd secondary` with the command line `qmp-driver daemon-args` gives for
/// the run's `pair.toml`, and waits until it serves.
pub fn spawn(dir: &Path, topology: &Topology, driver: &DriverConfig) -> Result<DaemonProcess> {
    let bin = workspace_binary("colo-blockd", "COLO_BLOCKD")?;
    let args = daemon_args(driver, Daemon::Blockd)?;
    let mut blockd = DaemonProcess::spawn(
        "colo-blockd",
        &topology.secondary,
        &bin,
        &args,
        dir.join("blockd.log"),
    )?;
    blockd.wait_log("serving NBD", Duration::from_secs(10))?;
    Ok(blockd)
}
