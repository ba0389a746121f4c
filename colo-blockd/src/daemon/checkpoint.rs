//! Asks the primary for a checkpoint when the PVM log passes its memory
//! budget ([`Replica::checkpoint_wanted`]).
//!
//! QEMU has no "checkpoint now" command, but re-setting `x-checkpoint-delay`
//! (to its current value, so the period does not change) makes the primary
//! checkpoint at once. Requests are coalesced to at most one per
//! [`RequestOptions::min_interval`]: each checkpoint pauses the primary, and
//! a log that fills faster than that only needs the next checkpoint, not one
//! per write. The reason, [`BLOCK_LOG_FULL`], is also noted to the relay
//! (best effort: it only feeds the relay's status).

use std::time::Duration;

use colo_control::ControlAddress;
use qmp_driver::pair::reset_checkpoint_delay;
use qmp_driver::qmp::{ConnectOptions, QmpClient};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::replica::Replica;

/// The reason noted to the relay (and the metrics' `reason` label).
pub const BLOCK_LOG_FULL: &str = crate::metrics::REASON_LOG_FULL;

/// Where the primary's QMP monitor listens (`unix:PATH` or `tcp:HOST:PORT`):
/// qmp-driver's address type.
pub use qmp_driver::config::Endpoint as QmpAddress;

/// Parses `--primary-qmp`, with an error that says what is expected.
pub fn parse_qmp_address(s: &str) -> Result<QmpAddress, String> {
    s.parse()
        .map_err(|e: qmp_driver::config::EndpointParseError| {
            format!(
                "expected unix:PATH or tcp:HOST:PORT, got {s:?} ({})",
                e.reason
            )
        })
}

/// How checkpoints are requested.
#[derive(Debug, Clone)]
pub struct RequestOptions {
    /// The primary's QMP monitor.
    pub primary: QmpAddress,
    /// The relay's control socket (Unix or TCP), to note the reason
    /// (optional).
    pub control: Option<ControlAddress>,
    /// At most one request per this interval.
    pub min_interval: Duration,
}

impl RequestOptions {
    /// One request per second at most.
    pub fn new(primary: QmpAddress, control: Option<ControlAddress>) -> RequestOptions {
        RequestOptions {
            primary,
            control,
            min_interval: Duration::from_secs(1),
        }
    }
}

/// Requests a checkpoint each time the PVM log fills, until `shutdown`.
pub async fn request_checkpoints(
    replica: Replica,
    opts: RequestOptions,
    shutdown: CancellationToken,
) {
    let mut wanted = replica.checkpoint_wanted();
    let mut last: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = wanted.wait_for(|w| *w) => if r.is_err() { return },
        }
        if let Some(at) = last {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(at + opts.min_interval) => {}
            }
        }
        // A checkpoint may have emptied the log while we waited.
        if !*wanted.borrow_and_update() {
            continue;
        }
        last = Some(Instant::now());
        match ask_primary(&opts.primary).await {
            Ok(delay) => {
                replica.metrics().checkpoints_requested_log_full.inc();
                tracing::info!(
                    reason = BLOCK_LOG_FULL,
                    primary = %opts.primary,
                    x_checkpoint_delay_ms = delay,
                    "asked the primary for a checkpoint: the PVM log is past its memory budget"
                );
                if let Some(control) = &opts.control
                    && let Err(err) =
                        colo_control::client::note_checkpoint_request(control, BLOCK_LOG_FULL).await
                {
                    tracing::debug!(%err, "cannot note the checkpoint request to the relay");
                }
                // Ask again only after the log was emptied and filled again
                // (any change of the flag); a failed request is retried on
                // the next round instead, as the flag is still set.
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = wanted.changed() => if r.is_err() { return },
                }
            }
            Err(err) => {
                replica.metrics().checkpoint_request_failures.inc();
                tracing::warn!(
                    reason = BLOCK_LOG_FULL,
                    primary = %opts.primary,
                    %err,
                    retry_in = ?opts.min_interval,
                    "cannot ask the primary for a checkpoint; the PVM log keeps spilling to its file"
                )
            }
        }
    }
}

/// Re-sets the primary's `x-checkpoint-delay`; returns it (ms).
async fn ask_primary(primary: &QmpAddress) -> Result<u64, String> {
    let opts = ConnectOptions {
        command_timeout: Duration::from_secs(5),
        ..ConnectOptions::default()
    };
    // A fresh connection per request (at most one a second): nothing to
    // keep alive across a primary restart.
    let client = QmpClient::connect_to(primary, opts)
        .await
        .map_err(|e| e.to_string())?;
    reset_checkpoint_delay(&client)
        .await
        .map(u64::from)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qmp_addresses_parse() {
        assert_eq!(
            "unix:/run/qmp.sock".parse(),
            Ok(QmpAddress::Unix("/run/qmp.sock".into()))
        );
        assert_eq!(
            "tcp:10.0.0.1:4444".parse(),
            Ok(QmpAddress::Tcp("10.0.0.1:4444".into()))
        );
        assert!("tcp:host".parse::<QmpAddress>().is_err());
        assert!("tcp::1".parse::<QmpAddress>().is_err());
        assert!("unix:".parse::<QmpAddress>().is_err());
        assert!("/run/qmp.sock".parse::<QmpAddress>().is_err());
        assert_eq!(
            QmpAddress::Tcp("h:1".into()).to_string(),
            "tcp:h:1".to_string()
        );
    }
}
