//! The one checkpoint requester of every daemon (and the policy the operator CLI follows).
//!
//! QEMU has no "checkpoint now" command; re-setting the primary's `x-checkpoint-delay` to its
//! current value while COLO runs starts one at once ([`request_checkpoint`]). The requester
//! wraps that in one policy:
//!
//! * **checked**: a request goes out only while the primary's migration is in `colo`;
//! * **coalesced**: one request is outstanding until the relay says `checkpoint-adopted`
//!   ([`CheckpointRequester::adopted`]); reasons that arrive meanwhile are counted, not sent;
//! * **rate limited**: at most one request per [`RequestOptions::min_interval`] (each
//!   checkpoint pauses the primary);
//! * **retried**: a request not followed by a checkpoint within
//!   [`RequestOptions::retry_after`] is sent again (QEMU absorbs a request that arrives during
//!   a checkpoint), and a request QMP did not take is retried after `min_interval`;
//! * **recorded**: every request is logged with its reason, reported to the daemon's
//!   [`RequestObserver`] (its metrics) and noted to the relay (best effort: it only feeds the
//!   relay's status).

use std::sync::Arc;
use std::time::Duration;

use colo_qmp::{QmpClient, QmpError};
use colo_types::Address;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::qmp_session::QmpSession;

/// Why a checkpoint could not be asked for.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The primary's migration is not in `colo`.
    #[error(
        "the primary's migration status is `{0}`, not `colo`: checkpoints happen only while COLO \
         runs"
    )]
    NotInColo(String),
    /// QMP failed (connect, timeout, QEMU's refusal).
    #[error(transparent)]
    Qmp(#[from] QmpError),
}

/// Refuses unless the primary's migration is in `colo`.
pub async fn ensure_colo(primary: &QmpClient) -> Result<(), CheckpointError> {
    match primary.query_migrate().await?.status {
        Some(status) if status == "colo" => Ok(()),
        other => Err(CheckpointError::NotInColo(
            other.unwrap_or_else(|| "none".into()),
        )),
    }
}

/// Asks the primary for a checkpoint now and returns its `x-checkpoint-delay` (ms). Returns
/// before the checkpoint runs. Refuses unless the primary's migration is `colo`.
pub async fn request_checkpoint(primary: &QmpClient) -> Result<u32, CheckpointError> {
    ensure_colo(primary).await?;
    Ok(primary.reset_checkpoint_delay().await?)
}

/// Tuning of the requests.
#[derive(Debug, Clone)]
pub struct RequestOptions {
    /// At most one request per this interval.
    pub min_interval: Duration,
    /// A request not followed by [`CheckpointRequester::adopted`] within this time is sent
    /// again.
    pub retry_after: Duration,
    /// The relay's control socket, to note the reason (optional).
    pub control: Option<Address>,
    /// The prefix of the reason noted to the relay (`proxy-` makes `proxy-payload-differs`).
    pub relay_prefix: &'static str,
}

impl Default for RequestOptions {
    fn default() -> Self {
        RequestOptions {
            min_interval: Duration::from_secs(1),
            retry_after: Duration::from_secs(5),
            control: None,
            relay_prefix: "",
        }
    }
}

/// What the daemon records of its requests (its metrics).
pub trait RequestObserver: Send + Sync + 'static {
    /// A request for `reason` went out.
    fn requested(&self, reason: &'static str);
    /// A request for `reason` could not be made (it is retried).
    fn failed(&self, reason: &'static str);
}

enum Message {
    Needed(&'static str),
    Adopted,
    Withdrawn,
}

/// The daemon's handle: never waits.
#[derive(Debug, Clone)]
pub struct CheckpointRequester {
    tx: mpsc::UnboundedSender<Message>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Message::Needed(r) => write!(f, "Needed({r})"),
            Message::Adopted => f.write_str("Adopted"),
            Message::Withdrawn => f.write_str("Withdrawn"),
        }
    }
}

impl CheckpointRequester {
    /// Starts the requesting task; it ends at `shutdown` or when every handle is dropped.
    pub fn spawn(
        qmp: QmpSession,
        opts: RequestOptions,
        observer: Arc<dyn RequestObserver>,
        shutdown: CancellationToken,
    ) -> Self {
        // Unbounded but not growing: the task drains every message at once and keeps only one
        // wanted reason and one outstanding request.
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(qmp, opts, observer, rx, shutdown));
        CheckpointRequester { tx }
    }

    /// A checkpoint is needed for `reason` (a label like `payload-differs`).
    pub fn request(&self, reason: &'static str) {
        let _ = self.tx.send(Message::Needed(reason));
    }

    /// A checkpoint was adopted: outstanding requests are answered.
    pub fn adopted(&self) {
        let _ = self.tx.send(Message::Adopted);
    }

    /// COLO ended (or the pair failed over): no checkpoint will come, and none is needed any
    /// more. The wanted and outstanding requests are dropped, not retried against a primary
    /// that has left COLO; a later [`request`](Self::request) starts afresh.
    pub fn withdraw(&self) {
        let _ = self.tx.send(Message::Withdrawn);
    }
}

async fn run(
    qmp: QmpSession,
    opts: RequestOptions,
    observer: Arc<dyn RequestObserver>,
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
            Some(Message::Withdrawn) => {
                if let Some(reason) = wanted.or(outstanding.map(|(_, r)| r)) {
                    tracing::info!(reason, "COLO ended: the checkpoint request is withdrawn");
                }
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
                observer.requested(reason);
                tracing::info!(
                    reason,
                    primary = %qmp.address(),
                    x_checkpoint_delay_ms = delay,
                    "asked the primary for a checkpoint"
                );
                if let Some(control) = opts.control.clone() {
                    let note = format!("{}{reason}", opts.relay_prefix);
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
                observer.failed(reason);
                tracing::warn!(
                    reason,
                    primary = %qmp.address(),
                    %err,
                    retry_in = ?opts.min_interval,
                    "cannot ask the primary for a checkpoint; the next periodic checkpoint will do"
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use colo_testkit::fake_qmp::{Answer, FakeMonitor};
    use serde_json::json;

    use super::*;

    #[derive(Default)]
    struct Counts {
        failed: AtomicUsize,
    }

    impl RequestObserver for Counts {
        fn requested(&self, _: &'static str) {}
        fn failed(&self, _: &'static str) {
            self.failed.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A primary that has left COLO refuses every request; the requester keeps the reason and
    /// retries until told COLO ended. After `withdraw` it asks no more (the primary's
    /// colo-proxyd once retried every second for as long as the primary served alone).
    #[tokio::test]
    async fn a_withdrawn_request_is_not_retried() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let mut monitor = FakeMonitor::serve_unix(&path, &[], |cmd| match cmd.name.as_str() {
            "query-migrate" => Answer::ret(json!({"status": "completed"})),
            _ => Answer::ok(),
        });
        let counts = Arc::new(Counts::default());
        let shutdown = CancellationToken::new();
        let opts = RequestOptions {
            min_interval: Duration::from_millis(20),
            ..RequestOptions::default()
        };
        let requester = CheckpointRequester::spawn(
            QmpSession::new(Address::Unix(path.clone())),
            opts,
            counts.clone(),
            shutdown.clone(),
        );
        requester.request("hold-timeout");
        // Refused, then asked again: the reason is kept while COLO may still run.
        for _ in 0..2 {
            monitor
                .recv_named("query-migrate", Duration::from_secs(5))
                .await
                .expect("the requester asks the primary");
        }
        requester.withdraw();
        // Whatever attempt was under way when the withdrawal arrived ends; then silence, over
        // many times the retry interval.
        let mut in_flight = 0;
        while in_flight < 3
            && monitor
                .recv_named("query-migrate", Duration::from_millis(500))
                .await
                .is_some()
        {
            in_flight += 1;
        }
        let failed = counts.failed.load(Ordering::SeqCst);
        assert!(failed >= 2, "the refusals were not recorded: {failed}");
        assert!(
            monitor
                .recv_named("query-migrate", Duration::from_millis(500))
                .await
                .is_none(),
            "the withdrawn request was retried"
        );
        // A new need starts afresh.
        requester.request("payload-differs");
        monitor
            .recv_named("query-migrate", Duration::from_secs(5))
            .await
            .expect("a new request goes out after a withdrawal");
        shutdown.cancel();
    }
}
