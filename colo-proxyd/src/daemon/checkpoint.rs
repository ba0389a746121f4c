//! Asks the primary QEMU for a checkpoint when the comparison needs one (divergence, hold
//! time, memory bound), over colo-proxyd's QMP connection to it.
//!
//! The request itself is qmp-driver's [`request_checkpoint`]: it checks that the primary's
//! migration is in `colo` and re-sets `x-checkpoint-delay` to its current value, which makes
//! QEMU checkpoint at once without changing the period (the same mechanism colo-blockd uses).
//! Requests are **coalesced**: one is outstanding until the relay says `checkpoint-adopted`
//! ([`CheckpointRequester::adopted`]); reasons that arrive meanwhile are counted but ask for
//! nothing more. They are **rate-limited** to one per `min_interval` (each checkpoint pauses
//! the primary). A request not followed by a checkpoint within `retry_after` is sent again
//! (QEMU absorbs a request that arrives during a checkpoint). Every request is logged with its
//! reason, counted in `checkpoint_requests_total{reason}` and noted to the relay (best
//! effort: it only feeds the relay's status).

use std::sync::Arc;
use std::time::Duration;

use colo_control::ControlAddress;
use qmp_driver::pair::request_checkpoint;
use qmp_driver::qmp::{ConnectOptions, QmpClient};
use tokio::sync::{Mutex, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::config::QmpAddress;
use super::metrics::Metrics;
use crate::compare::CheckpointReason;

/// A QMP connection to the primary QEMU, opened on first use and again after a failure,
/// shared by the checkpoint requests and the fail-open check. QEMU's QMP socket serves one
/// client at a time, so colo-proxyd should have a monitor of its own (`-qmp`).
#[derive(Debug, Clone)]
pub struct QmpSession {
    address: QmpAddress,
    client: Arc<Mutex<Option<QmpClient>>>,
}

impl QmpSession {
    /// A session with the monitor at `address` (not connected yet).
    pub fn new(address: QmpAddress) -> Self {
        QmpSession {
            address,
            client: Arc::new(Mutex::new(None)),
        }
    }

    /// The monitor's address.
    pub fn address(&self) -> &QmpAddress {
        &self.address
    }

    /// Runs `f` with a connected client; a failure drops the connection so the next call
    /// reconnects.
    pub async fn with_client<T, F, Fut>(&self, f: F) -> Result<T, String>
    where
        F: FnOnce(QmpClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, String>>,
    {
        let mut guard = self.client.lock().await;
        let client = match guard.as_ref() {
            Some(c) if c.is_connected() => c.clone(),
            _ => {
                let opts = ConnectOptions {
                    command_timeout: Duration::from_secs(5),
                    ..ConnectOptions::default()
                };
                let c = QmpClient::connect_to(&self.address, opts)
                    .await
                    .map_err(|e| format!("cannot connect to QMP at {}: {e}", self.address))?;
                *guard = Some(c.clone());
                c
            }
        };
        let r = f(client).await;
        if r.is_err() {
            *guard = None;
        }
        r
    }
}

/// The label of a reason in metrics and logs, and (prefixed with `proxy-`) to the relay.
pub fn reason_label(reason: &CheckpointReason) -> &'static str {
    match reason {
        CheckpointReason::PayloadDiffers { .. } => "payload-differs",
        CheckpointReason::SynDiffers => "syn-differs",
        CheckpointReason::FinDiffers => "fin-differs",
        CheckpointReason::SegmentBeforeSyn => "segment-before-syn",
        CheckpointReason::MemoryBound { .. } => "connection-memory-bound",
        CheckpointReason::DatagramsDiffer => "datagrams-differ",
        CheckpointReason::HoldTimeout => "hold-timeout",
        CheckpointReason::TotalMemoryBound { .. } => "total-memory-bound",
    }
}

/// Tuning of the requests.
#[derive(Debug, Clone)]
pub struct RequestOptions {
    /// At most one request per this interval.
    pub min_interval: Duration,
    /// A request not followed by `checkpoint-adopted` within this time is sent again.
    pub retry_after: Duration,
    /// The relay's control socket (Unix or TCP), to note the reason (optional).
    pub control: Option<ControlAddress>,
}

impl Default for RequestOptions {
    fn default() -> Self {
        RequestOptions {
            min_interval: Duration::from_secs(1),
            retry_after: Duration::from_secs(5),
            control: None,
        }
    }
}

enum Message {
    Needed(&'static str),
    Adopted,
}

/// The role loop's handle: never waits.
#[derive(Debug, Clone)]
pub struct CheckpointRequester {
    tx: mpsc::UnboundedSender<Message>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Message::Needed(r) => write!(f, "Needed({r})"),
            Message::Adopted => f.write_str("Adopted"),
        }
    }
}

impl CheckpointRequester {
    /// Starts the requesting task.
    pub fn spawn(
        qmp: QmpSession,
        opts: RequestOptions,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(qmp, opts, metrics, rx, shutdown));
        CheckpointRequester { tx }
    }

    /// The comparison needs a checkpoint for `reason`.
    pub fn request(&self, reason: &CheckpointReason) {
        let _ = self.tx.send(Message::Needed(reason_label(reason)));
    }

    /// A checkpoint was adopted: outstanding requests are answered.
    pub fn adopted(&self) {
        let _ = self.tx.send(Message::Adopted);
    }
}

async fn run(
    qmp: QmpSession,
    opts: RequestOptions,
    metrics: Metrics,
    mut rx: mpsc::UnboundedReceiver<Message>,
    shutdown: CancellationToken,
) {
    // The reason waiting to be sent, and when the last request went out.
    let mut wanted: Option<&'static str> = None;
    let mut outstanding: Option<(Instant, &'static str)> = None;
    let mut last_sent: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let due = match (wanted, outstanding) {
            (Some(_), None) => Some(last_sent.map_or(now, |t| t + opts.min_interval)),
            (_, Some((since, _))) => Some(since + opts.retry_after),
            (None, None) => None,
        };
        let message = tokio::select! {
            _ = shutdown.cancelled() => return,
            m = rx.recv() => match m { Some(m) => Some(m), None => return },
            _ = sleep_until(due) => None,
        };
        match message {
            Some(Message::Needed(reason)) => {
                if outstanding.is_some() || wanted.is_some() {
                    tracing::debug!(reason, "checkpoint already requested; coalesced");
                } else {
                    wanted = Some(reason);
                }
                continue;
            }
            Some(Message::Adopted) => {
                wanted = None;
                outstanding = None;
                continue;
            }
            None => {}
        }
        // A deadline passed: the first request, or a retry of an unanswered one.
        let reason = match (wanted, outstanding) {
            (Some(r), None) if last_sent.is_none_or(|t| t + opts.min_interval <= now) => r,
            (_, Some((since, r))) if since + opts.retry_after <= now => {
                tracing::warn!(
                    reason = r,
                    after = ?opts.retry_after,
                    "no checkpoint followed the request; asking again"
                );
                r
            }
            _ => continue,
        };
        last_sent = Some(now);
        match qmp
            .with_client(|c| async move { request_checkpoint(&c).await.map_err(|e| e.to_string()) })
            .await
        {
            Ok(delay) => {
                wanted = None;
                outstanding = Some((now, reason));
                metrics.checkpoint_requested(reason);
                tracing::info!(
                    reason,
                    primary = %qmp.address(),
                    x_checkpoint_delay_ms = delay,
                    "asked the primary for a checkpoint"
                );
                if let Some(control) = opts.control.clone() {
                    let note = format!("proxy-{reason}");
                    tokio::spawn(async move {
                        if let Err(err) =
                            colo_control::client::note_checkpoint_request(&control, &note).await
                        {
                            tracing::debug!(%err, "cannot note the checkpoint request to the relay");
                        }
                    });
                }
            }
            Err(err) => {
                // Keep the reason: retried after min_interval.
                wanted = Some(reason);
                outstanding = None;
                tracing::warn!(
                    reason,
                    primary = %qmp.address(),
                    %err,
                    retry_in = ?opts.min_interval,
                    "cannot ask the primary for a checkpoint; held packets wait for the next \
                     periodic checkpoint"
                );
            }
        }
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
