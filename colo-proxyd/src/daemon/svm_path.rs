//! The secondary's SVM path: what happens to each mirrored packet, each SVM packet and each
//! epoch event. Pure (no I/O), so the secondary's role loop is only wiring.
//!
//! * Mirrored packets (the client's, copied by the primary) go into the SVM with their
//!   acknowledgement numbers rewritten ([`RewriteTable::into_svm`]); a client ACK whose
//!   connection's SVM ISN is not known yet waits for the SVM's SYN. Before that, a segment
//!   the SVM's receive window cannot take yet waits for it to open ([`WindowPacer`]).
//! * SVM output goes to the primary tagged with the SVM epoch it belongs to, in the SVM's own
//!   sequence numbers: the comparator counts each side from its own SYN, and the SVM's SYN-ACK
//!   leaves before its offset can be known. Its SYNs teach the table the SVM's ISN
//!   ([`RewriteTable::out_of_svm`]); after a failover, its output is rewritten to the PVM's
//!   numbers for the client.
//! * `svm-epoch-closed{E}`: the role loop drains the SVM's socket first (that output is
//!   epoch E's); from then on output is tagged E+1 and **held**, as are mirrored packets,
//!   because the SVM may resume the adopted state before this daemon hears
//!   `checkpoint-adopted`, and both need the offsets of the new state.
//! * `checkpoint-adopted{E}`: the SVM is a copy of the PVM, every offset is 0 again; the held
//!   packets go on with the new offsets.
//! * `colo-exit` while held: no adoption is coming (the barrier failed); the held packets go on
//!   with the old offsets.
//! * `failover` with the secondary surviving: from then on the SVM's output goes to the network
//!   instead of to the primary, its sequence numbers shifted back to the PVM's for the
//!   connections the SVM opened in the last epoch (the client knows the PVM's numbers); with
//!   the network bridge ([`Failover::Bridge`]) the packets from the network come in through
//!   [`SvmPath::network_input`], their acknowledgements shifted the other way, and the
//!   primary's mirror is ignored. The offsets stay those in force at the failover: no
//!   checkpoint resets them any more, and a connection opened afterwards learns offset 0.

mod syn_wait;

use std::collections::VecDeque;
use std::time::Duration;

use super::svm_window::{PacerCounters, WindowPacer};
use crate::packet::{FlowKey, Network, Transport, parse_ethernet};
use crate::rewrite::{
    ChecksumState, Rewrite, RewriteCounters, RewriteError, RewriteLimits, RewriteTable,
};
use syn_wait::SynWait;

/// Packets kept at most in each queue of packets held (between `svm-epoch-closed` and
/// `checkpoint-adopted`) or waiting for an SVM SYN, and their bytes; beyond either, the
/// oldest are dropped (counted). The secondary cannot ask for a checkpoint; a packet lost
/// here is one the SVM misses or the primary does not see, which makes the PVM's output wait
/// and the primary ask for one (a hold timeout or a divergence), and TCP retransmits it.
/// The epoch is closed for milliseconds, so the bounds are far above what it collects.
const MAX_HELD: usize = 8192;
/// Bytes kept at most in each queue of held packets (with 8192 packets).
pub const MAX_HELD_BYTES: usize = 16 << 20;

/// Packets from the network kept at most while the failover event has not arrived yet, and
/// their bytes.
const MAX_NETWORK_HELD: usize = 1024;
/// See [`MAX_NETWORK_HELD`].
const MAX_NETWORK_HELD_BYTES: usize = 4 << 20;

/// How often the rewrite table is scanned for idle connections, at most.
const EXPIRY_SCAN: Duration = Duration::from_secs(1);

/// A monotonic clock reading for [`SvmPath::tick`]: the time since its first call.
pub fn monotonic_now() -> Duration {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed()
}

/// What a [`FrameQueue`] keeps: a frame, possibly with what it was looked up by.
pub(crate) trait Queued {
    /// The frame's bytes, counted against the queue's bound.
    fn bytes(&self) -> usize;
}

impl Queued for Vec<u8> {
    fn bytes(&self) -> usize {
        self.len()
    }
}

/// A client ACK waiting for its connection's SVM SYN, with that connection's key (in the
/// VM-to-client direction), so that a SYN wakes only its own connection's ACKs rather than
/// every waiting frame being parsed again at every SYN of a flood.
impl Queued for (FlowKey, Vec<u8>) {
    fn bytes(&self) -> usize {
        self.1.len()
    }
}

/// A queue of frames bounded in frames and in bytes: at either bound the oldest go (counted
/// by the caller's `dropped`).
#[derive(Debug)]
pub(crate) struct FrameQueue<T = Vec<u8>> {
    frames: VecDeque<T>,
    bytes: usize,
    max_frames: usize,
    max_bytes: usize,
}

impl<T: Queued> FrameQueue<T> {
    /// An empty queue of at most `max_frames` frames and `max_bytes` bytes (at least one
    /// frame is always kept).
    pub(crate) fn new(max_frames: usize, max_bytes: usize) -> Self {
        FrameQueue {
            frames: VecDeque::new(),
            bytes: 0,
            max_frames: max_frames.max(1),
            max_bytes,
        }
    }

    /// Appends `frame`, dropping the oldest while a bound is passed.
    pub(crate) fn push(&mut self, frame: T, dropped: &mut u64) {
        self.bytes += frame.bytes();
        self.frames.push_back(frame);
        while self.frames.len() > 1
            && (self.frames.len() > self.max_frames || self.bytes > self.max_bytes)
        {
            if let Some(old) = self.frames.pop_front() {
                self.bytes -= old.bytes();
                *dropped += 1;
            }
        }
    }

    /// The frames, oldest first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> {
        self.frames.iter()
    }

    /// Every frame, oldest first; the queue is empty afterwards.
    pub(crate) fn take(&mut self) -> VecDeque<T> {
        self.bytes = 0;
        std::mem::take(&mut self.frames)
    }

    /// The frames `wanted` picks, oldest first, taken out of the queue.
    pub(crate) fn extract(&mut self, mut wanted: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut picked = Vec::new();
        let mut kept = VecDeque::with_capacity(self.frames.len());
        for frame in self.frames.drain(..) {
            if wanted(&frame) {
                self.bytes -= frame.bytes();
                picked.push(frame);
            } else {
                kept.push_back(frame);
            }
        }
        self.frames = kept;
        picked
    }

    pub(crate) fn len(&self) -> usize {
        self.frames.len()
    }

    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
}

/// What a failover to the secondary makes of the SVM's traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failover {
    /// The daemon carries it: QEMU's redirectors hand the SVM's output to it and take its
    /// packets to the network (`red2`), and hand it the network's packets (`red3`).
    Bridge,
    /// No network ports: the SVM's output has nowhere to go (QEMU's filters are removed and
    /// the SVM uses its tap directly); the mirror from the primary is still injected.
    NoBridge,
}

/// Frames the network bridge carried since the failover, per direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BridgeCounts {
    /// SVM output sent towards the network.
    pub out_of_svm: u64,
    /// Of those, with the sequence number shifted.
    pub out_of_svm_rewritten: u64,
    /// Network packets sent into the SVM.
    pub into_svm: u64,
    /// Of those, with the acknowledgement number shifted.
    pub into_svm_rewritten: u64,
}

/// What the role loop must do.
#[derive(Debug, PartialEq, Eq)]
pub enum SvmOutput {
    /// Inject this frame into the SVM.
    ToSvm(Vec<u8>),
    /// Send this SVM frame to the primary, tagged with its SVM epoch.
    ToPrimary {
        /// The SVM epoch.
        epoch: u64,
        /// The frame, rewritten.
        frame: Vec<u8>,
    },
    /// After a failover: send this SVM frame to the network.
    ToNetwork(Vec<u8>),
}

/// The secondary's rewriting and epoch state.
#[derive(Debug)]
pub struct SvmPath {
    table: RewriteTable,
    /// The tag of the SVM's output now.
    epoch: u64,
    /// Between `svm-epoch-closed` and `checkpoint-adopted`.
    closed: bool,
    held_inbound: FrameQueue,
    held_output: FrameQueue,
    /// Client ACKs waiting for their connection's SVM SYN.
    waiting_syn: SynWait,
    /// Packets from the network that arrived before the failover event.
    held_network: FrameQueue,
    /// The next idle scan of the table is due at this time.
    next_expiry: Duration,
    /// The counts [`Self::tick`] last saw.
    exported: (RewriteCounters, u64, PacerCounters),
    failed_over: Option<Failover>,
    bridged: BridgeCounts,
    dropped: u64,
    /// Mirrored segments waiting for the SVM's receive window.
    pacer: WindowPacer,
    /// Frames the pacer let go, before they are rewritten (kept for its capacity).
    paced: Vec<Vec<u8>>,
}

impl SvmPath {
    /// A path tagging SVM output with `epoch`.
    pub fn new(epoch: u64) -> Self {
        SvmPath::with_limits(epoch, RewriteLimits::default())
    }

    /// A path tagging SVM output with `epoch`, its rewrite table bounded by `limits`.
    pub fn with_limits(epoch: u64, limits: RewriteLimits) -> Self {
        SvmPath {
            table: RewriteTable::with_limits(limits),
            epoch,
            closed: false,
            held_inbound: FrameQueue::new(MAX_HELD, MAX_HELD_BYTES),
            held_output: FrameQueue::new(MAX_HELD, MAX_HELD_BYTES),
            waiting_syn: SynWait::new(MAX_HELD, MAX_HELD_BYTES),
            held_network: FrameQueue::new(MAX_NETWORK_HELD, MAX_NETWORK_HELD_BYTES),
            next_expiry: Duration::ZERO,
            exported: Default::default(),
            failed_over: None,
            bridged: BridgeCounts::default(),
            dropped: 0,
            pacer: WindowPacer::new(),
            paced: Vec::new(),
        }
    }

    /// The tag of the SVM's output now.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether the SVM epoch is closed (packets held until the adoption).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Packets dropped because a bounded queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Connections with rewriting state.
    pub fn connections(&self) -> usize {
        self.table.connections()
    }

    /// Connections whose SVM sequence numbers differ from the PVM's (offset known and not 0).
    pub fn connections_with_offset(&self) -> usize {
        self.table.connections_with_offset()
    }

    /// The rewrite table's running totals (expired, evicted, refused).
    pub fn rewrite_counters(&self) -> RewriteCounters {
        self.table.counters()
    }

    /// Frames and bytes in the queues of held packets right now.
    pub fn queued(&self) -> (usize, usize) {
        [&self.held_inbound, &self.held_output, &self.held_network]
            .iter()
            .fold(
                (self.waiting_syn.len(), self.waiting_syn.bytes()),
                |(f, b), q| (f + q.len(), b + q.bytes()),
            )
    }

    /// Mirrored segments and their bytes waiting for the SVM's window right now.
    pub fn paced(&self) -> (usize, usize) {
        self.pacer.waiting()
    }

    /// Whether mirrored segments wait for the SVM's window: the role loop then calls
    /// [`Self::tick`] even when nothing arrives, so that none waits past its bound.
    pub fn pacing(&self) -> bool {
        self.pacer.is_pacing()
    }

    /// The pacer's running totals.
    pub fn pacer_counters(&self) -> PacerCounters {
        self.pacer.counters()
    }

    /// The role loop's clock (a monotonic reading, [`monotonic_now`], the clock the pacer's
    /// waits are measured by): sends on the mirrored
    /// segments that waited too long for the SVM's window, and forgets idle connections, at
    /// most one scan a second. Returns whether it scanned or a count changed since the last
    /// call (a moment for the caller to export the metrics).
    pub fn tick(&mut self, now: Duration, out: &mut Vec<SvmOutput>) -> bool {
        let mut paced = std::mem::take(&mut self.paced);
        self.pacer.tick(now, &mut paced);
        self.inject_all(&mut paced, out);
        let counts = (self.table.counters(), self.dropped, self.pacer.counters());
        let changed = counts != self.exported;
        self.exported = counts;
        if now < self.next_expiry {
            return changed;
        }
        self.next_expiry = now + EXPIRY_SCAN;
        self.table.expire(now);
        true
    }

    /// What the network bridge carried since the failover.
    pub fn bridged(&self) -> BridgeCounts {
        self.bridged
    }

    /// A mirrored packet from the primary.
    pub fn inbound(&mut self, frame: Vec<u8>, out: &mut Vec<SvmOutput>) {
        if self.failed_over == Some(Failover::Bridge) {
            // The client's packets reach the SVM through the bridge now; whatever the old
            // primary still mirrors would only duplicate them.
            return;
        }
        if self.closed {
            self.held_inbound.push(frame, &mut self.dropped);
            return;
        }
        self.pace(frame, out);
    }

    /// A mirrored packet goes into the SVM now, or when its window has room.
    fn pace(&mut self, frame: Vec<u8>, out: &mut Vec<SvmOutput>) {
        if self.failed_over.is_some() {
            self.inject(frame, out);
            return;
        }
        let mut paced = std::mem::take(&mut self.paced);
        self.pacer.to_svm(frame, monotonic_now(), &mut paced);
        self.inject_all(&mut paced, out);
    }

    /// Injects what the pacer let go, in its order.
    fn inject_all(&mut self, paced: &mut Vec<Vec<u8>>, out: &mut Vec<SvmOutput>) {
        for frame in paced.drain(..) {
            self.inject(frame, out);
        }
        self.paced = std::mem::take(paced);
    }

    /// Sends on everything the pacer holds.
    fn release_paced(&mut self, out: &mut Vec<SvmOutput>) {
        let mut paced = std::mem::take(&mut self.paced);
        self.pacer.release_all(&mut paced);
        self.inject_all(&mut paced, out);
    }

    /// A packet from the network (QEMU's `red3`), after a failover with the bridge. One that
    /// arrives before the failover event is held for it.
    pub fn network_input(&mut self, frame: Vec<u8>, out: &mut Vec<SvmOutput>) {
        if self.failed_over.is_none() {
            self.held_network.push(frame, &mut self.dropped);
            return;
        }
        self.inject(frame, out);
    }

    fn inject(&mut self, mut frame: Vec<u8>, out: &mut Vec<SvmOutput>) {
        match self.table.into_svm(&mut frame, ChecksumState::Complete) {
            Ok(Rewrite::WaitForSvmSyn) => match tcp_key(&frame) {
                Some(key) => self
                    .waiting_syn
                    .push(key.reversed(), frame, &mut self.dropped),
                // Cannot be: the table parsed it. Never lose it: on it goes, as it is.
                None => out.push(SvmOutput::ToSvm(frame)),
            },
            Err(RewriteError::TableFull(connections)) => {
                // The client's SYN is refused (it retries) rather than let its connection
                // run with a wrong offset: see `RewriteTable`.
                static LOG: colo_daemon::RateLimited =
                    colo_daemon::RateLimited::new(Duration::from_secs(1));
                if let Some(suppressed) = LOG.allow() {
                    tracing::error!(
                        connections,
                        suppressed,
                        "rewrite table full of connections whose sequence offsets must be kept: a new connection's SYN into the SVM is dropped (see --rewrite-max-connections)"
                    );
                }
            }
            Ok(rewrite @ (Rewrite::Unchanged | Rewrite::Rewritten)) => {
                let rewritten = rewrite == Rewrite::Rewritten;
                if self.failed_over == Some(Failover::Bridge) {
                    self.bridged.into_svm += 1;
                    self.bridged.into_svm_rewritten += u64::from(rewritten);
                }
                out.push(SvmOutput::ToSvm(frame))
            }
            // Not TCP, or not parseable: the SVM gets it as the PVM did.
            Err(_) => {
                if self.failed_over == Some(Failover::Bridge) {
                    self.bridged.into_svm += 1;
                }
                out.push(SvmOutput::ToSvm(frame))
            }
        }
    }

    /// A packet the SVM sent.
    pub fn svm_output(&mut self, frame: Vec<u8>, out: &mut Vec<SvmOutput>) {
        if self.closed {
            self.held_output.push(frame, &mut self.dropped);
            return;
        }
        self.forward(frame, out);
    }

    fn forward(&mut self, mut frame: Vec<u8>, out: &mut Vec<SvmOutput>) {
        let syn = syn_key(&frame);
        if self.failed_over.is_none() {
            // Its window may have opened for segments the pacer holds.
            let mut paced = std::mem::take(&mut self.paced);
            self.pacer.svm_sent(&frame, monotonic_now(), &mut paced);
            self.inject_all(&mut paced, out);
        }
        if let Some(failover) = self.failed_over {
            // The client talks to the SVM now: it must see the PVM's numbers.
            let rewritten = self.table.out_of_svm(&mut frame, ChecksumState::Complete)
                == Ok(Rewrite::Rewritten);
            if failover == Failover::Bridge {
                self.bridged.out_of_svm += 1;
                self.bridged.out_of_svm_rewritten += u64::from(rewritten);
            }
            out.push(SvmOutput::ToNetwork(frame));
        } else {
            // The primary's comparator places each side's segments relative to that side's
            // own SYN, so it gets the SVM's numbers untouched: the SYN-ACK leaves the SVM
            // before the offset can be known (the client's ACK teaches it), and rewriting
            // only the later segments would misplace them. Only a SYN teaches the table
            // something (the SVM's ISN, for the ACKs going into the SVM).
            // A SYN the full table refuses teaches nothing: the client's ACKs then reach the
            // SVM unshifted, the outputs diverge and the primary's checkpoint resets all.
            if syn.is_some() {
                let mut scratch = frame.clone();
                let _ = self.table.out_of_svm(&mut scratch, ChecksumState::Complete);
            }
            out.push(SvmOutput::ToPrimary {
                epoch: self.epoch,
                frame,
            });
        }
        if let Some(key) = syn
            && !self.waiting_syn.is_empty()
        {
            // The SVM SYN may have taught the offset its connection's waiting ACKs need.
            for frame in self.waiting_syn.take_for(&key) {
                self.inject(frame, out);
            }
        }
    }

    /// The relay's `svm-epoch-closed{epoch}`, after the SVM's socket was drained.
    pub fn epoch_closed(&mut self, epoch: u64) {
        self.epoch = epoch + 1;
        self.closed = true;
    }

    /// The relay's `checkpoint-adopted`: offsets reset, held packets go on.
    pub fn checkpoint_adopted(&mut self, out: &mut Vec<SvmOutput>) {
        self.table.reset();
        self.pacer_checkpoint(out);
        self.reopen(out);
    }

    /// The SVM is a copy of the PVM: what the pacer holds goes in (rewritten with the new,
    /// zero, offsets), before the packets held while the epoch was closed.
    fn pacer_checkpoint(&mut self, out: &mut Vec<SvmOutput>) {
        let mut paced = std::mem::take(&mut self.paced);
        self.pacer.checkpoint(&mut paced);
        self.inject_all(&mut paced, out);
    }

    /// The relay's `colo-started{epoch}`: the SVM is a fresh copy of the PVM.
    pub fn colo_started(&mut self, epoch: u64, out: &mut Vec<SvmOutput>) {
        self.table.reset();
        self.epoch = epoch;
        self.pacer_checkpoint(out);
        self.reopen(out);
    }

    /// The relay's `colo-exit`: no adoption is coming for a closed epoch.
    pub fn colo_exit(&mut self, out: &mut Vec<SvmOutput>) {
        self.release_paced(out);
        if self.closed {
            self.reopen(out);
        }
    }

    /// The relay's `failover` with the secondary surviving. The offsets in force stay; what
    /// was held goes on (its output to the network), then the packets from the network that
    /// came before this event.
    pub fn failover(&mut self, how: Failover, out: &mut Vec<SvmOutput>) {
        if self.failed_over.is_some() {
            return;
        }
        // Before the failover takes effect: these went through the old offsets' rewriting
        // like everything the SVM got before.
        self.release_paced(out);
        self.failed_over = Some(how);
        self.table.freeze();
        self.reopen(out);
        for frame in self.held_network.take() {
            self.inject(frame, out);
        }
    }

    /// Whether the SVM carries the traffic (after a failover to the secondary).
    pub fn failed_over(&self) -> bool {
        self.failed_over.is_some()
    }

    fn reopen(&mut self, out: &mut Vec<SvmOutput>) {
        self.closed = false;
        // ACKs that waited for a SYN: with offsets reset they need nothing any more.
        let waiting = self.waiting_syn.take();
        for (_, frame) in waiting {
            self.inject(frame, out);
        }
        for frame in self.held_output.take() {
            self.forward(frame, out);
        }
        for frame in self.held_inbound.take() {
            self.pace(frame, out);
        }
    }
}

/// The connection of a TCP SYN, in its direction of travel; `None` for any other frame.
fn syn_key(frame: &[u8]) -> Option<FlowKey> {
    match parse_ethernet(frame).ok()?.network {
        Network::Ip(ip) if matches!(&ip.transport, Transport::Tcp(t) if t.flags.syn) => {
            ip.flow_key()
        }
        _ => None,
    }
}

/// The connection of a TCP frame, in its direction of travel.
fn tcp_key(frame: &[u8]) -> Option<FlowKey> {
    match parse_ethernet(frame).ok()?.network {
        Network::Ip(ip) if matches!(ip.transport, Transport::Tcp(_)) => ip.flow_key(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCP/IPv4 frame on the client's port 40000; `from_vm` picks the direction.
    fn tcp(from_vm: bool, seq: u32, ack: u32, flags: u8) -> Vec<u8> {
        crate::test_frames::Tcp::new(from_vm, 40000, seq, ack, flags).frame()
    }

    fn seq_of(frame: &[u8]) -> u32 {
        u32::from_be_bytes(frame[38..42].try_into().unwrap())
    }

    fn ack_of(frame: &[u8]) -> u32 {
        u32::from_be_bytes(frame[42..46].try_into().unwrap())
    }

    #[test]
    fn a_new_connection_is_rewritten_both_ways_and_reset_at_adoption() {
        let mut path = SvmPath::new(1);
        let mut out = Vec::new();
        // Client SYN, then the SVM's SYN-ACK with ISN 5000 (the PVM chose 1000).
        path.inbound(tcp(false, 100, 0, 0x02), &mut out);
        path.svm_output(tcp(true, 5000, 101, 0x12), &mut out);
        // The client's handshake ACK acknowledges the PVM's ISN 1000.
        path.inbound(tcp(false, 101, 1001, 0x10), &mut out);
        let [
            SvmOutput::ToSvm(_),
            SvmOutput::ToPrimary { epoch: 1, .. },
            SvmOutput::ToSvm(ack),
        ] = out.as_slice()
        else {
            panic!("{out:?}")
        };
        assert_eq!(ack_of(ack), 5001);
        out.clear();
        path.svm_output(tcp(true, 5001, 101, 0x18), &mut out);
        let [SvmOutput::ToPrimary { frame, .. }] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!(
            seq_of(frame),
            5001,
            "the primary compares the SVM's own numbers"
        );
        out.clear();

        path.epoch_closed(1);
        path.svm_output(tcp(true, 1001, 101, 0x18), &mut out);
        path.inbound(tcp(false, 101, 1001, 0x10), &mut out);
        assert!(out.is_empty(), "held while the epoch is closed");
        path.checkpoint_adopted(&mut out);
        let [
            SvmOutput::ToPrimary { epoch: 2, frame },
            SvmOutput::ToSvm(ack),
        ] = out.as_slice()
        else {
            panic!("{out:?}")
        };
        assert_eq!(seq_of(frame), 1001, "offset 0 after the adoption");
        assert_eq!(ack_of(ack), 1001);
    }

    #[test]
    fn after_a_failover_the_svms_output_goes_to_the_network_in_the_pvms_numbers() {
        let mut path = SvmPath::new(1);
        let mut out = Vec::new();
        path.inbound(tcp(false, 100, 0, 0x02), &mut out);
        path.svm_output(tcp(true, 5000, 101, 0x12), &mut out);
        path.inbound(tcp(false, 101, 1001, 0x10), &mut out);
        out.clear();
        path.failover(Failover::Bridge, &mut out);
        path.svm_output(tcp(true, 5001, 101, 0x18), &mut out);
        let [SvmOutput::ToNetwork(frame)] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!(seq_of(frame), 1001);
    }

    #[test]
    fn a_client_ack_before_the_svms_syn_waits_for_it() {
        let mut path = SvmPath::new(1);
        let mut out = Vec::new();
        path.inbound(tcp(false, 100, 0, 0x02), &mut out);
        // The PVM answered faster than the SVM: the client's ACK arrives first.
        path.inbound(tcp(false, 101, 1001, 0x10), &mut out);
        assert_eq!(out.len(), 1, "only the SYN went in: {out:?}");
        path.svm_output(tcp(true, 5000, 101, 0x12), &mut out);
        let [_, SvmOutput::ToPrimary { .. }, SvmOutput::ToSvm(ack)] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!(ack_of(ack), 5001);
    }

    /// A connection the SVM accepted in this epoch with ISN 5000 (the PVM chose 1000).
    fn shifted_connection(path: &mut SvmPath, out: &mut Vec<SvmOutput>) {
        path.inbound(tcp(false, 100, 0, 0x02), out);
        path.svm_output(tcp(true, 5000, 101, 0x12), out);
        path.inbound(tcp(false, 101, 1001, 0x10), out);
        out.clear();
    }

    #[test]
    fn the_bridge_shifts_both_ways_and_ignores_the_old_primarys_mirror() {
        let mut path = SvmPath::new(1);
        let mut out = Vec::new();
        shifted_connection(&mut path, &mut out);
        assert_eq!(path.connections_with_offset(), 1);
        path.failover(Failover::Bridge, &mut out);
        assert!(out.is_empty(), "{out:?}");
        path.svm_output(tcp(true, 5001, 101, 0x18), &mut out);
        path.network_input(tcp(false, 101, 1002, 0x10), &mut out);
        path.inbound(tcp(false, 101, 1002, 0x10), &mut out);
        let [SvmOutput::ToNetwork(to_client), SvmOutput::ToSvm(to_svm)] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!(seq_of(to_client), 1001);
        assert_eq!(ack_of(to_svm), 5002);
        assert_eq!(
            path.bridged(),
            BridgeCounts {
                out_of_svm: 1,
                out_of_svm_rewritten: 1,
                into_svm: 1,
                into_svm_rewritten: 1,
            }
        );
        // A second failover event changes nothing.
        out.clear();
        path.failover(Failover::NoBridge, &mut out);
        path.inbound(tcp(false, 101, 1002, 0x10), &mut out);
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn after_the_failover_old_and_new_connections_without_offset_pass_unchanged() {
        let mut path = SvmPath::new(1);
        let mut out = Vec::new();
        // Adopted: the connection is the PVM's now, in the same numbers.
        shifted_connection(&mut path, &mut out);
        path.epoch_closed(1);
        path.checkpoint_adopted(&mut out);
        assert_eq!(path.connections_with_offset(), 0);
        path.failover(Failover::Bridge, &mut out);
        let old_out = tcp(true, 1001, 101, 0x18);
        let old_in = tcp(false, 101, 1002, 0x10);
        path.svm_output(old_out.clone(), &mut out);
        path.network_input(old_in.clone(), &mut out);
        // A connection opened after the failover: the client sees the SVM's own ISN.
        let syn = on_port(tcp(false, 7, 0, 0x02), 40001);
        let syn_ack = on_port(tcp(true, 9000, 8, 0x12), 40001);
        let ack = on_port(tcp(false, 8, 9001, 0x10), 40001);
        let data = on_port(tcp(true, 9001, 8, 0x18), 40001);
        path.network_input(syn.clone(), &mut out);
        path.svm_output(syn_ack.clone(), &mut out);
        path.network_input(ack.clone(), &mut out);
        path.svm_output(data.clone(), &mut out);
        assert_eq!(
            out,
            vec![
                SvmOutput::ToNetwork(old_out),
                SvmOutput::ToSvm(old_in),
                SvmOutput::ToSvm(syn),
                SvmOutput::ToNetwork(syn_ack),
                SvmOutput::ToSvm(ack),
                SvmOutput::ToNetwork(data),
            ]
        );
        assert_eq!(path.bridged().out_of_svm_rewritten, 0);
        assert_eq!(path.bridged().into_svm_rewritten, 0);
    }

    #[test]
    fn network_packets_before_the_failover_event_wait_for_it() {
        let mut path = SvmPath::new(1);
        let mut out = Vec::new();
        shifted_connection(&mut path, &mut out);
        path.network_input(tcp(false, 101, 1002, 0x10), &mut out);
        assert!(out.is_empty(), "{out:?}");
        path.failover(Failover::Bridge, &mut out);
        let [SvmOutput::ToSvm(ack)] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!(ack_of(ack), 5002);
    }

    #[test]
    fn without_the_bridge_the_mirror_still_goes_in_and_nothing_is_counted() {
        let mut path = SvmPath::new(1);
        let mut out = Vec::new();
        shifted_connection(&mut path, &mut out);
        path.failover(Failover::NoBridge, &mut out);
        path.inbound(tcp(false, 101, 1002, 0x10), &mut out);
        path.svm_output(tcp(true, 5001, 101, 0x18), &mut out);
        let [SvmOutput::ToSvm(ack), SvmOutput::ToNetwork(_)] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!(ack_of(ack), 5002);
        assert_eq!(path.bridged(), BridgeCounts::default());
    }

    fn on_port(mut frame: Vec<u8>, client_port: u16) -> Vec<u8> {
        // Source port of a client frame, destination port of a VM frame.
        let at = if u16::from_be_bytes([frame[34], frame[35]]) == 80 {
            36
        } else {
            34
        };
        frame[at..at + 2].copy_from_slice(&client_port.to_be_bytes());
        frame
    }

    #[test]
    fn held_packets_are_bounded_in_bytes_and_go_on_in_order_at_the_adoption() {
        let mut path = SvmPath::new(1);
        let mut out = Vec::new();
        path.epoch_closed(1);
        let big = |i: u32| {
            let mut f = tcp(true, i, 1, 0x18);
            f.resize(60_000, 0);
            f
        };
        let n = MAX_HELD_BYTES / 60_000 + 20;
        for i in 0..n as u32 {
            path.svm_output(big(i), &mut out);
        }
        let (frames, bytes) = path.queued();
        assert!(bytes <= MAX_HELD_BYTES, "{bytes}");
        assert_eq!(frames as u64 + path.dropped(), n as u64);
        assert!(out.is_empty());
        path.checkpoint_adopted(&mut out);
        let seqs: Vec<u32> = out
            .iter()
            .map(|o| match o {
                SvmOutput::ToPrimary { frame, .. } => seq_of(frame),
                other => panic!("{other:?}"),
            })
            .collect();
        let first = path.dropped() as u32;
        assert_eq!(
            seqs,
            (first..n as u32).collect::<Vec<_>>(),
            "the newest, in order"
        );
        assert_eq!(path.queued(), (0, 0));
    }
}
