//! Follows the relay's epoch events as a synchronous subscriber of its
//! control socket (`docs/control-protocol.md`) and drives the [`Replica`]:
//!
//! | event | step | ack |
//! |---|---|---|
//! | `svm-epoch-closed` | [`Replica::svm_epoch_closed`] | after the step |
//! | `checkpoint-adopted` | [`Replica::checkpoint_adopted`] | after the step returned `Ok` |
//! | `failover` (survivor `secondary`) | [`Replica::failover`] | not a sync event |
//! | `colo-exit` | logged; the exports keep serving (the operator decides) | — |
//! | anything else | logged | when sync (the protocol requires it) |
//!
//! The ack is the relay's only evidence that the epoch boundary was honoured,
//! so a step that fails is **not** acked: the barrier then fails and the
//! relay ends COLO instead of letting the SVM adopt a state its disk lacks.
//!
//! When the connection drops, the follower reconnects with a bounded
//! exponential backoff. Meanwhile COLO cannot checkpoint: the relay fails
//! every barrier that a sync subscriber left during the session.

use std::io;
use tracing::Instrument;

use colo_control::client::Subscriber;
use colo_control::follow::{SessionEnd, follow_relay};
use colo_control::protocol::{Event, EventKind};
use colo_types::Role;
use tokio_util::sync::CancellationToken;

use crate::replica::Replica;

/// Default `hello` name on the control socket.
pub const DEFAULT_NAME: &str = "colo-blockd";

/// How to reach the relay (colo-control's follower options; use
/// [`DEFAULT_NAME`] as the name unless told otherwise).
pub use colo_control::follow::FollowOptions as EpochOptions;

/// Follows the relay's events until `shutdown` is cancelled, reconnecting
/// whenever the connection is lost.
pub async fn follow_epochs(replica: Replica, opts: EpochOptions, shutdown: CancellationToken) {
    let stop = shutdown.clone();
    follow_relay(&opts, &shutdown, move |sub| {
        let (replica, stop) = (replica.clone(), stop.clone());
        Box::pin(async move {
            let metrics = replica.metrics();
            metrics.relay_connected.set(1);
            metrics.epoch.set(sub.welcome().epoch);
            let ended = follow_connection(&replica, sub, &stop).await;
            replica.metrics().relay_connected.set(0);
            ended
        })
    })
    .await;
}

async fn follow_connection(
    replica: &Replica,
    sub: &mut Subscriber,
    shutdown: &CancellationToken,
) -> SessionEnd {
    loop {
        // Shutdown only interrupts the wait for an event, never a step:
        // a half-done commit is left to the journal only after a crash.
        let ev = match colo_control::follow::next_event(sub, shutdown).await {
            Ok(ev) => ev,
            Err(end) => return end,
        };
        replica.metrics().epoch.set(ev.epoch);
        // Every log line of the step carries the epoch it belongs to.
        let span = tracing::info_span!("epoch", epoch = ev.epoch, event = %ev.event);
        match apply(replica, &ev).instrument(span).await {
            Ok(()) => {
                if ev.sync
                    && let Err(err) = sub.ack(ev.seq).await
                {
                    return SessionEnd::Failed(err);
                }
            }
            Err(err) => {
                tracing::error!(
                    %err,
                    event = %ev.event,
                    epoch = ev.epoch,
                    "epoch step failed; not acknowledging it, so the relay fails the barrier \
                     and ends COLO rather than let the secondary adopt a state its disk lacks"
                );
                if ev.sync {
                    return SessionEnd::StepFailed;
                }
            }
        }
    }
}

/// Does what `ev` requires of the replica (see the module documentation).
async fn apply(replica: &Replica, ev: &Event) -> io::Result<()> {
    match ev.event {
        EventKind::SvmEpochClosed => {
            replica.svm_epoch_closed().await;
            tracing::debug!(
                epoch = ev.epoch,
                "svm-epoch-closed: holding new SVM requests"
            );
        }
        EventKind::CheckpointAdopted => {
            let commit = replica.checkpoint_adopted().await?;
            // One line per checkpoint: the operator's record of what each
            // epoch cost (the metrics have the distribution).
            tracing::info!(
                epoch = ev.epoch,
                bytes = commit.data_bytes,
                journal_bytes = commit.journal_bytes,
                duration_ms = commit.duration.as_secs_f64() * 1e3,
                "checkpoint-adopted: PVM log committed, SVM overlay dropped"
            );
        }
        EventKind::Failover => match ev.survivor {
            Some(Role::Secondary) => {
                replica.failover().await?;
                tracing::warn!(
                    epoch = ev.epoch,
                    detail = ev.detail.as_deref().unwrap_or(""),
                    "failover to the secondary: PVM log dropped, SVM overlay merged into the \
                     image; the svm export now writes the image directly"
                );
            }
            Some(Role::Primary) => tracing::warn!(
                epoch = ev.epoch,
                "failover to the primary: this replica is no longer protected; keep serving \
                 until the operator re-protects or stops it"
            ),
            None => tracing::warn!(
                epoch = ev.epoch,
                "failover event without a survivor; ignored"
            ),
        },
        EventKind::ColoExit => tracing::warn!(
            epoch = ev.epoch,
            reason = ev.reason.as_deref().unwrap_or(""),
            detail = ev.detail.as_deref().unwrap_or(""),
            "COLO ended; still serving both exports: the operator decides between failover \
             and re-protect"
        ),
        EventKind::ColoStarted => tracing::info!(epoch = ev.epoch, "COLO started"),
        EventKind::CheckpointComplete => {
            tracing::debug!(epoch = ev.epoch, "checkpoint complete")
        }
        EventKind::RelayError => tracing::error!(
            epoch = ev.epoch,
            detail = ev.detail.as_deref().unwrap_or(""),
            "the relay reports a problem; checkpoints may no longer be barriered"
        ),
        EventKind::Unknown => {
            tracing::debug!(seq = ev.seq, "ignoring an event this version does not know")
        }
    }
    Ok(())
}
