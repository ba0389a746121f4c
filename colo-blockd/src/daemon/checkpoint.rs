//! Asks the primary for a checkpoint when the PVM log passes its memory
//! budget ([`Replica::checkpoint_wanted`]), through colo-daemon's one
//! checkpoint requester (checked, coalesced, rate limited, retried, noted to
//! the relay with the reason [`BLOCK_LOG_FULL`]).
//!
//! The log's flag going up is a request; the flag going down (a checkpoint
//! emptied the log) answers it.

use std::sync::Arc;
use std::time::Duration;

use colo_daemon::checkpoint::{CheckpointRequester, RequestObserver};
use colo_daemon::qmp_session::QmpSession;
use colo_types::Address;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::replica::Replica;

/// The reason noted to the relay (and the metrics' `reason` label).
pub const BLOCK_LOG_FULL: &str = crate::metrics::REASON_LOG_FULL;

/// How checkpoints are requested.
#[derive(Debug, Clone)]
pub struct RequestOptions {
    /// The primary's QMP monitor.
    pub primary: Address,
    /// The relay's control socket (Unix or TCP), to note the reason
    /// (optional).
    pub control: Option<Address>,
    /// At most one request per this interval.
    pub min_interval: Duration,
    /// A request not answered by a checkpoint within this time is sent again.
    pub retry_after: Duration,
}

impl RequestOptions {
    /// One request per second at most, re-sent after 5 s without a checkpoint.
    pub fn new(primary: Address, control: Option<Address>) -> RequestOptions {
        let defaults = colo_daemon::checkpoint::RequestOptions::default();
        RequestOptions {
            primary,
            control,
            min_interval: defaults.min_interval,
            retry_after: defaults.retry_after,
        }
    }
}

impl RequestObserver for Metrics {
    fn requested(&self, _reason: &'static str) {
        self.checkpoints_requested_log_full.inc();
    }

    fn failed(&self, _reason: &'static str) {
        self.checkpoint_request_failures.inc();
    }
}

/// Requests a checkpoint each time the PVM log fills, until `shutdown`.
pub async fn request_checkpoints(
    replica: Replica,
    opts: RequestOptions,
    shutdown: CancellationToken,
) {
    let requester = CheckpointRequester::spawn(
        QmpSession::new(opts.primary),
        colo_daemon::checkpoint::RequestOptions {
            min_interval: opts.min_interval,
            retry_after: opts.retry_after,
            control: opts.control,
            relay_prefix: "",
        },
        Arc::new(replica.metrics().clone()),
        shutdown.clone(),
    );
    let mut wanted = replica.checkpoint_wanted();
    loop {
        if *wanted.borrow_and_update() {
            tracing::debug!(
                reason = BLOCK_LOG_FULL,
                "the PVM log is past its memory budget"
            );
            requester.request(BLOCK_LOG_FULL);
        } else {
            requester.adopted();
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = wanted.changed() => if r.is_err() { return },
        }
    }
}
