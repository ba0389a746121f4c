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
//! The reconnect loop is the same as colo-blockd's (`colo_blockd::daemon::epochs`); both could
//! move into colo-control as a generic follower.

use std::time::Duration;

use colo_control::ControlAddress;
use colo_control::client::{ControlError, Subscriber, Welcome};
use colo_control::protocol::Event;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// How to reach the relay.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// The relay's control socket: its Unix socket (`qmp-driver relay --control PATH`) or,
    /// from the other host, its TCP address (`--control-tcp`).
    pub control: ControlAddress,
    /// Our `hello` name (shown in the relay's status and barrier errors).
    pub name: String,
    /// First wait before reconnecting; doubled after each failed attempt.
    pub retry_min: Duration,
    /// Longest wait between reconnection attempts.
    pub retry_max: Duration,
}

impl RelayOptions {
    /// Options for `control` with the backoff colo-blockd uses (100 ms up to 5 s).
    pub fn new(control: impl Into<ControlAddress>, name: &str) -> RelayOptions {
        RelayOptions {
            control: control.into(),
            name: name.to_owned(),
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
        }
    }
}

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

enum Ended {
    Shutdown,
    RelayClosed,
    Failed(ControlError),
}

async fn follow(opts: RelayOptions, tx: mpsc::Sender<EpochNotice>, shutdown: CancellationToken) {
    let mut backoff = opts.retry_min;
    loop {
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = Subscriber::connect(&opts.control, &opts.name, true) => r,
        };
        match attempt {
            Ok(mut sub) => {
                backoff = opts.retry_min;
                let w = sub.welcome();
                tracing::info!(
                    control = %opts.control,
                    name = %opts.name,
                    epoch = w.epoch,
                    state = %w.state,
                    "subscribed to the relay (sync): checkpoints wait for our acks"
                );
                if tx.send(EpochNotice::Subscribed(w)).await.is_err() {
                    return;
                }
                match follow_connection(&mut sub, &tx, &shutdown).await {
                    Ended::Shutdown => return,
                    Ended::RelayClosed => tracing::error!(
                        control = %opts.control,
                        "the relay closed the control connection; COLO cannot checkpoint while \
                         we are disconnected (the relay fails the barrier); reconnecting"
                    ),
                    Ended::Failed(err) => tracing::error!(
                        %err,
                        "lost the relay's control connection; COLO cannot checkpoint while we \
                         are disconnected (the relay fails the barrier); reconnecting"
                    ),
                }
            }
            Err(err) => tracing::error!(
                %err,
                retry_in = ?backoff,
                "cannot subscribe to the relay; COLO cannot checkpoint until we are connected \
                 (the relay fails the barrier)"
            ),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(opts.retry_max);
    }
}

async fn follow_connection(
    sub: &mut Subscriber,
    tx: &mpsc::Sender<EpochNotice>,
    shutdown: &CancellationToken,
) -> Ended {
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return Ended::Shutdown,
            n = sub.next_event() => n,
        };
        let ev = match next {
            Ok(Some(ev)) => ev,
            Ok(None) => return Ended::RelayClosed,
            Err(err) => return Ended::Failed(err),
        };
        let (seq, sync, kind, epoch) = (ev.seq, ev.sync, ev.event, ev.epoch);
        let (done_tx, done_rx) = oneshot::channel();
        if tx
            .send(EpochNotice::Event(ev, Completion(Some(done_tx))))
            .await
            .is_err()
        {
            return Ended::Shutdown;
        }
        if !sync {
            continue;
        }
        // The role loop's work is not interrupted by shutdown; its answer is awaited.
        match done_rx.await {
            Ok(()) => {
                if let Err(err) = sub.ack(seq).await {
                    return Ended::Failed(err);
                }
                tracing::debug!(event = %kind, epoch, seq, "acknowledged");
            }
            Err(_) if shutdown.is_cancelled() => return Ended::Shutdown,
            Err(_) => tracing::error!(
                event = %kind,
                epoch,
                "the epoch step was not completed; not acknowledging it, so the relay fails \
                 the barrier and ends COLO"
            ),
        }
    }
}
