//! The HA agent (`qmp-driver agent`): one per protected VM on each host. It watches its own
//! QEMU ([`observe`]), tells its peer agent over a corosync CPG group what it sees, and lets
//! [`colo_cluster::arbiter::Arbiter`] decide, from the group's totally ordered messages and
//! quorum, whether this side takes the VM over or fences it ([`act`]). docs/ha.md has the
//! rule and why it never makes two primaries.
//!
//! The loop here is independent of corosync: it reads the group's events from a channel and
//! sends through a [`GroupLink`], which the CLI backs with `colo_cluster::link::Link`.

pub mod act;
pub mod daemons;
pub mod observe;
pub mod reprotect;
pub mod status;

use crate::config::PairConfig;
use crate::pair::{FailoverReport, PairError, Progress, ReprotectReport};
use colo_cluster::arbiter::{Action, Arbiter, Input, LeaveCause, NodeId};
use colo_cluster::message::{Message, VmState};
use colo_qmp::{ConnectOptions, QmpClient};
use colo_types::Role;
use observe::{Observed, Observer, Seen, vm_label};
use reprotect::{Attempt, AutoReprotect, ReprotectStatus};
use status::{AgentStatus, Decision, PeerStatus, unix_ms, write_state_file};
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior, Sleep};
use tokio_util::sync::CancellationToken;

/// The agent's way to the group (a corosync CPG group in production).
pub trait GroupLink: Send + Sync {
    /// This node's id in the group.
    fn node_id(&self) -> NodeId;
    /// Sends one message to the group, in its total order.
    fn send(&self, message: &Message) -> Result<(), String>;
}

impl GroupLink for colo_cluster::link::Link {
    fn node_id(&self) -> NodeId {
        colo_cluster::link::Link::node_id(self)
    }

    fn send(&self, message: &Message) -> Result<(), String> {
        colo_cluster::link::Link::send(self, message).map_err(|e| e.to_string())
    }
}

/// How often the agent asks the relay on its host about colo's daemons.
pub const DAEMONS_PROBE: Duration = Duration::from_secs(1);

/// How often the agent tries to send one message before it gives up on it.
pub const SEND_ATTEMPTS: u32 = 5;

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Which side of the pair this host is.
    pub side: Role,
    /// How often the agent probes its QEMU.
    pub probe: Duration,
    /// The primary's stall bound: a checkpoint that keeps it stopped, or a monitor silent,
    /// this long counts as the secondary gone.
    pub stall: Duration,
    /// How long the agent waits for quorum of a new membership before it fences its VM.
    pub quorum_grace: Duration,
    /// Run the config's failover hook of this side on a take-over.
    pub run_hook: bool,
    /// Tell the relay about a take-over (best effort, bounded).
    pub notify_relay: bool,
    /// The QEMU's pid file: a fence kills that process after QMP `stop`.
    pub qemu_pidfile: Option<PathBuf>,
    /// Where the agent writes its [`AgentStatus`].
    pub state_file: Option<PathBuf>,
    /// QMP connection options.
    pub connect: ConnectOptions,
    /// On the primary: re-protect by itself when a new secondary waits ([`reprotect`]).
    pub auto_reprotect: Option<AutoReprotect>,
}

/// What the agent reports to its caller (logs and metrics).
#[derive(Debug)]
pub enum AgentEvent<'a> {
    /// The status changed (also written to the state file).
    Status(&'a AgentStatus),
    /// A decision was taken.
    Decided(&'a Decision),
    /// A step of a take-over.
    Step(Progress),
    /// A take-over finished: this side serves alone.
    TookOver(&'a FailoverReport),
    /// A take-over failed.
    TakeOverFailed(&'a PairError),
    /// A message could not be sent to the group.
    SendFailed(String),
    /// An automatic re-protect started (its attempt number since the agent started).
    ReprotectStarted(u32),
    /// An automatic re-protect brought the pair back into COLO.
    Reprotected(&'a ReprotectReport),
    /// An automatic re-protect failed; the primary serves on alone.
    ReprotectFailed(&'a str),
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The config names no QMP socket of the agent's own for this side.
    #[error(
        "the config has no {side}.watch_qmp: the agent needs a QMP socket of its own \
         (QEMU serves one client per monitor; `qmp-driver qemu-args` adds it)"
    )]
    NoWatchQmp {
        /// The side.
        side: Role,
    },
}

/// Runs the agent until `cancel`.
pub async fn run_agent(
    cfg: &PairConfig,
    opts: &AgentOptions,
    link: &dyn GroupLink,
    group: &mut mpsc::Receiver<Input>,
    report: &mut (dyn FnMut(AgentEvent<'_>) + Send),
    cancel: &CancellationToken,
) -> Result<(), AgentError> {
    let side = opts.side;
    let address = cfg
        .host(side)
        .watch_qmp
        .clone()
        .ok_or(AgentError::NoWatchQmp { side })?;
    let observer = Observer::new(side, address, opts.connect.clone(), opts.stall);
    let (seen_tx, mut seen) = mpsc::channel(16);
    let (client_tx, client) = watch::channel(None);
    let observer_cancel = cancel.child_token();
    let observer_task = tokio::spawn(observe_loop(
        observer,
        opts.probe,
        seen_tx,
        client_tx,
        observer_cancel.clone(),
    ));
    let mut agent = Agent {
        cfg,
        opts,
        link,
        arbiter: Arbiter::new(link.node_id()),
        client,
        status: AgentStatus {
            pair: cfg.name.clone(),
            side: side.name().to_string(),
            node: link.node_id(),
            vm: Observed::Waiting.label().to_string(),
            quorate: false,
            peer: None,
            in_sync: false,
            last_decision: None,
            daemons: None,
            reprotect: None,
            pid: std::process::id(),
            updated_unix_ms: unix_ms(),
        },
        observed: None,
        first_sign: None,
        grace: None,
        my_vm: None,
        peer_vm: None,
        attempt: None,
        last_failure: None,
        reprotected_unseen: false,
    };
    let (daemons_tx, mut daemons_rx) = watch::channel(None);
    let daemons_task = daemons::relay_is_local(cfg).then(|| {
        tokio::spawn(daemons::watch_daemons(
            cfg.clone(),
            DAEMONS_PROBE,
            daemons_tx,
            observer_cancel.clone(),
        ))
    });
    agent.publish(report);
    let mut group_open = true;
    loop {
        // Biased, the quorum grace last: a quorum verdict or an observation already queued
        // when the grace runs out must be taken first, or a descheduled agent (a loaded host)
        // would fence on a grace that the queued verdict had already ended.
        let input = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            event = group.recv(), if group_open => event.or_else(|| {
                group_open = false;
                Some(Input::ClusterLost)
            }),
            found = seen.recv() => match found {
                Some(found) => agent.on_seen(found),
                None => break,
            },
            Ok(()) = daemons_rx.changed(), if daemons_task.is_some() => {
                let seen = daemons_rx.borrow_and_update().clone();
                agent.on_daemons(seen, report);
                None
            }
            () = wait_grace(&mut agent.grace) => {
                agent.grace = None;
                Some(Input::GraceExpired)
            }
            outcome = reprotect::wait_attempt(&mut agent.attempt) => {
                agent.attempt = None;
                agent.on_reprotect_done(outcome, report);
                None
            }
        };
        if let Some(input) = input {
            agent.feed(input, report).await;
        }
        // Every probe comes through here, so a back-off ends within one probe period.
        agent.maybe_reprotect(report);
    }
    if let Some(attempt) = agent.attempt.take() {
        tracing::warn!(
            "the agent stops during an automatic re-protect: undoing it on the primary, whose \
             guest serves on alone (restart the secondary's QEMU before the next attempt)"
        );
        let qmp = agent.client.borrow().clone();
        attempt.abandon(qmp.as_ref(), cfg).await;
    }
    observer_cancel.cancel();
    let _ = observer_task.await;
    if let Some(task) = daemons_task {
        let _ = task.await;
    }
    Ok(())
}

async fn wait_grace(grace: &mut Option<Pin<Box<Sleep>>>) {
    match grace.as_mut() {
        Some(sleep) => sleep.await,
        None => std::future::pending().await,
    }
}

/// Probes the QEMU in a task of its own, so that a slow probe (a hung monitor is waited for up
/// to the stall bound) never delays the group's messages.
async fn observe_loop(
    mut observer: Observer,
    probe: Duration,
    seen: mpsc::Sender<Seen>,
    client: watch::Sender<Option<QmpClient>>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(probe);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        // Only the wait for an event races the tick; the event is handled outside the race.
        let found = tokio::select! {
            () = cancel.cancelled() => return,
            event = observer.next_event() => match observer.on_event(event).await {
                Some(found) => found,
                None => continue,
            },
            _ = tick.tick() => observer.probe().await,
        };
        client.send_replace(observer.qmp().cloned());
        if seen.send(found).await.is_err() {
            return;
        }
    }
}

struct Agent<'a> {
    cfg: &'a PairConfig,
    opts: &'a AgentOptions,
    link: &'a dyn GroupLink,
    arbiter: Arbiter,
    client: watch::Receiver<Option<QmpClient>>,
    status: AgentStatus,
    observed: Option<Observed>,
    /// When the agent first saw a sign of the failure now being handled.
    first_sign: Option<Instant>,
    grace: Option<Pin<Box<Sleep>>>,
    /// The own VM's state as last fed to the arbiter.
    my_vm: Option<VmState>,
    /// The peer's VM as it last reported it (None once its agent left).
    peer_vm: Option<VmState>,
    /// An automatic re-protect under way.
    attempt: Option<Attempt>,
    /// When the last automatic re-protect failed.
    last_failure: Option<Instant>,
    /// A re-protect succeeded and the observer has not reported the own VM since: the states
    /// this agent holds (`alone`, the peer `waiting`) are the ones before COLO began, and
    /// must not start another attempt.
    reprotected_unseen: bool,
}

impl Agent<'_> {
    /// Turns a finding about the own VM into an input for the arbiter (state changes only).
    fn on_seen(&mut self, found: Seen) -> Option<Input> {
        match found {
            Seen::State(observed) => {
                if self.observed == Some(observed) {
                    return None;
                }
                tracing::info!(from = ?self.observed.map(Observed::label), to = observed.label(), "own VM");
                self.observed = Some(observed);
                match observed {
                    Observed::Vm(vm) => Some(Input::Local(vm)),
                    Observed::Waiting => {
                        self.set_vm_label(observed.label());
                        None
                    }
                }
            }
            Seen::Trigger(trigger, detail) => Some(Input::LocalTrigger {
                reason: format!("{}: {detail}", trigger.label()),
            }),
        }
    }

    fn set_vm_label(&mut self, label: &str) {
        if self.status.vm != "fenced" {
            self.status.vm = label.to_string();
        }
    }

    /// Feeds one input to the arbiter and carries out its actions.
    async fn feed(&mut self, input: Input, report: &mut (dyn FnMut(AgentEvent<'_>) + Send)) {
        self.note_input(&input);
        let actions = self.arbiter.handle(input);
        for action in actions {
            self.act(action, report).await;
        }
        self.status.quorate = self.arbiter.quorate();
        self.publish(report);
    }

    /// Keeps the status (the peer, the own VM) and the first sign of a failure.
    fn note_input(&mut self, input: &Input) {
        let me = self.link.node_id();
        let failure_sign = match input {
            Input::Local(vm) => {
                self.my_vm = Some(*vm);
                self.reprotected_unseen = false;
                self.set_vm_label(vm_label(*vm));
                self.status.in_sync = vm.protected();
                if vm.protected() {
                    self.first_sign = None;
                }
                *vm == VmState::Gone
            }
            Input::LocalTrigger { .. } => true,
            Input::Joined { node } if *node != me => {
                tracing::info!(node, "a peer agent joined the group");
                if self.status.peer.as_ref().is_none_or(|p| p.node != *node) {
                    self.status.peer = Some(PeerStatus {
                        node: *node,
                        vm: "joined".into(),
                    });
                }
                false
            }
            Input::Left { node, cause } if *node != me => {
                tracing::warn!(node, ?cause, "a peer agent left the group");
                self.peer_vm = None;
                self.status.peer = Some(PeerStatus {
                    node: *node,
                    vm: "left".into(),
                });
                *cause == LeaveCause::NodeDown
            }
            Input::Delivered {
                from,
                message: Message::State { vm },
            } if *from != me => {
                tracing::info!(node = from, vm = vm_label(*vm), "the peer's VM");
                if *vm == VmState::Waiting && self.peer_vm != Some(VmState::Waiting) {
                    // A new secondary QEMU (a failed attempt's one has to be restarted): it
                    // is tried at once, not after the back-off of the old one's failures.
                    self.last_failure = None;
                }
                self.peer_vm = Some(*vm);
                self.status.peer = Some(PeerStatus {
                    node: *from,
                    vm: vm_label(*vm).into(),
                });
                if vm.protected() {
                    // The peer is well: what was seen before is not a failure being handled.
                    self.first_sign = None;
                }
                *vm == VmState::Gone
            }
            Input::Delivered {
                from,
                message: Message::Claim { reason },
            } => {
                tracing::warn!(node = from, %reason, "a claim was delivered");
                false
            }
            Input::Ring { seq } => {
                tracing::info!(seq, "new membership");
                false
            }
            Input::Quorum { quorate, ring } => {
                tracing::info!(quorate, ring, "quorum");
                !quorate
            }
            Input::ClusterLost => {
                tracing::error!("the connection to corosync is lost");
                true
            }
            _ => false,
        };
        if failure_sign && self.first_sign.is_none() && self.status.in_sync {
            self.first_sign = Some(Instant::now());
        }
    }

    fn decide(
        &mut self,
        action: &str,
        reason: &str,
        report: &mut (dyn FnMut(AgentEvent<'_>) + Send),
    ) {
        let decision = Decision {
            action: action.to_string(),
            reason: reason.to_string(),
            unix_ms: unix_ms(),
            detection_ms: self.first_sign.map(|t| t.elapsed().as_secs_f64() * 1000.0),
            failover_ms: None,
            error: None,
        };
        report(AgentEvent::Decided(&decision));
        self.status.last_decision = Some(decision);
    }

    async fn act(&mut self, action: Action, report: &mut (dyn FnMut(AgentEvent<'_>) + Send)) {
        match action {
            Action::Send(message) => {
                if let Message::Claim { reason } = &message {
                    self.decide("claim", reason, report);
                }
                self.send(&message, report);
            }
            Action::TakeOver { reason } => {
                self.decide("take-over", &reason, report);
                self.publish(report);
                let qmp = self.client.borrow().clone();
                let Some(qmp) = qmp else {
                    let e = PairError::Precondition {
                        side: self.opts.side,
                        what: "the agent has no QMP connection to its QEMU".into(),
                        hint: "check that QEMU runs and listens on the side's watch_qmp".into(),
                    };
                    if let Some(d) = self.status.last_decision.as_mut() {
                        d.error = Some(e.to_string());
                    }
                    report(AgentEvent::TakeOverFailed(&e));
                    return;
                };
                let mut forward = |p: Progress| report(AgentEvent::Step(p));
                let result = act::take_over(
                    self.opts.side,
                    &qmp,
                    self.cfg,
                    self.opts.run_hook,
                    self.opts.notify_relay,
                    &mut forward,
                )
                .await;
                match result {
                    Ok(done) => {
                        if let Some(d) = self.status.last_decision.as_mut() {
                            d.failover_ms = Some(done.total_ms);
                        }
                        report(AgentEvent::TookOver(&done));
                    }
                    Err(e) => {
                        if let Some(d) = self.status.last_decision.as_mut() {
                            d.error = Some(e.to_string());
                        }
                        report(AgentEvent::TakeOverFailed(&e));
                    }
                }
            }
            Action::Fence { reason } => {
                self.decide("fence", &reason, report);
                self.my_vm = Some(VmState::Fenced);
                self.status.vm = "fenced".into();
                self.status.in_sync = false;
                self.publish(report);
                let qmp = self.client.borrow().clone();
                let done = act::fence(qmp.as_ref(), self.opts.qemu_pidfile.as_deref()).await;
                tracing::error!(%reason, done = ?done, "fenced this side's VM: it stays stopped until an operator starts it again");
            }
            Action::StartQuorumGrace => {
                tracing::warn!(grace = ?self.opts.quorum_grace, "waiting for quorum of the new membership");
                self.grace = Some(Box::pin(tokio::time::sleep(self.opts.quorum_grace)));
            }
            Action::CancelQuorumGrace => self.grace = None,
        }
    }

    /// Sends one message. corosync refuses sends for a while during a membership change
    /// (the link retries about a second, the quorum device's sync can take longer), and a
    /// claim that never leaves would leave the pair without a decision: so up to
    /// [`SEND_ATTEMPTS`] tries. Blocks this worker thread meanwhile, which is what the agent
    /// wants: nothing else may be decided before the message is out.
    fn send(&mut self, message: &Message, report: &mut (dyn FnMut(AgentEvent<'_>) + Send)) {
        for attempt in 1..=SEND_ATTEMPTS {
            match tokio::task::block_in_place(|| self.link.send(message)) {
                Ok(()) => return,
                Err(e) => {
                    report(AgentEvent::SendFailed(format!(
                        "attempt {attempt} of {SEND_ATTEMPTS}: {e}"
                    )));
                }
            }
        }
    }

    /// Records (and logs) what the relay says of colo's daemons.
    fn on_daemons(
        &mut self,
        seen: Option<daemons::DaemonsStatus>,
        report: &mut (dyn FnMut(AgentEvent<'_>) + Send),
    ) {
        if let Some(d) = &seen {
            if d.all_well() {
                tracing::info!(
                    subscribers = d.subscribers.len(),
                    "colo's daemons: all well"
                );
            } else {
                tracing::warn!(daemons = ?d, "colo's daemons: not all well (the relay ends COLO at the next barrier if one fails it)");
            }
        }
        self.status.daemons = seen;
        self.publish(report);
    }

    /// Starts an automatic re-protect when everything it needs holds ([`reprotect`]).
    fn maybe_reprotect(&mut self, report: &mut (dyn FnMut(AgentEvent<'_>) + Send)) {
        let Some(auto) = &self.opts.auto_reprotect else {
            return;
        };
        let failures = self
            .status
            .reprotect
            .as_ref()
            .map_or(0, |r| r.failures_in_a_row);
        let wanted = self.opts.side == Role::Primary
            && self.attempt.is_none()
            && !self.reprotected_unseen
            && self.my_vm == Some(VmState::Alone)
            && self.peer_vm == Some(VmState::Waiting)
            && self.arbiter.quorate()
            && reprotect::may_retry(auto, failures, self.last_failure, Instant::now());
        if !wanted {
            return;
        }
        let Some(qmp) = self.client.borrow().clone() else {
            return;
        };
        let attempts = self.status.reprotect.as_ref().map_or(0, |r| r.attempts) + 1;
        tracing::info!(
            attempt = attempts,
            "the peer's QEMU waits for its migration and this VM serves alone: re-protecting"
        );
        self.attempt = Some(Attempt::start(
            qmp,
            self.cfg.clone(),
            auto.options(self.cfg),
            self.opts.connect.clone(),
        ));
        self.status.reprotect = Some(ReprotectStatus {
            state: "running".into(),
            attempts,
            failures_in_a_row: failures,
            started_unix_ms: unix_ms(),
            finished_unix_ms: None,
            report: None,
            error: None,
        });
        report(AgentEvent::ReprotectStarted(attempts));
        self.publish(report);
    }

    /// Records an automatic re-protect's outcome.
    fn on_reprotect_done(
        &mut self,
        outcome: Result<ReprotectReport, String>,
        report: &mut (dyn FnMut(AgentEvent<'_>) + Send),
    ) {
        let Some(status) = self.status.reprotect.as_mut() else {
            return;
        };
        status.finished_unix_ms = Some(unix_ms());
        match outcome {
            Ok(done) => {
                status.state = "done".into();
                status.failures_in_a_row = 0;
                self.last_failure = None;
                self.reprotected_unseen = true;
                report(AgentEvent::Reprotected(&done));
                status.report = Some(done);
            }
            Err(e) => {
                status.state = "failed".into();
                status.failures_in_a_row += 1;
                self.last_failure = Some(Instant::now());
                if let Some(auto) = &self.opts.auto_reprotect {
                    tracing::warn!(
                        retry_in = ?auto.backoff(status.failures_in_a_row),
                        "the next automatic re-protect waits (a restarted secondary QEMU \
                         reporting `waiting` anew is taken at once)"
                    );
                }
                report(AgentEvent::ReprotectFailed(&e));
                status.error = Some(e);
            }
        }
        self.publish(report);
    }

    /// Writes the state file and reports the status.
    fn publish(&mut self, report: &mut (dyn FnMut(AgentEvent<'_>) + Send)) {
        self.status.updated_unix_ms = unix_ms();
        if let Some(path) = &self.opts.state_file
            && let Err(e) = write_state_file(path, &self.status)
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the state file");
        }
        report(AgentEvent::Status(&self.status));
    }
}

#[cfg(test)]
mod tests;
