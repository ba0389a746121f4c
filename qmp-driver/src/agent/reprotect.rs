//! Automatic re-protect (`agent --auto-reprotect`): the primary's agent, its VM serving alone
//! after a take-over, brings a new secondary into COLO by itself once one is started on the
//! other host, with `qmp-driver reprotect`'s sequence ([`crate::pair::reprotect`]).
//!
//! **When.** All of: this agent is the primary's; its VM runs alone (`alone`); the peer agent
//! reports its VM `waiting` (a QEMU that answers, waiting for its migration: the operator, a
//! systemd unit or Pacemaker started the secondary host's relay, daemons, `colo-blockd serve`
//! and QEMU); this node is quorate for the current membership; no attempt runs, and the last
//! failed one is older than the back-off. The peer's `waiting` is the signal that the host is
//! meant to become the secondary: a host that only boots, or runs its agent without a QEMU, is
//! never copied to.
//!
//! **Failures** leave the primary serving alone (the sequence undoes itself), and are retried
//! after `retry`, doubled after every failure in a row up to [`MAX_RETRY`]. The secondary's QEMU
//! usually has to be restarted after a failed attempt (its incoming migration may have begun);
//! a restarted one reports `waiting` again, which does not wait for the back-off.
//!
//! **Not automatic:** the failback (the secondary serving alone moves the VM home). Moving a
//! VM between hosts is the operator's choice, as Pacemaker's stickiness makes it by default;
//! `qmp-driver failback` does it, and this re-protect follows.

use crate::config::PairConfig;
use crate::pair::{self, ReprotectOptions, ReprotectReport};
use colo_qmp::{ConnectOptions, QmpClient};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The longest back-off between two failed attempts.
pub const MAX_RETRY: Duration = Duration::from_secs(600);

/// How the agent re-protects by itself.
#[derive(Debug, Clone)]
pub struct AutoReprotect {
    /// The copy's target, `nbd://HOST:PORT/EXPORT` (default: the new secondary's
    /// `colo-blockd serve` on `disk.nbd_port + 1`, [`pair::default_reprotect_target`]).
    pub target: Option<String>,
    /// Bound on the copy's background rate in bytes/s (0: none).
    pub speed: u64,
    /// The wait after a first failed attempt.
    pub retry: Duration,
}

impl AutoReprotect {
    /// The sequence's options for `cfg`.
    pub fn options(&self, cfg: &PairConfig) -> ReprotectOptions {
        let target = self
            .target
            .clone()
            .unwrap_or_else(|| pair::default_reprotect_target(cfg));
        ReprotectOptions {
            speed: self.speed,
            ..ReprotectOptions::new(target)
        }
    }

    /// The back-off after `failures` failed attempts in a row (at least one).
    pub fn backoff(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(16);
        self.retry
            .saturating_mul(1 << doublings)
            .min(MAX_RETRY.max(self.retry))
    }
}

/// The last automatic re-protect, as the state file shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReprotectStatus {
    /// `running`, `done` or `failed`.
    pub state: String,
    /// Attempts since the agent started.
    pub attempts: u32,
    /// Failed attempts in a row (0 after a success).
    pub failures_in_a_row: u32,
    /// When the last attempt started (Unix ms).
    pub started_unix_ms: u64,
    /// When it ended (Unix ms).
    pub finished_unix_ms: Option<u64>,
    /// What it did, once it succeeded.
    pub report: Option<ReprotectReport>,
    /// Why it failed.
    pub error: Option<String>,
}

/// An attempt under way: its task, and where its outcome arrives.
#[derive(Debug)]
pub struct Attempt {
    task: JoinHandle<()>,
    done: oneshot::Receiver<Result<ReprotectReport, String>>,
}

impl Attempt {
    /// Starts the sequence in a task of its own, so that the agent goes on reading the group
    /// and its QEMU (a failure of the new secondary, a lost quorum) while it runs. `primary`
    /// is the agent's own connection to its QEMU; the secondary's is opened on its `qmp`
    /// socket (its agent holds `watch_qmp`). Progress goes to the log.
    pub fn start(
        primary: QmpClient,
        cfg: PairConfig,
        opts: ReprotectOptions,
        connect: ConnectOptions,
    ) -> Attempt {
        let (tx, done) = oneshot::channel();
        let task = tokio::spawn(async move {
            let outcome = run(&primary, &cfg, &opts, connect).await;
            let _ = tx.send(outcome);
        });
        Attempt { task, done }
    }

    /// Waits for the outcome (a task that vanished without one counts as failed).
    pub async fn outcome(&mut self) -> Result<ReprotectReport, String> {
        (&mut self.done)
            .await
            .unwrap_or_else(|_| Err("the re-protect's task ended without an outcome".into()))
    }
}

impl Attempt {
    /// Ends an attempt from outside (the agent stops): its task is aborted and what it began
    /// on the primary undone as a failed re-protect undoes it (the copy and a migration
    /// cancelled, a VM stopped for the switch resumed), within [`ABANDON_BOUND`]. Left as
    /// it was, a migration would reach the switch and keep the guest stopped.
    pub async fn abandon(self, primary: Option<&QmpClient>, cfg: &PairConfig) {
        self.task.abort();
        let Some(primary) = primary else {
            tracing::error!(
                "no QMP connection to undo the abandoned re-protect: check the primary \
                 (`qmp-driver status`); a VM stopped for the switch needs `cont`"
            );
            return;
        };
        let mut progress = |p: pair::Progress| tracing::warn!(step = %p, "re-protect undone");
        let undo = pair::undo_reprotect(primary, cfg, &mut progress);
        if tokio::time::timeout(ABANDON_BOUND, undo).await.is_err() {
            tracing::error!(
                bound = ?ABANDON_BOUND,
                "undoing the abandoned re-protect did not finish: check the primary"
            );
        }
    }
}

/// The longest an agent that stops spends undoing its re-protect.
pub const ABANDON_BOUND: Duration = Duration::from_secs(10);

impl Drop for Attempt {
    /// The task never outlives its attempt (a panicking agent included).
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(
    primary: &QmpClient,
    cfg: &PairConfig,
    opts: &ReprotectOptions,
    connect: ConnectOptions,
) -> Result<ReprotectReport, String> {
    let secondary = QmpClient::connect_to(&cfg.secondary.qmp, connect)
        .await
        .map_err(|e| {
            format!(
                "cannot reach the secondary's QMP {}: {e}",
                cfg.secondary.qmp
            )
        })?;
    let mut progress = |p: pair::Progress| tracing::info!(step = %p, "re-protect");
    pair::reprotect(primary, &secondary, cfg, opts, &mut progress)
        .await
        .map_err(|e| e.to_string())
}

/// Waits for an attempt's outcome; pending for ever without one.
pub async fn wait_attempt(attempt: &mut Option<Attempt>) -> Result<ReprotectReport, String> {
    match attempt.as_mut() {
        Some(a) => a.outcome().await,
        None => std::future::pending().await,
    }
}

/// Whether a new attempt may start now, after `failures_in_a_row` failures, the last at
/// `last_failure`.
pub fn may_retry(
    auto: &AutoReprotect,
    failures_in_a_row: u32,
    last_failure: Option<Instant>,
    now: Instant,
) -> bool {
    match last_failure {
        Some(at) if failures_in_a_row > 0 => now >= at + auto.backoff(failures_in_a_row),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auto(retry_ms: u64) -> AutoReprotect {
        AutoReprotect {
            target: None,
            speed: 0,
            retry: Duration::from_millis(retry_ms),
        }
    }

    #[test]
    fn the_back_off_doubles_up_to_its_bound() {
        let a = auto(30_000);
        assert_eq!(a.backoff(1), Duration::from_secs(30));
        assert_eq!(a.backoff(2), Duration::from_secs(60));
        assert_eq!(a.backoff(3), Duration::from_secs(120));
        assert_eq!(a.backoff(10), MAX_RETRY);
        assert_eq!(a.backoff(u32::MAX), MAX_RETRY);
        // A retry configured above the bound is kept as given.
        assert_eq!(auto(900_000).backoff(3), Duration::from_secs(900));
    }

    #[test]
    fn a_retry_waits_for_the_back_off() {
        let a = auto(1000);
        let t = Instant::now();
        assert!(may_retry(&a, 0, None, t));
        assert!(!may_retry(&a, 1, Some(t), t + Duration::from_millis(999)));
        assert!(may_retry(&a, 1, Some(t), t + Duration::from_millis(1000)));
        assert!(!may_retry(&a, 2, Some(t), t + Duration::from_millis(1999)));
        assert!(may_retry(&a, 2, Some(t), t + Duration::from_millis(2000)));
    }

    #[test]
    fn the_target_defaults_to_the_new_secondarys_serve() {
        let cfg = crate::config::testing::parse(crate::config::testing::MINIMAL).unwrap();
        let opts = auto(1000).options(&cfg);
        assert_eq!(opts.target, pair::default_reprotect_target(&cfg));
        let given = AutoReprotect {
            target: Some("nbd://10.0.0.9:1/x".into()),
            speed: 4096,
            retry: Duration::from_secs(1),
        }
        .options(&cfg);
        assert_eq!(given.target, "nbd://10.0.0.9:1/x");
        assert_eq!(given.speed, 4096);
    }
}
