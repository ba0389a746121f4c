//! colo-proxyd on both hosts in place of QEMU's colo-compare and filter-rewriter.
//!
//! `colo-proxyd primary` runs in the primary's namespace: it connects to the primary QEMU's
//! filter sockets on that host's loopback (PVM output, mirrored inbound packets, release),
//! listens for its peer on `primary.host:network.link_port`, and asks for checkpoints over a
//! QMP monitor of its own. `colo-proxyd secondary` runs in the secondary's namespace: the
//! secondary QEMU's redirectors connect to it on that host's loopback, and it connects to the
//! primary's daemon over the bridge. Both follow the relay's epochs as synchronous subscribers.

use std::collections::BTreeMap;
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

/// colo-proxyd primary's log in the run directory.
const PRIMARY_LOG: &str = "proxyd-primary.log";

/// colo-proxyd primary's log of the run in `dir` (its checkpoint requests, by reason).
pub fn primary_log(dir: &Path) -> PathBuf {
    dir.join(PRIMARY_LOG)
}

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
        Role::Primary => (&topology.primary, PRIMARY_LOG),
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

/// colo-proxyd's requests for a checkpoint in its log from byte `from` on, by reason.
pub fn proxyd_reasons(log: &Path, from: u64) -> BTreeMap<String, u64> {
    let text = std::fs::read(log).unwrap_or_default();
    count_reasons(&String::from_utf8_lossy(
        &text[(from as usize).min(text.len())..],
    ))
}

/// The `reason=` of each "the comparison needs a checkpoint" line, counted.
pub fn count_reasons(log: &str) -> BTreeMap<String, u64> {
    let mut reasons = BTreeMap::new();
    for line in log
        .lines()
        .filter(|l| l.contains("the comparison needs a checkpoint"))
    {
        let reason = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("reason="))
            .unwrap_or("unknown")
            .trim_matches('"')
            .to_string();
        *reasons.entry(reason).or_default() += 1;
    }
    reasons
}

/// Reasons as `reason n, reason n` for the tables ("-" for none).
pub fn render_reasons(reasons: &BTreeMap<String, u64>) -> String {
    if reasons.is_empty() {
        return "-".into();
    }
    reasons
        .iter()
        .map(|(r, n)| format!("{r} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxyd_reasons_are_counted() {
        let line = |r: &str| {
            format!(
                "2026-12-06T03:00:00Z  INFO colo_proxyd::daemon::primary: the comparison needs \
                 a checkpoint reason={r} detail=X epoch=3\n"
            )
        };
        let text = format!(
            "{}{}{}other line reason=ignored\n",
            line("payload-differs"),
            line("payload-differs"),
            line("\"hold-timeout\"")
        );
        let counted = count_reasons(&text);
        assert_eq!(
            counted,
            BTreeMap::from([("hold-timeout".into(), 1), ("payload-differs".into(), 2)])
        );
        assert_eq!(
            render_reasons(&counted),
            "hold-timeout 1, payload-differs 2"
        );
        assert_eq!(render_reasons(&BTreeMap::new()), "-");
        assert!(proxyd_reasons(Path::new("/nonexistent/proxyd-primary.log"), 0).is_empty());
    }
}
