//! A QEMU process started inside a namespace, owned by PID.
//!
//! `ip netns exec` enters the namespace and then execs QEMU, so the PID we hold is QEMU's own:
//! killing it is exactly a fail-stop crash of that VM, and we never signal anything we did not
//! start.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use colo_qmp::{ConnectOptions, EventStream, QmpClient};

/// Stops a process this bed started (SIGSTOP), as a frozen or dead host's process looks to its
/// peers: it keeps its sockets open and sends nothing.
pub fn freeze(pid: u32) -> Result<()> {
    let pid = libc::pid_t::try_from(pid).context("pid")?;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours; the pid is of a
    // process this bed started and still owns (not yet reaped).
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    Ok(())
}

/// A running QEMU and the files it was started with.
#[derive(Debug)]
pub struct QemuProcess {
    /// Role name used in logs and file names (`primary`, `secondary`).
    pub role: String,
    child: Option<Child>,
    /// QMP socket path.
    pub qmp_socket: PathBuf,
    /// Where QEMU's stderr goes.
    pub stderr_log: PathBuf,
}

impl QemuProcess {
    /// Starts `qemu args...` inside `netns`, writing the command line to `<dir>/<role>.cmdline`
    /// so an operator can rerun it by hand.
    pub fn spawn(
        qemu: &Path,
        netns: &str,
        role: &str,
        dir: &Path,
        qmp_socket: PathBuf,
        args: &[String],
    ) -> Result<Self> {
        let stderr_log = dir.join(format!("{role}.stderr"));
        let cmdline = std::iter::once(qemu.display().to_string())
            .chain(args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" \\\n  ");
        std::fs::write(dir.join(format!("{role}.cmdline")), format!("{cmdline}\n"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(qemu)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr_log)?)
            .spawn()
            .with_context(|| format!("starting {role} QEMU in namespace {netns}"))?;
        Ok(QemuProcess {
            role: role.to_string(),
            child: Some(child),
            qmp_socket,
            stderr_log,
        })
    }

    /// PID of the QEMU process.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Connects to QMP, waiting for QEMU to create its socket; a QEMU that exits first is an
    /// error quoting its stderr. The event stream is subscribed before the handshake ends, so
    /// no event can slip past.
    pub async fn connect_qmp(&mut self, within: Duration) -> Result<(QmpClient, EventStream)> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "{} QEMU exited ({status}) before QMP was up: {}",
                    self.role,
                    self.stderr_tail()
                );
            }
            if self.qmp_socket.exists() {
                match QmpClient::connect_unix_with_events(
                    &self.qmp_socket,
                    ConnectOptions::default(),
                )
                .await
                {
                    Ok(connected) => return Ok(connected),
                    Err(e) if Instant::now() > deadline => {
                        bail!("{} QMP at {}: {e}", self.role, self.qmp_socket.display())
                    }
                    Err(_) => {}
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "{} QEMU did not open QMP within {within:?}: {}",
                    self.role,
                    self.stderr_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last lines QEMU wrote to stderr, for error messages.
    pub fn stderr_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr_log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(8)..].join(" | ");
        if tail.is_empty() {
            "(no stderr output)".to_string()
        } else {
            tail
        }
    }

    /// Whether the process has exited.
    pub fn has_exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    /// SIGKILL: the host of this VM fails without warning.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child
                .kill()
                .with_context(|| format!("killing {} QEMU", self.role))?;
            child.wait()?;
        }
        Ok(())
    }

    /// Waits for a clean exit (after QMP `quit`), killing it if it does not come in time.
    pub fn wait_exit(&mut self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        while !self.has_exited() {
            if Instant::now() > deadline {
                self.kill()?;
                bail!("{} QEMU did not exit within {within:?}; killed", self.role);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = None;
        Ok(())
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
