//! colo's daemons on the bed's hosts (colo-blockd, colo-proxyd), each started in its host's
//! namespace and owned by PID: `ip netns exec` execs the daemon, so the PID held here is the
//! daemon's own, and killing it is exactly that daemon (or its host) failing.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// One daemon process and its log.
#[derive(Debug)]
pub struct DaemonProcess {
    /// Its name in messages, e.g. `colo-blockd`.
    pub name: String,
    child: Option<Child>,
    /// Its log (stdout and stderr).
    pub log: PathBuf,
    netns: String,
    binary: PathBuf,
    args: Vec<String>,
    /// Where the running instance's part of the log starts (after a restart, the log goes
    /// on): [`DaemonProcess::wait_log`] looks only at what this instance wrote.
    log_from: usize,
}

impl DaemonProcess {
    /// Starts `binary args...` in `netns`, logging to `log`, with `RUST_LOG=info`.
    pub fn spawn(
        name: &str,
        netns: &str,
        binary: &Path,
        args: &[String],
        log: PathBuf,
    ) -> Result<DaemonProcess> {
        std::fs::write(
            log.with_extension("cmdline"),
            format!("{} {}\n", binary.display(), args.join(" ")),
        )?;
        let mut daemon = DaemonProcess {
            name: name.to_string(),
            child: None,
            log,
            netns: netns.to_string(),
            binary: binary.to_path_buf(),
            args: args.to_vec(),
            log_from: 0,
        };
        daemon.start(File::create(&daemon.log)?)?;
        Ok(daemon)
    }

    fn start(&mut self, out: File) -> Result<()> {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .arg(&self.binary)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} in namespace {}",
                    self.binary.display(),
                    self.netns
                )
            })?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL and start again with the same command line, the log continued: a crashed
    /// daemon that its supervisor restarts.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let out = std::fs::OpenOptions::new().append(true).open(&self.log)?;
        self.log_from = usize::try_from(out.metadata()?.len()).unwrap_or(usize::MAX);
        self.start(out)
    }

    /// Waits until the running instance's log contains `line`; an exit first is an error
    /// quoting the log.
    pub fn wait_log(&mut self, line: &str, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if std::fs::read(&self.log).is_ok_and(|t| {
                String::from_utf8_lossy(t.get(self.log_from..).unwrap_or_default()).contains(line)
            }) {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("{} exited ({status}): {}", self.name, self.log_tail());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not log {line:?} within {within:?}: {}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the relay at `control` lists `subscriber` as a synchronous subscriber, so
    /// that every barrier from then on waits for it.
    pub async fn wait_subscribed(
        &self,
        control: &Path,
        subscriber: &str,
        within: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(status) = colo_control::client::query_status(control).await
                && status
                    .subscribers
                    .iter()
                    .any(|s| s.name == subscriber && s.sync)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not subscribe to the relay at {} as {subscriber} within \
                     {within:?}: {}",
                    self.name,
                    control.display(),
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the daemon to exit by itself, cleanly (`colo-blockd serve
    /// --exit-after-client` once its client left).
    pub fn wait_exit(&mut self, within: Duration) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                if !status.success() {
                    bail!("{} exited {status}: {}", self.name, self.log_tail());
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not exit by itself within {within:?}: {}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits for a clean exit (it may have state to write first).
    pub fn stop(&mut self, within: Duration) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = libc::pid_t::try_from(child.id()).context("the daemon's PID")?;
        // SAFETY: kill(2) with a PID we spawned and still own (not yet reaped).
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    bail!("{} exited {status}: {}", self.name, self.log_tail());
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{} did not stop within {within:?} of SIGTERM; killed: {}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: the daemon's host fails.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Lines of its log that contain `what`.
    pub fn log_lines(&self, what: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(what))
            .count()
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
