//! The primary's release gate: what happens to each PVM packet, SVM packet and epoch event.
//! Pure (time is passed in, no I/O), so the primary's role loop is only wiring.
//!
//! | state | PVM output | SVM output |
//! |---|---|---|
//! | [`Protection::Unprotected`] (before COLO, after a failover to the primary) | released at once, uncompared | dropped (a later epoch's kept) |
//! | [`Protection::Protected`] | compared; released when matched, else held until `checkpoint-adopted` | of the compared epoch: compared; older: dropped as stale; newer: kept for its epoch |
//! | [`Protection::Exited`] (COLO ended, no failover decided yet) | held | compared |
//! | [`Protection::Fenced`] (after a failover to the secondary) | dropped: the SVM is the VM now | dropped |
//!
//! SVM output carries the SVM epoch the secondary's daemon tagged it with. The epoch compared
//! is the one the relay's last `colo-started` or `checkpoint-adopted` opened: at
//! `checkpoint-adopted{E}` every held PVM packet is released (the SVM has the PVM's state, so
//! it *will* produce that output), SVM output of epoch E or older is dropped, comparison
//! restarts, and SVM output the secondary already tagged E+1 (the SVM resumes before the
//! primary hears of the adoption) is compared at once.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasherDefault;
use std::time::Duration;

use bytes::Bytes;

use crate::compare::{Action, CheckpointReason, PacketId};
use crate::engine::{ComparisonEngine, EngineConfig, EngineCounters, PacketIdHasher};

/// SVM frames of later epochs kept at most, and their bytes; beyond either, the oldest are
/// dropped and the epoch they belonged to asks for a checkpoint as soon as it is compared
/// ([`CheckpointReason::SvmOutputLost`]): its comparison lacks them, so its held PVM output
/// would only wait for the hold timeout. Early output is what the SVM sends between its
/// resumption and this daemon's `checkpoint-adopted` (milliseconds), so the bound is rarely
/// approached; the bytes bound matters because a frame can be 68 KiB.
const MAX_FUTURE_FRAMES: usize = 8192;
/// Bytes of SVM frames of later epochs kept at most (with 8192 frames; see the module).
pub const MAX_FUTURE_BYTES: usize = 16 << 20;

/// Whether the PVM's output is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    /// No SVM to compare with: COLO has not started, or a failover to the primary ended it.
    Unprotected,
    /// COLO runs: output is released only when the SVM matched it.
    Protected,
    /// COLO ended without a failover decision: output is held (not requesting checkpoints)
    /// until the operator decides.
    Exited,
    /// The secondary took over: whatever this PVM still sends must not reach the network
    /// (it would be a second copy of the VM), until COLO starts again.
    Fenced,
}

/// What the role loop must do.
#[derive(Debug, PartialEq, Eq)]
pub enum GateOutput {
    /// Send this Ethernet frame to the network.
    Release {
        /// The frame, as it was read (shared, not copied).
        frame: Bytes,
        /// Time from its arrival to its release; `None` when it passed uncompared because
        /// COLO does not run.
        held: Option<Duration>,
    },
    /// Ask for a checkpoint.
    Checkpoint(CheckpointReason),
}

#[derive(Debug)]
struct Held {
    /// Shared with the comparison, which compares the SVM's bytes where they lie in it.
    frame: Bytes,
    arrived: Duration,
}

/// What an SVM frame's epoch tag meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SvmFrameFate {
    /// Compared.
    Compared,
    /// Of an adopted epoch: dropped.
    Stale,
    /// Of a later epoch: kept until that epoch is compared.
    Early,
    /// Not compared: COLO does not run.
    Ignored,
}

/// The primary's comparison and epoch state.
#[derive(Debug)]
pub struct ReleaseGate {
    engine: ComparisonEngine,
    protection: Protection,
    /// The SVM epoch compared now.
    epoch: u64,
    /// Ids are the gate's own counter, not the network's: no keyed hash needed.
    held: HashMap<PacketId, Held, BuildHasherDefault<PacketIdHasher>>,
    /// The held frames' own bytes. A frame shares the read buffer's chunk it was split off,
    /// so the memory held can be larger, by a bounded factor: see
    /// [`crate::codec::read_buffer`].
    held_bytes: usize,
    next_id: u64,
    early: VecDeque<(u64, Bytes)>,
    early_bytes: usize,
    /// The latest epoch whose early output was dropped.
    early_lost: Option<u64>,
    early_dropped: u64,
    actions: Vec<Action>,
    fenced_drops: u64,
}

impl ReleaseGate {
    /// A gate in the given protection state, comparing SVM epoch `epoch`.
    pub fn new(config: EngineConfig, protection: Protection, epoch: u64) -> Self {
        ReleaseGate {
            engine: ComparisonEngine::new(config),
            protection,
            epoch,
            held: HashMap::default(),
            held_bytes: 0,
            next_id: 0,
            early: VecDeque::new(),
            early_bytes: 0,
            early_lost: None,
            early_dropped: 0,
            actions: Vec::new(),
            fenced_drops: 0,
        }
    }

    /// The protection state.
    pub fn protection(&self) -> Protection {
        self.protection
    }

    /// The SVM epoch compared now.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// PVM packets held.
    pub fn held_packets(&self) -> usize {
        self.held.len()
    }

    /// Bytes of the PVM packets held (the frames' own, not the read-buffer chunks they keep
    /// alive: see [`crate::codec::read_buffer`] for that bound).
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Flows with comparison state.
    pub fn flows(&self) -> usize {
        self.engine.flows()
    }

    /// PVM packets dropped because this host is fenced.
    pub fn fenced_drops(&self) -> u64 {
        self.fenced_drops
    }

    /// SVM frames of later epochs kept, and their bytes.
    pub fn early(&self) -> (usize, usize) {
        (self.early.len(), self.early_bytes)
    }

    /// SVM frames of later epochs dropped because their queue was full.
    pub fn early_dropped(&self) -> u64 {
        self.early_dropped
    }

    /// The engine's counters.
    pub fn counters(&self) -> EngineCounters {
        self.engine.counters()
    }

    /// What was released under each equivalence rule (in the configuration's order).
    pub fn equivalent_counters(&self) -> &[crate::engine::EquivalentCount] {
        self.engine.equivalent_counters()
    }

    /// A frame of PVM output arrived at `now`.
    pub fn pvm_frame(&mut self, frame: Bytes, now: Duration, out: &mut Vec<GateOutput>) {
        match self.protection {
            Protection::Unprotected => {
                out.push(GateOutput::Release { frame, held: None });
                return;
            }
            Protection::Fenced => {
                self.fenced_drops += 1;
                return;
            }
            Protection::Protected | Protection::Exited => {}
        }
        let id = PacketId(self.next_id);
        self.next_id += 1;
        let mut actions = std::mem::take(&mut self.actions);
        self.engine.push_pvm(id, &frame, now, &mut actions);
        self.held_bytes += frame.len();
        self.held.insert(
            id,
            Held {
                frame,
                arrived: now,
            },
        );
        self.apply(&mut actions, now, out);
        self.actions = actions;
    }

    /// A frame of SVM output, tagged with SVM epoch `epoch`, arrived at `now`.
    pub fn svm_frame(
        &mut self,
        epoch: u64,
        frame: Bytes,
        now: Duration,
        out: &mut Vec<GateOutput>,
    ) -> SvmFrameFate {
        if epoch > self.epoch {
            self.early_bytes += frame.len();
            self.early.push_back((epoch, frame));
            while self.early.len() > MAX_FUTURE_FRAMES || self.early_bytes > MAX_FUTURE_BYTES {
                let Some((tag, dropped)) = self.early.pop_front() else {
                    break;
                };
                self.early_bytes -= dropped.len();
                self.early_dropped += 1;
                self.early_lost = Some(self.early_lost.map_or(tag, |lost| lost.max(tag)));
            }
            return SvmFrameFate::Early;
        }
        if epoch < self.epoch {
            return SvmFrameFate::Stale;
        }
        if matches!(
            self.protection,
            Protection::Unprotected | Protection::Fenced
        ) {
            return SvmFrameFate::Ignored;
        }
        self.compare_svm(&frame, now, out);
        SvmFrameFate::Compared
    }

    fn compare_svm(&mut self, frame: &[u8], now: Duration, out: &mut Vec<GateOutput>) {
        let mut actions = std::mem::take(&mut self.actions);
        self.engine.push_svm(frame, &mut actions);
        self.apply(&mut actions, now, out);
        self.actions = actions;
    }

    /// The hold-time timer fired at `now`.
    pub fn tick(&mut self, now: Duration, out: &mut Vec<GateOutput>) {
        if self.protection != Protection::Protected {
            return;
        }
        let mut actions = std::mem::take(&mut self.actions);
        self.engine.check_hold_time(now, &mut actions);
        self.apply(&mut actions, now, out);
        self.actions = actions;
    }

    /// The relay's `colo-started{epoch}`: the SVM is a fresh copy of the PVM.
    pub fn colo_started(&mut self, epoch: u64, now: Duration, out: &mut Vec<GateOutput>) {
        self.release_all(now, out);
        self.protection = Protection::Protected;
        self.open_epoch(epoch, now, out);
    }

    /// The relay's `checkpoint-adopted{epoch}`: release everything held, drop stale SVM
    /// output, compare epoch+1. The caller has drained the PVM's socket first.
    pub fn checkpoint_adopted(&mut self, epoch: u64, now: Duration, out: &mut Vec<GateOutput>) {
        self.release_all(now, out);
        if self.protection == Protection::Exited {
            // A barrier completed after all: COLO goes on.
            self.protection = Protection::Protected;
        }
        self.open_epoch(epoch + 1, now, out);
    }

    /// The relay's `colo-exit`: hold output until a failover decision.
    pub fn colo_exit(&mut self) {
        if self.protection == Protection::Protected {
            self.protection = Protection::Exited;
        }
    }

    /// The relay's `failover`. With the primary surviving, everything held is released and
    /// output flows uncompared from now on; with the secondary surviving this host is being
    /// fenced, so held output is dropped (the SVM will produce it) and so is any later
    /// output. Returns the packets dropped.
    pub fn failover(
        &mut self,
        primary_survives: bool,
        now: Duration,
        out: &mut Vec<GateOutput>,
    ) -> usize {
        let dropped = if primary_survives {
            self.release_all(now, out);
            0
        } else {
            let mut ignored = Vec::new();
            self.release_all(now, &mut ignored);
            ignored.len()
        };
        self.protection = if primary_survives {
            Protection::Unprotected
        } else {
            Protection::Fenced
        };
        // Nothing is compared from now on. A new `colo-started`'s SVM is a fresh copy: the
        // flows' state, anchored at sequence numbers from before, would be wrong then, and
        // would keep its memory meanwhile.
        self.engine.forget_flows();
        self.early.clear();
        self.early_bytes = 0;
        self.early_lost = None;
        dropped
    }

    fn open_epoch(&mut self, epoch: u64, now: Duration, out: &mut Vec<GateOutput>) {
        self.epoch = epoch;
        if let Some(lost) = self.early_lost
            && lost <= epoch
        {
            self.early_lost = None;
            if lost == epoch && self.protection == Protection::Protected {
                out.push(GateOutput::Checkpoint(CheckpointReason::SvmOutputLost));
            }
        }
        let early = std::mem::take(&mut self.early);
        self.early_bytes = 0;
        // A `checkpoint-adopted` late after a failover opens an epoch nothing compares in.
        let comparing = matches!(self.protection, Protection::Protected | Protection::Exited);
        for (tag, frame) in early {
            if tag == epoch {
                if comparing {
                    self.compare_svm(&frame, now, out);
                }
            } else if tag > epoch {
                self.early_bytes += frame.len();
                self.early.push_back((tag, frame));
            }
        }
    }

    /// Releases every held packet in arrival order and restarts comparison.
    fn release_all(&mut self, now: Duration, out: &mut Vec<GateOutput>) {
        for id in self.engine.reset() {
            self.release(id, now, out);
        }
        // Packets the engine no longer tracks cannot exist (it hands every one back), but a
        // leftover must not be lost: release it too, in arrival order.
        if !self.held.is_empty() {
            let mut rest: Vec<PacketId> = self.held.keys().copied().collect();
            rest.sort_unstable();
            for id in rest {
                self.release(id, now, out);
            }
        }
    }

    /// Takes a held packet out of the gate, its bytes no longer counted.
    fn take_held(&mut self, id: PacketId) -> Option<Held> {
        let held = self.held.remove(&id)?;
        self.held_bytes -= held.frame.len();
        Some(held)
    }

    fn release(&mut self, id: PacketId, now: Duration, out: &mut Vec<GateOutput>) {
        if let Some(held) = self.take_held(id) {
            out.push(GateOutput::Release {
                held: Some(now.saturating_sub(held.arrived)),
                // Shared with what the comparison still keeps of it (bytes a reordered
                // stream needs): nothing is copied.
                frame: held.frame,
            });
        }
    }

    /// Releases a PVM segment with its acknowledgement lowered to the SVM's: a copy of the
    /// frame (the comparison may still share the original's bytes) with the two fields and the
    /// checksum changed. A frame that does not parse as TCP cannot come here (the comparator
    /// only lowers TCP acknowledgements); it would go unchanged rather than be lost.
    fn release_lowered(
        &mut self,
        id: PacketId,
        ack: u32,
        window: u16,
        now: Duration,
        out: &mut Vec<GateOutput>,
    ) {
        if let Some(held) = self.held.get_mut(&id) {
            let mut frame = held.frame.to_vec();
            if crate::rewrite::set_ack_and_window(&mut frame, ack, window).is_ok() {
                held.frame = Bytes::from(frame);
            }
        }
        self.release(id, now, out);
    }

    fn apply(&mut self, actions: &mut Vec<Action>, now: Duration, out: &mut Vec<GateOutput>) {
        for action in actions.drain(..) {
            match action {
                Action::Release(id) => self.release(id, now, out),
                Action::ReleaseLoweredAck { id, ack, window } => {
                    self.release_lowered(id, ack, window, now, out)
                }
                Action::Discard(id) => {
                    self.take_held(id);
                }
                Action::CheckpointNeeded(reason) => {
                    if self.protection == Protection::Protected {
                        out.push(GateOutput::Checkpoint(reason));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCP/IPv4 frame from the VM (10.0.0.2:80) to a client (10.0.0.9:40000).
    fn tcp(seq: u32, flags: u8, payload: &[u8]) -> Bytes {
        tcp_acking(seq, 1, flags, payload)
    }

    /// The same, acknowledging `ack`.
    fn tcp_acking(seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Bytes {
        let mut f = vec![0x52, 0x54, 0, 0, 0, 9, 0x52, 0x54, 0, 0, 0, 1, 0x08, 0x00];
        let total = 20 + 20 + payload.len();
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&(total as u16).to_be_bytes());
        f.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 2, 10, 0, 0, 9]);
        f.extend_from_slice(&80u16.to_be_bytes());
        f.extend_from_slice(&40000u16.to_be_bytes());
        f.extend_from_slice(&seq.to_be_bytes());
        f.extend_from_slice(&ack.to_be_bytes());
        f.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        f.extend_from_slice(payload);
        f.into()
    }

    fn released(out: &[GateOutput]) -> Vec<Bytes> {
        out.iter()
            .filter_map(|o| match o {
                GateOutput::Release { frame, .. } => Some(frame.clone()),
                GateOutput::Checkpoint(_) => None,
            })
            .collect()
    }

    const T: Duration = Duration::from_millis(1);

    #[test]
    fn matched_output_is_released_and_unmatched_waits_for_adoption() {
        let mut gate = ReleaseGate::new(EngineConfig::default(), Protection::Protected, 3);
        let mut out = Vec::new();
        let a = tcp(1000, 0x18, b"hello");
        gate.pvm_frame(a.clone(), T, &mut out);
        assert!(out.is_empty());
        assert_eq!(gate.held_packets(), 1);
        gate.svm_frame(3, a.clone(), T, &mut out);
        assert_eq!(released(&out), vec![a]);
        out.clear();

        let b = tcp(1005, 0x18, b"world");
        gate.pvm_frame(b.clone(), T, &mut out);
        gate.svm_frame(3, tcp(1005, 0x18, b"WORLD"), T, &mut out);
        assert!(matches!(out.as_slice(), [GateOutput::Checkpoint(_)]));
        out.clear();
        // Output of the next epoch arrives before the adoption: kept, not compared yet.
        assert_eq!(
            gate.svm_frame(4, tcp(1010, 0x18, b"!"), T, &mut out),
            SvmFrameFate::Early
        );
        gate.checkpoint_adopted(3, T, &mut out);
        assert_eq!(released(&out), vec![b]);
        assert_eq!(gate.epoch(), 4);
        assert_eq!(gate.held_packets(), 0);
        assert_eq!(
            gate.svm_frame(3, tcp(1, 0x10, b""), T, &mut out),
            SvmFrameFate::Stale
        );
    }

    #[test]
    fn data_goes_out_with_the_svms_acknowledgement_when_the_pvms_is_ahead() {
        let mut gate = ReleaseGate::new(EngineConfig::default(), Protection::Protected, 3);
        let mut out = Vec::new();
        gate.svm_frame(3, tcp_acking(1000, 40, 0x10, b""), T, &mut out);
        let pvm = tcp_acking(1000, 100, 0x18, b"echo");
        gate.pvm_frame(pvm.clone(), T, &mut out);
        gate.svm_frame(3, tcp_acking(1000, 40, 0x18, b"echo"), T, &mut out);
        let [sent] = released(&out).try_into().unwrap();
        assert_eq!(sent.len(), pvm.len());
        assert_eq!(
            &sent[42..46],
            &40u32.to_be_bytes(),
            "the SVM's acknowledgement"
        );
        assert_eq!(&sent[..42], &pvm[..42]);
        assert_eq!(&sent[54..], &pvm[54..], "the data as the PVM sent it");
        assert_eq!(gate.counters().lowered_acks, 1);
    }

    #[test]
    fn a_syn_ack_the_pvm_superseded_is_dropped_and_the_new_one_released() {
        let mut gate = ReleaseGate::new(EngineConfig::default(), Protection::Protected, 3);
        let mut out = Vec::new();
        gate.pvm_frame(tcp(1000, 0x12, b""), T, &mut out);
        let kept = tcp(7000, 0x12, b"");
        gate.pvm_frame(kept.clone(), T, &mut out);
        assert!(out.is_empty());
        assert_eq!((gate.held_packets(), gate.held_bytes()), (1, kept.len()));
        assert_eq!(gate.counters().superseded_syn_acks, 1);
        gate.svm_frame(3, tcp(90_000, 0x12, b""), T, &mut out);
        assert_eq!(released(&out), vec![kept]);
        assert_eq!(gate.held_packets(), 0);
    }

    #[test]
    fn unprotected_output_passes_and_failover_to_the_primary_releases_what_was_held() {
        let mut gate = ReleaseGate::new(EngineConfig::default(), Protection::Unprotected, 0);
        let mut out = Vec::new();
        let a = tcp(1, 0x18, b"x");
        gate.pvm_frame(a.clone(), T, &mut out);
        assert_eq!(released(&out), vec![a.clone()]);
        out.clear();
        gate.colo_started(1, T, &mut out);
        gate.pvm_frame(a.clone(), T, &mut out);
        assert_eq!(gate.flows(), 1);
        gate.colo_exit();
        let mut ticked = Vec::new();
        gate.tick(Duration::from_secs(10), &mut ticked);
        assert!(ticked.is_empty(), "no checkpoint requests after colo-exit");
        assert!(out.is_empty());
        assert_eq!(gate.failover(true, T, &mut out), 0);
        assert_eq!(released(&out), vec![a]);
        assert_eq!(gate.protection(), Protection::Unprotected);
        assert_eq!(
            gate.flows(),
            0,
            "nothing compared now: the flows are forgotten"
        );
    }

    #[test]
    fn early_output_is_bounded_in_bytes_and_its_loss_asks_for_a_checkpoint() {
        let mut gate = ReleaseGate::new(EngineConfig::default(), Protection::Protected, 1);
        let mut out = Vec::new();
        let big = tcp(1, 0x18, &[7u8; 60_000]);
        let n = MAX_FUTURE_BYTES / big.len() + 10;
        for _ in 0..n {
            assert_eq!(
                gate.svm_frame(2, big.clone(), T, &mut out),
                SvmFrameFate::Early
            );
        }
        let (frames, bytes) = gate.early();
        assert!(bytes <= MAX_FUTURE_BYTES, "{bytes}");
        assert_eq!(frames as u64 + gate.early_dropped(), n as u64);
        assert!(gate.early_dropped() >= 10);
        assert!(out.is_empty());
        gate.checkpoint_adopted(1, T, &mut out);
        assert!(
            out.contains(&GateOutput::Checkpoint(CheckpointReason::SvmOutputLost)),
            "{out:?}"
        );
        assert_eq!(gate.early(), (0, 0));
    }

    #[test]
    fn after_a_failover_to_the_secondary_the_pvm_is_fenced() {
        let mut gate = ReleaseGate::new(EngineConfig::default(), Protection::Protected, 1);
        let mut out = Vec::new();
        gate.pvm_frame(tcp(1, 0x18, b"held"), T, &mut out);
        assert_eq!(gate.failover(false, T, &mut out), 1);
        gate.pvm_frame(tcp(5, 0x18, b"late"), T, &mut out);
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(gate.fenced_drops(), 1);
        assert_eq!(gate.protection(), Protection::Fenced);
        assert_eq!(gate.flows(), 0);
        // The SVM's output of the next epoch, then a `checkpoint-adopted` late: nothing is
        // compared, no flow comes back.
        assert_eq!(
            gate.svm_frame(2, tcp(9, 0x18, b"svm"), T, &mut out),
            SvmFrameFate::Early
        );
        gate.checkpoint_adopted(1, T, &mut out);
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(gate.flows(), 0);
        gate.colo_started(2, T, &mut out);
        assert_eq!(gate.protection(), Protection::Protected);
    }
}
