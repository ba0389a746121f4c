//! What the agent does to its own VM when the arbiter decides: take it over (the failover
//! sequence of its side, the sequences `qmp-driver failover` runs) or fence it.

use crate::config::PairConfig;
use crate::pair::{
    self, FailoverOptions, FailoverReport, Hook, PairError, Progress, ProgressFn,
    failover_to_primary, failover_to_secondary,
};
use colo_qmp::QmpClient;
use colo_types::Role;
use std::path::Path;
use std::time::Duration;

/// How long the fence's QMP `stop` may take before the agent goes on to kill QEMU.
pub const FENCE_STOP_TIMEOUT: Duration = Duration::from_millis(1000);

/// Runs the failover sequence of `side` on its QEMU. The primary first lets go of the dead
/// peer out of band (yank of the migration stream and of the NBD replication child), as the
/// watch agent does, so a hung monitor cannot delay it; the secondary's sequence yanks its
/// migration stream itself.
pub async fn take_over(
    side: Role,
    qmp: &QmpClient,
    cfg: &PairConfig,
    run_hook: bool,
    notify_relay: bool,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<FailoverReport, PairError> {
    let mut opts = FailoverOptions {
        hook: if run_hook {
            Hook::FromConfig
        } else {
            Hook::Skip
        },
        notify_relay,
        ..FailoverOptions::default()
    };
    let mut progress: ProgressFn = progress;
    match side {
        Role::Primary => {
            pair::yank_peer_links(qmp, &mut progress).await;
            opts.links_yanked = true;
            failover_to_primary(qmp, cfg, opts, &mut progress).await
        }
        Role::Secondary => failover_to_secondary(qmp, cfg, opts, &mut progress).await,
    }
}

/// Fences this side's VM: QMP `stop` (its vCPUs stop, so it produces no more output), then,
/// when the QEMU's pid file is known, SIGKILL of that QEMU (a hung monitor cannot refuse that,
/// and a killed VM can never be resumed by mistake). Returns what was done.
pub async fn fence(qmp: Option<&QmpClient>, qemu_pidfile: Option<&Path>) -> Vec<String> {
    let mut done = Vec::new();
    if let Some(qmp) = qmp {
        match qmp
            .execute_raw_timeout("stop", None, FENCE_STOP_TIMEOUT)
            .await
        {
            Ok(_) => done.push("QMP stop: the guest is stopped".to_string()),
            Err(e) => done.push(format!("QMP stop failed: {e}")),
        }
    } else {
        done.push("no QMP connection: QEMU is gone or unreachable".to_string());
    }
    if let Some(path) = qemu_pidfile {
        done.push(match kill_from_pidfile(path) {
            Ok(pid) => format!("QEMU (pid {pid}) killed"),
            Err(e) => format!("cannot kill QEMU from {}: {e}", path.display()),
        });
    }
    done
}

/// SIGKILLs the process whose id `path` holds.
fn kill_from_pidfile(path: &Path) -> std::io::Result<i32> {
    let text = std::fs::read_to_string(path)?;
    let pid: i32 = text
        .trim()
        .parse()
        .ok()
        .filter(|pid| *pid > 1)
        .ok_or_else(|| std::io::Error::other(format!("not a process id: {:?}", text.trim())))?;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pidfile_must_hold_a_process_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qemu.pid");
        for bad in ["", "abc", "1", "-5"] {
            std::fs::write(&path, bad).unwrap();
            assert!(kill_from_pidfile(&path).is_err(), "{bad:?}");
        }
        assert!(kill_from_pidfile(&dir.path().join("missing.pid")).is_err());
    }

    #[test]
    fn a_fence_kills_the_process_the_pidfile_names() {
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qemu.pid");
        std::fs::write(&path, format!("{}\n", child.id())).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let done = rt.block_on(fence(None, Some(&path)));
        let status = child.wait().unwrap();
        assert!(!status.success(), "the process was killed: {status}");
        assert!(done.iter().any(|d| d.contains("killed")), "{done:?}");
    }
}
