//! Prometheus metrics: prometheus-client counters, gauges and one histogram that the role loops
//! update, every family registered once in the registry that colo-daemon's `/metrics` responder
//! serves (`--metrics ADDR`; the Prometheus text format, version 0.0.4). Within a labelled family
//! the order of the series is not fixed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use colo_daemon::metrics::{Gauge, MetricsRegistry};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::daemon::gate::ReleaseGate;
use crate::daemon::svm_path::{BridgeCounts, SvmPath};

/// Upper bounds of the hold-time histogram's buckets, in seconds.
const HOLD_BUCKETS: [f64; 12] = [
    0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0,
];

/// Every metric of one daemon. Cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RoleLabel {
    role: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PortLabel {
    port: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PortReasonLabel {
    port: String,
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ChardevLabel {
    chardev: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FilterLabel {
    filter: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RuleLabel {
    rule: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

/// The label set of a family with at most one, unlabelled series: one that is not shown
/// until it has a value.
type NoLabels = [(&'static str, &'static str); 0];

/// One direction of the secondary's network bridge: all frames, and those shifted.
#[derive(Debug)]
struct Bridged {
    frames: Counter,
    rewritten: Counter,
}

#[derive(Debug)]
struct Inner {
    /// Port name → connected.
    connections: Family<PortLabel, Gauge>,
    /// QEMU chardev id → it has a peer (the fail-open check).
    chardevs: Family<ChardevLabel, Gauge>,
    /// QEMU filter id → times re-created over QMP.
    filters_recreated: Family<FilterLabel, Counter>,
    /// The guest link as colo-proxyd last set it over QMP (no series: not yet).
    guest_link_up: Family<NoLabels, Gauge>,
    guest_link_downs: Counter,
    compared_bytes: Counter,
    released_packets: Counter,
    released_bytes: Counter,
    uncompared_bytes: Counter,
    bypassed_bytes: Counter,
    lowered_acks: Counter,
    superseded_syn_acks: Counter,
    /// Equivalence rule → PVM segments released with a tolerated difference.
    equivalent_segments: Family<RuleLabel, Counter>,
    /// Equivalence rule → bytes of the differing values released.
    equivalent_bytes: Family<RuleLabel, Counter>,
    svm_frames: Counter,
    stale_svm_frames: Counter,
    dropped_frames: Counter,
    link_errors: Counter,
    link_dead_peers: Counter,
    /// 1 when the link runs without TLS (no `--tls-dir`): anyone who reaches the port can
    /// be the peer.
    link_unauthenticated: Gauge,
    /// Link connections not yet authenticated (TLS, then the hello).
    link_pending: Gauge,
    /// Reason → link connections refused before they could touch the live link.
    link_refused: Family<ReasonLabel, Counter>,
    /// (Port, reason) → connections to a QEMU-facing port refused before a byte was read.
    port_refused: Family<PortReasonLabel, Counter>,
    barriers: Counter,
    /// The secondary's network bridge after a failover (running totals from the role logic).
    out_of_svm: Bridged,
    into_svm: Bridged,
    offset_connections: Gauge,
    flows: Gauge,
    epoch: Gauge,
    comparing: Gauge,
    held_packets: Gauge,
    held_bytes: Gauge,
    /// Reason → count (what the comparison asked for).
    checkpoints_needed: Family<ReasonLabel, Counter>,
    /// Reason → count (requests actually sent to QEMU).
    checkpoints_requested: Family<ReasonLabel, Counter>,
    /// Requests sent to QEMU, all reasons.
    checkpoints_requested_total: AtomicU64,
    /// Seconds from a PVM packet's arrival to its release, over [`HOLD_BUCKETS`].
    hold: Histogram,
    /// The bounded tables and queues (`docs/memory-bounds.md`).
    bounds: Bounds,
    /// Every family above, registered.
    exposition: Arc<MetricsRegistry>,
}

impl Inner {
    fn new(role: &'static str) -> Inner {
        let info = Family::<RoleLabel, Gauge>::default();
        info.get_or_create(&RoleLabel { role }).set(1);
        let direction = |direction| DirectionLabel { direction };
        let bridged_frames = Family::<DirectionLabel, Counter>::default();
        let bridged_rewritten = Family::<DirectionLabel, Counter>::default();
        let bridged = |d| Bridged {
            frames: bridged_frames.get_or_create_owned(&direction(d)),
            rewritten: bridged_rewritten.get_or_create_owned(&direction(d)),
        };
        let inner = Inner {
            connections: Family::default(),
            chardevs: Family::default(),
            filters_recreated: Family::default(),
            guest_link_up: Family::default(),
            guest_link_downs: Counter::default(),
            compared_bytes: Counter::default(),
            released_packets: Counter::default(),
            released_bytes: Counter::default(),
            uncompared_bytes: Counter::default(),
            bypassed_bytes: Counter::default(),
            lowered_acks: Counter::default(),
            superseded_syn_acks: Counter::default(),
            equivalent_segments: Family::default(),
            equivalent_bytes: Family::default(),
            svm_frames: Counter::default(),
            stale_svm_frames: Counter::default(),
            dropped_frames: Counter::default(),
            link_errors: Counter::default(),
            link_dead_peers: Counter::default(),
            link_unauthenticated: Gauge::default(),
            link_pending: Gauge::default(),
            link_refused: Family::default(),
            port_refused: Family::default(),
            barriers: Counter::default(),
            out_of_svm: bridged("out_of_svm"),
            into_svm: bridged("into_svm"),
            offset_connections: Gauge::default(),
            flows: Gauge::default(),
            epoch: Gauge::default(),
            comparing: Gauge::default(),
            held_packets: Gauge::default(),
            held_bytes: Gauge::default(),
            checkpoints_needed: Family::default(),
            checkpoints_requested: Family::default(),
            checkpoints_requested_total: AtomicU64::new(0),
            hold: Histogram::new(HOLD_BUCKETS),
            bounds: Bounds::default(),
            exposition: Arc::default(),
        };

        // Every name gets the prefix `colo_proxyd_`; prometheus-client ends every help text
        // with a full stop and every counter's name with `_total`.
        let mut r = Registry::with_prefix("colo_proxyd");
        r.register("info", "Always 1; the role is a label", info);
        r.register(
            "connection_up",
            "1 when the port or link is connected",
            inner.connections.clone(),
        );
        r.register(
            "qemu_chardev_connected",
            "1 when QEMU's chardev has a peer (0: its redirector fails open)",
            inner.chardevs.clone(),
        );
        r.register(
            "qemu_filters_recreated",
            "QEMU filters re-created over QMP because their input chardev reconnected",
            inner.filters_recreated.clone(),
        );
        r.register(
            "port_refused",
            "Connections to a QEMU-facing port refused before a byte was read: reason uid (the \
             connecting socket's owner is not root, colo-proxyd's uid or a --qemu-uid), \
             unknown-peer (no open socket of this host at its address), lookup-failed (the \
             kernel's socket table could not be read)",
            inner.port_refused.clone(),
        );
        r.register(
            "guest_link_up",
            "The guest's link as colo-proxyd last set it (0: cut off while compare0 is down)",
            inner.guest_link_up.clone(),
        );
        let counters = [
            (
                "guest_link_downs",
                "Times colo-proxyd set the guest's link down because compare0 had no connection while COLO ran",
                &inner.guest_link_downs,
            ),
            (
                "compared_bytes",
                "PVM bytes given to the comparison",
                &inner.compared_bytes,
            ),
            (
                "released_packets",
                "PVM packets released to the network while COLO ran (matched, bypassed, or at a checkpoint)",
                &inner.released_packets,
            ),
            (
                "released_bytes",
                "PVM bytes released to the network while COLO ran",
                &inner.released_bytes,
            ),
            (
                "uncompared_bytes",
                "PVM bytes passed uncompared while COLO did not run (before it, after a failover)",
                &inner.uncompared_bytes,
            ),
            (
                "bypassed_bytes",
                "PVM bytes released uncompared by a bypass rule",
                &inner.bypassed_bytes,
            ),
            (
                "lowered_ack_packets",
                "PVM segments with data released with their TCP acknowledgement lowered to the \
                 SVM's (the SVM had not yet acknowledged as far as the PVM)",
                &inner.lowered_acks,
            ),
            (
                "superseded_syn_ack_packets",
                "PVM SYN-ACKs dropped unsent because the guest answered the client's SYN again \
                 with another initial sequence number before the first was released",
                &inner.superseded_syn_acks,
            ),
            (
                "svm_frames",
                "SVM output frames received",
                &inner.svm_frames,
            ),
            (
                "stale_svm_frames",
                "SVM output frames of an adopted epoch, dropped",
                &inner.stale_svm_frames,
            ),
            (
                "dropped_frames",
                "Frames not delivered because a port or the link was down or full",
                &inner.dropped_frames,
            ),
            (
                "link_errors",
                "Link connections closed for a malformed message or handshake",
                &inner.link_errors,
            ),
            (
                "link_dead_peer",
                "Link connections closed because the peer went silent (no message, or a write \
                 that did not complete, within the link's dead-peer bound)",
                &inner.link_dead_peers,
            ),
            (
                "barriers",
                "Synchronous relay events handled and acknowledged",
                &inner.barriers,
            ),
        ];
        for (name, help, counter) in counters {
            r.register(name, help, counter.clone());
        }
        r.register(
            "failover_bridged_frames",
            "Frames the secondary carried between the SVM and the network after its failover",
            bridged_frames,
        );
        r.register(
            "failover_rewritten_frames",
            "Of those, frames whose sequence (out of the SVM) or acknowledgement (into it) number was shifted",
            bridged_rewritten,
        );
        let gauges = [
            (
                "failover_offset_connections",
                "Connections whose sequence numbers the secondary shifts after its failover (opened by the SVM in the last epoch)",
                &inner.offset_connections,
            ),
            (
                "flows",
                "Flows with comparison state (primary) or connections with rewriting state (secondary)",
                &inner.flows,
            ),
            (
                "epoch",
                "The SVM epoch compared (primary) or tagged (secondary)",
                &inner.epoch,
            ),
            (
                "comparing",
                "1 while COLO runs and output is compared",
                &inner.comparing,
            ),
            (
                "held_packets",
                "PVM packets held for comparison",
                &inner.held_packets,
            ),
            (
                "held_bytes",
                "Bytes of the PVM packets held for comparison",
                &inner.held_bytes,
            ),
            (
                "link_unauthenticated",
                "1 when the inter-host link runs without TLS (no --tls-dir): its peer is not authenticated",
                &inner.link_unauthenticated,
            ),
            (
                "link_pending",
                "Link connections accepted and not yet authenticated (TLS handshake, hello)",
                &inner.link_pending,
            ),
        ];
        for (name, help, gauge) in gauges {
            r.register(name, help, gauge.clone());
        }
        r.register(
            "link_refused",
            "Link connections refused before they could replace the live link (a failed TLS \
             handshake, a bad or missing hello, too many pending), by reason",
            inner.link_refused.clone(),
        );
        r.register(
            "equivalent_segments",
            "PVM segments released although they differed from the SVM's, only where an --equivalent rule allows",
            inner.equivalent_segments.clone(),
        );
        r.register(
            "equivalent_bytes",
            "Bytes of the values an --equivalent rule let differ, released as the PVM's",
            inner.equivalent_bytes.clone(),
        );
        r.register(
            "checkpoints_needed",
            "Checkpoints the comparison asked for, by reason",
            inner.checkpoints_needed.clone(),
        );
        r.register(
            "checkpoint_requests",
            "Checkpoint requests sent to QEMU, by reason",
            inner.checkpoints_requested.clone(),
        );
        r.register(
            "hold_seconds",
            "Time from a PVM packet's arrival to its release",
            inner.hold.clone(),
        );
        inner.bounds.register(&mut r);
        Inner {
            exposition: Arc::new(MetricsRegistry::new(r)),
            ..inner
        }
    }
}

impl Default for Metrics {
    /// A registry whose role label is empty.
    fn default() -> Self {
        Metrics::new("")
    }
}

impl Metrics {
    /// A registry for the daemon of `role` (`primary` or `secondary`).
    pub fn new(role: &'static str) -> Self {
        Metrics {
            inner: Arc::new(Inner::new(role)),
        }
    }

    /// Every family, registered: what colo-daemon's
    /// [`serve_metrics`](colo_daemon::metrics::serve_metrics) serves.
    pub fn metrics_registry(&self) -> Arc<MetricsRegistry> {
        Arc::clone(&self.inner.exposition)
    }

    /// A port or the link connected or disconnected.
    pub fn set_connected(&self, port: &str, connected: bool) {
        let port = PortLabel {
            port: port.to_owned(),
        };
        self.inner
            .connections
            .get_or_create(&port)
            .set(u64::from(connected));
    }

    /// Whether `port` is connected right now (false when never seen).
    pub fn is_connected(&self, port: &str) -> bool {
        let port = PortLabel {
            port: port.to_owned(),
        };
        self.inner
            .connections
            .get(&port)
            .is_some_and(|up| up.get() == 1)
    }

    /// The fail-open check saw QEMU's chardev `id` with (or without) a peer.
    pub fn set_chardev_connected(&self, id: &str, connected: bool) {
        let chardev = ChardevLabel {
            chardev: id.to_owned(),
        };
        self.inner
            .chardevs
            .get_or_create(&chardev)
            .set(u64::from(connected));
    }

    /// QEMU's filter `id` was re-created over QMP.
    pub fn filter_recreated(&self, id: &str) {
        let filter = FilterLabel {
            filter: id.to_owned(),
        };
        self.inner.filters_recreated.get_or_create(&filter).inc();
    }

    /// Times QEMU's filter `id` was re-created.
    pub fn filters_recreated(&self, id: &str) -> u64 {
        let filter = FilterLabel {
            filter: id.to_owned(),
        };
        self.inner
            .filters_recreated
            .get(&filter)
            .map_or(0, |n| n.get())
    }

    /// colo-proxyd set the guest's link up or down over QMP (`set_link`).
    pub fn set_guest_link(&self, up: bool) {
        self.inner
            .guest_link_up
            .get_or_create(&[])
            .set(u64::from(up));
        if !up {
            self.inner.guest_link_downs.inc();
        }
    }

    /// The comparison asked for a checkpoint.
    pub fn checkpoint_needed(&self, reason: &str) {
        let reason = ReasonLabel {
            reason: reason.to_owned(),
        };
        self.inner.checkpoints_needed.get_or_create(&reason).inc();
    }

    /// A checkpoint request went to QEMU.
    pub fn checkpoint_requested(&self, reason: &str) {
        let reason = ReasonLabel {
            reason: reason.to_owned(),
        };
        self.inner
            .checkpoints_requested
            .get_or_create(&reason)
            .inc();
        self.inner
            .checkpoints_requested_total
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Checkpoint requests sent to QEMU, all reasons.
    pub fn checkpoints_requested_total(&self) -> u64 {
        self.inner
            .checkpoints_requested_total
            .load(Ordering::Relaxed)
    }

    /// PVM bytes given to the comparison.
    pub fn add_compared(&self, bytes: usize) {
        self.inner.compared_bytes.inc_by(bytes as u64);
    }

    /// A PVM packet went to the network after `held` in the daemon.
    pub fn released(&self, bytes: usize, held: Duration) {
        let i = &self.inner;
        i.released_packets.inc();
        i.released_bytes.inc_by(bytes as u64);
        i.hold.observe(held.as_secs_f64());
    }

    /// PVM bytes released without comparison because COLO does not run (no SVM to compare
    /// with, or after a failover).
    pub fn add_uncompared(&self, bytes: usize) {
        self.inner.uncompared_bytes.inc_by(bytes as u64);
    }

    /// What was released under the equivalence rule `rule` (running totals).
    pub fn set_equivalent(&self, rule: &str, segments: u64, bytes: u64) {
        let label = RuleLabel {
            rule: rule.to_owned(),
        };
        set_total(
            &self.inner.equivalent_segments.get_or_create(&label),
            segments,
        );
        set_total(&self.inner.equivalent_bytes.get_or_create(&label), bytes);
    }

    /// The engine's bypass counter (a running total).
    pub fn set_bypassed(&self, bytes: u64) {
        set_total(&self.inner.bypassed_bytes, bytes);
    }

    /// The engine's count of segments released with a lowered acknowledgement.
    pub fn set_lowered_acks(&self, packets: u64) {
        set_total(&self.inner.lowered_acks, packets);
    }

    /// The engine's count of SYN-ACKs the PVM superseded, dropped unsent.
    pub fn set_superseded_syn_acks(&self, packets: u64) {
        set_total(&self.inner.superseded_syn_acks, packets);
    }

    /// Packets and bytes held right now.
    pub fn set_held(&self, packets: usize, bytes: usize) {
        self.inner.held_packets.set(packets as u64);
        self.inner.held_bytes.set(bytes as u64);
    }

    /// A frame of SVM output arrived (compared or not).
    pub fn svm_frame(&self) {
        self.inner.svm_frames.inc();
    }

    /// SVM output of an epoch already adopted was dropped.
    pub fn stale_svm_frame(&self) {
        self.inner.stale_svm_frames.inc();
    }

    /// A frame could not be delivered (port or link down, queue full).
    pub fn dropped_frame(&self) {
        self.inner.dropped_frames.inc();
    }

    /// `frames` frames could not be delivered (a failed write of a batch).
    pub fn add_dropped(&self, frames: u64) {
        self.inner.dropped_frames.inc_by(frames);
    }

    /// Frames dropped so far.
    pub fn dropped_frames(&self) -> u64 {
        self.inner.dropped_frames.get()
    }

    /// The link was closed because of a malformed message or a failed handshake.
    pub fn link_error(&self) {
        self.inner.link_errors.inc();
    }

    /// Link errors so far.
    pub fn link_errors(&self) -> u64 {
        self.inner.link_errors.get()
    }

    /// The link was closed because the peer went silent (see `peer::DEAD_AFTER`).
    pub fn link_dead_peer(&self) {
        self.inner.link_dead_peers.inc();
    }

    /// Link connections closed for a silent peer so far.
    pub fn link_dead_peers(&self) -> u64 {
        self.inner.link_dead_peers.get()
    }

    /// Whether the link runs without authentication (plaintext).
    pub fn set_link_unauthenticated(&self, unauthenticated: bool) {
        self.inner
            .link_unauthenticated
            .set(u64::from(unauthenticated));
    }

    /// One more link connection waits for its authentication.
    pub fn link_pending_started(&self) {
        self.inner.link_pending.inc();
    }

    /// One fewer link connection waits for its authentication.
    pub fn link_pending_ended(&self) {
        self.inner.link_pending.dec();
    }

    /// A link connection refused before it could replace the live one, for `reason`.
    pub fn link_refused(&self, reason: &str) {
        self.inner
            .link_refused
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Link connections refused for `reason` so far.
    pub fn link_refusals(&self, reason: &str) -> u64 {
        self.inner
            .link_refused
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .get()
    }

    /// A connection to the QEMU-facing port `port` refused for `reason` (`uid`,
    /// `unknown-peer`, `lookup-failed`).
    pub fn port_refused(&self, port: &str, reason: &'static str) {
        self.inner
            .port_refused
            .get_or_create(&PortReasonLabel {
                port: port.to_owned(),
                reason,
            })
            .inc();
    }

    /// Connections to `port` refused for `reason` so far.
    pub fn port_refusals(&self, port: &str, reason: &'static str) -> u64 {
        self.inner
            .port_refused
            .get_or_create(&PortReasonLabel {
                port: port.to_owned(),
                reason,
            })
            .get()
    }

    /// A synchronous barrier event was handled and acknowledged.
    pub fn barrier_done(&self) {
        self.inner.barriers.inc();
    }

    /// The SVM epoch compared (primary) or tagged (secondary), and whether output is
    /// compared now (primary: COLO runs; secondary: the SVM's output goes to the primary).
    pub fn set_epoch(&self, epoch: u64, comparing: bool) {
        self.inner.epoch.set(epoch);
        self.inner.comparing.set(u64::from(comparing));
    }

    /// Flows (connections and datagram flows) with comparison state (primary) or TCP
    /// connections with rewriting state (secondary).
    pub fn set_flows(&self, flows: usize) {
        self.inner.flows.set(flows as u64);
    }

    /// What the secondary's network bridge carried since the failover (running totals).
    pub fn set_bridged(&self, counts: BridgeCounts) {
        let i = &self.inner;
        set_total(&i.out_of_svm.frames, counts.out_of_svm);
        set_total(&i.out_of_svm.rewritten, counts.out_of_svm_rewritten);
        set_total(&i.into_svm.frames, counts.into_svm);
        set_total(&i.into_svm.rewritten, counts.into_svm_rewritten);
    }

    /// Connections whose sequence numbers the secondary shifts after its failover (those
    /// the SVM opened in the last epoch).
    pub fn set_offset_connections(&self, connections: usize) {
        self.inner.offset_connections.set(connections as u64);
    }

    /// A table's running totals: entries forgotten when idle, evicted for room, and work
    /// refused because it was full.
    pub fn set_table(&self, table: &'static str, idle: u64, evicted: u64, refused: u64) {
        let b = &self.inner.bounds;
        let label = |why| TableLabel { table, why };
        set_total(&b.forgotten.get_or_create(&label("idle")), idle);
        set_total(&b.forgotten.get_or_create(&label("evicted")), evicted);
        set_total(&b.refused.get_or_create(&label("full")), refused);
    }

    /// A bounded queue's frames and bytes now and its running total of drops.
    pub fn set_queue(&self, queue: &'static str, frames: usize, bytes: usize, dropped: u64) {
        let b = &self.inner.bounds;
        let label = QueueLabel { queue };
        b.queue_frames.get_or_create(&label).set(frames as u64);
        b.queue_bytes.get_or_create(&label).set(bytes as u64);
        set_total(&b.queue_dropped.get_or_create(&label), dropped);
    }

    /// The primary's flow table and early queue.
    pub fn set_primary_bounds(&self, gate: &ReleaseGate) {
        let c = gate.counters();
        self.set_table(
            "flows",
            c.flows_expired,
            c.flows_evicted,
            c.flow_table_full_packets,
        );
        let unaligned = TableLabel {
            table: "flows",
            why: "evicted-unaligned",
        };
        set_total(
            &self.inner.bounds.forgotten.get_or_create(&unaligned),
            c.flows_evicted_unaligned,
        );
        let (frames, bytes) = gate.early();
        self.set_queue("early", frames, bytes, gate.early_dropped());
    }

    /// The secondary's rewrite table and held queues.
    pub fn set_secondary_bounds(&self, path: &SvmPath) {
        let c = path.rewrite_counters();
        self.set_table("rewrite", c.expired, c.evicted, c.refused);
        let (frames, bytes) = path.queued();
        self.set_queue("held", frames, bytes, path.dropped());
        // The pacer never drops: past its bounds segments go on.
        let (frames, bytes) = path.paced();
        self.set_queue("svm-window", frames, bytes, 0);
        let c = path.pacer_counters();
        let paced = &self.inner.bounds.paced;
        for (outcome, total) in [
            ("waited", c.paced),
            ("overdue", c.overdue),
            ("overflow", c.overflow),
        ] {
            set_total(&paced.get_or_create(&OutcomeLabel { outcome }), total);
        }
        self.set_offset_connections(path.connections_with_offset());
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        self.inner.exposition.encode()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TableLabel {
    table: &'static str,
    why: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct QueueLabel {
    queue: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// The metrics of the bounded tables and queues. Each family has its series created (and
/// shown) only when the role sets it: the primary's flow table and early queue, the
/// secondary's rewrite table and held queues.
#[derive(Debug, Default)]
struct Bounds {
    /// Table entries forgotten, by table and why (`idle`, `evicted`).
    forgotten: Family<TableLabel, Counter>,
    /// New work a full table refused, by table (`why` is `full`).
    refused: Family<TableLabel, Counter>,
    queue_frames: Family<QueueLabel, Gauge>,
    queue_bytes: Family<QueueLabel, Gauge>,
    queue_dropped: Family<QueueLabel, Counter>,
    /// Mirrored segments the secondary held for the SVM's receive window, by outcome.
    paced: Family<OutcomeLabel, Counter>,
}

impl Bounds {
    fn register(&self, r: &mut Registry) {
        r.register(
            "table_forgotten_entries",
            "Flow-table (primary) or rewrite-table (secondary) entries forgotten: idle past \
             their bound, evicted (safe to forget) to make room, or evicted-unaligned (quiet \
             but opened this epoch, e.g. a SYN flood's half-open handshakes; until the \
             checkpoint new flows must then start with a SYN)",
            self.forgotten.clone(),
        );
        r.register(
            "table_full_refusals",
            "Work a full table refused: PVM packets of new flows held until the checkpoint \
             (flows), new connections' SYNs dropped (rewrite)",
            self.refused.clone(),
        );
        r.register(
            "queue_frames",
            "Frames in a bounded queue (early: SVM output of a later epoch, primary; held: \
             packets held across a checkpoint or waiting for an SVM SYN, secondary; \
             svm-window: mirrored segments waiting for the SVM's receive window, secondary)",
            self.queue_frames.clone(),
        );
        r.register(
            "queue_bytes",
            "Bytes of the frames in a bounded queue",
            self.queue_bytes.clone(),
        );
        r.register(
            "queue_dropped_frames",
            "Frames dropped, oldest first, because a bounded queue was full",
            self.queue_dropped.clone(),
        );
        r.register(
            "svm_window_segments",
            "Mirrored client segments the secondary held because the SVM's receive window \
             could not take them yet (waited), of those sent on after the 1 s bound with the \
             window still closed (overdue), and segments sent on at once because the pacer's \
             32 MiB were full (overflow)",
            self.paced.clone(),
        );
    }
}

/// Sets a counter that mirrors a running total kept elsewhere.
fn set_total(counter: &Counter, total: u64) {
    counter.inner().store(total, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_every_family() {
        let m = Metrics::new("primary");
        m.set_connected("compare0", true);
        m.checkpoint_needed("payload-differs");
        m.released(100, Duration::from_millis(3));
        let text = m.render();
        for needle in [
            "colo_proxyd_info{role=\"primary\"} 1",
            "colo_proxyd_connection_up{port=\"compare0\"} 1",
            "colo_proxyd_checkpoints_needed_total{reason=\"payload-differs\"} 1",
            "colo_proxyd_hold_seconds_bucket{le=\"0.005\"} 1",
            "colo_proxyd_hold_seconds_bucket{le=\"0.001\"} 0",
            "colo_proxyd_hold_seconds_count 1",
            "colo_proxyd_released_bytes_total 100",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }

    #[test]
    fn the_secondary_exports_its_queues_and_the_window_pacer() {
        let m = Metrics::new("secondary");
        m.set_secondary_bounds(&SvmPath::new(1));
        let text = m.render();
        for needle in [
            "colo_proxyd_queue_frames{queue=\"svm-window\"} 0",
            "colo_proxyd_queue_bytes{queue=\"held\"} 0",
            "colo_proxyd_svm_window_segments_total{outcome=\"waited\"} 0",
            "colo_proxyd_svm_window_segments_total{outcome=\"overdue\"} 0",
            "colo_proxyd_svm_window_segments_total{outcome=\"overflow\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == needle),
                "{needle} missing from\n{text}"
            );
        }
    }

    #[test]
    fn running_totals_are_set_and_the_guest_link_shows_once_set() {
        let m = Metrics::new("secondary");
        assert!(!m.render().contains("colo_proxyd_guest_link_up"));
        assert!(!m.is_connected("red0"));
        m.set_connected("red0", true);
        assert!(m.is_connected("red0"));
        m.set_guest_link(false);
        m.filter_recreated("f1");
        m.filter_recreated("f1");
        m.set_bypassed(900);
        m.set_bypassed(1000);
        m.set_lowered_acks(7);
        m.set_superseded_syn_acks(2);
        m.set_equivalent("tcp:80 header Date", 1, 29);
        m.set_equivalent("tcp:80 header Date", 3, 87);
        m.set_bridged(BridgeCounts {
            out_of_svm: 7,
            out_of_svm_rewritten: 2,
            into_svm: 5,
            into_svm_rewritten: 1,
        });
        m.checkpoint_requested("a");
        m.checkpoint_requested("b");
        m.port_refused("red1", "uid");
        m.port_refused("red1", "uid");
        assert_eq!(m.port_refusals("red1", "uid"), 2);
        assert_eq!(m.port_refusals("red0", "uid"), 0);
        assert_eq!(m.filters_recreated("f1"), 2);
        assert_eq!(m.checkpoints_requested_total(), 2);
        let text = m.render();
        for needle in [
            "colo_proxyd_info{role=\"secondary\"} 1",
            "colo_proxyd_guest_link_up 0",
            "colo_proxyd_guest_link_downs_total 1",
            "colo_proxyd_qemu_filters_recreated_total{filter=\"f1\"} 2",
            "colo_proxyd_bypassed_bytes_total 1000",
            "colo_proxyd_lowered_ack_packets_total 7",
            "colo_proxyd_superseded_syn_ack_packets_total 2",
            "colo_proxyd_equivalent_segments_total{rule=\"tcp:80 header Date\"} 3",
            "colo_proxyd_equivalent_bytes_total{rule=\"tcp:80 header Date\"} 87",
            "colo_proxyd_failover_bridged_frames_total{direction=\"out_of_svm\"} 7",
            "colo_proxyd_failover_rewritten_frames_total{direction=\"into_svm\"} 1",
            "# TYPE colo_proxyd_checkpoint_requests_total counter",
            "colo_proxyd_port_refused_total{port=\"red1\",reason=\"uid\"} 2",
        ] {
            assert!(
                text.lines().any(|l| l == needle),
                "{needle} missing from\n{text}"
            );
        }
    }
}
