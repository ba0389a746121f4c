//! colo-blockd on the secondary host: the secondary's disk replica in place of QEMU's block
//! replication.
//!
//! It runs in the secondary's namespace (the primary's quorum child reaches it over the bridge
//! at `secondary.host:disk.nbd_port`, the SVM's disk over its Unix socket), follows the
//! relay's epochs as a synchronous subscriber, and asks the primary for a checkpoint over the
//! primary's operator QMP socket when its PVM log fills.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use qmp_driver::config::PairConfig as DriverConfig;

use super::Role;
use super::daemon::DaemonProcess;
use super::driver::{operator_qmp_path, relay_control_path, workspace_binary};
use crate::topology::Topology;

/// The name colo-blockd subscribes under (its default).
pub const SUBSCRIBER_NAME: &str = "colo-blockd";

/// Starts `colo-blockd secondary` over the secondary's image and waits until it serves.
pub fn spawn(dir: &Path, topology: &Topology, driver: &DriverConfig) -> Result<DaemonProcess> {
    let bin = workspace_binary("colo-blockd", "COLO_BLOCKD")?;
    let vm = driver
        .vm
        .as_ref()
        .context("pair.toml has no [vm] section")?;
    let socket = driver
        .disk
        .blockd_socket
        .as_ref()
        .context("pair.toml has no disk.blockd_socket")?;
    let args = vec![
        "secondary".to_string(),
        "--image".into(),
        vm.secondary_image.display().to_string(),
        "--tcp".into(),
        format!("{}:{}", driver.secondary.host, driver.disk.nbd_port),
        "--unix".into(),
        socket.display().to_string(),
        "--control".into(),
        relay_control_path(dir).display().to_string(),
        "--primary-qmp".into(),
        format!("unix:{}", operator_qmp_path(dir, Role::Primary).display()),
    ];
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
