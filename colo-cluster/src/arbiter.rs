//! Who of the pair takes over: the rule that keeps a pair from ever having two primaries.
//!
//! - A *protection period* starts when the delivered states of two nodes are `primary` and
//!   `secondary`. In it, the **first `Claim` delivered wins**, and since corosync delivers the
//!   group's messages in one total order (`CPG_TYPE_AGREED`), both agents pick the same winner.
//!   The winner takes over on its side; a loser whose VM is still in COLO stops it.
//! - An agent claims only while its VM is in COLO and it is quorate **for the current ring**: a
//!   quorum verdict about an older membership does not count, so the minority of a split, which
//!   sees the peer leave just like the majority does, never claims (its claim would be
//!   delivered in its own partition only). A won claim is acted on only with quorum for the
//!   current ring too; until that verdict arrives it waits.
//! - A membership change or a lost quorum while the VM is in COLO (or a take-over waits) starts
//!   a grace (the quorum device's sync window); still not quorate when it ends, the agent stops
//!   its VM. Losing the connection to corosync stops it at once: the peer sees this node leave
//!   and may take over.
//! - The peer's node leaving (`NODEDOWN`) or the peer's VM `gone` is a reason to claim; the
//!   peer's agent alone leaving (`PROCDOWN`, `LEAVE`) is not: its VM may be well.

use crate::message::{Message, VmState};
use std::collections::BTreeMap;

/// A corosync node id.
pub type NodeId = u32;

/// The most nodes whose states are tracked (a pair has two; more is a misconfiguration, and
/// the bound keeps a flood of strangers from growing the table).
pub const MAX_TRACKED_NODES: usize = 8;

/// Why a member left the group (corosync's CPG reasons).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaveCause {
    /// Its node left the membership: the host died or was cut off.
    NodeDown,
    /// Its agent's process died; the node is still there.
    ProcessDown,
    /// Its agent left the group on purpose.
    Left,
}

/// What the agent observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Its own VM is now in this state.
    Local(VmState),
    /// Its own side sees the peer fail (the primary's watch triggers).
    LocalTrigger {
        /// Why.
        reason: String,
    },
    /// corosync formed a new ring (membership).
    Ring {
        /// The ring's sequence number.
        seq: u64,
    },
    /// corosync's quorum verdict for a ring.
    Quorum {
        /// Quorate or not.
        quorate: bool,
        /// The ring it is about.
        ring: u64,
    },
    /// A member joined the group.
    Joined {
        /// Its node.
        node: NodeId,
    },
    /// A member left the group.
    Left {
        /// Its node.
        node: NodeId,
        /// Why.
        cause: LeaveCause,
    },
    /// A message of the group, in the group's total order (the agent's own included).
    Delivered {
        /// Its sender.
        from: NodeId,
        /// The message.
        message: Message,
    },
    /// The grace started by [`Action::StartQuorumGrace`] ended.
    GraceExpired,
    /// The connection to corosync is lost.
    ClusterLost,
}

/// What the agent must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this message to the group.
    Send(Message),
    /// Take the VM over on this side (the failover sequence of this side's role).
    TakeOver {
        /// Why.
        reason: String,
    },
    /// Stop this side's VM (QMP `stop`, or kill its QEMU) and never resume it by itself.
    Fence {
        /// Why.
        reason: String,
    },
    /// Start the quorum grace timer (feed [`Input::GraceExpired`] when it ends).
    StartQuorumGrace,
    /// Cancel it.
    CancelQuorumGrace,
}

/// One agent's decisions.
#[derive(Debug)]
pub struct Arbiter {
    me: NodeId,
    my_vm: Option<VmState>,
    connected: bool,
    /// Every node's state as delivered, in the group's order.
    views: BTreeMap<NodeId, VmState>,
    period_active: bool,
    winner: Option<NodeId>,
    claimed: bool,
    /// A claim waiting for a quorum verdict about the current ring.
    claim_waiting: Option<String>,
    /// A won claim waiting for the same.
    takeover_waiting: Option<String>,
    ring: u64,
    quorum: Option<(bool, u64)>,
    grace_armed: bool,
}

impl Arbiter {
    /// The arbiter of node `me`, before it knows anything.
    pub fn new(me: NodeId) -> Self {
        Arbiter {
            me,
            my_vm: None,
            connected: true,
            views: BTreeMap::new(),
            period_active: false,
            winner: None,
            claimed: false,
            claim_waiting: None,
            takeover_waiting: None,
            ring: 0,
            quorum: None,
            grace_armed: false,
        }
    }

    /// The winner of the current or last protection period's claims.
    pub fn winner(&self) -> Option<NodeId> {
        self.winner
    }

    /// Quorate for the current ring.
    pub fn quorate(&self) -> bool {
        self.quorum == Some((true, self.ring))
    }

    /// A protection period is running and nobody claimed the VM yet.
    pub fn period_active(&self) -> bool {
        self.period_active
    }

    /// Feeds one observation; returns what to do.
    pub fn handle(&mut self, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::Local(vm) => self.on_local(vm, &mut out),
            Input::LocalTrigger { reason } => self.try_claim(reason, &mut out),
            Input::Ring { seq } => {
                self.ring = seq;
                if self.at_stake() {
                    self.arm_grace(&mut out);
                }
            }
            Input::Quorum { quorate, ring } => {
                self.quorum = Some((quorate, ring));
                self.on_quorum(&mut out);
            }
            Input::Joined { node } => {
                if node != self.me
                    && let Some(vm) = self.my_vm
                {
                    // The newcomer learns this side's state from the group itself.
                    out.push(Action::Send(Message::State { vm }));
                }
            }
            Input::Left { node, cause } => {
                let peer_protected = self.views.get(&node).is_some_and(|v| v.protected());
                if node != self.me && cause == LeaveCause::NodeDown && peer_protected {
                    self.try_claim(format!("node {node} left the membership"), &mut out);
                }
            }
            Input::Delivered { from, message } => self.on_delivered(from, message, &mut out),
            Input::GraceExpired => {
                if self.grace_armed && !self.quorate() && self.at_stake() {
                    self.fence("no quorum for the current membership".into(), &mut out);
                }
                self.grace_armed = false;
            }
            Input::ClusterLost => {
                self.connected = false;
                if self.at_stake() {
                    self.fence("the connection to corosync is lost".into(), &mut out);
                }
            }
        }
        out
    }

    fn my_vm_protected(&self) -> bool {
        self.my_vm.is_some_and(VmState::protected)
    }

    /// Something that needs quorum is under way: the VM in COLO or a take-over waiting.
    fn at_stake(&self) -> bool {
        self.my_vm_protected() || self.takeover_waiting.is_some()
    }

    fn on_local(&mut self, vm: VmState, out: &mut Vec<Action>) {
        if self.my_vm == Some(vm) || self.my_vm == Some(VmState::Fenced) {
            // A fenced VM stays fenced in the group's eyes until an operator starts over.
            return;
        }
        self.my_vm = Some(vm);
        if self.connected {
            out.push(Action::Send(Message::State { vm }));
        }
        if !self.at_stake() && self.grace_armed {
            self.grace_armed = false;
            out.push(Action::CancelQuorumGrace);
        }
    }

    fn try_claim(&mut self, reason: String, out: &mut Vec<Action>) {
        let eligible = self.period_active
            && self.winner.is_none()
            && !self.claimed
            && self.connected
            && self.my_vm_protected();
        if !eligible {
            return;
        }
        if self.quorate() {
            self.claimed = true;
            self.claim_waiting = None;
            out.push(Action::Send(Message::Claim { reason }));
        } else {
            self.claim_waiting = Some(reason);
            if !self.grace_armed {
                self.arm_grace(out);
            }
        }
    }

    fn on_quorum(&mut self, out: &mut Vec<Action>) {
        if self.quorate() {
            if self.grace_armed {
                self.grace_armed = false;
                out.push(Action::CancelQuorumGrace);
            }
            if let Some(reason) = self.takeover_waiting.take() {
                out.push(Action::TakeOver { reason });
            } else if let Some(reason) = self.claim_waiting.take() {
                self.try_claim(reason, out);
            }
        } else if self.at_stake() && !self.grace_armed {
            self.arm_grace(out);
        }
    }

    fn on_delivered(&mut self, from: NodeId, message: Message, out: &mut Vec<Action>) {
        match message {
            Message::State { vm } => {
                if !self.views.contains_key(&from) && self.views.len() >= MAX_TRACKED_NODES {
                    return;
                }
                let was_protected = self.views.get(&from).is_some_and(|v| v.protected());
                self.views.insert(from, vm);
                if !self.period_active && self.pair_protected() {
                    self.period_active = true;
                    self.winner = None;
                    self.claimed = false;
                }
                if matches!(vm, VmState::Alone | VmState::Fenced) && self.winner.is_none() {
                    // A side left COLO without a claim (it serves alone, or it stopped): the
                    // pair is not protected any more, and the other side's copy goes stale
                    // from now on, so nobody may take the VM over in this period.
                    self.period_active = false;
                    self.claim_waiting = None;
                }
                if from != self.me && vm == VmState::Gone && was_protected {
                    self.try_claim(format!("node {from} reports its VM gone"), out);
                }
            }
            Message::Claim { reason } => {
                if !self.period_active || self.winner.is_some() {
                    // Too late: the period's claim was decided, or none is running.
                    return;
                }
                self.winner = Some(from);
                self.period_active = false;
                self.claim_waiting = None;
                if from == self.me {
                    // Alone: this primary's COLO ended (the claim's very reason) between
                    // sending the claim and its delivery; its failover sequence still has to
                    // run (it finishes what QEMU left, and is idempotent).
                    if !self.my_vm_protected() && self.my_vm != Some(VmState::Alone) {
                        return;
                    }
                    if self.quorate() {
                        out.push(Action::TakeOver { reason });
                    } else {
                        self.takeover_waiting = Some(reason);
                        if !self.grace_armed {
                            self.arm_grace(out);
                        }
                    }
                } else if self.my_vm_protected() {
                    self.fence(format!("node {from} took the VM over: {reason}"), out);
                }
            }
        }
    }

    /// Two nodes' delivered states are primary and secondary.
    fn pair_protected(&self) -> bool {
        let has = |s| self.views.values().any(|v| *v == s);
        has(VmState::Primary) && has(VmState::Secondary)
    }

    fn arm_grace(&mut self, out: &mut Vec<Action>) {
        self.grace_armed = true;
        out.push(Action::StartQuorumGrace);
    }

    fn fence(&mut self, reason: String, out: &mut Vec<Action>) {
        self.my_vm = Some(VmState::Fenced);
        self.takeover_waiting = None;
        self.claim_waiting = None;
        out.push(Action::Fence { reason });
        if self.connected {
            out.push(Action::Send(Message::State {
                vm: VmState::Fenced,
            }));
        }
    }
}

#[cfg(test)]
mod tests;
