//! The agent's eyes on its own QEMU: which state the VM is in, and (on the primary) the signs
//! that the secondary stopped taking part in COLO.
//!
//! The agent keeps a QMP connection of its own (`watch_qmp` of its side) and probes every
//! `probe`. Losing the connection means QEMU is gone (it is reconnected when a new QEMU
//! listens there, e.g. a restarted secondary). On the primary, in COLO, the triggers of the
//! watch agent apply ([`Trigger`]): `COLO_EXIT`, a monitor that does not answer within
//! `stall`, a checkpoint that keeps the VM stopped for longer than `stall`.

use crate::pair::{Trigger, checkpoint_stall};
use colo_cluster::message::VmState;
use colo_qmp::{ConnectOptions, Event, EventStream, QmpClient, QmpError};
use colo_types::{Address, Role};
use std::time::Duration;
use tokio::time::Instant;

/// What the agent sees of its own VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// Nothing to tell the peer: QEMU has not answered yet (not started), or its VM is
    /// stopped outside COLO in a passing state (`paused`, `finish-migrate`, `postmigrate`: a
    /// move or a switch under way). The arbiter keeps the VM's last state meanwhile, so a
    /// primary whose COLO just broke can still claim. A fresh QEMU waiting for its migration
    /// or for `start` is [`VmState::Waiting`].
    Waiting,
    /// In one of the states the agents tell each other.
    Vm(VmState),
}

impl Observed {
    /// The label in the state file and logs.
    pub fn label(self) -> &'static str {
        match self {
            Observed::Waiting => "waiting",
            Observed::Vm(vm) => vm_label(vm),
        }
    }
}

/// The label of a VM state in the state file, logs and metrics.
pub fn vm_label(vm: VmState) -> &'static str {
    match vm {
        VmState::Primary => "primary",
        VmState::Secondary => "secondary",
        VmState::Alone => "alone",
        VmState::Gone => "gone",
        VmState::Fenced => "fenced",
        VmState::Waiting => "waiting",
    }
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// The VM's state (reported on every probe; the caller keeps the changes).
    State(Observed),
    /// The primary, in COLO, sees the secondary fail.
    Trigger(Trigger, String),
}

/// The observer of one side's QEMU.
#[derive(Debug)]
pub struct Observer {
    side: Role,
    address: Address,
    connect: ConnectOptions,
    stall: Duration,
    qmp: Option<(QmpClient, EventStream)>,
    /// Ever connected: a refused connection before that is "not started yet", after it "gone".
    was_connected: bool,
    last: Option<Observed>,
    stopped_since: Option<Instant>,
}

impl Observer {
    /// An observer of `side`'s QEMU at `address` (its `watch_qmp`).
    pub fn new(side: Role, address: Address, connect: ConnectOptions, stall: Duration) -> Self {
        Observer {
            side,
            address,
            connect,
            stall,
            qmp: None,
            was_connected: false,
            last: None,
            stopped_since: None,
        }
    }

    /// The QMP connection, while there is one.
    pub fn qmp(&self) -> Option<&QmpClient> {
        self.qmp.as_ref().map(|(q, _)| q)
    }

    /// The next QMP event; pending for ever without a connection, `None` once the connection
    /// closed. Cancel-safe: an event is taken off the stream only when this completes, so it
    /// may race the probe's tick; [`Observer::on_event`] then handles the event to the end.
    pub async fn next_event(&mut self) -> Option<Event> {
        let Some((_, events)) = self.qmp.as_mut() else {
            return std::future::pending().await;
        };
        events.recv().await
    }

    /// What an event from [`Observer::next_event`] means, if anything. Not cancel-safe (a
    /// `COLO_EXIT` is confirmed with a query), so run it to the end outside any race: QEMU's
    /// primary keeps reporting mode `primary` after COLO broke, until a failover, so this
    /// event is the only sign of it, and one dropped half-handled leaves the agent blind.
    pub async fn on_event(&mut self, event: Option<Event>) -> Option<Seen> {
        match event {
            None => Some(self.lost()),
            Some(e) if e.name == "SHUTDOWN" => {
                // QEMU is going away (quit, a guest poweroff): its VM is gone for the
                // peer's purposes, before the socket even closes.
                Some(self.remember(Observed::Vm(VmState::Gone)))
            }
            Some(e) if e.name == "COLO_EXIT" => {
                let in_colo_primary = self.last == Some(Observed::Vm(VmState::Primary));
                let broke = e.data["reason"] == "error";
                let ours = self.side == Role::Primary && e.data["mode"] == "primary";
                if ours && in_colo_primary && broke {
                    Some(self.confirm_colo_exit().await)
                } else {
                    None
                }
            }
            Some(_) => None,
        }
    }

    /// One probe query; what to report instead when it fails: a hung monitor on a protected
    /// primary is the trigger, elsewhere the last state holds; a lost connection is the VM gone.
    async fn query(
        &mut self,
        qmp: &QmpClient,
        command: &str,
        protected_primary: bool,
    ) -> Result<serde_json::Value, Seen> {
        match qmp.execute_raw_timeout(command, None, self.stall).await {
            Ok(v) => Ok(v),
            Err(QmpError::Timeout { .. }) if protected_primary => Err(Seen::Trigger(
                Trigger::MonitorHung,
                format!("{command} unanswered for {:?}", self.stall),
            )),
            Err(QmpError::Timeout { .. }) => {
                Err(Seen::State(self.last.unwrap_or(Observed::Waiting)))
            }
            Err(_) => Err(self.lost()),
        }
    }

    /// A `COLO_EXIT` (reason `error`) on the primary means the secondary's side failed,
    /// unless the primary's own QEMU is going away (a `quit` ends COLO with the same event
    /// just before QEMU exits): only a QEMU that still answers and is not shutting down turns
    /// it into a claim; otherwise its VM counts as gone, and the peer takes over.
    async fn confirm_colo_exit(&mut self) -> Seen {
        let Some((qmp, _)) = self.qmp.as_ref() else {
            return self.lost();
        };
        match qmp
            .execute_raw_timeout("query-status", None, self.stall)
            .await
        {
            Ok(status) if status["status"] != "shutdown" => Seen::Trigger(
                Trigger::ColoExit,
                format!("COLO_EXIT reason error, QEMU {}", status["status"]),
            ),
            Ok(_) => self.remember(Observed::Vm(VmState::Gone)),
            // A monitor that hangs right after COLO broke: the stream's peer is stuck.
            Err(QmpError::Timeout { .. }) => Seen::Trigger(
                Trigger::ColoExit,
                format!(
                    "COLO_EXIT reason error, then query-status unanswered for {:?}",
                    self.stall
                ),
            ),
            Err(_) => self.lost(),
        }
    }

    fn lost(&mut self) -> Seen {
        self.qmp = None;
        self.stopped_since = None;
        self.remember(Observed::Vm(VmState::Gone))
    }

    fn remember(&mut self, observed: Observed) -> Seen {
        self.last = Some(observed);
        Seen::State(observed)
    }

    /// One probe: connects if needed, then reads the VM's state.
    pub async fn probe(&mut self) -> Seen {
        if self.qmp.is_none() {
            match QmpClient::connect_to(&self.address, self.connect.clone()).await {
                Ok(q) => {
                    let events = q.subscribe();
                    self.qmp = Some((q, events));
                    self.was_connected = true;
                }
                // Before the first connection QEMU may simply not be started yet.
                Err(_) if !self.was_connected => return self.remember(Observed::Waiting),
                Err(_) => return self.lost(),
            }
        }
        let Some((qmp, _)) = self.qmp.as_ref() else {
            return self.lost();
        };
        let qmp = qmp.clone();
        let protected_primary =
            self.side == Role::Primary && self.last == Some(Observed::Vm(VmState::Primary));
        let colo = match self
            .query(&qmp, "query-colo-status", protected_primary)
            .await
        {
            Ok(v) => v,
            Err(seen) => return seen,
        };
        let status = match self.query(&qmp, "query-status", protected_primary).await {
            Ok(v) => v,
            Err(seen) => return seen,
        };
        let observed = classify(
            colo["mode"].as_str().unwrap_or("none"),
            colo["last-mode"].as_str().unwrap_or("none"),
            status["status"].as_str().unwrap_or(""),
        );
        if protected_primary
            && observed != Observed::Vm(VmState::Primary)
            && colo["reason"] == "error"
        {
            // COLO broke and this probe saw it before the COLO_EXIT event was handled (the
            // event comes from QEMU's migration thread, the probe's answer from its monitor):
            // the same trigger, once; the next probe reports the new state.
            self.last = Some(observed);
            self.stopped_since = None;
            return Seen::Trigger(
                Trigger::ColoExit,
                format!("COLO ended (reason error), QEMU {}", status["status"]),
            );
        }
        if observed == Observed::Vm(VmState::Primary)
            && protected_primary
            && let Some((trigger, detail)) =
                checkpoint_stall(&status, &mut self.stopped_since, self.stall, Instant::now())
        {
            return Seen::Trigger(trigger, detail);
        }
        if observed != Observed::Vm(VmState::Primary) {
            self.stopped_since = None;
        }
        self.remember(observed)
    }
}

/// The VM's state from QEMU's COLO mode, last COLO mode and run state.
pub fn classify(mode: &str, last_mode: &str, runstate: &str) -> Observed {
    match mode {
        "primary" => Observed::Vm(VmState::Primary),
        "secondary" => Observed::Vm(VmState::Secondary),
        _ => match runstate {
            // A VM that serves without a peer: the survivor of a failover, or one never
            // protected. `colo` here is a primary stopped for a checkpoint that COLO left.
            "running" => Observed::Vm(VmState::Alone),
            "colo" if last_mode != "none" => Observed::Vm(VmState::Alone),
            // A fresh QEMU: a secondary waiting for its migration (`-incoming`), a primary
            // before `start` (`-S`). A QEMU that was in COLO never gets here again.
            "inmigrate" | "prelaunch" => Observed::Vm(VmState::Waiting),
            _ => Observed::Waiting,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_follow_qemu() {
        assert_eq!(
            classify("primary", "none", "running"),
            Observed::Vm(VmState::Primary)
        );
        assert_eq!(
            classify("primary", "none", "colo"),
            Observed::Vm(VmState::Primary)
        );
        assert_eq!(
            classify("secondary", "none", "running"),
            Observed::Vm(VmState::Secondary)
        );
        assert_eq!(
            classify("none", "secondary", "running"),
            Observed::Vm(VmState::Alone)
        );
        assert_eq!(
            classify("none", "none", "running"),
            Observed::Vm(VmState::Alone)
        );
        // A secondary before the first migration, a primary before `start`.
        for runstate in ["inmigrate", "prelaunch"] {
            assert_eq!(
                classify("none", "none", runstate),
                Observed::Vm(VmState::Waiting)
            );
        }
        // Passing states outside COLO tell the peer nothing (a primary whose COLO broke must
        // keep its last state in the arbiter, or it could not claim).
        for runstate in ["paused", "finish-migrate", "postmigrate"] {
            assert_eq!(classify("none", "primary", runstate), Observed::Waiting);
        }
    }

    #[test]
    fn labels_are_the_state_file_words() {
        for (vm, word) in [
            (VmState::Primary, "primary"),
            (VmState::Secondary, "secondary"),
            (VmState::Alone, "alone"),
            (VmState::Gone, "gone"),
            (VmState::Fenced, "fenced"),
            (VmState::Waiting, "waiting"),
        ] {
            assert_eq!(Observed::Vm(vm).label(), word);
        }
        assert_eq!(Observed::Waiting.label(), "waiting");
    }
}
