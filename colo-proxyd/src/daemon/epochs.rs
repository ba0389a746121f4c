//! Follows the relay's epoch events as a synchronous subscriber of its control socket
//! (`docs/control-protocol.md`) and hands each to the role loop as an [`EpochNotice`].
//!
//! The role loop does what the event requires and then calls [`Completion::done`]; only then
//! is a synchronous event acknowledged. A notice dropped without `done` (the role loop could
//! not do its part) is **not** acknowledged: the relay then fails the barrier and ends COLO,
//! instead of letting the SVM adopt a state whose network output was not handled.
//!
//! The connection is re-established with a bounded exponential backoff. Meanwhile COLO cannot
//! checkpoint: the relay fails every barrier that a sync subscriber left during the session.
//! The reconnect loop is colo-control's follower ([`colo_control::follow`]), shared with
//! colo-blockd.

use colo_control::client::{Subscriber, Welcome};
use colo_control::follow::{SessionEnd, follow_relay};
use colo_control::protocol::Event;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// How to reach the relay: colo-control's follower options.
pub use colo_control::follow::FollowOptions as RelayOptions;

/// What the role loop hears from the relay.
#[derive(Debug)]
pub enum EpochNotice {
    /// (Re)subscribed: the relay's epoch and state now.
    Subscribed(Welcome),
    /// An event. For a synchronous one, call [`Completion::done`] when its work is done.
    Event(Event, Completion),
}

/// The acknowledgement of one event, to give when its work is done.
#[derive(Debug)]
pub struct Completion(Option<oneshot::Sender<()>>);

impl Completion {
    /// The work is done: a synchronous event is acknowledged now.
    pub fn done(mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

/// Follows the relay until `shutdown`, reconnecting whenever the connection is lost. The
/// receiver of the returned channel must be read, or barriers time out.
pub fn spawn(opts: RelayOptions, shutdown: CancellationToken) -> mpsc::Receiver<EpochNotice> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(follow(opts, tx, shutdown));
    rx
}

async fn follow(opts: RelayOptions, tx: mpsc::Sender<EpochNotice>, shutdown: CancellationToken) {
    let stop = shutdown.clone();
    follow_relay(&opts, &shutdown, move |sub| {
        let (tx, stop) = (tx.clone(), stop.clone());
        Box::pin(async move {
            if tx
                .send(EpochNotice::Subscribed(sub.welcome()))
                .await
                .is_err()
            {
                return SessionEnd::Shutdown;
            }
            follow_connection(sub, &tx, &stop).await
        })
    })
    .await;
}

async fn follow_connection(
    sub: &mut Subscriber,
    tx: &mpsc::Sender<EpochNotice>,
    shutdown: &CancellationToken,
) -> SessionEnd {
    loop {
        let ev = match colo_control::follow::next_event(sub, shutdown).await {
            Ok(ev) => ev,
            Err(end) => return end,
        };
        let (seq, sync, kind, epoch) = (ev.seq, ev.sync, ev.event, ev.epoch);
        let (done_tx, done_rx) = oneshot::channel();
        if tx
            .send(EpochNotice::Event(ev, Completion(Some(done_tx))))
            .await
            .is_err()
        {
            return SessionEnd::Shutdown;
        }
        if !sync {
            continue;
        }
        // The role loop's work is not interrupted by shutdown; its answer is awaited.
        match done_rx.await {
            Ok(()) => {
                if let Err(err) = sub.ack(seq).await {
                    return SessionEnd::Failed(err);
                }
                tracing::debug!(event = %kind, epoch, seq, "acknowledged");
            }
            Err(_) if shutdown.is_cancelled() => return SessionEnd::Shutdown,
            Err(_) => {
                tracing::error!(
                    event = %kind,
                    epoch,
                    "the epoch step was not completed; not acknowledging it, so the relay \
                     fails the barrier and ends COLO"
                );
                return SessionEnd::StepFailed;
            }
        }
    }
}
