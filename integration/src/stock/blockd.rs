//! colo-blockd on the secondary host: the secondary's disk replica in place of QEMU's block
//! replication.
//!
//! It runs in the secondary's namespace (the primary's quorum child reaches it over the bridge
//! at `secondary.host:disk.nbd_port`, the SVM's disk over its Unix socket), follows the
//! relay's epochs as a synchronous subscriber, and asks the primary for a checkpoint over the
//! primary's operator QMP socket when its PVM log fills. `ip netns exec` execs it, so the PID
//! held here is colo-blockd's own.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use qmp_driver::config::PairConfig as DriverConfig;

use super::Role;
use super::driver::{operator_qmp_path, relay_control_path, workspace_binary};
use crate::topology::Topology;

/// The name colo-blockd subscribes under (its default).
pub const SUBSCRIBER_NAME: &str = "colo-blockd";

/// The `colo-blockd secondary` daemon of the pair, owned by PID.
#[derive(Debug)]
pub struct BlockdProcess {
    child: Option<Child>,
    /// Its log (stderr).
    pub log: PathBuf,
    control: PathBuf,
}

impl BlockdProcess {
    /// Starts `colo-blockd secondary` over the secondary's image and waits until it serves.
    pub fn spawn(dir: &Path, topology: &Topology, driver: &DriverConfig) -> Result<BlockdProcess> {
        let bin = workspace_binary("colo-blockd", "COLO_BLOCKD")?;
        let vm = driver
            .vm
            .as_ref()
            .context("pair.toml has no [vm] section")?;
        let log = dir.join("blockd.log");
        let control = relay_control_path(dir);
        let listen = format!("{}:{}", driver.secondary.host, driver.disk.nbd_port);
        let primary_qmp = format!("unix:{}", operator_qmp_path(dir, Role::Primary).display());
        let out = File::create(&log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &topology.secondary])
            .arg(&bin)
            .arg("secondary")
            .arg("--image")
            .arg(&vm.secondary_image)
            .args(["--tcp", &listen])
            .arg("--unix")
            .arg(
                driver
                    .disk
                    .blockd_socket
                    .as_ref()
                    .context("pair.toml has no disk.blockd_socket")?,
            )
            .arg("--control")
            .arg(&control)
            .args(["--primary-qmp", &primary_qmp])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {} secondary", bin.display()))?;
        let mut blockd = BlockdProcess {
            child: Some(child),
            log,
            control,
        };
        blockd.wait_log("serving NBD", Duration::from_secs(10))?;
        Ok(blockd)
    }

    fn wait_log(&mut self, line: &str, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if std::fs::read_to_string(&self.log).is_ok_and(|t| t.contains(line)) {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("colo-blockd exited ({status}): {}", self.log_tail());
            }
            if Instant::now() > deadline {
                bail!(
                    "colo-blockd did not log {line:?} within {within:?}: {}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the relay lists colo-blockd as a synchronous subscriber, so that every
    /// barrier from the first on waits for it.
    pub async fn wait_subscribed(&self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(status) = colo_control::client::query_status(&self.control).await
                && status
                    .subscribers
                    .iter()
                    .any(|s| s.name == SUBSCRIBER_NAME && s.sync)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "colo-blockd did not subscribe to the relay at {} within {within:?}: {}",
                    self.control.display(),
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then waits for it to finish writing the image and exit.
    pub fn stop(&mut self, within: Duration) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = libc::pid_t::try_from(child.id()).context("colo-blockd's PID")?;
        // SAFETY: kill(2) with a PID we spawned and still own (not yet reaped).
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    bail!("colo-blockd exited {status}: {}", self.log_tail());
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "colo-blockd did not stop within {within:?} of SIGTERM; killed: {}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: the secondary host fails.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for BlockdProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
