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

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use colo_control::ControlAddress;
use qmp_driver::qmp::{ConnectOptions, QmpClient};
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::replica::Replica;

/// The reason noted to the relay (and the metrics' `reason` label).
pub const BLOCK_LOG_FULL: &str = crate::metrics::REASON_LOG_FULL;

/// Where the primary's QMP monitor listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QmpAddress {
    /// `unix:PATH`
    Unix(PathBuf),
    /// `tcp:HOST:PORT`
    Tcp(String),
}

impl FromStr for QmpAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<QmpAddress, String> {
        match s.split_once(':') {
            Some(("unix", path)) if !path.is_empty() => Ok(QmpAddress::Unix(path.into())),
            Some(("tcp", addr))
                if addr
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) =>
            {
                Ok(QmpAddress::Tcp(addr.to_owned()))
            }
            _ => Err(format!("expected unix:PATH or tcp:HOST:PORT, got {s:?}")),
        }
    }
}

impl fmt::Display for QmpAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QmpAddress::Unix(p) => write!(f, "unix:{}", p.display()),
            QmpAddress::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
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
    let client = match primary {
        QmpAddress::Unix(path) => QmpClient::connect_unix(path, opts).await,
        QmpAddress::Tcp(addr) => QmpClient::connect_tcp(addr, opts).await,
    }
    .map_err(|e| e.to_string())?;
    let params = client
        .execute_raw("query-migrate-parameters", None)
        .await
        .map_err(|e| e.to_string())?;
    let delay = params
        .get("x-checkpoint-delay")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| format!("query-migrate-parameters has no x-checkpoint-delay: {params}"))?;
    client
        .migrate_set_parameters(json!({ "x-checkpoint-delay": delay }))
        .await
        .map_err(|e| e.to_string())?;
    Ok(delay)
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
