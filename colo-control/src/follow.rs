//! A daemon's side of the relay over time: subscribe as a synchronous
//! subscriber, run a session until the connection ends, and reconnect with a
//! bounded exponential backoff, until shutdown. colo-blockd and colo-proxyd
//! both follow the relay this way; only what they do with each session's
//! events differs.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::client::{ClientOptions, ControlError, Subscriber};
use crate::protocol::Event;
use colo_types::Address;

/// How to reach the relay and how fast to retry.
#[derive(Debug, Clone)]
pub struct FollowOptions {
    /// The relay's control socket: its Unix socket (`qmp-driver relay
    /// --control PATH`) or, from the other host, its TCP address
    /// (`--control-tcp`).
    pub control: Address,
    /// Our `hello` name (shown in the relay's status and barrier errors).
    pub name: String,
    /// First wait before reconnecting; doubled after each failed attempt.
    pub retry_min: Duration,
    /// Longest wait between reconnection attempts.
    pub retry_max: Duration,
    /// Mutual TLS to the relay's TCP listener, when it requires it.
    pub tls: Option<colo_tls::PeerConnector>,
}

impl FollowOptions {
    /// Options for `control` under `name`, with a backoff of 100 ms up to
    /// 5 s: short enough to be back before the next checkpoint period, long
    /// enough not to spin on a relay that is down.
    pub fn new(control: impl Into<Address>, name: &str) -> FollowOptions {
        FollowOptions {
            control: control.into(),
            name: name.to_owned(),
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
            tls: None,
        }
    }
}

/// Why one subscribed session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// Shutdown was asked for (or the daemon is going away): stop following.
    Shutdown,
    /// The relay closed the connection.
    RelayClosed,
    /// The connection failed.
    Failed(ControlError),
    /// We could not do our part of a synchronous event: the connection is closed on purpose,
    /// because a sync subscriber that leaves during a barrier makes the relay fail it at once
    /// (instead of after its ack timeout, with both VMs stopped meanwhile).
    StepFailed,
}

/// The relay's next event, or why the session ends: shutdown (which only ever interrupts this
/// wait, never a step a daemon is doing), the relay closing the connection, or a failure.
pub async fn next_event(
    sub: &mut Subscriber,
    shutdown: &CancellationToken,
) -> Result<Event, SessionEnd> {
    let next = tokio::select! {
        _ = shutdown.cancelled() => return Err(SessionEnd::Shutdown),
        n = sub.next_event() => n,
    };
    match next {
        Ok(Some(ev)) => Ok(ev),
        Ok(None) => Err(SessionEnd::RelayClosed),
        Err(err) => Err(SessionEnd::Failed(err)),
    }
}

/// One session's work on a connected subscriber: owns what it needs and
/// borrows only the subscriber, so the follower can run on any runtime thread.
pub type SessionFuture<'s> = Pin<Box<dyn Future<Output = SessionEnd> + Send + 's>>;

/// Subscribes to the relay (synchronously) and runs `session` on each
/// connection until shutdown, reconnecting whenever a session ends other
/// than by [`SessionEnd::Shutdown`]. While disconnected, COLO cannot
/// checkpoint (the relay fails every barrier a sync subscriber left), which
/// is logged each time.
pub async fn follow_relay(
    opts: &FollowOptions,
    shutdown: &CancellationToken,
    mut session: impl for<'s> FnMut(&'s mut Subscriber) -> SessionFuture<'s>,
) {
    let mut backoff = opts.retry_min;
    let client = ClientOptions::default();
    loop {
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = Subscriber::connect_tls(&opts.control, &opts.name, true, &client, opts.tls.as_ref()) => r,
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
                match session(&mut sub).await {
                    SessionEnd::Shutdown => return,
                    SessionEnd::RelayClosed => tracing::error!(
                        control = %opts.control,
                        "the relay closed the control connection; COLO cannot checkpoint while \
                         we are disconnected (the relay fails the barrier); reconnecting"
                    ),
                    SessionEnd::Failed(err) => tracing::error!(
                        %err,
                        "lost the relay's control connection; COLO cannot checkpoint while we \
                         are disconnected (the relay fails the barrier); reconnecting"
                    ),
                    SessionEnd::StepFailed => tracing::error!(
                        control = %opts.control,
                        "closed the control connection after a failed epoch step, so that the \
                         relay fails the barrier now and COLO ends; reconnecting"
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
