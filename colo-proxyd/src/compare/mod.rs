//! Comparison of one TCP connection's output from the PVM and the SVM on the reassembled byte
//! stream.
//!
//! Both VMs send the "same" connection to the client, each with its own initial sequence
//! number (until the secondary's rewriting or a checkpoint makes them equal), its own
//! segmentation, options, window and timing. [`StreamComparator`] places each side's segments
//! at their offsets in the connection's sequence space and releases a PVM segment only when
//! the SVM produced the same thing there: the same bytes, a SYN where the PVM has its SYN, a FIN
//! at the same offset, an RST. The client never sees an acknowledgement beyond the SVM's, so
//! no byte it sent is acknowledged that the SVM might not have when it takes over: a PVM
//! segment without data waits until the SVM has acknowledged as far, and one with data goes as
//! soon as the SVM produced the same data, its acknowledgement lowered to the SVM's
//! ([`Action::ReleaseLoweredAck`]). Holding such data for the acknowledgement instead can
//! deadlock: the SVM's receive buffer is full because its application waits to send, and it
//! waits because the client never got (nor acknowledged) the data that would let it.
//!
//! The comparator is fed [`Segment`]s and answers with [`Action`]s; it knows nothing of
//! sockets, rings or clocks, so either attachment (net-filter sockets or vhost-user) and the
//! epoch logic drive it the same way. It never drops a PVM packet: every packet it is given is
//! either released through an action or handed back by [`StreamComparator::reset`] at the
//! next checkpoint.

mod datagram;
mod equivalence;
mod prefetch;
mod released;
mod sequence;
mod stream_bytes;

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{Buf, Bytes};

use crate::packet::TcpSegment;
pub use datagram::{DEFAULT_REORDER_WINDOW, DatagramComparator};
use equivalence::Equivalence;
pub use equivalence::{
    EquivalentRelease, IMF_FIXDATE_LEN, MAX_VALUE_LEN, MIN_PREFIX_LEN, Pattern, ValueByte,
    imf_fixdate,
};
use released::ReleasedRanges;
use sequence::{SequenceMap, seq_at_or_after};
use stream_bytes::{Data, Exact, Side, StreamBytes, Tolerance};

/// How many segments' worth of the other side's kept bytes are asked into the caches (this
/// one's and the next's): see [`prefetch`]. Further ahead measured no faster.
const PREFETCH_SEGMENTS: i64 = 2;

/// `part` of `frame` as a reference into it, or a copy when `part` does not lie in `frame`.
fn share(frame: &Bytes, part: &[u8]) -> Bytes {
    let (whole, piece) = (frame.as_ptr_range(), part.as_ptr_range());
    if !part.is_empty() && whole.start <= piece.start && piece.end <= whole.end {
        frame.slice_ref(part)
    } else {
        Bytes::copy_from_slice(part)
    }
}

/// The caller's handle for a PVM packet the comparator holds; it is never interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PacketId(pub u64);

/// The parts of a TCP segment the comparison looks at; everything else (options, window, IP
/// ID, checksums) is deliberately not compared. The window and its scale are read to keep the
/// window's right edge when an acknowledgement is lowered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment<'a> {
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgement number, if the ACK flag is set.
    pub ack: Option<u32>,
    /// SYN flag.
    pub syn: bool,
    /// FIN flag.
    pub fin: bool,
    /// RST flag.
    pub rst: bool,
    /// The window field, as sent (unscaled).
    pub window: u16,
    /// The window scale option (on a SYN only).
    pub window_scale: Option<u8>,
    /// The segment's data.
    pub payload: &'a [u8],
}

impl<'a> From<&TcpSegment<'a>> for Segment<'a> {
    fn from(tcp: &TcpSegment<'a>) -> Self {
        Segment {
            seq: tcp.seq,
            ack: tcp.flags.ack.then_some(tcp.ack),
            syn: tcp.flags.syn,
            fin: tcp.flags.fin,
            rst: tcp.flags.rst,
            window: tcp.window,
            window_scale: tcp.window_scale,
            payload: tcp.payload,
        }
    }
}

/// What the caller must do after feeding a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this held PVM packet to the client.
    Release(PacketId),
    /// Send this held PVM packet to the client with its TCP acknowledgement number set to
    /// `ack` (the SVM's, lower than the PVM's) and its window field set to `window` (the same
    /// right edge as the PVM's, where the connection's window scale is known; else the PVM's
    /// field unchanged), the checksum updated.
    ReleaseLoweredAck {
        /// The packet.
        id: PacketId,
        /// The acknowledgement number to send.
        ack: u32,
        /// The window field to send.
        window: u16,
    },
    /// Drop this held PVM packet unsent: the PVM superseded it. It is a SYN-ACK the guest
    /// has since replaced by another with a different initial sequence number (it answered the
    /// client's SYN from a SYN cookie, then, its listen queue free again, answered the SYN's
    /// retransmission with a real handshake). A client that got the first would acknowledge a
    /// handshake the guest no longer has and be reset. Never a packet with data, never one
    /// after anything of the connection was released: only what a lossy network could have
    /// lost, and the client's TCP retransmits its SYN for it.
    Discard(PacketId),
    /// The outputs diverged or a bound was reached: ask for a checkpoint. Emitted once per
    /// connection and epoch; until [`StreamComparator::reset`] every PVM packet is held.
    CheckpointNeeded(CheckpointReason),
}

impl Action {
    /// The packet this action releases, if it releases one.
    pub fn released(&self) -> Option<PacketId> {
        match self {
            Action::Release(id) | Action::ReleaseLoweredAck { id, .. } => Some(*id),
            Action::Discard(_) | Action::CheckpointNeeded(_) => None,
        }
    }

    /// The held packet this action settles (releases or discards), if any: the comparator
    /// holds it no more.
    pub fn settled(&self) -> Option<PacketId> {
        match self {
            Action::Discard(id) => Some(*id),
            _ => self.released(),
        }
    }
}

/// Why a connection needs a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointReason {
    /// The two VMs sent different bytes at this stream offset.
    PayloadDiffers {
        /// The first differing offset found.
        offset: i64,
    },
    /// A SYN appeared on one side at a sequence number the other side does not match.
    SynDiffers,
    /// The FINs are at different stream offsets, or one side sent data beyond the other's FIN.
    FinDiffers,
    /// A segment arrived on a side whose SYN was not seen, although the connection started
    /// with a handshake: it cannot be placed in the stream.
    SegmentBeforeSyn,
    /// The bytes held for comparison reached the per-connection bound.
    MemoryBound {
        /// Bytes held when the bound was crossed.
        bytes: usize,
    },
    /// A datagram flow's outputs no longer match within its reorder window.
    DatagramsDiffer,
    /// A PVM packet waited for its match longer than `max_hold` while the SVM sent nothing at
    /// all: the SVM stopped, or lost the packet's cause.
    HoldTimeout,
    /// A PVM packet waited for its match longer than `max_hold_limit` although the SVM kept
    /// sending other output: it is that far behind, or its match never comes.
    HoldLimit,
    /// A PVM SYN (its answer to a client's SYN, or its own) waited for the SVM's longer than
    /// `max_handshake_hold`: held much longer, it would reach a client that has already
    /// retransmitted its SYN.
    HandshakeHold,
    /// The comparison buffers of all flows together reached their bound.
    TotalMemoryBound {
        /// Bytes held when the bound was crossed.
        bytes: usize,
    },
    /// A new flow had no room in the flow table: every flow in it keeps state that only a
    /// checkpoint makes safe to forget (held packets, or sequence numbers that differ between
    /// the VMs). The new flow's packets are held until then.
    FlowTableFull {
        /// Flows in the table when the bound was reached.
        flows: usize,
    },
    /// SVM output that arrived early (tagged with an epoch not compared yet) was dropped from
    /// its bounded queue: that epoch's comparison lacks it, so it would only end in a hold
    /// timeout.
    SvmOutputLost,
}

/// Bounds of one connection's comparison state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ComparatorLimits {
    /// Most payload bytes (PVM held plus SVM ahead) kept for comparison; beyond it the
    /// connection asks for a checkpoint.
    pub max_buffered_bytes: usize,
}

impl Default for ComparatorLimits {
    fn default() -> Self {
        // Four maximal TCP windows without scaling: generous for an epoch of one connection,
        // small enough that thousands of connections fit in memory.
        ComparatorLimits {
            max_buffered_bytes: 256 * 1024,
        }
    }
}

/// How the two sides' sequence numbers map to shared stream offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// Nothing seen yet.
    Unknown,
    /// The connection began with a handshake: each side's offsets count from its own SYN.
    Handshake,
    /// The connection was already running (first seen mid-stream, or after a checkpoint made
    /// both VMs identical): both sides use the PVM's sequence numbers. Offsets below 0 are
    /// bytes from before, released already.
    Shared,
}

/// A PVM segment waiting for the SVM. Its bytes are in the connection's [`StreamBytes`]
/// (once per offset, however often the PVM sent them), not in the segment.
#[derive(Debug)]
struct HeldSegment {
    id: PacketId,
    /// Sequence-space offset of the segment's first element (its SYN, if any).
    start: i64,
    len: usize,
    syn: bool,
    fin: bool,
    rst: bool,
    ack: Option<u32>,
    window: u16,
}

impl HeldSegment {
    fn data_start(&self) -> i64 {
        self.start + i64::from(self.syn)
    }

    fn data_end(&self) -> i64 {
        self.data_start() + self.len as i64
    }

    /// End of the segment in sequence space (a FIN occupies one number).
    fn end(&self) -> i64 {
        self.data_end() + i64::from(self.fin)
    }
}

/// What the last input changed, so that only the held segments it can affect are looked at
/// again: a divergence needs both sides' bytes (or flags), and the later of the two to arrive
/// is the change that finds it. Bytes are compared when they are stored (see
/// [`StreamBytes::insert`]), so only the flags are left to look at here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    /// A PVM segment was appended to the held queue.
    NewestPvmSegment,
    /// The SVM produced bytes (possibly none) or flags other than a new FIN.
    SvmSegment,
    /// The SVM's FIN became known: every held segment may now be beyond it.
    SvmFin,
}

/// Whether a held segment may go.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Ready,
    Wait,
    Diverged(CheckpointReason),
}

/// What the SVM has shown so far of the connection's control flow.
#[derive(Debug, Default)]
struct SvmControl {
    syn: bool,
    /// The SVM sent something besides SYN-ACKs (data, a FIN, an RST, an ACK).
    past_handshake: bool,
    fin: Option<i64>,
    rst: bool,
    /// The furthest acknowledgement the SVM sent.
    ack: Option<u32>,
}

/// The comparator of one TCP connection's VM-to-client direction.
#[derive(Debug)]
pub struct StreamComparator {
    limits: ComparatorLimits,
    /// The bytes this connection may keep before it asks for a checkpoint: its own bound, or
    /// more while the engine's total budget has room ([`Self::allow`]).
    allowance: usize,
    origin: Origin,
    pvm_map: Option<SequenceMap>,
    svm_map: Option<SequenceMap>,
    held: VecDeque<HeldSegment>,
    /// Both sides' bytes from the release floor up, each stored once.
    bytes: StreamBytes,
    /// Payload bytes of the held PVM segments, counted per segment as if each kept its own
    /// copy: the memory bound keeps the meaning it had when they did, and so never counts
    /// fewer bytes than the buffer really holds (gaps aside, which [`Self::store`] bounds).
    held_bytes: usize,
    svm: SvmControl,
    released: ReleasedRanges,
    /// The PVM's furthest sequence-space end and acknowledgement, for the state after a
    /// checkpoint.
    pvm_end: Option<i64>,
    pvm_ack: Option<u32>,
    /// The PVM's receive window scale, once its SYN-ACK settled it (kept across checkpoints:
    /// the connection's scale never changes).
    pvm_scale: Option<u8>,
    /// Set once a checkpoint was requested; the connection then only holds.
    stalled: bool,
    /// A PVM FIN or RST was released: the VM closed its side of the connection.
    closed: bool,
    /// The declared equivalences that apply to this connection (boxed: most have none).
    equivalence: Option<Box<Equivalence>>,
    /// A packet came since the last [`Self::reset`]: a comparator no packet touched since is
    /// already what a reset would make of it, and a checkpoint skips it (not a rebuild). The
    /// engine relies on the same fact to visit only the flows used in the epoch at a
    /// checkpoint; `resetting_a_reset_comparator_changes_nothing` pins it.
    touched: bool,
}

impl StreamComparator {
    /// A comparator for a connection not seen before.
    pub fn new(limits: ComparatorLimits) -> Self {
        StreamComparator {
            limits,
            allowance: limits.max_buffered_bytes,
            origin: Origin::Unknown,
            pvm_map: None,
            svm_map: None,
            held: VecDeque::new(),
            bytes: StreamBytes::new(-1),
            held_bytes: 0,
            svm: SvmControl::default(),
            released: ReleasedRanges::new(-1),
            pvm_end: None,
            pvm_ack: None,
            pvm_scale: None,
            stalled: false,
            closed: false,
            equivalence: None,
            touched: true,
        }
    }

    /// A comparator for a connection not seen before, on which the bytes of each pattern's
    /// value may differ between the VMs (see [`Pattern`]); the `usize` is the rule's id in
    /// what [`Self::drain_equivalent`] reports. No patterns: the same as [`Self::new`].
    pub fn with_equivalence(
        limits: ComparatorLimits,
        patterns: Arc<[(usize, Arc<Pattern>)]>,
    ) -> Self {
        let mut comparator = StreamComparator::new(limits);
        if !patterns.is_empty() {
            comparator.equivalence = Some(Box::new(Equivalence::new(patterns)));
        }
        comparator
    }

    /// Appends to `out` what was released under each equivalence rule since the last call.
    pub fn drain_equivalent(&mut self, out: &mut Vec<EquivalentRelease>) {
        if let Some(equivalence) = &mut self.equivalence {
            equivalence.drain(out);
        }
    }

    /// PVM packets held right now.
    pub fn held_packets(&self) -> usize {
        self.held.len()
    }

    /// Lets the connection keep `headroom` bytes more than it keeps now (the free part of all
    /// connections' budget), or its own bound if that is more. Set before each packet.
    pub fn allow(&mut self, headroom: usize) {
        self.touched = true;
        self.allowance = self
            .limits
            .max_buffered_bytes
            .max(self.buffered_bytes().saturating_add(headroom));
    }

    /// Payload bytes kept for comparison right now (PVM held plus SVM ahead).
    pub fn buffered_bytes(&self) -> usize {
        self.held_bytes + self.bytes.svm_bytes()
    }

    /// Whether a checkpoint was requested and the connection waits for [`Self::reset`].
    pub fn needs_checkpoint(&self) -> bool {
        self.stalled
    }

    /// Whether the VM's side of the connection is finished (its FIN or RST was released) and
    /// nothing is held: the comparator can be dropped, and a new SYN on the same addresses
    /// starts a new connection rather than a divergence.
    pub fn is_finished(&self) -> bool {
        self.closed && self.held.is_empty()
    }

    /// Whether the comparator keeps nothing but the connection's sequence mapping: nothing
    /// held, no SVM bytes waiting for the PVM's, not stalled. Unlike [`Self::is_forgettable`],
    /// the two VMs may use different sequence numbers (a connection opened this epoch, a
    /// SYN flood's half-open handshakes): dropping it is safe only if a later segment of the
    /// connection is not compared mid-stream before the next checkpoint, which the engine
    /// ensures by refusing such segments until then.
    pub fn is_quiet(&self) -> bool {
        !self.stalled && self.held.is_empty() && self.bytes.svm_bytes() == 0
    }

    /// Whether dropping this comparator loses nothing a later segment needs: nothing is held
    /// or kept, and a fresh comparator meeting the connection mid-stream places both sides
    /// where this one would, because both VMs use the same sequence numbers (a connection
    /// that existed at the last checkpoint, or one whose ISNs happen to be equal) or the
    /// connection is finished. A connection opened this epoch with another ISN in the SVM
    /// must be kept until the next checkpoint makes the numbers equal. What a forgotten
    /// connection can still cost is a wait: an old retransmission or an acknowledgement the
    /// SVM sent before is not matched again, so the PVM's packet waits for the hold timeout's
    /// checkpoint; nothing is ever released uncompared.
    pub fn is_forgettable(&self) -> bool {
        if self.stalled || !self.held.is_empty() || self.bytes.svm_bytes() > 0 {
            return false;
        }
        if self.closed {
            return true;
        }
        match self.origin {
            Origin::Unknown | Origin::Shared => true,
            Origin::Handshake => match (self.pvm_map, self.svm_map) {
                (Some(pvm), Some(svm)) => pvm.same_numbers(&svm),
                _ => false,
            },
        }
    }

    /// The oldest PVM packet still held; the caller knows when it arrived and asks for a
    /// checkpoint when it waited too long.
    pub fn oldest_held(&self) -> Option<PacketId> {
        self.held.front().map(|segment| segment.id)
    }

    /// The PVM sent `segment` (packet `id`), parsed from `frame`; the comparator now holds it
    /// until it appears in an [`Action::Release`] or is returned by [`Self::reset`]. Its
    /// payload is kept as a reference into `frame` (which the caller holds anyway until the
    /// release), never copied; a payload that does not lie in `frame` is copied.
    pub fn push_pvm(
        &mut self,
        id: PacketId,
        segment: &Segment<'_>,
        frame: &Bytes,
        actions: &mut Vec<Action>,
    ) {
        self.touched = true;
        if let Some(map) = self.pvm_map {
            // Only when the SVM ran ahead: its copy is compared at once. A PVM that leads
            // has nothing to compare yet.
            let at = map.offset(segment.seq);
            if self.bytes.ends_after(at) {
                self.prefetch_for(at, segment);
            }
        }
        self.decide_origin(segment);
        if segment.syn && segment.ack.is_some() && self.supersedes_held_handshake(segment.seq) {
            self.discard_held_handshake(actions);
        }
        let map = match self.pvm_map {
            Some(map) => map,
            None if segment.syn => *self.pvm_map.insert(SequenceMap::new(segment.seq, -1)),
            None => {
                // Cannot be placed; hold it whole until the checkpoint.
                self.held.push_back(HeldSegment {
                    id,
                    start: 0,
                    len: 0,
                    syn: false,
                    fin: false,
                    rst: segment.rst,
                    ack: segment.ack,
                    window: segment.window,
                });
                self.stall(CheckpointReason::SegmentBeforeSyn, actions);
                return;
            }
        };
        let held = HeldSegment {
            id,
            start: map.offset(segment.seq),
            len: segment.payload.len(),
            syn: segment.syn,
            fin: segment.fin,
            rst: segment.rst,
            ack: segment.ack,
            window: segment.window,
        };
        if segment.syn && segment.ack.is_some() {
            // The PVM's SYN-ACK carries the option only if the client's SYN did.
            self.pvm_scale = Some(segment.window_scale.unwrap_or(0));
        }
        let end = held.end();
        if let Some(map) = &mut self.pvm_map {
            map.advance_to(end);
        }
        self.pvm_end = Some(self.pvm_end.map_or(end, |e| e.max(end)));
        if let Some(ack) = segment.ack {
            self.pvm_ack = Some(match self.pvm_ack {
                Some(known) if seq_at_or_after(known, ack) => known,
                _ => ack,
            });
        }
        let syn_consistent = !segment.syn || self.syn_is_consistent(held.start);
        let (data_start, data_end) = (held.data_start(), held.data_end());
        self.held.push_back(held);
        if self.stalled {
            // A stalled connection keeps only the id: its packets wait for the checkpoint.
            return;
        }
        self.held_bytes += segment.payload.len();
        if !syn_consistent {
            self.stall(CheckpointReason::SynDiffers, actions);
            return;
        }
        if let Some(equivalence) = &mut self.equivalence
            && let Err(offset) = equivalence.scan_pvm(data_start, segment.payload)
        {
            self.stall(CheckpointReason::PayloadDiffers { offset }, actions);
            return;
        }
        let payload = share(frame, segment.payload);
        if let Err(reason) = self.store(data_start, data_end, Data::Shared(payload)) {
            self.stall(reason, actions);
            return;
        }
        self.settle(Change::NewestPvmSegment, actions);
    }

    /// Asks the caches for `segment` (placed at sequence-space offset `at`) and for the kept
    /// bytes it, and the same side's next segment (the sides go on in order), will be
    /// compared with: the loads run while the checks before the comparison, and the next
    /// segment's, do.
    fn prefetch_for(&self, at: i64, segment: &Segment<'_>) {
        let data_start = at + i64::from(segment.syn);
        prefetch::prefetch(segment.payload);
        self.bytes.prefetch(
            data_start,
            data_start + PREFETCH_SEGMENTS * segment.payload.len() as i64,
        );
    }

    /// Stores (and compares) the bytes of `payload`, which sits at `[data_start, data_end)`,
    /// from the release floor up: the bytes below were released already, the peer only
    /// retransmits them.
    fn store(
        &mut self,
        data_start: i64,
        data_end: i64,
        payload: Data<'_>,
    ) -> Result<(), CheckpointReason> {
        let floor = self.released.floor();
        if data_end <= floor {
            return Ok(());
        }
        // The bytes span from the base to the furthest byte; a segment far ahead (a hole
        // larger than any window) must not make the comparator keep that span. Below this
        // bound the span is checked after the releases the segment allows, as every other
        // input is.
        let span = data_end - self.bytes.base();
        // Gaps are not counted in the buffered bytes; they may span up to the connection's
        // own bound plus a window beyond what it is allowed to keep.
        let hard_bound = (self.allowance + self.limits.max_buffered_bytes) as i64 + (128 << 10);
        if span > hard_bound {
            return Err(CheckpointReason::MemoryBound {
                bytes: span as usize,
            });
        }
        let skip = (floor - data_start).max(0);
        let start = data_start + skip;
        let tolerance: &mut dyn Tolerance = match &mut self.equivalence {
            Some(equivalence) => equivalence.as_mut(),
            None => &mut Exact,
        };
        let stored = match payload {
            Data::Shared(mut bytes) => {
                bytes.advance(skip as usize);
                self.bytes
                    .insert(Side::Pvm, start, Data::Shared(bytes), tolerance)
            }
            Data::Borrowed(data) => {
                let data = Data::Borrowed(&data[skip as usize..]);
                self.bytes.insert(Side::Svm, start, data, tolerance)
            }
        };
        stored.map_err(|offset| CheckpointReason::PayloadDiffers { offset })
    }

    /// The SVM sent `segment`. SVM packets are never forwarded; they only let PVM packets go.
    pub fn push_svm(&mut self, segment: &Segment<'_>, actions: &mut Vec<Action>) {
        self.touched = true;
        if self.stalled {
            return;
        }
        if let Some(map) = self.svm_map {
            self.prefetch_for(map.offset(segment.seq), segment);
        }
        self.decide_origin(segment);
        let map = match self.svm_map {
            Some(map) => map,
            None if segment.syn => *self.svm_map.insert(SequenceMap::new(segment.seq, -1)),
            None => {
                self.stall(CheckpointReason::SegmentBeforeSyn, actions);
                return;
            }
        };
        let mut start = map.offset(segment.seq);
        if segment.syn {
            if !self.syn_is_consistent(start) {
                if !self.svm_replaces_its_handshake(segment) {
                    self.stall(CheckpointReason::SynDiffers, actions);
                    return;
                }
                // The SVM answered the client's SYN again, from a real handshake after a SYN
                // cookie's answer (see `Action::Discard` for the PVM's case): its numbers
                // start at this SYN now, as the secondary's rewriting does (a client SYN
                // makes it learn the SVM's ISN anew).
                self.svm_map = Some(SequenceMap::new(segment.seq, -1));
                start = -1;
            }
            self.svm.syn = true;
        } else {
            self.svm.past_handshake = true;
        }
        let data_start = start + i64::from(segment.syn);
        let data_end = data_start + segment.payload.len() as i64;
        if let Some(map) = &mut self.svm_map {
            map.advance_to(data_end + i64::from(segment.fin));
        }
        let stored = self.store(data_start, data_end, Data::Borrowed(segment.payload));
        let mut change = Change::SvmSegment;
        if segment.fin {
            match self.svm.fin {
                None => {
                    self.svm.fin = Some(data_end);
                    change = Change::SvmFin;
                }
                Some(known) if known == data_end => {}
                Some(_) => {
                    self.stall(CheckpointReason::FinDiffers, actions);
                    return;
                }
            }
        }
        if let Err(reason) = stored {
            self.stall(reason, actions);
            return;
        }
        self.svm.rst |= segment.rst;
        if let Some(ack) = segment.ack {
            self.svm.ack = Some(match self.svm.ack {
                Some(known) if seq_at_or_after(known, ack) => known,
                _ => ack,
            });
        }
        self.settle(change, actions);
    }

    /// The epoch logic adopted a checkpoint: both VMs are now the PVM's state. Returns every
    /// held PVM packet, oldest first, for the caller to release, and restarts the comparison
    /// from the PVM's current position with both sides sharing its sequence numbers.
    pub fn reset(&mut self) -> Vec<PacketId> {
        if !self.touched {
            return Vec::new();
        }
        let held: Vec<PacketId> = self.held.drain(..).map(|segment| segment.id).collect();
        let anchor = match (self.pvm_map, self.pvm_end) {
            (Some(map), Some(end)) => Some(map.seq(end)),
            _ => None,
        };
        let pvm_ack = self.pvm_ack;
        let pvm_scale = self.pvm_scale;
        let equivalence = self.equivalence.as_ref().map(|e| Box::new(e.restarted()));
        *self = StreamComparator::new(self.limits);
        self.equivalence = equivalence;
        self.pvm_scale = pvm_scale;
        if let Some(anchor) = anchor {
            self.start_shared(anchor);
            // The SVM is a copy of the PVM now, so it holds every byte the PVM acknowledged.
            self.svm.ack = pvm_ack;
            self.pvm_ack = pvm_ack;
        }
        self.touched = false;
        held
    }

    fn decide_origin(&mut self, segment: &Segment<'_>) {
        if self.origin == Origin::Unknown {
            if segment.syn {
                self.origin = Origin::Handshake;
            } else {
                // First seen mid-stream: assume both sides are at the same sequence numbers,
                // as they are after a checkpoint. Bytes a reordered earlier segment carries
                // (negative offsets) then pass as already released; the daemon starts every
                // protection period with a checkpoint, so this only covers that first moment.
                self.start_shared(segment.seq);
            }
        }
    }

    /// Whether a PVM SYN-ACK at `seq` replaces the handshake this comparator holds: the
    /// connection began with a handshake, the PVM sent nothing but SYN-ACKs (a SYN of its own
    /// opened a connection: never dropped), all still held (nothing released), and this one
    /// has another initial sequence number.
    fn supersedes_held_handshake(&self, seq: u32) -> bool {
        self.origin == Origin::Handshake
            && self.released.floor() < 0
            && !self.held.is_empty()
            && self
                .held
                .iter()
                .all(|h| h.syn && h.ack.is_some() && h.len == 0 && !h.fin && !h.rst)
            && self.pvm_map.is_some_and(|map| map.offset(seq) != -1)
    }

    /// Whether the SVM's SYN-ACK `segment`, at another number than its first, replaces that
    /// handshake: the connection began with one and the SVM sent only SYN-ACKs so far. What
    /// the first SYN-ACK let go was only the PVM's SYN-ACK, which this one matches as well.
    fn svm_replaces_its_handshake(&self, segment: &Segment<'_>) -> bool {
        segment.ack.is_some()
            && !segment.fin
            && !segment.rst
            && segment.payload.is_empty()
            && self.origin == Origin::Handshake
            && self.svm.syn
            && !self.svm.past_handshake
    }

    /// Drops the held SYN-ACKs the PVM superseded ([`Action::Discard`]) and forgets their
    /// sequence numbers: the next SYN-ACK is the handshake's, compared as the first one was.
    fn discard_held_handshake(&mut self, actions: &mut Vec<Action>) {
        for segment in self.held.drain(..) {
            self.held_bytes -= segment.len;
            actions.push(Action::Discard(segment.id));
        }
        self.pvm_map = None;
        self.pvm_end = None;
    }

    /// A SYN belongs at offset -1 of a connection that began with a handshake; in a shared
    /// (already running) connection only a retransmitted old SYN, below offset 0, is normal.
    /// Anything else is a new connection on the same addresses in one VM only.
    fn syn_is_consistent(&self, start: i64) -> bool {
        match self.origin {
            Origin::Handshake => start == -1,
            Origin::Shared => start < 0,
            Origin::Unknown => false,
        }
    }

    fn start_shared(&mut self, anchor: u32) {
        self.origin = Origin::Shared;
        self.pvm_map = Some(SequenceMap::new(anchor, 0));
        self.svm_map = Some(SequenceMap::new(anchor, 0));
        self.released = ReleasedRanges::new(0);
        self.bytes.clear(0);
        self.pvm_end = Some(0);
    }

    fn stall(&mut self, reason: CheckpointReason, actions: &mut Vec<Action>) {
        if self.stalled {
            return;
        }
        self.stalled = true;
        // Nothing is compared any more: keep only the ids, so memory stays bounded.
        self.bytes.clear(self.released.floor());
        self.held_bytes = 0;
        actions.push(Action::CheckpointNeeded(reason));
    }

    /// Looks for divergence where `change` could have caused one (a difference behind a
    /// waiting segment must not wait for it), then releases what can go, in the PVM's order.
    fn settle(&mut self, change: Change, actions: &mut Vec<Action>) {
        if self.stalled {
            return;
        }
        let diverged = |segment: &HeldSegment| match self.verdict(segment) {
            Verdict::Diverged(reason) => Some(reason),
            _ => None,
        };
        let divergence = match change {
            // Only the SVM's FIN can make a PVM segment diverge here (its bytes were
            // compared as they were stored); without it, a verdict would only say "wait".
            Change::NewestPvmSegment if self.svm.fin.is_none() => None,
            Change::NewestPvmSegment => self.held.back().and_then(diverged),
            Change::SvmSegment => None,
            Change::SvmFin => self.held.iter().find_map(diverged),
        };
        if let Some(reason) = divergence {
            self.stall(reason, actions);
            return;
        }
        while let Some(front) = self.held.front() {
            if self.verdict(front) != Verdict::Ready {
                break;
            }
            let Some(segment) = self.held.pop_front() else {
                break;
            };
            self.held_bytes -= segment.len;
            if let Some(equivalence) = &mut self.equivalence {
                equivalence.released(segment.data_start(), segment.data_end());
            }
            self.released.insert(segment.start, segment.end());
            self.closed |= segment.fin || segment.rst;
            actions.push(self.release_action(&segment));
        }
        self.bytes.forget_below(self.released.floor());
        if let Some(equivalence) = &mut self.equivalence {
            equivalence.forget_below(self.released.floor());
        }
        let buffered = self.buffered_bytes();
        if buffered > self.allowance {
            self.stall(CheckpointReason::MemoryBound { bytes: buffered }, actions);
        }
    }

    /// How a segment that may go is released: as it is, or with its acknowledgement lowered to
    /// the SVM's (see the module documentation), its window widened by as much so that the
    /// window's right edge stays the PVM's.
    fn release_action(&self, segment: &HeldSegment) -> Action {
        let (Some(ack), Some(svm_ack)) = (segment.ack, self.svm.ack) else {
            return Action::Release(segment.id);
        };
        if seq_at_or_after(svm_ack, ack) {
            return Action::Release(segment.id);
        }
        let window = match self.pvm_scale {
            Some(scale) => {
                let edge = ack.wrapping_add(u32::from(segment.window) << scale);
                let widened = edge.wrapping_sub(svm_ack) >> scale;
                u16::try_from(widened).unwrap_or(u16::MAX)
            }
            None => segment.window,
        };
        Action::ReleaseLoweredAck {
            id: segment.id,
            ack: svm_ack,
            window,
        }
    }

    fn verdict(&self, segment: &HeldSegment) -> Verdict {
        let floor = self.released.floor();
        let mut waiting = false;
        if segment.syn && segment.start >= floor && !self.svm.syn {
            waiting = true;
        }
        let data_start = segment.data_start().max(floor);
        let data_end = segment.data_end();
        if data_end > data_start {
            if self.svm.fin.is_some_and(|fin| data_end > fin) {
                return Verdict::Diverged(CheckpointReason::FinDiffers);
            }
            // The bytes were compared as they arrived; a difference stalled the connection.
            if !self.bytes.verified(data_start, data_end)
                || self
                    .equivalence
                    .as_ref()
                    .is_some_and(|e| e.holds_back(data_start, data_end, floor, &self.bytes))
            {
                waiting = true;
            }
        }
        if segment.fin && data_end >= floor {
            match self.svm.fin {
                None => waiting = true,
                Some(fin) if fin == data_end => {}
                Some(_) => return Verdict::Diverged(CheckpointReason::FinDiffers),
            }
        }
        if segment.rst && !self.svm.rst {
            waiting = true;
        }
        if let Some(ack) = segment.ack
            && !self.svm.ack.is_some_and(|svm| seq_at_or_after(svm, ack))
            && (segment.len == 0 || self.svm.ack.is_none())
        {
            // Data goes with the acknowledgement lowered to the SVM's (`release_action`); a
            // segment without data would only repeat an acknowledgement the client has (a
            // duplicate ACK, which counts towards a fast retransmit), so it waits.
            waiting = true;
        }
        if waiting {
            Verdict::Wait
        } else {
            Verdict::Ready
        }
    }
}

#[cfg(test)]
mod tests;
