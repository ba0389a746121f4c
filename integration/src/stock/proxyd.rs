//! colo-proxyd on both hosts in place of QEMU's colo-compare and filter-rewriter.
//!
//! `colo-proxyd primary` runs in the primary's namespace: it connects to the primary QEMU's
//! filter sockets on that host's loopback (PVM output, mirrored inbound packets, release),
//! listens for its peer on `primary.host:network.link_port`, and asks for checkpoints over a
//! QMP monitor of its own. `colo-proxyd secondary` runs in the secondary's namespace: the
//! secondary QEMU's redirectors connect to it on that host's loopback, and it connects to the
//! primary's daemon over the bridge. Both follow the relay's epochs as synchronous subscribers.

use std::path::{Path, PathBuf};

use anyhow::Result;
use colo_types::Role;
use qmp_driver::config::PairConfig as DriverConfig;
use qmp_driver::daemon_args::{Daemon, daemon_args};

use super::daemon::DaemonProcess;
use super::driver::workspace_binary;
use crate::topology::Topology;

/// The primary daemon's name on the relay's control socket (its default).
pub const PRIMARY_SUBSCRIBER: &str = "colo-proxyd-primary";
/// The secondary daemon's name on the relay's control socket (its default).
pub const SECONDARY_SUBSCRIBER: &str = "colo-proxyd-secondary";

/// The QMP monitor the generated primary command line opens for colo-proxyd.
pub fn qmp_path(dir: &Path) -> PathBuf {
    dir.join("primary-qmp-proxyd.sock")
}

/// The QMP monitor the generated secondary command line opens for colo-proxyd.
pub fn secondary_qmp_path(dir: &Path) -> PathBuf {
    dir.join("secondary-qmp-proxyd.sock")
}

fn binary() -> Result<PathBuf> {
    workspace_binary("colo-proxyd", "COLO_PROXYD")
}

/// Starts `daemon` (a colo-proxyd role) with the command line `qmp-driver daemon-args` gives
/// for the run's `pair.toml`, in its host's namespace.
fn spawn(
    dir: &Path,
    topology: &Topology,
    driver: &DriverConfig,
    daemon: Daemon,
) -> Result<DaemonProcess> {
    let (netns, log) = match daemon.host() {
        Role::Primary => (&topology.primary, "proxyd-primary.log"),
        Role::Secondary => (&topology.secondary, "proxyd-secondary.log"),
    };
    DaemonProcess::spawn(
        &format!("colo-proxyd ({})", daemon.host()),
        netns,
        &binary()?,
        &daemon_args(driver, daemon)?,
        dir.join(log),
    )
}

/// Starts `colo-proxyd primary` in the primary's namespace.
pub fn spawn_primary(
    dir: &Path,
    topology: &Topology,
    driver: &DriverConfig,
) -> Result<DaemonProcess> {
    spawn(dir, topology, driver, Daemon::ProxydPrimary)
}

/// Starts `colo-proxyd secondary` in the secondary's namespace.
pub fn spawn_secondary(
    dir: &Path,
    topology: &Topology,
    driver: &DriverConfig,
) -> Result<DaemonProcess> {
    spawn(dir, topology, driver, Daemon::ProxydSecondary)
}
