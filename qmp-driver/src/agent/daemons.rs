//! The agent's view of colo's daemons, through the relay on the agent's host: the relay
//! answers, and which of its subscribers (colo-proxyd on both hosts, colo-blockd) are
//! connected and keep up with the barriers.
//!
//! It is reported (state file, logs, metrics), not acted on: a daemon that dies or stops
//! acknowledging makes the relay fail the next barrier and end COLO, which the primary's agent
//! sees as `COLO_EXIT` and turns into a claim. The relay runs on the secondary's host, so only
//! the agent there (where the relay's control socket exists) fills this in.

use crate::config::PairConfig;
use crate::pair::relay_status;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The daemons as the relay reports them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonsStatus {
    /// The relay answered its control socket.
    pub relay_up: bool,
    /// Why it did not.
    pub relay_error: Option<String>,
    /// Its subscribers.
    pub subscribers: Vec<SubscriberView>,
}

/// One subscriber of the relay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubscriberView {
    /// Its name (e.g. `colo-proxyd-primary`).
    pub name: String,
    /// Connected to the relay.
    pub connected: bool,
    /// Acknowledging barriers in time.
    pub healthy: bool,
}

impl DaemonsStatus {
    /// Everything up and healthy.
    pub fn all_well(&self) -> bool {
        self.relay_up && self.subscribers.iter().all(|s| s.connected && s.healthy)
    }
}

/// Whether the relay's control socket is on this host.
pub fn relay_is_local(cfg: &PairConfig) -> bool {
    cfg.relay.as_ref().is_some_and(|r| r.control.exists())
}

/// Asks the relay every `every` and publishes what changed, until `cancel`.
pub async fn watch_daemons(
    cfg: PairConfig,
    every: Duration,
    view: watch::Sender<Option<DaemonsStatus>>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(report) = relay_status(&cfg).await else {
            return;
        };
        let seen = DaemonsStatus {
            relay_up: report.reachable,
            relay_error: report.error,
            subscribers: report
                .status
                .map(|s| {
                    s.subscribers
                        .into_iter()
                        .map(|s| SubscriberView {
                            name: s.name,
                            connected: s.connected,
                            healthy: s.healthy,
                        })
                        .collect()
                })
                .unwrap_or_default(),
        };
        view.send_if_modified(|old| {
            let changed = old.as_ref() != Some(&seen);
            *old = Some(seen);
            changed
        });
    }
}
