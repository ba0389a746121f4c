//! Prometheus metrics: a registry the role loops update, rendered in the plain-text exposition
//! format with colo-daemon's writer and served by colo-daemon's `/metrics` responder
//! (`--metrics ADDR`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use colo_daemon::metrics::{Exposition, Histogram, Text};

use crate::daemon::svm_path::BridgeCounts;

/// Upper bounds of the hold-time histogram's buckets, in seconds.
const HOLD_BUCKETS: [f64; 12] = [
    0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0,
];

/// Every metric of one daemon. Cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    role: Mutex<&'static str>,
    /// Port name → connected.
    connections: Mutex<BTreeMap<String, bool>>,
    /// Reason → count (what the comparison asked for).
    checkpoints_needed: Mutex<BTreeMap<String, u64>>,
    /// Reason → count (requests actually sent to QEMU).
    checkpoints_requested: Mutex<BTreeMap<String, u64>>,
    /// QEMU chardev id → it has a peer (the fail-open check).
    chardevs: Mutex<BTreeMap<String, bool>>,
    /// QEMU filter id → times re-created over QMP.
    filters_recreated: Mutex<BTreeMap<String, u64>>,
    /// The guest link as colo-proxyd last set it over QMP (`None`: not yet).
    guest_link_up: Mutex<Option<bool>>,
    guest_link_downs: AtomicU64,
    compared_bytes: AtomicU64,
    released_packets: AtomicU64,
    released_bytes: AtomicU64,
    uncompared_bytes: AtomicU64,
    bypassed_bytes: AtomicU64,
    held_packets: AtomicU64,
    held_bytes: AtomicU64,
    svm_frames: AtomicU64,
    stale_svm_frames: AtomicU64,
    dropped_frames: AtomicU64,
    link_errors: AtomicU64,
    barriers: AtomicU64,
    epoch: AtomicU64,
    comparing: AtomicU64,
    flows: AtomicU64,
    hold: HoldHistogram,
    /// The secondary's network bridge after a failover (running totals from the role logic).
    bridged: Mutex<BridgeCounts>,
    offset_connections: AtomicU64,
}

/// The hold-time histogram over [`HOLD_BUCKETS`].
#[derive(Debug)]
struct HoldHistogram(Histogram);

impl Default for HoldHistogram {
    fn default() -> Self {
        HoldHistogram(Histogram::new(&HOLD_BUCKETS))
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these maps leaves it consistent (single inserts).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Metrics {
    /// A registry for the daemon of `role` (`primary` or `secondary`).
    pub fn new(role: &'static str) -> Self {
        let metrics = Metrics::default();
        *lock(&metrics.inner.role) = role;
        metrics
    }

    /// A port or the link connected or disconnected.
    pub fn set_connected(&self, port: &str, connected: bool) {
        lock(&self.inner.connections).insert(port.to_owned(), connected);
    }

    /// Whether `port` is connected right now (false when never seen).
    pub fn is_connected(&self, port: &str) -> bool {
        lock(&self.inner.connections)
            .get(port)
            .copied()
            .unwrap_or(false)
    }

    /// The fail-open check saw QEMU's chardev `id` with (or without) a peer.
    pub fn set_chardev_connected(&self, id: &str, connected: bool) {
        lock(&self.inner.chardevs).insert(id.to_owned(), connected);
    }

    /// QEMU's filter `id` was re-created over QMP.
    pub fn filter_recreated(&self, id: &str) {
        *lock(&self.inner.filters_recreated)
            .entry(id.to_owned())
            .or_default() += 1;
    }

    /// Times QEMU's filter `id` was re-created.
    pub fn filters_recreated(&self, id: &str) -> u64 {
        lock(&self.inner.filters_recreated)
            .get(id)
            .copied()
            .unwrap_or(0)
    }

    /// colo-proxyd set the guest's link up or down over QMP (`set_link`).
    pub fn set_guest_link(&self, up: bool) {
        *lock(&self.inner.guest_link_up) = Some(up);
        if !up {
            self.inner.guest_link_downs.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The comparison asked for a checkpoint.
    pub fn checkpoint_needed(&self, reason: &str) {
        *lock(&self.inner.checkpoints_needed)
            .entry(reason.to_owned())
            .or_default() += 1;
    }

    /// A checkpoint request went to QEMU.
    pub fn checkpoint_requested(&self, reason: &str) {
        *lock(&self.inner.checkpoints_requested)
            .entry(reason.to_owned())
            .or_default() += 1;
    }

    /// Checkpoint requests sent to QEMU, all reasons.
    pub fn checkpoints_requested_total(&self) -> u64 {
        lock(&self.inner.checkpoints_requested).values().sum()
    }

    /// PVM bytes given to the comparison.
    pub fn add_compared(&self, bytes: usize) {
        self.inner
            .compared_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// A PVM packet went to the network after `held` in the daemon.
    pub fn released(&self, bytes: usize, held: Duration) {
        let i = &self.inner;
        i.released_packets.fetch_add(1, Ordering::Relaxed);
        i.released_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        i.hold.0.observe(held);
    }

    /// PVM bytes released without comparison because COLO does not run (no SVM to compare
    /// with, or after a failover).
    pub fn add_uncompared(&self, bytes: usize) {
        self.inner
            .uncompared_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// The engine's bypass counter (a running total).
    pub fn set_bypassed(&self, bytes: u64) {
        self.inner.bypassed_bytes.store(bytes, Ordering::Relaxed);
    }

    /// Packets and bytes held right now.
    pub fn set_held(&self, packets: usize, bytes: usize) {
        self.inner
            .held_packets
            .store(packets as u64, Ordering::Relaxed);
        self.inner.held_bytes.store(bytes as u64, Ordering::Relaxed);
    }

    /// A frame of SVM output arrived (compared or not).
    pub fn svm_frame(&self) {
        self.inner.svm_frames.fetch_add(1, Ordering::Relaxed);
    }

    /// SVM output of an epoch already adopted was dropped.
    pub fn stale_svm_frame(&self) {
        self.inner.stale_svm_frames.fetch_add(1, Ordering::Relaxed);
    }

    /// A frame could not be delivered (port or link down, queue full).
    pub fn dropped_frame(&self) {
        self.inner.dropped_frames.fetch_add(1, Ordering::Relaxed);
    }

    /// `frames` frames could not be delivered (a failed write of a batch).
    pub fn add_dropped(&self, frames: u64) {
        self.inner
            .dropped_frames
            .fetch_add(frames, Ordering::Relaxed);
    }

    /// Frames dropped so far.
    pub fn dropped_frames(&self) -> u64 {
        self.inner.dropped_frames.load(Ordering::Relaxed)
    }

    /// The link was closed because of a malformed message or a failed handshake.
    pub fn link_error(&self) {
        self.inner.link_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Link errors so far.
    pub fn link_errors(&self) -> u64 {
        self.inner.link_errors.load(Ordering::Relaxed)
    }

    /// A synchronous barrier event was handled and acknowledged.
    pub fn barrier_done(&self) {
        self.inner.barriers.fetch_add(1, Ordering::Relaxed);
    }

    /// The SVM epoch compared (primary) or tagged (secondary), and whether output is
    /// compared now (primary: COLO runs; secondary: the SVM's output goes to the primary).
    pub fn set_epoch(&self, epoch: u64, comparing: bool) {
        self.inner.epoch.store(epoch, Ordering::Relaxed);
        self.inner
            .comparing
            .store(u64::from(comparing), Ordering::Relaxed);
    }

    /// Flows (connections and datagram flows) with comparison state (primary) or TCP
    /// connections with rewriting state (secondary).
    pub fn set_flows(&self, flows: usize) {
        self.inner.flows.store(flows as u64, Ordering::Relaxed);
    }

    /// What the secondary's network bridge carried since the failover (running totals).
    pub fn set_bridged(&self, counts: BridgeCounts) {
        *lock(&self.inner.bridged) = counts;
    }

    /// Connections whose sequence numbers the secondary shifts after its failover (those
    /// the SVM opened in the last epoch).
    pub fn set_offset_connections(&self, connections: usize) {
        self.inner
            .offset_connections
            .store(connections as u64, Ordering::Relaxed);
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let i = &self.inner;
        let role = *lock(&i.role);
        let mut out = Text::default();
        header(&mut out, "info", "gauge", "Always 1; the role is a label.");
        out.sample("colo_proxyd_info", &[("role", role)], 1);

        header(
            &mut out,
            "connection_up",
            "gauge",
            "1 when the port or link is connected.",
        );
        for (port, up) in lock(&i.connections).iter() {
            out.sample(
                "colo_proxyd_connection_up",
                &[("port", port)],
                u64::from(*up),
            );
        }
        header(
            &mut out,
            "qemu_chardev_connected",
            "gauge",
            "1 when QEMU's chardev has a peer (0: its redirector fails open).",
        );
        for (id, up) in lock(&i.chardevs).iter() {
            out.sample(
                "colo_proxyd_qemu_chardev_connected",
                &[("chardev", id)],
                u64::from(*up),
            );
        }
        header(
            &mut out,
            "qemu_filters_recreated_total",
            "counter",
            "QEMU filters re-created over QMP because their input chardev reconnected.",
        );
        for (id, n) in lock(&i.filters_recreated).iter() {
            out.sample(
                "colo_proxyd_qemu_filters_recreated_total",
                &[("filter", id)],
                *n,
            );
        }
        if let Some(up) = *lock(&i.guest_link_up) {
            header(
                &mut out,
                "guest_link_up",
                "gauge",
                "The guest's link as colo-proxyd last set it (0: cut off while compare0 is down).",
            );
            out.sample("colo_proxyd_guest_link_up", &[], u64::from(up));
        }
        let counters: [(&str, &str, &AtomicU64); 10] = [
            (
                "guest_link_downs_total",
                "Times colo-proxyd set the guest's link down because compare0 had no connection while COLO ran.",
                &i.guest_link_downs,
            ),
            (
                "compared_bytes_total",
                "PVM bytes given to the comparison.",
                &i.compared_bytes,
            ),
            (
                "released_packets_total",
                "PVM packets released to the network while COLO ran (matched, bypassed, or at a checkpoint).",
                &i.released_packets,
            ),
            (
                "released_bytes_total",
                "PVM bytes released to the network while COLO ran.",
                &i.released_bytes,
            ),
            (
                "uncompared_bytes_total",
                "PVM bytes passed uncompared while COLO did not run (before it, after a failover).",
                &i.uncompared_bytes,
            ),
            (
                "bypassed_bytes_total",
                "PVM bytes released uncompared by a bypass rule.",
                &i.bypassed_bytes,
            ),
            (
                "svm_frames_total",
                "SVM output frames received.",
                &i.svm_frames,
            ),
            (
                "stale_svm_frames_total",
                "SVM output frames of an adopted epoch, dropped.",
                &i.stale_svm_frames,
            ),
            (
                "dropped_frames_total",
                "Frames not delivered because a port or the link was down or full.",
                &i.dropped_frames,
            ),
            (
                "link_errors_total",
                "Link connections closed for a malformed message or handshake.",
                &i.link_errors,
            ),
        ];
        for (name, help, value) in counters {
            header(&mut out, name, "counter", help);
            out.sample(
                &format!("colo_proxyd_{name}"),
                &[],
                value.load(Ordering::Relaxed),
            );
        }
        header(
            &mut out,
            "barriers_total",
            "counter",
            "Synchronous relay events handled and acknowledged.",
        );
        out.sample(
            "colo_proxyd_barriers_total",
            &[],
            i.barriers.load(Ordering::Relaxed),
        );
        let bridged = *lock(&i.bridged);
        for (name, help, out_of_svm, into_svm) in [
            (
                "failover_bridged_frames_total",
                "Frames the secondary carried between the SVM and the network after its failover.",
                bridged.out_of_svm,
                bridged.into_svm,
            ),
            (
                "failover_rewritten_frames_total",
                "Of those, frames whose sequence (out of the SVM) or acknowledgement (into it) number was shifted.",
                bridged.out_of_svm_rewritten,
                bridged.into_svm_rewritten,
            ),
        ] {
            header(&mut out, name, "counter", help);
            out.sample(
                &format!("colo_proxyd_{name}"),
                &[("direction", "out_of_svm")],
                out_of_svm,
            );
            out.sample(
                &format!("colo_proxyd_{name}"),
                &[("direction", "into_svm")],
                into_svm,
            );
        }
        header(
            &mut out,
            "failover_offset_connections",
            "gauge",
            "Connections whose sequence numbers the secondary shifts after its failover (opened by the SVM in the last epoch).",
        );
        out.sample(
            "colo_proxyd_failover_offset_connections",
            &[],
            i.offset_connections.load(Ordering::Relaxed),
        );
        header(
            &mut out,
            "flows",
            "gauge",
            "Flows with comparison state (primary) or connections with rewriting state (secondary).",
        );
        out.sample("colo_proxyd_flows", &[], i.flows.load(Ordering::Relaxed));
        header(
            &mut out,
            "epoch",
            "gauge",
            "The SVM epoch compared (primary) or tagged (secondary).",
        );
        out.sample("colo_proxyd_epoch", &[], i.epoch.load(Ordering::Relaxed));
        header(
            &mut out,
            "comparing",
            "gauge",
            "1 while COLO runs and output is compared.",
        );
        out.sample(
            "colo_proxyd_comparing",
            &[],
            i.comparing.load(Ordering::Relaxed),
        );
        header(
            &mut out,
            "held_packets",
            "gauge",
            "PVM packets held for comparison.",
        );
        out.sample(
            "colo_proxyd_held_packets",
            &[],
            i.held_packets.load(Ordering::Relaxed),
        );
        header(
            &mut out,
            "held_bytes",
            "gauge",
            "Bytes of the PVM packets held for comparison.",
        );
        out.sample(
            "colo_proxyd_held_bytes",
            &[],
            i.held_bytes.load(Ordering::Relaxed),
        );
        for (name, help, map) in [
            (
                "checkpoints_needed_total",
                "Checkpoints the comparison asked for, by reason.",
                &i.checkpoints_needed,
            ),
            (
                "checkpoint_requests_total",
                "Checkpoint requests sent to QEMU, by reason.",
                &i.checkpoints_requested,
            ),
        ] {
            header(&mut out, name, "counter", help);
            for (reason, n) in lock(map).iter() {
                out.sample(&format!("colo_proxyd_{name}"), &[("reason", reason)], *n);
            }
        }
        i.hold.0.render(
            &mut out,
            "colo_proxyd_hold_seconds",
            "Time from a PVM packet's arrival to its release.",
        );
        out.finish()
    }
}

/// The `# HELP` and `# TYPE` lines of `colo_proxyd_{name}`.
fn header(out: &mut Text, name: &str, kind: &str, help: &str) {
    out.header(&format!("colo_proxyd_{name}"), help, kind);
}

impl Exposition for Metrics {
    fn render(&self) -> String {
        Metrics::render(self)
    }
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
}
