//! What the primary's own QEMU says about COLO (`query-colo-status`), so that the primary
//! daemon releases nothing uncompared on the relay's word alone, and learns of a failover to
//! its side even when the relay (on the other host) cannot tell it.
//!
//! | QEMU's `mode` / `last-mode` | [`QemuColo`] | the role loop |
//! |---|---|---|
//! | `none` / `none` | [`QemuColo::NeverProtected`] | nothing claims protection: output passes uncompared |
//! | `primary` / any | [`QemuColo::InColo`] | output is compared (or held until the relay gives the epoch) |
//! | `none` / `primary` | [`QemuColo::SurvivedAlone`] | a failover to this side ran `x-colo-lost-heartbeat` here: uncompared |
//!
//! A daemon (re)started after COLO ended therefore holds the PVM's output until it knows
//! which of these holds; before, it started releasing uncompared although QEMU was still a
//! COLO primary waiting for a failover decision. `x-colo-lost-heartbeat` is only ever sent
//! to the primary's QEMU by the primary's failover or a planned stop, so `none` / `primary`
//! is the decision that the primary carries on (a failover to the secondary fences this side
//! through the relay's event instead, and nothing here undoes that).

use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use colo_daemon::qmp_session::QmpSession;

/// The primary QEMU's COLO state, as far as the daemon's release decisions go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QemuColo {
    /// Never in COLO (before `start`, or during the first migration).
    NeverProtected,
    /// In COLO as the primary.
    InColo,
    /// Was the COLO primary; a failover to this side ended it.
    SurvivedAlone,
}

impl QemuColo {
    /// Reads a `query-colo-status` answer; `None` for a state a primary cannot be in (a
    /// `secondary` mode means the daemon's `--qmp` names the wrong QEMU).
    pub fn from_status(status: &Value) -> Option<QemuColo> {
        let mode = status["mode"].as_str()?;
        // Without last-mode (QEMU before 4.0) a failover cannot be told from never: unknown.
        let last = status["last-mode"].as_str()?;
        match (mode, last) {
            ("primary", _) => Some(QemuColo::InColo),
            ("none", "none") => Some(QemuColo::NeverProtected),
            ("none", "primary") => Some(QemuColo::SurvivedAlone),
            _ => None,
        }
    }

    /// The name in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            QemuColo::NeverProtected => "never-protected",
            QemuColo::InColo => "in-colo",
            QemuColo::SurvivedAlone => "survived-alone",
        }
    }
}

/// Asks QEMU every `interval` and sends each change of its state (the first answer too).
/// Errors (QEMU unreachable, a wrong answer) are logged at most once per kind of failure in a
/// row and change nothing: the role loop keeps what it knew.
pub fn spawn(
    qmp: QmpSession,
    interval: Duration,
    stop: CancellationToken,
) -> mpsc::Receiver<QemuColo> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut last = None;
        let mut last_error = None::<String>;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let answer = qmp
                .with_client(|c| async move {
                    c.execute_raw("query-colo-status", None)
                        .await
                        .map_err(|e| e.to_string())
                })
                .await;
            let state = answer.and_then(|v| {
                QemuColo::from_status(&v).ok_or_else(|| {
                    format!("query-colo-status answered {v}: not a primary QEMU (check --qmp)")
                })
            });
            match state {
                Ok(state) => {
                    last_error = None;
                    if last != Some(state) {
                        last = Some(state);
                        if tx.send(state).await.is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    if last_error.as_deref() != Some(e.as_str()) {
                        tracing::warn!(
                            error = %e,
                            qmp = %qmp.address(),
                            "cannot learn QEMU's COLO state; keeping the last known one"
                        );
                        last_error = Some(e);
                    }
                }
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_the_three_states_of_a_primary() {
        let s = |mode: &str, last: &str| json!({"mode": mode, "last-mode": last, "reason": "none"});
        assert_eq!(
            QemuColo::from_status(&s("none", "none")),
            Some(QemuColo::NeverProtected)
        );
        assert_eq!(
            QemuColo::from_status(&s("primary", "none")),
            Some(QemuColo::InColo)
        );
        assert_eq!(
            QemuColo::from_status(&s("primary", "primary")),
            Some(QemuColo::InColo)
        );
        assert_eq!(
            QemuColo::from_status(&s("none", "primary")),
            Some(QemuColo::SurvivedAlone)
        );
        // A secondary's QEMU, or garbage, is no state of a primary.
        assert_eq!(QemuColo::from_status(&s("secondary", "none")), None);
        assert_eq!(QemuColo::from_status(&s("none", "secondary")), None);
        assert_eq!(QemuColo::from_status(&json!({})), None);
        // QEMU before 4.0 has no last-mode: a failover there looks like never.
        assert_eq!(QemuColo::from_status(&json!({"mode": "none"})), None);
    }
}
