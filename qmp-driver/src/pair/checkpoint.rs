//! Forcing a checkpoint.
//!
//! QEMU has no "checkpoint now" command, but re-setting `x-checkpoint-delay`
//! on the primary while COLO runs starts a checkpoint at once (and re-arms
//! the periodic timer). The current value is re-set, so the period does not
//! change.

use super::{PairError, relay_link};
use crate::config::PairConfig;
use colo_daemon::checkpoint::CheckpointError;
use colo_qmp::{QmpClient, QmpError};
use colo_types::Role;
use serde::Serialize;
use std::time::{Duration, Instant};

/// How [`checkpoint`] runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointOptions {
    /// Reason noted to the relay (counted in its status).
    pub reason: String,
    /// How long to wait for the checkpoint (default: the checkpoint period
    /// plus 10 s, since a request that arrives during a checkpoint is
    /// absorbed and the next periodic one is then the answer).
    pub timeout: Option<Duration>,
    /// Note the reason to the relay and read its epoch afterwards, when a
    /// relay is configured.
    pub use_relay: bool,
}

impl Default for CheckpointOptions {
    fn default() -> Self {
        CheckpointOptions {
            reason: "operator".to_string(),
            timeout: None,
            use_relay: true,
        }
    }
}

/// The relay's view after the checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RelayEpoch {
    /// The epoch the pair is in now.
    pub epoch: u64,
    /// Checkpoints the relay has seen complete.
    pub checkpoints: u64,
    /// The last checkpoint's pause as the relay measured it, in µs.
    pub last_pause_us: Option<u64>,
}

/// One forced checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckpointReport {
    /// The `x-checkpoint-delay` that was re-set (unchanged), in ms.
    pub checkpoint_delay_ms: u32,
    /// How long the primary was paused (QEMU's STOP → RESUME timestamps),
    /// in ms.
    pub pause_ms: f64,
    /// QEMU's timestamp of the STOP, µs since the Unix epoch.
    pub stop_us: i64,
    /// QEMU's timestamp of the RESUME, µs since the Unix epoch.
    pub resume_us: i64,
    /// From the request to the RESUME, by this host's clock, in ms.
    pub waited_ms: f64,
    /// The relay's epoch afterwards, when a relay is configured and answered.
    pub relay: Option<RelayEpoch>,
    /// Why the relay could not be used, when it is configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay_error: Option<String>,
}

/// Refuses unless the primary's migration is in `colo`, with the operator's hint.
async fn ensure_colo(primary: &QmpClient) -> Result<(), PairError> {
    colo_daemon::checkpoint::ensure_colo(primary)
        .await
        .map_err(|e| match e {
            CheckpointError::NotInColo(_) => PairError::precondition(
                Role::Primary,
                e.to_string(),
                "Start COLO first (`qmp-driver start`); `qmp-driver status` shows both sides",
            ),
            CheckpointError::Qmp(source) => PairError::Qmp {
                side: Role::Primary,
                step: "query-migrate".into(),
                source,
            },
        })
}

/// Re-sets the primary's current `x-checkpoint-delay` (colo-qmp's
/// [`QmpClient::reset_checkpoint_delay`]), which makes QEMU checkpoint at
/// once without changing the period; returns the delay.
async fn reset_checkpoint_delay(primary: &QmpClient) -> Result<u32, PairError> {
    primary
        .reset_checkpoint_delay()
        .await
        .map_err(|source| PairError::Qmp {
            side: Role::Primary,
            step: "re-set x-checkpoint-delay (query-migrate-parameters, migrate-set-parameters)"
                .into(),
            source,
        })
}

/// Forces a checkpoint and waits for it: notes the reason to the relay (when
/// configured; best effort), requests the checkpoint, waits for the next
/// STOP/RESUME pair on the primary, and reads the relay's new epoch.
pub async fn checkpoint(
    primary: &QmpClient,
    cfg: &PairConfig,
    opts: &CheckpointOptions,
) -> Result<CheckpointReport, PairError> {
    ensure_colo(primary).await?;
    let relay = cfg.relay.as_ref().filter(|_| opts.use_relay);
    let mut relay_error = None;
    let mut relay_before = None;
    if let Some(r) = relay {
        match relay_link::query_status(&r.control, relay_link::NOTIFY_TIMEOUT).await {
            Ok(s) => relay_before = Some(s.checkpoints),
            Err(e) => relay_error = Some(e.to_string()),
        }
        if relay_error.is_none()
            && let Err(e) = relay_link::note_checkpoint_request(
                &r.control,
                &opts.reason,
                relay_link::NOTIFY_TIMEOUT,
            )
            .await
        {
            relay_error = Some(e.to_string());
        }
    }

    // Subscribed before the request, so the checkpoint's events cannot slip
    // past. A RESUME of a checkpoint already under way is skipped by waiting
    // for a STOP first.
    let mut events = primary.subscribe();
    let requested = Instant::now();
    let delay = reset_checkpoint_delay(primary).await?;
    let timeout = opts
        .timeout
        .unwrap_or(Duration::from_millis(u64::from(delay)) + Duration::from_secs(10));
    let deadline = requested + timeout;
    let wait = |e: QmpError| match e {
        QmpError::Timeout { .. } => PairError::incomplete(
            Role::Primary,
            format!("no checkpoint (STOP, then RESUME) on the primary within {timeout:?}"),
            "The primary may hang in a checkpoint because the secondary is gone: check \
             `qmp-driver status`; if the secondary died, run `qmp-driver failover --survivor \
             primary`",
        ),
        source => PairError::Qmp {
            side: Role::Primary,
            step: "wait for STOP/RESUME".into(),
            source,
        },
    };
    let stop = events
        .wait_for("STOP", deadline.saturating_duration_since(Instant::now()))
        .await
        .map_err(wait)?;
    let resume = events
        .wait_for("RESUME", deadline.saturating_duration_since(Instant::now()))
        .await
        .map_err(wait)?;
    let waited_ms = requested.elapsed().as_secs_f64() * 1000.0;
    drop(events);

    let mut relay_epoch = None;
    if let (Some(r), Some(before)) = (relay, relay_before) {
        // The relay counts a checkpoint at vmstate-loaded, just before the
        // primary resumes; give it a moment.
        let until = Instant::now() + relay_link::NOTIFY_TIMEOUT;
        loop {
            match relay_link::query_status(&r.control, relay_link::NOTIFY_TIMEOUT).await {
                Ok(s) if s.checkpoints > before || Instant::now() > until => {
                    relay_epoch = Some(RelayEpoch {
                        epoch: s.epoch,
                        checkpoints: s.checkpoints,
                        last_pause_us: s.last_pause_us,
                    });
                    break;
                }
                Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => {
                    relay_error = Some(e.to_string());
                    break;
                }
            }
        }
    }

    let stop_us = stop.timestamp.as_micros();
    let resume_us = resume.timestamp.as_micros();
    Ok(CheckpointReport {
        checkpoint_delay_ms: delay,
        pause_ms: (resume_us - stop_us) as f64 / 1000.0,
        stop_us,
        resume_us,
        waited_ms,
        relay: relay_epoch,
        relay_error,
    })
}
