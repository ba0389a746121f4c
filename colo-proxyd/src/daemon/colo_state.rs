//! What a daemon's own QEMU says about COLO (`query-colo-status`), so that the primary
//! daemon releases nothing uncompared on the relay's word alone, and either daemon learns of a
//! failover to its side even when the relay (on the other host, for the primary) cannot tell
//! it.
//!
//! | QEMU's `mode` / `last-mode` | [`QemuColo`] | primary's role loop | secondary's |
//! |---|---|---|---|
//! | `none` / `none` | [`QemuColo::NeverProtected`] | nothing claims protection: output passes uncompared | nothing |
//! | its role / any | [`QemuColo::InColo`] | output compared (or held until the relay gives the epoch) | nothing |
//! | `none` / its role | [`QemuColo::SurvivedAlone`] | a failover to this side ran `x-colo-lost-heartbeat` here: uncompared | the failover to the secondary (bridge) |
//!
//! A daemon (re)started after COLO ended therefore holds the PVM's output until it knows
//! which of these holds; before, it started releasing uncompared although QEMU was still a
//! COLO primary waiting for a failover decision. `x-colo-lost-heartbeat` is only ever sent
//! to a side's QEMU by that side's failover (or, on the primary, a planned stop), so
//! `none` / its role is the decision that this side carries on (a failover to the secondary
//! fences the primary through the relay's event instead, and nothing here undoes that).

use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use colo_daemon::qmp_session::QmpSession;
use colo_types::Role;

/// A QEMU's COLO state, as far as the daemons' decisions go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QemuColo {
    /// Never in COLO (before `start`, or during the first migration).
    NeverProtected,
    /// In COLO in its role.
    InColo,
    /// Was in COLO in its role; a failover to this side ended it.
    SurvivedAlone,
}

impl QemuColo {
    /// Reads the `query-colo-status` answer of a QEMU in `role`; `None` for a state it
    /// cannot be in (the other role's mode means the daemon's `--qmp` names the wrong QEMU).
    pub fn from_status(status: &Value, role: Role) -> Option<QemuColo> {
        let mode = status["mode"].as_str()?;
        // Without last-mode (QEMU before 4.0) a failover cannot be told from never: unknown.
        let last = status["last-mode"].as_str()?;
        let own = role.name();
        if mode == own {
            Some(QemuColo::InColo)
        } else if mode != "none" {
            None
        } else if last == "none" {
            Some(QemuColo::NeverProtected)
        } else if last == own {
            Some(QemuColo::SurvivedAlone)
        } else {
            None
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

/// How often QEMU is asked (`query-colo-status`, one small command).
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Asks QEMU every [`POLL_INTERVAL`] and sends each change of its state (the first answer too).
/// Errors (QEMU unreachable, a wrong answer) are logged at most once per kind of failure in a
/// row and change nothing: the role loop keeps what it knew.
pub fn spawn(qmp: QmpSession, role: Role, stop: CancellationToken) -> mpsc::Receiver<QemuColo> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut last = None;
        let mut last_error = None::<String>;
        let mut tick = tokio::time::interval(POLL_INTERVAL);
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
                QemuColo::from_status(&v, role).ok_or_else(|| {
                    format!("query-colo-status answered {v}: not a {role} QEMU (check --qmp)")
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
    fn reads_the_three_states_of_each_role() {
        use QemuColo::*;
        let (p, s) = (Role::Primary, Role::Secondary);
        let cases = [
            (p, "none", "none", Some(NeverProtected)),
            (p, "primary", "none", Some(InColo)),
            (p, "primary", "primary", Some(InColo)),
            (p, "none", "primary", Some(SurvivedAlone)),
            // The other role's QEMU is no state of this one.
            (p, "secondary", "none", None),
            (p, "none", "secondary", None),
            (s, "none", "none", Some(NeverProtected)),
            (s, "secondary", "none", Some(InColo)),
            (s, "none", "secondary", Some(SurvivedAlone)),
            (s, "primary", "none", None),
            (s, "none", "primary", None),
        ];
        for (role, mode, last, want) in cases {
            let status = json!({"mode": mode, "last-mode": last, "reason": "none"});
            assert_eq!(
                QemuColo::from_status(&status, role),
                want,
                "{role} {mode}/{last}"
            );
        }
        assert_eq!(QemuColo::from_status(&json!({}), p), None);
        // QEMU before 4.0 has no last-mode: a failover there looks like never.
        assert_eq!(QemuColo::from_status(&json!({"mode": "none"}), p), None);
    }
}
