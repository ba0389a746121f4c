//! The watch agent's primary side (`qmp-driver watch`): notices that the secondary stopped
//! taking part in COLO and makes the primary carry on alone, without an operator.
//!
//! QEMU never fails over by itself: after a broken stream it emits `COLO_EXIT` (reason
//! `error`) and waits for `x-colo-lost-heartbeat`; when the secondary's host goes silent
//! without a FIN it does not even notice, and stays stopped in the middle of a checkpoint
//! (runstate `colo`), or hangs its monitor (the migration thread or the drain of a hung NBD
//! child holds the big lock). While that lasts the guest serves nobody. So the agent, on its
//! own QMP monitor of the primary, probes every `probe`:
//!
//! | what it sees while the primary is in COLO | trigger |
//! |---|---|
//! | `COLO_EXIT` for mode `primary` | [`Trigger::ColoExit`] |
//! | `query-status` unanswered for `stall` | [`Trigger::MonitorHung`] |
//! | runstate `colo` (a checkpoint under way) for longer than `stall` | [`Trigger::CheckpointStalled`] |
//!
//! On a trigger it yanks the migration stream and the NBD replication child out of band (so
//! QEMU lets go of the dead peer at once) and runs [`failover_to_primary`], the sequence
//! `qmp-driver failover --survivor primary` runs. The primary's service is therefore back
//! within about `stall` plus the failover's own time (tens of ms) after the secondary went
//! silent, plus the checkpoint period or `--max-hold-ms` if the pair was between checkpoints.
//!
//! Only the primary is watched this way. A primary that carries on alone cannot make two
//! primaries: the secondary never takes over without a decision (today the operator's
//! `failover --survivor secondary` after fencing the primary). A secondary that takes over by
//! itself needs quorum and fencing, which this agent does not have.

use super::failover::{FailoverOptions, FailoverReport, failover_to_primary};
use super::steps::{self, Journal};
use super::{Hook, PairError, Progress, ProgressFn};
use crate::config::PairConfig;
use colo_qmp::{QmpClient, QmpError};
use colo_types::Role;
use serde_json::Value;
use std::time::Duration;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// How the agent watches.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// How long a checkpoint may keep the primary stopped, or its monitor silent, before the
    /// secondary counts as gone. Above the longest checkpoint pause the pair sees (the relay's
    /// status reports the last one).
    pub stall: Duration,
    /// How often the primary is probed.
    pub probe: Duration,
    /// Run the config's `failover.primary_continue_hook`.
    pub run_hook: bool,
    /// Tell the relay about the failover (best effort, bounded).
    pub notify_relay: bool,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            stall: Duration::from_secs(3),
            probe: Duration::from_millis(250),
            run_hook: true,
            notify_relay: true,
        }
    }
}

/// Why the agent decided the secondary is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// QEMU reported `COLO_EXIT` on the primary (the stream broke, or the relay cut it).
    ColoExit,
    /// The primary's monitor did not answer `query-status` within the stall bound.
    MonitorHung,
    /// A checkpoint kept the primary stopped for longer than the stall bound.
    CheckpointStalled,
}

impl Trigger {
    /// The label in logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Trigger::ColoExit => "colo-exit",
            Trigger::MonitorHung => "monitor-hung",
            Trigger::CheckpointStalled => "checkpoint-stalled",
        }
    }

    /// Every trigger, for metrics that list them all from the start.
    pub const ALL: [Trigger; 3] = [
        Trigger::ColoExit,
        Trigger::MonitorHung,
        Trigger::CheckpointStalled,
    ];
}

/// What the agent tells its caller (logs, metrics).
#[derive(Debug)]
pub enum WatchEvent {
    /// The primary is in COLO: watched from now on.
    Protected,
    /// The primary is not in COLO (before `start`, or after a failover, whoever did it).
    Unprotected {
        /// QEMU's COLO `last-mode`.
        last_mode: String,
    },
    /// The secondary counts as gone; a failover to the primary starts.
    Triggered {
        /// Why.
        trigger: Trigger,
        /// What was seen.
        detail: String,
    },
    /// The failover finished: the primary serves alone.
    FailedOver(FailoverReport),
    /// The failover failed; the agent keeps watching (and tries again on the next trigger).
    FailoverFailed(PairError),
    /// A step of the failover (its progress).
    Step(Progress),
}

/// Where the primary stands, as far as the agent knows.
enum Phase {
    /// Not in COLO: wait until it is.
    Unprotected,
    /// In COLO; `stopped_since` is when the current checkpoint stopped the VM.
    Protected { stopped_since: Option<Instant> },
}

/// Watches the primary (`qmp`, a monitor of its own) until `cancel`; returns an error when
/// the monitor is gone (QEMU exited: nothing left to save on this host).
pub async fn watch_primary(
    qmp: &QmpClient,
    cfg: &PairConfig,
    opts: &WatchOptions,
    report: &mut (dyn FnMut(WatchEvent) + Send),
    cancel: &CancellationToken,
) -> Result<(), PairError> {
    let mut events = qmp.subscribe();
    let mut tick = tokio::time::interval(opts.probe);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut phase = Phase::Unprotected;
    let mut announced_unprotected = None::<String>;
    loop {
        let trigger = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            event = events.recv() => match event {
                None => return Err(gone(qmp)),
                Some(e) if e.name == "COLO_EXIT" && e.data["mode"] == "primary" => {
                    matches!(phase, Phase::Protected { .. }).then(|| {
                        (Trigger::ColoExit, format!("COLO_EXIT reason {}", e.data["reason"]))
                    })
                }
                Some(_) => None,
            },
            _ = tick.tick() => probe(qmp, opts, &mut phase, &mut announced_unprotected, report).await?,
        };
        if let Some((trigger, detail)) = trigger {
            report(WatchEvent::Triggered { trigger, detail });
            fail_over(qmp, cfg, opts, report).await;
            phase = Phase::Unprotected;
            announced_unprotected = None;
        }
    }
}

/// One probe; returns a trigger when the secondary counts as gone.
async fn probe(
    qmp: &QmpClient,
    opts: &WatchOptions,
    phase: &mut Phase,
    announced_unprotected: &mut Option<String>,
    report: &mut (dyn FnMut(WatchEvent) + Send),
) -> Result<Option<(Trigger, String)>, PairError> {
    let colo = match qmp
        .execute_raw_timeout("query-colo-status", None, opts.stall)
        .await
    {
        Ok(v) => v,
        Err(QmpError::Timeout { .. }) if matches!(phase, Phase::Protected { .. }) => {
            return Ok(Some((
                Trigger::MonitorHung,
                format!("query-colo-status unanswered for {:?}", opts.stall),
            )));
        }
        Err(e) => return Err(query_failed(qmp, "query-colo-status", e)),
    };
    let mode = colo["mode"].as_str().unwrap_or("none");
    if mode != "primary" {
        let last_mode = colo["last-mode"].as_str().unwrap_or("none").to_string();
        if announced_unprotected.as_deref() != Some(last_mode.as_str()) {
            report(WatchEvent::Unprotected {
                last_mode: last_mode.clone(),
            });
            *announced_unprotected = Some(last_mode);
        }
        *phase = Phase::Unprotected;
        return Ok(None);
    }
    let stopped_since = match phase {
        Phase::Protected { stopped_since } => stopped_since,
        Phase::Unprotected => {
            report(WatchEvent::Protected);
            *announced_unprotected = None;
            *phase = Phase::Protected {
                stopped_since: None,
            };
            return Ok(None);
        }
    };
    let status = match qmp
        .execute_raw_timeout("query-status", None, opts.stall)
        .await
    {
        Ok(v) => v,
        Err(QmpError::Timeout { .. }) => {
            return Ok(Some((
                Trigger::MonitorHung,
                format!("query-status unanswered for {:?}", opts.stall),
            )));
        }
        Err(e) => return Err(query_failed(qmp, "query-status", e)),
    };
    Ok(checkpoint_stall(
        &status,
        stopped_since,
        opts.stall,
        Instant::now(),
    ))
}

/// The checkpoint-stall rule: runstate `colo` (stopped for a checkpoint) for longer than
/// `stall`. Any other runstate, `paused` by an operator included, resets the clock.
pub(crate) fn checkpoint_stall(
    status: &Value,
    stopped_since: &mut Option<Instant>,
    stall: Duration,
    now: Instant,
) -> Option<(Trigger, String)> {
    if status["status"] != "colo" {
        *stopped_since = None;
        return None;
    }
    let since = *stopped_since.get_or_insert(now);
    let stopped = now.duration_since(since);
    (stopped > stall).then(|| {
        (
            Trigger::CheckpointStalled,
            format!("the primary stopped for a checkpoint {stopped:?} ago and has not resumed"),
        )
    })
}

/// Lets go of the dead peer (out-of-band yanks), then the primary's failover sequence.
async fn fail_over(
    qmp: &QmpClient,
    cfg: &PairConfig,
    opts: &WatchOptions,
    report: &mut (dyn FnMut(WatchEvent) + Send),
) {
    let failover = FailoverOptions {
        hook: if opts.run_hook {
            Hook::FromConfig
        } else {
            Hook::Skip
        },
        notify_relay: opts.notify_relay,
        links_yanked: true,
        ..FailoverOptions::default()
    };
    let result = {
        let mut forward = |p: Progress| report(WatchEvent::Step(p));
        let mut progress: ProgressFn = &mut forward;
        yank_peer_links(qmp, &mut progress).await;
        failover_to_primary(qmp, cfg, failover, &mut progress).await
    };
    match result {
        Ok(done) => report(WatchEvent::FailedOver(done)),
        Err(e) => report(WatchEvent::FailoverFailed(e)),
    }
}

/// Lets go of the dead peer out of band, on the primary: yanks the migration stream and the
/// NBD replication child, so that a monitor hung on them answers again at once.
pub(crate) async fn yank_peer_links(qmp: &QmpClient, progress: &mut ProgressFn<'_>) {
    let mut journal = Journal::new(progress);
    steps::yank_migration(qmp, Role::Primary, &mut journal).await;
    steps::yank_replication_child(qmp, &mut journal).await;
}

fn gone(qmp: &QmpClient) -> PairError {
    PairError::Unreachable {
        side: Role::Primary,
        address: qmp.peer().to_string(),
        source: QmpError::Disconnected {
            peer: qmp.peer().to_string(),
        },
    }
}

fn query_failed(qmp: &QmpClient, step: &str, source: QmpError) -> PairError {
    if matches!(source, QmpError::Disconnected { .. }) {
        return gone(qmp);
    }
    PairError::Qmp {
        side: Role::Primary,
        step: step.into(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_a_checkpoint_that_outlasts_the_bound_counts() {
        let stall = Duration::from_secs(3);
        let t0 = Instant::now();
        let mut since = None;
        let colo = json!({"status": "colo", "running": false});
        assert_eq!(checkpoint_stall(&colo, &mut since, stall, t0), None);
        assert_eq!(since, Some(t0));
        let later = t0 + Duration::from_secs(2);
        assert_eq!(checkpoint_stall(&colo, &mut since, stall, later), None);
        let running = json!({"status": "running", "running": true});
        assert_eq!(checkpoint_stall(&running, &mut since, stall, later), None);
        assert_eq!(since, None, "a resumed VM resets the clock");
        // An operator's pause is not a stalled checkpoint.
        let paused = json!({"status": "paused", "running": false});
        let much_later = t0 + Duration::from_secs(60);
        assert_eq!(
            checkpoint_stall(&paused, &mut since, stall, much_later),
            None
        );
        assert_eq!(checkpoint_stall(&colo, &mut since, stall, much_later), None);
        let (trigger, detail) = checkpoint_stall(
            &colo,
            &mut since,
            stall,
            much_later + Duration::from_secs(4),
        )
        .unwrap();
        assert_eq!(trigger, Trigger::CheckpointStalled);
        assert!(detail.contains("4s"), "{detail}");
    }
}
