//! colo-proxyd on both hosts in place of QEMU's colo-compare and filter-rewriter.
//!
//! `colo-proxyd primary` runs in the primary's namespace: it connects to the primary QEMU's
//! filter sockets on that host's loopback (PVM output, mirrored inbound packets, release),
//! listens for its peer on `primary.host:network.link_port`, and asks for checkpoints over a
//! QMP monitor of its own. `colo-proxyd secondary` runs in the secondary's namespace: the
//! secondary QEMU's redirectors connect to it on that host's loopback, and it connects to the
//! primary's daemon over the bridge. Both follow the relay's epochs as synchronous subscribers.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use qmp_driver::config::{Endpoint, PairConfig as DriverConfig};

use super::daemon::DaemonProcess;
use super::driver::{relay_control_path, workspace_binary};
use crate::topology::Topology;

/// The primary daemon's name on the relay's control socket (its default).
pub const PRIMARY_SUBSCRIBER: &str = "colo-proxyd-primary";
/// The secondary daemon's name on the relay's control socket (its default).
pub const SECONDARY_SUBSCRIBER: &str = "colo-proxyd-secondary";

/// The QMP monitor the generated primary command line opens for colo-proxyd.
pub fn qmp_path(dir: &Path) -> PathBuf {
    dir.join("primary-qmp-proxyd.sock")
}

fn binary() -> Result<PathBuf> {
    workspace_binary("colo-proxyd", "COLO_PROXYD")
}

fn link(driver: &DriverConfig) -> String {
    format!("{}:{}", driver.primary.host, driver.network.link_port)
}

fn loopback(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// Starts `colo-proxyd primary` in the primary's namespace.
pub fn spawn_primary(
    dir: &Path,
    topology: &Topology,
    driver: &DriverConfig,
) -> Result<DaemonProcess> {
    let net = &driver.network;
    let qmp = match &net.proxyd_qmp {
        Some(Endpoint::Unix(p)) => format!("unix:{}", p.display()),
        Some(Endpoint::Tcp(a)) => format!("tcp:{a}"),
        None => None.context("pair.toml has no network.proxyd_qmp")?,
    };
    let args = vec![
        "primary".to_string(),
        "--pvm-output".into(),
        loopback(net.compare_primary_in_port),
        "--mirror".into(),
        loopback(net.mirror_port),
        "--release".into(),
        loopback(net.compare_out_port),
        "--link-listen".into(),
        link(driver),
        "--control".into(),
        relay_control_path(dir).display().to_string(),
        "--qmp".into(),
        qmp,
    ];
    DaemonProcess::spawn(
        "colo-proxyd primary",
        &topology.primary,
        &binary()?,
        &args,
        dir.join("proxyd-primary.log"),
    )
}

/// Starts `colo-proxyd secondary` in the secondary's namespace.
pub fn spawn_secondary(
    dir: &Path,
    topology: &Topology,
    driver: &DriverConfig,
) -> Result<DaemonProcess> {
    let net = &driver.network;
    let args = vec![
        "secondary".to_string(),
        "--svm-input-listen".into(),
        loopback(net.mirror_port),
        "--svm-output-listen".into(),
        loopback(net.compare_port),
        "--primary-link".into(),
        link(driver),
        "--control".into(),
        relay_control_path(dir).display().to_string(),
    ];
    DaemonProcess::spawn(
        "colo-proxyd secondary",
        &topology.secondary,
        &binary()?,
        &args,
        dir.join("proxyd-secondary.log"),
    )
}
