//! The comparison engine of one VM pair: routes every frame of the PVM's and the SVM's output
//! to the comparator of its flow, applies the bypass rules and the policy for uncompared
//! traffic, and watches the bounds that span flows (total memory, hold time).
//!
//! Time is passed in by the caller (a monotonic clock reading as a [`Duration`]), so the engine
//! stays pure and its tests need no clock.

mod classify;
mod equivalence;
mod policy;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::compare::{
    Action, CheckpointReason, ComparatorLimits, DEFAULT_REORDER_WINDOW, DatagramComparator,
    EquivalentRelease, PacketId, Pattern, StreamComparator,
};
use crate::packet::FlowKey;
use classify::{Class, classify};
pub use equivalence::EquivalenceRule;
pub use policy::{BypassRule, UncomparedPolicy};

/// The engine's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Bounds of each TCP connection's comparison.
    pub per_connection: ComparatorLimits,
    /// Bound of all flows' comparison buffers together.
    pub max_total_buffered_bytes: usize,
    /// How long a PVM packet may wait for its match while the SVM sends nothing at all before
    /// a checkpoint is requested: the SVM has stopped (or lost the packet's cause), and only a
    /// checkpoint releases the packet. While the SVM keeps sending, it is behind but alive, and
    /// the packet waits up to [`Self::max_hold_limit`].
    pub max_hold: Duration,
    /// The longest a PVM packet may wait for its match however busy the SVM is: the last
    /// resort for an SVM that sends other output but never this packet's match.
    pub max_hold_limit: Duration,
    /// The longest a PVM SYN (a SYN-ACK, or the VM's own SYN) may wait for the SVM's however
    /// busy the SVM is; see [`DEFAULT_MAX_HANDSHAKE_HOLD`].
    pub max_handshake_hold: Duration,
    /// How far either side of a datagram flow may run ahead.
    pub reorder_window: usize,
    /// What happens to PVM frames that are not compared.
    pub uncompared: UncomparedPolicy,
    /// Flows released without comparison.
    pub bypass: Vec<BypassRule>,
    /// Bytes known to differ between the VMs without changing the stream's length, released
    /// as the PVM's without a checkpoint (`docs/equivalence.md`); empty by default.
    pub equivalent: Vec<EquivalenceRule>,
    /// Most flows with comparison state (see [`ComparisonEngine`] for what happens at it).
    pub max_flows: usize,
    /// A flow that kept nothing for this long, and whose state is safe to forget, is
    /// forgotten.
    pub flow_idle: Duration,
}

/// The default bound of the flow table: a busy server's connections, at about 1 KiB of state
/// each when nothing is held (see `docs/memory-bounds.md`).
pub const DEFAULT_MAX_FLOWS: usize = 65_536;

/// The default idle time after which a flow with nothing kept is forgotten. Longer than any
/// hold (a flow holding nothing is idle), short enough that idle connections and the
/// answers to a SYN flood leave the table within a checkpoint period or two.
pub const DEFAULT_FLOW_IDLE: Duration = Duration::from_secs(30);

/// The default [`EngineConfig::max_hold_limit`]: a secondary up to this far behind, sending
/// the same bytes, costs the client this latency but no checkpoint (a checkpoint would not
/// make a slower secondary faster; it would pause the primary and leave the secondary behind
/// again a moment later). QEMU's colo-compare waits as long (`compare_timeout`, 3000 ms). On
/// the TCG bed 1 s asked for a checkpoint every 1–2 s at 16 and 64 web clients and cut the
/// requests served to 0.6 and 0.15 of what 3 s serves (`docs/benchmarks.md`).
pub const DEFAULT_MAX_HOLD_LIMIT: Duration = Duration::from_secs(3);

/// The default [`EngineConfig::max_handshake_hold`]. A client retransmits its SYN after 1 s
/// (RFC 6298's initial timeout, Linux's too). A SYN-ACK the SVM does not answer (its listen
/// queue was full and it dropped the SYN) would otherwise wait for the hold limit, the client
/// would send its SYN again meanwhile, and the PVM, if it kept no state for the first (a SYN
/// cookie) or dropped it, answers with another SYN-ACK: the client then acknowledges the first
/// one, released late, and gets a reset. Measured on the bed at 64 web clients: 6–24 resets
/// per 1000 requests before this bound. Half the client's timeout leaves the checkpoint's own
/// pause room.
pub const DEFAULT_MAX_HANDSHAKE_HOLD: Duration = Duration::from_millis(500);

/// The time the expiry hand takes to go round the whole table (when ticks come often
/// enough for [`EXPIRY_STEPS`]), a third of [`EngineConfig::flow_idle`] and this at least:
/// a flow safe to forget and idle for `flow_idle` is forgotten within two rounds more. The
/// hand moves a share of the table at each tick, not the whole table at once (a scan of
/// 65,536 flows stalls the role loop for milliseconds); a step costs about 0.3 µs in a
/// table of 20,000 flows (cache misses), so a round of a second would cost some 300 µs at
/// every 50 ms tick there.
const EXPIRY_ROUND_MIN: Duration = Duration::from_secs(1);

/// Flows the expiry hand passes at most per tick, however long since the last (a tick after
/// a pause catches up over several): about 1.2 ms in a large table. At the default tick
/// (50 ms) and round (10 s) a full default table (65,536 flows) takes some 330 per tick.
const EXPIRY_STEPS: usize = 4096;

/// Released ids [`ComparisonEngine`]'s arrival order may keep beyond twice the held ones
/// before it is compacted.
const ARRIVAL_ORDER_SLACK: usize = 1024;

/// Keys of forgotten flows [`ComparisonEngine`]'s eviction order (and its list of the flows
/// used this epoch) may keep beyond twice the table before it is compacted.
const EVICTION_ORDER_SLACK: usize = 1024;

/// A flow active more recently than this is not evicted to make room: the connections in use
/// keep their state (and their packets flow) while a flood of new ones waits for the
/// checkpoint that a full table asks for.
const EVICT_MIN_IDLE: Duration = Duration::from_secs(1);

/// Flows the eviction hand passes over at most to make room for one new flow: about 100 µs.
const EVICTION_STEPS: usize = 512;

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            per_connection: ComparatorLimits::default(),
            max_total_buffered_bytes: 64 * 1024 * 1024,
            // The COLO paper's bound on unmatched output, now for an SVM that went silent.
            max_hold: Duration::from_millis(200),
            max_hold_limit: DEFAULT_MAX_HOLD_LIMIT,
            max_handshake_hold: DEFAULT_MAX_HANDSHAKE_HOLD,
            reorder_window: DEFAULT_REORDER_WINDOW,
            uncompared: UncomparedPolicy::default(),
            bypass: Vec::new(),
            equivalent: Vec::new(),
            max_flows: DEFAULT_MAX_FLOWS,
            flow_idle: DEFAULT_FLOW_IDLE,
        }
    }
}

// The flow table stores comparators in place: nearly every flow of a VM's output is TCP, so
// boxing the large variant would cost an allocation per connection and a pointer chase per
// packet to save memory on the few datagram flows.
#[expect(
    clippy::large_enum_variant,
    reason = "stream comparators dominate the flow table; see above"
)]
#[derive(Debug)]
enum FlowComparator {
    Stream(StreamComparator),
    Datagram(DatagramComparator),
}

impl FlowComparator {
    fn is_forgettable(&self) -> bool {
        match self {
            FlowComparator::Stream(c) => c.is_forgettable(),
            FlowComparator::Datagram(c) => c.is_forgettable(),
        }
    }

    /// See [`StreamComparator::is_quiet`]; a datagram flow has no sequence numbers, so it is
    /// quiet when it is forgettable.
    fn is_quiet(&self) -> bool {
        match self {
            FlowComparator::Stream(c) => c.is_quiet(),
            FlowComparator::Datagram(c) => c.is_forgettable(),
        }
    }

    fn buffered_bytes(&self) -> usize {
        match self {
            FlowComparator::Stream(c) => c.buffered_bytes(),
            FlowComparator::Datagram(c) => c.buffered_bytes(),
        }
    }
}

/// Names the connection whose comparison asked for a checkpoint, and which VM's packet made
/// it ask: the daemon's own line gives the reason but not the connection, and finding which
/// connection diverges (a header that differs, a handshake the guests answered differently)
/// is the first step in tuning (`docs/proxyd-link.md`). A comparator asks once and then only
/// holds until the checkpoint, so this logs once per comparator and epoch (a connection, or
/// a new one on the same ports).
fn log_connection_checkpoints(key: &FlowKey, packet_from: &'static str, produced: &[Action]) {
    for action in produced {
        if let Action::CheckpointNeeded(reason) = action {
            tracing::info!(connection = %key, packet_from, ?reason, "a connection's comparison asks for a checkpoint");
        }
    }
}

/// A flow's comparator, when it was created and when either VM last sent on it.
#[derive(Debug)]
struct Flow {
    comparator: FlowComparator,
    /// An entry of [`ComparisonEngine::eviction_order`] older than this is a forgotten
    /// flow's of the same key.
    created: Duration,
    last_active: Duration,
    /// Used since the last checkpoint: its key is in [`ComparisonEngine::epoch_flows`].
    in_epoch: bool,
}

/// Hashes packet ids for the tables of held packets (arrival times here, frames in the
/// primary's gate). The ids are chosen by the daemon, not by the network, so a keyed
/// (flooding-resistant) hash buys nothing there, and these tables are touched twice for every
/// PVM packet; a folded multiply spreads sequential ids well.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PacketIdHasher(u64);

impl PacketIdHasher {
    const MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;

    fn mix(&mut self, word: u64) {
        let product = u128::from(self.0 ^ word) * u128::from(Self::MULTIPLIER);
        // Truncation is the point: the folded halves of the product.
        self.0 = (product as u64) ^ ((product >> 64) as u64);
    }
}

impl Hasher for PacketIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.mix(n);
    }
}

/// Counters for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EngineCounters {
    /// PVM payload bytes released uncompared because of a bypass rule.
    pub bypassed_bytes: u64,
    /// PVM frames that no comparator reads (handled by [`UncomparedPolicy`]).
    pub uncompared_frames: u64,
    /// Flows forgotten after [`EngineConfig::flow_idle`] with nothing kept.
    pub flows_expired: u64,
    /// Flows with nothing kept forgotten early to make room for new ones.
    pub flows_evicted: u64,
    /// Quiet flows whose VMs use different sequence numbers (connections opened this epoch,
    /// half-open handshakes of a SYN flood) forgotten to make room when no flow was safe to
    /// forget; until the next checkpoint a new flow must then begin with a SYN.
    pub flows_evicted_unaligned: u64,
    /// PVM packets of new flows held uncompared (until the checkpoint) because the flow table
    /// was full and the eviction hand found no flow to forget.
    pub flow_table_full_packets: u64,
    /// PVM segments released with their acknowledgement lowered to the SVM's
    /// ([`Action::ReleaseLoweredAck`]).
    pub lowered_acks: u64,
    /// PVM SYN-ACKs dropped unsent because the PVM replaced them with another handshake
    /// ([`Action::Discard`]).
    pub superseded_syn_acks: u64,
}

/// What was released under one equivalence rule: PVM segments whose bytes differed from the
/// SVM's only where the rule allows, and the bytes of those differing values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EquivalentCount {
    /// PVM segments released with a tolerated difference.
    pub segments: u64,
    /// Bytes of the differing values released.
    pub bytes: u64,
}

/// The equivalence rules' patterns that apply to the connection `key`, with the rules' ids.
fn patterns_for(rules: &[EquivalenceRule], key: &FlowKey) -> Arc<[(usize, Arc<Pattern>)]> {
    rules
        .iter()
        .enumerate()
        .filter(|(_, rule)| rule.matches(key))
        .map(|(i, rule)| (i, rule.pattern().clone()))
        .collect()
}

/// A comparator for a new connection `key`, with the equivalence rules that cover it.
fn new_stream(
    limits: ComparatorLimits,
    rules: Option<&[EquivalenceRule]>,
    key: &FlowKey,
) -> StreamComparator {
    match rules {
        Some(rules) => StreamComparator::with_equivalence(limits, patterns_for(rules, key)),
        None => StreamComparator::new(limits),
    }
}

/// Compares a VM pair's output flow by flow.
///
/// The flow table is bounded ([`EngineConfig::max_flows`]). A flow whose state is safe to
/// forget (nothing held or kept, both VMs on the same sequence numbers: see
/// [`StreamComparator::is_forgettable`]) is forgotten once idle for
/// [`EngineConfig::flow_idle`], and earlier, about the longest idle first, when a new flow
/// needs room.
/// When none is, a quiet flow whose VMs use different sequence numbers is forgotten instead
/// (a SYN flood's half-open handshakes), and until the next checkpoint a new flow must begin
/// with a SYN: a segment met mid-stream might belong to such a flow, whose SVM bytes would be
/// misplaced. When no flow can be forgotten at all, or a new flow does not begin with a SYN
/// after such an eviction, the new flow's PVM packets are held uncompared and a checkpoint is
/// asked for ([`CheckpointReason::FlowTableFull`]); after it every flow is forgettable
/// again. Nothing is dropped or released uncompared.
#[derive(Debug)]
pub struct ComparisonEngine {
    config: EngineConfig,
    /// Flows inline (384 bytes a slot with the key), in an index sized for
    /// [`EngineConfig::max_flows`] when the first flow comes: a doubling index moved every
    /// flow into a fresh allocation, a stall of milliseconds on one packet, and boxing the
    /// flows cost 0.3 µs per frame (docs/memory-bounds.md).
    flows: HashMap<FlowKey, Flow>,
    /// The latest time the caller gave (SVM packets come without one).
    now: Duration,
    /// When the expiry hand last moved.
    expiry_moved: Duration,
    /// The entries of [`Self::eviction_order`] when the expiry hand's round began, those
    /// the round has yet to pass, and those of them due by now that [`EXPIRY_STEPS`] left
    /// to the next ticks.
    expiry_round: usize,
    expiry_round_left: usize,
    expiry_due: usize,
    /// Set once a full table found nothing to forget: no scan until the checkpoint.
    table_full: bool,
    /// The flows' keys in the order the flows came, each one the eviction hand passed over
    /// moved to the back with the time it passed, each one the expiry hand passed moved to
    /// the back with its time unchanged; with keys of flows forgotten since, dropped by the
    /// hands that meet them (see [`Self::make_room`], [`Self::expire_idle`]).
    eviction_order: VecDeque<(FlowKey, Duration)>,
    /// The keys of the flows used since the last checkpoint, the only ones its reset visits
    /// (a flow idle since is in its reset state already; a scan of the whole table made each
    /// checkpoint's pause 4.3 ms longer at 65,000 idle connections); with keys of flows
    /// forgotten since, and compacted like [`Self::eviction_order`].
    epoch_flows: Vec<FlowKey>,
    /// Set once a flow whose VMs use different sequence numbers was forgotten this epoch: a
    /// segment of an unknown connection that is not a SYN may be one of it, and meeting it
    /// mid-stream would misplace the SVM's bytes, so such segments wait for the checkpoint.
    unaligned_evicted: bool,
    /// When each held PVM packet arrived.
    arrivals: HashMap<PacketId, Duration, BuildHasherDefault<PacketIdHasher>>,
    /// The held PVM packets in the order they arrived, with some released ones among them
    /// (taken off the front lazily, compacted when they outnumber the held ones): the hold
    /// check finds the oldest held packet without walking every flow, which under a flood
    /// of connections stalled the role loop for a scan of the whole table at every tick.
    arrival_order: VecDeque<PacketId>,
    /// The held PVM packets that carry a SYN, oldest (lowest id) first: bounded by the held
    /// packets.
    held_syns: BTreeSet<PacketId>,
    /// PVM packets held outside any comparator (policy or engine-wide bound).
    held_uncompared: Vec<PacketId>,
    total_buffered: usize,
    /// When the SVM last sent a TCP segment or datagram the comparison took (the engine's
    /// clock when it arrived): the SVM's sign of life for [`EngineConfig::max_hold`].
    svm_last_output: Duration,
    /// Set when the engine-wide memory bound was reached: nothing is compared until reset.
    stalled: bool,
    timeout_requested: bool,
    flow_table_full_requested: bool,
    counters: EngineCounters,
    /// The equivalence rules (`None` when there are none), shared with each new flow.
    rules: Option<Arc<[EquivalenceRule]>>,
    /// Per rule, what was released under it.
    equivalent: Vec<EquivalentCount>,
    /// What the last packet's comparator released under the rules, reused.
    drained: Vec<EquivalentRelease>,
    /// The actions of the packet being handled, reused so a packet costs no allocation.
    produced: Vec<Action>,
}

impl ComparisonEngine {
    /// An engine with no flows.
    pub fn new(config: EngineConfig) -> Self {
        let rules = (!config.equivalent.is_empty()).then(|| config.equivalent.clone().into());
        let equivalent = vec![EquivalentCount::default(); config.equivalent.len()];
        ComparisonEngine {
            rules,
            equivalent,
            drained: Vec::new(),
            config,
            flows: HashMap::new(),
            now: Duration::ZERO,
            expiry_moved: Duration::ZERO,
            expiry_round: 0,
            expiry_round_left: 0,
            expiry_due: 0,
            table_full: false,
            unaligned_evicted: false,
            arrivals: HashMap::default(),
            arrival_order: VecDeque::new(),
            eviction_order: VecDeque::new(),
            epoch_flows: Vec::new(),
            held_syns: BTreeSet::new(),
            held_uncompared: Vec::new(),
            total_buffered: 0,
            svm_last_output: Duration::ZERO,
            stalled: false,
            timeout_requested: false,
            flow_table_full_requested: false,
            counters: EngineCounters::default(),
            produced: Vec::new(),
        }
    }

    /// PVM packets held right now.
    pub fn held_packets(&self) -> usize {
        self.arrivals.len()
    }

    /// Bytes all comparators keep right now.
    pub fn buffered_bytes(&self) -> usize {
        self.total_buffered
    }

    /// Flows known right now.
    pub fn flows(&self) -> usize {
        self.flows.len()
    }

    /// The counters since the engine was created.
    pub fn counters(&self) -> EngineCounters {
        self.counters
    }

    /// What was released under each of [`EngineConfig::equivalent`]'s rules (in their
    /// order) since the engine was created.
    pub fn equivalent_counters(&self) -> &[EquivalentCount] {
        &self.equivalent
    }

    /// The PVM sent this Ethernet frame (packet `id`, arrived at `now`). Every packet ends in
    /// an [`Action::Release`] or in the list [`Self::reset`] returns, exactly once. The
    /// comparison keeps references into `ethernet` (the caller holds the packet until then
    /// anyway) rather than copies of its payload.
    pub fn push_pvm(
        &mut self,
        id: PacketId,
        ethernet: &Bytes,
        now: Duration,
        actions: &mut Vec<Action>,
    ) {
        let class = classify(ethernet);
        let key = match &class {
            Class::Stream(key, _) | Class::Datagram(key, _) => Some(*key),
            Class::Uncompared => None,
        };
        if let Some(key) = key
            && self.config.bypass.iter().any(|rule| rule.matches(&key))
        {
            self.counters.bypassed_bytes += ethernet.len() as u64;
            actions.push(Action::Release(id));
            return;
        }
        self.now = self.now.max(now);
        self.arrivals.insert(id, now);
        self.arrival_order.push_back(id);
        if self.arrival_order.len() > 2 * self.arrivals.len() + ARRIVAL_ORDER_SLACK {
            let arrivals = &self.arrivals;
            self.arrival_order.retain(|id| arrivals.contains_key(id));
        }
        if self.stalled {
            self.held_uncompared.push(id);
            return;
        }
        let mut produced = std::mem::take(&mut self.produced);
        match class {
            Class::Uncompared => {
                self.counters.uncompared_frames += 1;
                match self.config.uncompared {
                    UncomparedPolicy::ReleasePrimary => produced.push(Action::Release(id)),
                    UncomparedPolicy::HoldUntilCheckpoint => self.held_uncompared.push(id),
                }
            }
            Class::Stream(key, segment) => {
                let limits = self.config.per_connection;
                let headroom = self.headroom();
                let mut misrouted = false;
                let rules = self.rules.clone();
                let rules = rules.as_deref();
                let create = || FlowComparator::Stream(new_stream(limits, rules, &key));
                if segment.syn {
                    // Until it is released (`emit`) or handed back (`reset`).
                    self.held_syns.insert(id);
                }
                let before = produced.len();
                let admitted = self.with_flow(key, segment.syn, create, |flow| {
                    match stream_flow(flow, limits, rules, &key, segment.syn) {
                        Some(comparator) => {
                            comparator.allow(headroom);
                            comparator.push_pvm(id, &segment, ethernet, &mut produced)
                        }
                        None => misrouted = true,
                    }
                });
                log_connection_checkpoints(&key, "pvm", &produced[before..]);
                if !admitted {
                    self.refuse_flow(&mut produced);
                }
                if misrouted || !admitted {
                    self.held_uncompared.push(id);
                }
            }
            Class::Datagram(key, bytes) => {
                let window = self.config.reorder_window;
                let mut misrouted = false;
                let create = || FlowComparator::Datagram(DatagramComparator::new(window));
                let before = produced.len();
                let admitted =
                    self.with_flow(key, true, create, |flow| match datagram_flow(flow) {
                        Some(comparator) => comparator.push_pvm(id, &bytes, &mut produced),
                        None => misrouted = true,
                    });
                log_connection_checkpoints(&key, "pvm", &produced[before..]);
                if !admitted {
                    self.refuse_flow(&mut produced);
                }
                if misrouted || !admitted {
                    self.held_uncompared.push(id);
                }
            }
        }
        self.emit(produced, actions);
    }

    /// The SVM sent this Ethernet frame. SVM frames are never forwarded.
    pub fn push_svm(&mut self, ethernet: &[u8], actions: &mut Vec<Action>) {
        if self.stalled {
            return;
        }
        let mut produced = std::mem::take(&mut self.produced);
        match classify(ethernet) {
            Class::Uncompared => return,
            Class::Stream(key, segment) => {
                if self.is_bypassed(&key) {
                    return;
                }
                self.svm_last_output = self.now;
                let limits = self.config.per_connection;
                let headroom = self.headroom();
                let rules = self.rules.clone();
                let rules = rules.as_deref();
                let create = || FlowComparator::Stream(new_stream(limits, rules, &key));
                let before = produced.len();
                let admitted = self.with_flow(key, segment.syn, create, |flow| {
                    if let Some(comparator) = stream_flow(flow, limits, rules, &key, segment.syn) {
                        comparator.allow(headroom);
                        comparator.push_svm(&segment, &mut produced);
                    }
                });
                log_connection_checkpoints(&key, "svm", &produced[before..]);
                if !admitted {
                    // Not kept: the PVM's packets of this flow wait for the checkpoint.
                    self.refuse_flow(&mut produced);
                }
            }
            Class::Datagram(key, bytes) => {
                if self.is_bypassed(&key) {
                    return;
                }
                self.svm_last_output = self.now;
                let window = self.config.reorder_window;
                let create = || FlowComparator::Datagram(DatagramComparator::new(window));
                let before = produced.len();
                let admitted = self.with_flow(key, true, create, |flow| {
                    if let Some(comparator) = datagram_flow(flow) {
                        comparator.push_svm(&bytes, &mut produced);
                    }
                });
                log_connection_checkpoints(&key, "svm", &produced[before..]);
                if !admitted {
                    self.refuse_flow(&mut produced);
                }
            }
        }
        self.emit(produced, actions);
    }

    /// Asks for a checkpoint (once per epoch) if a PVM packet has waited longer than
    /// `max_hold` at `now` while the SVM sent nothing for `max_hold` either (it stopped), or
    /// longer than `max_hold_limit` in any case. Call it from the daemon's timer.
    /// Also forgets idle flows (the expiry hand goes round the table once per
    /// `flow_idle / 3`, 1 s at least, a share at each call).
    pub fn check_hold_time(&mut self, now: Duration, actions: &mut Vec<Action>) {
        self.now = self.now.max(now);
        self.expire_idle();
        if self.timeout_requested {
            return;
        }
        let oldest = self.oldest_arrival();
        let svm_silent = now.saturating_sub(self.svm_last_output) > self.config.max_hold;
        let Some(waited) = oldest.map(|arrived| now.saturating_sub(arrived)) else {
            return;
        };
        let handshake_waited = self
            .held_syns
            .first()
            .and_then(|id| self.arrivals.get(id))
            .map(|arrived| now.saturating_sub(*arrived));
        let reason = if waited > self.config.max_hold && svm_silent {
            CheckpointReason::HoldTimeout
        } else if handshake_waited.is_some_and(|w| w > self.config.max_handshake_hold) {
            CheckpointReason::HandshakeHold
        } else if waited > self.config.max_hold_limit {
            CheckpointReason::HoldLimit
        } else {
            return;
        };
        self.timeout_requested = true;
        actions.push(Action::CheckpointNeeded(reason));
    }

    /// A checkpoint was adopted: returns every held PVM packet (in ascending id order) for
    /// the caller to release and restarts the comparison of every flow used since the last
    /// checkpoint (the others hold nothing and are in their reset state).
    pub fn reset(&mut self) -> Vec<PacketId> {
        let mut held: Vec<PacketId> = std::mem::take(&mut self.held_uncompared);
        // Datagram flows keep no state worth keeping across a checkpoint, nor do finished
        // connections.
        // The natural moment to prune: every kept connection now shares the PVM's sequence
        // numbers, so every idle one is safe to forget (those idle all epoch are left to the
        // expiry hand).
        let (now, idle) = (self.now, self.config.flow_idle);
        let mut expired = 0;
        for key in self.epoch_flows.drain(..) {
            let Some(flow) = self.flows.get_mut(&key) else {
                continue;
            };
            if !flow.in_epoch {
                // A key met twice (a flow forgotten and opened again this epoch).
                continue;
            }
            flow.in_epoch = false;
            let keep = match &mut flow.comparator {
                FlowComparator::Stream(c) => {
                    let finished = c.is_finished();
                    held.extend(c.reset());
                    let keep = !finished && now.saturating_sub(flow.last_active) < idle;
                    expired += u64::from(!keep && !finished);
                    keep
                }
                FlowComparator::Datagram(c) => {
                    held.extend(c.reset());
                    false
                }
            };
            if !keep {
                self.flows.remove(&key);
            }
        }
        self.counters.flows_expired += expired;
        held.sort_unstable();
        self.arrivals.clear();
        self.arrival_order.clear();
        self.held_syns.clear();
        self.total_buffered = 0;
        self.stalled = false;
        self.timeout_requested = false;
        self.table_full = false;
        self.unaligned_evicted = false;
        self.flow_table_full_requested = false;
        held
    }

    /// Forgets every flow, after a [`Self::reset`] (none holds anything then): the comparison
    /// stops (a failover), and the table's memory is returned rather than kept while no
    /// packet comes to use or expire it.
    pub fn forget_flows(&mut self) {
        self.flows = HashMap::new();
        self.eviction_order = VecDeque::new();
        self.epoch_flows = Vec::new();
        self.expiry_round = 0;
        self.expiry_round_left = 0;
        self.expiry_due = 0;
    }

    /// Forgets the flows idle for [`EngineConfig::flow_idle`] that are safe to forget: moves
    /// the hand of [`Self::eviction_order`] over the share of a round due since the hand
    /// last moved (a round passes the entries the order had when it began, in
    /// [`Self::expiry_round`], [`EXPIRY_STEPS`] at most per call), dropping the keys of forgotten
    /// flows on the way. A flow is passed
    /// within two rounds (the eviction hand may move it back meanwhile). The flows it passes
    /// keep the time the eviction hand passed them: expiry gives no second chance.
    fn expire_idle(&mut self) {
        let (now, idle) = (self.now, self.config.flow_idle);
        let elapsed = now.saturating_sub(self.expiry_moved);
        if elapsed.is_zero() {
            return;
        }
        self.expiry_moved = now;
        if self.expiry_round_left == 0 {
            self.expiry_round = self.eviction_order.len();
            self.expiry_round_left = self.expiry_round;
        }
        let share = elapsed.as_secs_f64() / self.expiry_round().as_secs_f64();
        let due = (self.expiry_round as f64 * share).ceil() as usize;
        self.expiry_due = self
            .expiry_due
            .saturating_add(due)
            .min(self.expiry_round_left);
        let steps = self.expiry_due.min(EXPIRY_STEPS);
        self.expiry_due -= steps;
        self.expiry_round_left -= steps;
        for _ in 0..steps {
            let Some((key, passed)) = self.eviction_order.pop_front() else {
                break;
            };
            let Some(flow) = self.live_flow(&key, passed) else {
                continue;
            };
            if now.saturating_sub(flow.last_active) >= idle && flow.comparator.is_forgettable() {
                self.flows.remove(&key);
                self.counters.flows_expired += 1;
                continue;
            }
            self.eviction_order.push_back((key, passed));
        }
    }

    /// The time the expiry hand takes to go round the table.
    fn expiry_round(&self) -> Duration {
        (self.config.flow_idle / 3).max(EXPIRY_ROUND_MIN)
    }

    /// The flow of an entry of [`Self::eviction_order`], if the entry is not a forgotten
    /// flow's (the flow is gone, or the key's flow now is a newer one).
    fn live_flow(&self, key: &FlowKey, passed: Duration) -> Option<&Flow> {
        self.flows.get(key).filter(|flow| passed >= flow.created)
    }

    /// The table is full: forgets a flow idle for [`EVICT_MIN_IDLE`], found by a clock hand
    /// going round [`Self::eviction_order`] (the order the flows came), passing over
    /// [`EVICTION_STEPS`] flows at most per new flow (one round of a smaller table; the keys
    /// of forgotten flows it drops on the way are not counted). A flow used since the hand last
    /// passed it gets a second chance, so the flows forgotten are nearly the longest idle, at
    /// a bounded cost: two whole rounds, walked whenever a flood had filled the table,
    /// stalled the role loop for 0.9–1.6 ms at 4,096 flows. The first flow safe to forget and
    /// not used since goes; when the steps met none, the longest idle of the flows safe to
    /// forget they met goes after all (its second chance spent), else the quiet flows they
    /// met whose VMs use different sequence numbers (a SYN flood's half-open handshakes,
    /// connections opened this epoch), an eighth of the table at most, and until the
    /// checkpoint a new flow must begin with a SYN ([`Self::unaligned_evicted`]): a flood
    /// then costs its own half-open entries, not a checkpoint wait for every new client.
    /// When the steps met no flow idle enough that is safe to forget or quiet, the table
    /// counts as full until the checkpoint, though such flows may wait further along the
    /// hand: a table of busy flows may so ask for a checkpoint early. Returns whether there
    /// is room now.
    fn make_room(&mut self) -> bool {
        if self.table_full {
            return false;
        }
        let now = self.now;
        let idle_enough = |flow: &Flow| now.saturating_sub(flow.last_active) >= EVICT_MIN_IDLE;
        let batch = (self.config.max_flows / 8).max(1);
        // The longest idle flow safe to forget that had a second chance coming.
        let mut second_chance_spent: Option<(FlowKey, Duration)> = None;
        let mut quiet: Vec<FlowKey> = Vec::new();
        let mut steps = EVICTION_STEPS.min(self.flows.len());
        while steps > 0 {
            let Some((key, passed)) = self.eviction_order.pop_front() else {
                break;
            };
            let Some(flow) = self.live_flow(&key, passed) else {
                // Not a step: each forgotten flow's key is dropped once, here or by the expiry
                // hand, a cheap lookup that costs less than forgetting the flow did.
                continue;
            };
            steps -= 1;
            if idle_enough(flow) {
                if flow.comparator.is_forgettable() {
                    if flow.last_active <= passed {
                        // Its key is out of the order already.
                        self.flows.remove(&key);
                        self.counters.flows_evicted += 1;
                        return true;
                    }
                    if second_chance_spent.is_none_or(|(_, last)| flow.last_active < last) {
                        second_chance_spent = Some((key, flow.last_active));
                    }
                } else if quiet.len() < batch && flow.comparator.is_quiet() {
                    quiet.push(key);
                }
            }
            self.eviction_order.push_back((key, now));
        }
        if let Some((key, _)) = second_chance_spent {
            // Its key stays in the order, left behind.
            self.flows.remove(&key);
            self.counters.flows_evicted += 1;
            return true;
        }
        // A key met twice (a forgotten flow's of the same time) is removed once.
        let evicted = quiet
            .iter()
            .filter(|key| self.flows.remove(key).is_some())
            .count();
        if evicted == 0 {
            self.table_full = true;
            return false;
        }
        self.unaligned_evicted = true;
        self.counters.flows_evicted_unaligned += evicted as u64;
        self.flows.len() < self.config.max_flows
    }

    /// Adds a new flow's key to [`Self::eviction_order`], compacted first (the keys of
    /// forgotten flows and repeated keys dropped) when it grew past twice the table. Called
    /// before the flow is in the table: an entry of its key there is a forgotten flow's.
    fn note_new_flow(&mut self, key: FlowKey) {
        if self.eviction_order.len() > 2 * self.flows.len() + EVICTION_ORDER_SLACK {
            let flows = &self.flows;
            let mut seen = HashSet::with_capacity(flows.len());
            self.eviction_order.retain(|(k, passed)| {
                flows.get(k).is_some_and(|flow| *passed >= flow.created) && seen.insert(*k)
            });
        }
        self.eviction_order.push_back((key, self.now));
    }

    /// A packet's new flow found no room: asks for the checkpoint that makes room (once per
    /// epoch).
    fn refuse_flow(&mut self, produced: &mut Vec<Action>) {
        self.counters.flow_table_full_packets += 1;
        if !self.flow_table_full_requested {
            self.flow_table_full_requested = true;
            produced.push(Action::CheckpointNeeded(CheckpointReason::FlowTableFull {
                flows: self.flows.len(),
            }));
        }
    }

    fn is_bypassed(&self, key: &FlowKey) -> bool {
        self.config.bypass.iter().any(|rule| rule.matches(key))
    }

    /// Runs `f` on the flow's comparator, created by `create` for a new flow, and keeps the
    /// total of buffered bytes. The comparator is used in place: one hash, no move. Returns
    /// `false`, without running `f`, when a new flow finds the table full, or (after an
    /// unaligned eviction this epoch) when a new flow's first segment is not a SYN
    /// (`begins_connection`; datagram flows always may begin).
    fn with_flow(
        &mut self,
        key: FlowKey,
        begins_connection: bool,
        create: impl FnOnce() -> FlowComparator,
        f: impl FnOnce(&mut FlowComparator),
    ) -> bool {
        if !self.flows.contains_key(&key) {
            if self.unaligned_evicted && !begins_connection {
                // Perhaps a connection forgotten with other sequence numbers in the SVM.
                return false;
            }
            if self.flows.len() >= self.config.max_flows && !self.make_room() {
                return false;
            }
            if self.flows.capacity() == 0 {
                // Sized for the bound at once, so that the index never grows (each growth
                // moves every flow, milliseconds on one packet); an allocator that refuses
                // (a huge `--max-flows`) leaves the index to grow as it fills.
                let _ = self.flows.try_reserve(self.config.max_flows);
            }
            self.note_new_flow(key);
        }
        let now = self.now;
        let flow = self.flows.entry(key).or_insert_with(|| Flow {
            comparator: create(),
            created: now,
            last_active: now,
            in_epoch: false,
        });
        flow.last_active = now;
        let first_use_in_epoch = !flow.in_epoch;
        flow.in_epoch = true;
        let before = flow.comparator.buffered_bytes();
        f(&mut flow.comparator);
        let after = flow.comparator.buffered_bytes();
        if let FlowComparator::Stream(c) = &mut flow.comparator {
            c.drain_equivalent(&mut self.drained);
        }
        self.total_buffered = self.total_buffered.saturating_sub(before) + after;
        for release in self.drained.drain(..) {
            if let Some(count) = self.equivalent.get_mut(release.rule) {
                count.segments += release.segments;
                count.bytes += release.bytes;
            }
            tracing::debug!(
                flow = ?key,
                rule = release.rule,
                segments = release.segments,
                bytes = release.bytes,
                "released as equivalent",
            );
        }
        if first_use_in_epoch {
            self.note_used_in_epoch(key);
        }
        true
    }

    /// Adds a flow's key to [`Self::epoch_flows`], compacted first (the keys of forgotten
    /// flows and repeated keys dropped) when it grew past twice the table.
    fn note_used_in_epoch(&mut self, key: FlowKey) {
        if self.epoch_flows.len() > 2 * self.flows.len() + EVICTION_ORDER_SLACK {
            let flows = &self.flows;
            let mut seen = HashSet::with_capacity(flows.len());
            self.epoch_flows.retain(|k| {
                *k != key && flows.get(k).is_some_and(|flow| flow.in_epoch) && seen.insert(*k)
            });
        }
        self.epoch_flows.push(key);
    }

    /// When the oldest PVM packet still held arrived (the caller's clock never goes back, so
    /// the first in arrival order is the oldest).
    fn oldest_arrival(&mut self) -> Option<Duration> {
        while let Some(id) = self.arrival_order.front() {
            if let Some(arrived) = self.arrivals.get(id) {
                return Some(*arrived);
            }
            self.arrival_order.pop_front();
        }
        None
    }

    /// How far a connection may grow beyond what it keeps now: the free part of the total
    /// budget. A bulk transfer that runs ahead of a lagging SVM may so use what the other
    /// connections leave free, instead of stopping at its own bound
    /// ([`ComparatorLimits::max_buffered_bytes`], which it keeps as a floor).
    fn headroom(&self) -> usize {
        self.config
            .max_total_buffered_bytes
            .saturating_sub(self.total_buffered)
    }

    fn emit(&mut self, mut produced: Vec<Action>, actions: &mut Vec<Action>) {
        for action in &produced {
            if let Some(id) = action.settled() {
                self.arrivals.remove(&id);
                self.held_syns.remove(&id);
            }
            match action {
                Action::ReleaseLoweredAck { .. } => self.counters.lowered_acks += 1,
                Action::Discard(_) => self.counters.superseded_syn_acks += 1,
                _ => {}
            }
        }
        actions.append(&mut produced);
        self.produced = produced;
        if !self.stalled && self.total_buffered > self.config.max_total_buffered_bytes {
            self.stalled = true;
            actions.push(Action::CheckpointNeeded(
                CheckpointReason::TotalMemoryBound {
                    bytes: self.total_buffered,
                },
            ));
        }
    }
}

// The flow key contains the IP protocol, so a TCP key never names a datagram flow or the
// reverse; the `None` arms exist so that even a broken invariant holds a packet instead of
// losing it or panicking.

fn stream_flow<'a>(
    flow: &'a mut FlowComparator,
    limits: ComparatorLimits,
    rules: Option<&[EquivalenceRule]>,
    key: &FlowKey,
    syn: bool,
) -> Option<&'a mut StreamComparator> {
    // A SYN on a finished connection's addresses opens a new connection (port reuse).
    if syn && matches!(flow, FlowComparator::Stream(c) if c.is_finished()) {
        *flow = FlowComparator::Stream(new_stream(limits, rules, key));
    }
    match flow {
        FlowComparator::Stream(c) => Some(c),
        FlowComparator::Datagram(_) => None,
    }
}

fn datagram_flow(flow: &mut FlowComparator) -> Option<&mut DatagramComparator> {
    match flow {
        FlowComparator::Datagram(c) => Some(c),
        FlowComparator::Stream(_) => None,
    }
}

#[cfg(test)]
mod tests;
