//! colo-blockd's metrics: prometheus-client counters, gauges and one
//! histogram, every family registered once in the registry that
//! colo-daemon's `/metrics` responder serves (the Prometheus text format,
//! version 0.0.4). No I/O here.
//!
//! [`Metrics`] is a cheap handle (an `Arc`): the replica, the epoch
//! follower, the checkpoint requester and the NBD server each hold a clone
//! and update it with relaxed atomic operations, never a lock on the
//! request path (an export's counters are looked up once per connection;
//! the commit histogram takes one short lock per checkpoint). Scraping
//! reads the values one by one, so a sample may mix values from just before
//! and just after a concurrent update; each value is itself exact. Within a
//! labelled family the order of the series is not fixed.
//!
//! | metric | type | what |
//! |---|---|---|
//! | `colo_blockd_pvm_log_memory_bytes` | gauge | PVM log data held in memory |
//! | `colo_blockd_pvm_log_spilled_bytes` | gauge | PVM log bytes written to its spill file this epoch |
//! | `colo_blockd_svm_overlay_memory_bytes` | gauge | SVM overlay data held in memory |
//! | `colo_blockd_svm_overlay_spilled_bytes` | gauge | SVM overlay bytes written to its spill file this epoch |
//! | `colo_blockd_commit_duration_seconds` | histogram | `checkpoint-adopted` step, from the event to the ack |
//! | `colo_blockd_checkpoints_committed_total` | counter | checkpoints adopted (empty PVM logs too) |
//! | `colo_blockd_committed_bytes_total` | counter | PVM log data bytes committed |
//! | `colo_blockd_checkpoints_requested_total{reason}` | counter | checkpoints asked of the primary |
//! | `colo_blockd_checkpoint_request_failures_total` | counter | requests the primary's QMP did not take |
//! | `colo_blockd_epoch` | gauge | epoch of the relay's last event |
//! | `colo_blockd_relay_connected` | gauge | 1 while subscribed to the relay |
//! | `colo_blockd_failovers_total` | counter | failovers to this secondary done |
//! | `colo_blockd_nbd_connections{transport}` | gauge | NBD connections open |
//! | `colo_blockd_nbd_connections_total{transport}` | counter | NBD connections accepted |
//! | `colo_blockd_nbd_connections_refused_total{reason}` | counter | NBD connections closed before the greeting (`limit`: `--max-connections` reached) |
//! | `colo_blockd_nbd_tls_refused_total{reason}` | counter | TCP clients refused for TLS (`no-starttls`: an option before `NBD_OPT_STARTTLS`; `handshake`: no/foreign/not-allowed certificate) |
//! | `colo_blockd_nbd_unauthenticated` | gauge | 1 when the TCP listener serves without TLS (no `--tls-dir`) |
//! | `colo_blockd_nbd_connections_dropped_total{reason}` | counter | NBD connections the server ended (`handshake-timeout`, `write-timeout`, `peer-timeout`) |
//! | `colo_blockd_nbd_max_connections` | gauge | the `--max-connections` in force |
//! | `colo_blockd_nbd_requests_total{export,command}` | counter | NBD requests answered |
//! | `colo_blockd_nbd_request_errors_total{export,command}` | counter | of those, answered with an error |
//! | `colo_blockd_nbd_bytes_total{export,direction}` | counter | data bytes read and written |

use std::sync::{Arc, Mutex};

use colo_daemon::metrics::{Gauge, MetricsRegistry};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

/// The reason label of checkpoint requests made because the PVM log
/// passed its memory budget (the same word the relay's status shows).
pub const REASON_LOG_FULL: &str = "block-log-full";

/// Upper bounds (seconds) of the commit-time histogram's buckets: 1 ms to
/// 10 s in 1-2.5-5 steps. A commit of an empty log takes microseconds, a
/// 10 MB log about one fsync (milliseconds on SSDs, tens on disks); seconds
/// mean a saturated or failing device.
pub const COMMIT_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How an NBD client reached the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A Unix socket (the SVM's QEMU, on the same host).
    Unix,
    /// TCP (the primary's quorum child).
    Tcp,
}

impl Transport {
    const ALL: [Transport; 2] = [Transport::Unix, Transport::Tcp];

    fn label(self) -> &'static str {
        match self {
            Transport::Unix => "unix",
            Transport::Tcp => "tcp",
        }
    }
}

/// Why the server ended an NBD connection it had accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// No export chosen within the handshake timeout.
    HandshakeTimeout,
    /// The client took no reply data within the write timeout.
    WriteTimeout,
    /// The TCP socket timed out (`ETIMEDOUT`): keepalive found the peer
    /// dead, or sent data (or a closed receive window) went unanswered for
    /// `TCP_USER_TIMEOUT`.
    PeerTimeout,
}

impl DropReason {
    const ALL: [DropReason; 3] = [
        DropReason::HandshakeTimeout,
        DropReason::WriteTimeout,
        DropReason::PeerTimeout,
    ];

    fn label(self) -> &'static str {
        match self {
            DropReason::HandshakeTimeout => "handshake-timeout",
            DropReason::WriteTimeout => "write-timeout",
            DropReason::PeerTimeout => "peer-timeout",
        }
    }
}

/// The reason label of connections refused because the server already
/// serves `--max-connections` clients.
pub const REFUSED_LIMIT: &str = "limit";

/// Why a TCP client was refused for TLS (`colo_blockd_nbd_tls_refused_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsRefusal {
    /// It sent an option other than `NBD_OPT_STARTTLS`/`ABORT` before TLS (answered
    /// `NBD_REP_ERR_TLS_REQD`, or closed for `NBD_OPT_EXPORT_NAME`); counted once per
    /// connection.
    NoStartTls,
    /// The TLS handshake failed: no certificate, another CA's, a name not allowed, no TLS.
    Handshake,
}

impl TlsRefusal {
    const ALL: [TlsRefusal; 2] = [TlsRefusal::NoStartTls, TlsRefusal::Handshake];

    fn label(self) -> &'static str {
        match self {
            TlsRefusal::NoStartTls => "no-starttls",
            TlsRefusal::Handshake => "handshake",
        }
    }
}

/// NBD commands as counted; every command the server does not implement
/// is `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NbdCommand {
    /// `NBD_CMD_READ`
    Read,
    /// `NBD_CMD_WRITE`
    Write,
    /// `NBD_CMD_FLUSH`
    Flush,
    /// `NBD_CMD_TRIM`
    Trim,
    /// `NBD_CMD_WRITE_ZEROES`
    WriteZeroes,
    /// Anything else (refused).
    Other,
}

impl NbdCommand {
    const ALL: [NbdCommand; 6] = [
        NbdCommand::Read,
        NbdCommand::Write,
        NbdCommand::Flush,
        NbdCommand::Trim,
        NbdCommand::WriteZeroes,
        NbdCommand::Other,
    ];

    fn label(self) -> &'static str {
        match self {
            NbdCommand::Read => "read",
            NbdCommand::Write => "write",
            NbdCommand::Flush => "flush",
            NbdCommand::Trim => "trim",
            NbdCommand::WriteZeroes => "write_zeroes",
            NbdCommand::Other => "other",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TransportLabel {
    transport: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CommandLabels {
    export: String,
    command: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DirectionLabels {
    export: String,
    direction: &'static str,
}

/// The NBD counters of one export: its series of the labelled families,
/// looked up once.
#[derive(Debug)]
pub struct ExportMetrics {
    name: String,
    requests: [Counter; NbdCommand::ALL.len()],
    errors: [Counter; NbdCommand::ALL.len()],
    read_bytes: Counter,
    written_bytes: Counter,
}

impl ExportMetrics {
    /// Counts one answered request; `moved` is the data it read or wrote
    /// (counted only when it succeeded).
    pub fn request(&self, command: NbdCommand, ok: bool, moved: u64) {
        self.requests[command.index()].inc();
        if !ok {
            self.errors[command.index()].inc();
        } else if command == NbdCommand::Read {
            self.read_bytes.inc_by(moved);
        } else if command == NbdCommand::Write {
            self.written_bytes.inc_by(moved);
        }
    }

    /// Requests of `command` answered so far.
    pub fn requests(&self, command: NbdCommand) -> u64 {
        self.requests[command.index()].get()
    }

    /// Of those, answered with an error.
    pub fn errors(&self, command: NbdCommand) -> u64 {
        self.errors[command.index()].get()
    }
}

/// Every metric of one colo-blockd process; reach it through [`Metrics`].
#[derive(Debug)]
pub struct Registry {
    /// PVM log data held in memory.
    pub pvm_log_memory_bytes: Gauge,
    /// PVM log bytes written to its spill file this epoch.
    pub pvm_log_spilled_bytes: Gauge,
    /// SVM overlay data held in memory.
    pub svm_overlay_memory_bytes: Gauge,
    /// SVM overlay bytes written to its spill file this epoch.
    pub svm_overlay_spilled_bytes: Gauge,
    /// Duration in seconds of each `checkpoint-adopted` step (what the
    /// primary's pause waits for), over [`COMMIT_BUCKETS`].
    pub commit_duration: Histogram,
    /// Checkpoints adopted.
    pub checkpoints_committed: Counter,
    /// PVM log data bytes committed.
    pub committed_bytes: Counter,
    /// Checkpoints asked of the primary because the PVM log was full.
    pub checkpoints_requested_log_full: Counter,
    /// Checkpoint requests that failed (QMP unreachable or refusing).
    pub checkpoint_request_failures: Counter,
    /// Epoch of the relay's last event (or welcome).
    pub epoch: Gauge,
    /// 1 while subscribed to the relay, else 0.
    pub relay_connected: Gauge,
    /// Failovers to this secondary.
    pub failovers: Counter,
    /// The cap on NBD connections (set by the server).
    pub nbd_max_connections: Gauge,
    connections_refused_limit: Counter,
    tls_refused: [Counter; TlsRefusal::ALL.len()],
    /// 1 while a TCP listener serves without TLS (no `--tls-dir`).
    nbd_unauthenticated: Gauge,
    connections_dropped: [Counter; DropReason::ALL.len()],
    connections: [Gauge; Transport::ALL.len()],
    connections_total: [Counter; Transport::ALL.len()],
    requests: Family<CommandLabels, Counter>,
    request_errors: Family<CommandLabels, Counter>,
    bytes: Family<DirectionLabels, Counter>,
    exports: Mutex<Vec<Arc<ExportMetrics>>>,
    /// Every family above, registered.
    exposition: Arc<MetricsRegistry>,
}

impl Default for Registry {
    fn default() -> Registry {
        let pvm_log_memory_bytes = Gauge::default();
        let pvm_log_spilled_bytes = Gauge::default();
        let svm_overlay_memory_bytes = Gauge::default();
        let svm_overlay_spilled_bytes = Gauge::default();
        let commit_duration = Histogram::new(COMMIT_BUCKETS);
        let checkpoints_committed = Counter::default();
        let committed_bytes = Counter::default();
        let checkpoints_requested = Family::<ReasonLabel, Counter>::default();
        let checkpoints_requested_log_full =
            checkpoints_requested.get_or_create_owned(&ReasonLabel {
                reason: REASON_LOG_FULL,
            });
        let checkpoint_request_failures = Counter::default();
        let epoch = Gauge::default();
        let relay_connected = Gauge::default();
        let failovers = Counter::default();
        let open = Family::<TransportLabel, Gauge>::default();
        let accepted = Family::<TransportLabel, Counter>::default();
        let transport = |t: Transport| TransportLabel {
            transport: t.label(),
        };
        let connections = Transport::ALL.map(|t| open.get_or_create_owned(&transport(t)));
        let connections_total = Transport::ALL.map(|t| accepted.get_or_create_owned(&transport(t)));
        let refused = Family::<ReasonLabel, Counter>::default();
        let connections_refused_limit = refused.get_or_create_owned(&ReasonLabel {
            reason: REFUSED_LIMIT,
        });
        let tls_family = Family::<ReasonLabel, Counter>::default();
        let tls_refused = TlsRefusal::ALL
            .map(|r| tls_family.get_or_create_owned(&ReasonLabel { reason: r.label() }));
        let nbd_unauthenticated = Gauge::default();
        let dropped = Family::<ReasonLabel, Counter>::default();
        let connections_dropped = DropReason::ALL
            .map(|r| dropped.get_or_create_owned(&ReasonLabel { reason: r.label() }));
        let nbd_max_connections = Gauge::default();
        let requests = Family::<CommandLabels, Counter>::default();
        let request_errors = Family::<CommandLabels, Counter>::default();
        let bytes = Family::<DirectionLabels, Counter>::default();

        // prometheus-client ends every help text with a full stop and every
        // counter's name with `_total`.
        let mut r = prometheus_client::registry::Registry::default();
        r.register(
            "colo_blockd_pvm_log_memory_bytes",
            "PVM log (this epoch's primary writes) data held in memory",
            pvm_log_memory_bytes.clone(),
        );
        r.register(
            "colo_blockd_pvm_log_spilled_bytes",
            "PVM log bytes written to its spill file this epoch (overwritten ones too)",
            pvm_log_spilled_bytes.clone(),
        );
        r.register(
            "colo_blockd_svm_overlay_memory_bytes",
            "SVM overlay (this epoch's secondary writes) data held in memory",
            svm_overlay_memory_bytes.clone(),
        );
        r.register(
            "colo_blockd_svm_overlay_spilled_bytes",
            "SVM overlay bytes written to its spill file this epoch (overwritten ones too)",
            svm_overlay_spilled_bytes.clone(),
        );
        r.register(
            "colo_blockd_commit_duration_seconds",
            "Duration of the checkpoint-adopted step (commit of the PVM log up to the ack)",
            commit_duration.clone(),
        );
        r.register(
            "colo_blockd_checkpoints_committed",
            "Checkpoints adopted (PVM log committed, SVM overlay dropped)",
            checkpoints_committed.clone(),
        );
        r.register(
            "colo_blockd_committed_bytes",
            "PVM log data bytes committed into the image",
            committed_bytes.clone(),
        );
        r.register(
            "colo_blockd_checkpoints_requested",
            "Checkpoints asked of the primary, by reason",
            checkpoints_requested,
        );
        r.register(
            "colo_blockd_checkpoint_request_failures",
            "Checkpoint requests the primary's QMP monitor did not take",
            checkpoint_request_failures.clone(),
        );
        r.register(
            "colo_blockd_epoch",
            "Epoch of the relay's last event",
            epoch.clone(),
        );
        r.register(
            "colo_blockd_relay_connected",
            "1 while subscribed to the relay's control socket; COLO cannot checkpoint at 0",
            relay_connected.clone(),
        );
        r.register(
            "colo_blockd_failovers",
            "Failovers to this secondary",
            failovers.clone(),
        );
        r.register("colo_blockd_nbd_connections", "NBD connections open", open);
        r.register(
            "colo_blockd_nbd_connections",
            "NBD connections accepted",
            accepted,
        );
        r.register(
            "colo_blockd_nbd_connections_refused",
            "NBD connections closed before the greeting, by reason (limit: --max-connections \
             clients already served)",
            refused,
        );
        r.register(
            "colo_blockd_nbd_tls_refused",
            "TCP NBD clients refused for TLS, by reason (no-starttls: an option before \
             NBD_OPT_STARTTLS, answered NBD_REP_ERR_TLS_REQD; handshake: no certificate, \
             another CA's, or a name not in --tls-peer)",
            tls_family,
        );
        r.register(
            "colo_blockd_nbd_unauthenticated",
            "1 when the TCP NBD listener serves without TLS (no --tls-dir): anyone who reaches \
             it can read and write the exports",
            nbd_unauthenticated.clone(),
        );
        r.register(
            "colo_blockd_nbd_connections_dropped",
            "NBD connections the server ended, by reason (handshake-timeout; write-timeout: \
             the client stopped reading its replies; peer-timeout: TCP keepalive or \
             TCP_USER_TIMEOUT, a dead peer or link)",
            dropped,
        );
        r.register(
            "colo_blockd_nbd_max_connections",
            "NBD connections served at once at most (--max-connections)",
            nbd_max_connections.clone(),
        );
        r.register(
            "colo_blockd_nbd_requests",
            "NBD requests answered, by export and command",
            requests.clone(),
        );
        r.register(
            "colo_blockd_nbd_request_errors",
            "NBD requests answered with an error, by export and command",
            request_errors.clone(),
        );
        r.register(
            "colo_blockd_nbd_bytes",
            "Data bytes of successful NBD reads and writes, by export",
            bytes.clone(),
        );

        Registry {
            pvm_log_memory_bytes,
            pvm_log_spilled_bytes,
            svm_overlay_memory_bytes,
            svm_overlay_spilled_bytes,
            commit_duration,
            checkpoints_committed,
            committed_bytes,
            checkpoints_requested_log_full,
            checkpoint_request_failures,
            epoch,
            relay_connected,
            failovers,
            nbd_max_connections,
            connections_refused_limit,
            tls_refused,
            nbd_unauthenticated,
            connections_dropped,
            connections,
            connections_total,
            requests,
            request_errors,
            bytes,
            exports: Mutex::default(),
            exposition: Arc::new(MetricsRegistry::new(r)),
        }
    }
}

impl Registry {
    /// Connections open on `transport`.
    pub fn connections(&self, transport: Transport) -> u64 {
        self.connections[transport as usize].get()
    }

    /// Connections accepted on `transport` so far.
    pub fn connections_total(&self, transport: Transport) -> u64 {
        self.connections_total[transport as usize].get()
    }

    /// Connections refused because `--max-connections` were served.
    pub fn connections_refused_limit(&self) -> u64 {
        self.connections_refused_limit.get()
    }

    /// Connections the server ended for `reason`.
    pub fn connections_dropped(&self, reason: DropReason) -> u64 {
        self.connections_dropped[reason as usize].get()
    }

    /// The counters of export `name`, created on first use (once per
    /// connection, not per request).
    pub fn export(&self, name: &str) -> Arc<ExportMetrics> {
        let mut exports = self
            .exports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(e) = exports.iter().find(|e| e.name == name) {
            return Arc::clone(e);
        }
        let command = |c: NbdCommand| CommandLabels {
            export: name.to_owned(),
            command: c.label(),
        };
        let direction = |direction| DirectionLabels {
            export: name.to_owned(),
            direction,
        };
        let e = Arc::new(ExportMetrics {
            name: name.to_owned(),
            requests: NbdCommand::ALL.map(|c| self.requests.get_or_create_owned(&command(c))),
            errors: NbdCommand::ALL.map(|c| self.request_errors.get_or_create_owned(&command(c))),
            read_bytes: self.bytes.get_or_create_owned(&direction("read")),
            written_bytes: self.bytes.get_or_create_owned(&direction("write")),
        });
        exports.push(Arc::clone(&e));
        e
    }

    /// The registry in the text exposition format.
    pub fn render(&self) -> String {
        self.exposition.encode()
    }
}

/// Counts its connection as closed when dropped.
#[derive(Debug)]
pub struct ConnectionGuard {
    open: Gauge,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// The handle every part of colo-blockd updates; clones share one
/// [`Registry`].
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    registry: Arc<Registry>,
}

impl Metrics {
    /// A fresh registry, every value zero.
    pub fn new() -> Metrics {
        Metrics::default()
    }

    /// Counts a new NBD connection on `transport`; the returned guard
    /// counts it as closed when dropped.
    pub fn connection_opened(&self, transport: Transport) -> ConnectionGuard {
        let i = transport as usize;
        self.registry.connections[i].inc();
        self.registry.connections_total[i].inc();
        ConnectionGuard {
            open: self.registry.connections[i].clone(),
        }
    }

    /// Counts a connection closed before the greeting because the server
    /// already served its maximum.
    pub fn connection_refused_limit(&self) {
        self.registry.connections_refused_limit.inc();
    }

    /// Counts a TCP client refused for TLS.
    pub fn tls_refused(&self, reason: TlsRefusal) {
        self.registry.tls_refused[reason as usize].inc();
    }

    /// TCP clients refused for TLS, for `reason`.
    pub fn tls_refusals(&self, reason: TlsRefusal) -> u64 {
        self.registry.tls_refused[reason as usize].get()
    }

    /// Says whether the TCP listener serves without TLS.
    pub fn set_nbd_unauthenticated(&self, unauthenticated: bool) {
        self.registry
            .nbd_unauthenticated
            .set(u64::from(unauthenticated));
    }

    /// 1 when the TCP listener serves without TLS.
    pub fn nbd_unauthenticated(&self) -> u64 {
        self.registry.nbd_unauthenticated.get()
    }

    /// Counts a connection the server ended for `reason`.
    pub fn connection_dropped(&self, reason: DropReason) {
        self.registry.connections_dropped[reason as usize].inc();
    }

    /// Every family, registered: what colo-daemon's
    /// [`serve_metrics`](colo_daemon::metrics::serve_metrics) serves.
    pub fn metrics_registry(&self) -> Arc<MetricsRegistry> {
        Arc::clone(&self.registry.exposition)
    }
}

impl std::ops::Deref for Metrics {
    type Target = Registry;

    fn deref(&self) -> &Registry {
        &self.registry
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The value of the sample line `series` (name with labels, exactly as
    /// rendered).
    fn value(text: &str, series: &str) -> Option<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ').map(str::to_owned))
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_in_the_count() {
        let m = Metrics::new();
        for ms in [0, 1, 3, 30, 20_000] {
            m.commit_duration
                .observe(Duration::from_millis(ms).as_secs_f64());
        }
        let text = m.render();
        let bucket = |le: &str| {
            value(
                &text,
                &format!("colo_blockd_commit_duration_seconds_bucket{{le=\"{le}\"}}"),
            )
        };
        assert_eq!(bucket("0.001").as_deref(), Some("2"), "{text}");
        assert_eq!(bucket("0.005").as_deref(), Some("3"));
        assert_eq!(bucket("0.05").as_deref(), Some("4"));
        assert_eq!(bucket("10").as_deref(), Some("4"));
        assert_eq!(bucket("+Inf").as_deref(), Some("5"));
        assert_eq!(
            value(&text, "colo_blockd_commit_duration_seconds_count").as_deref(),
            Some("5")
        );
        assert_eq!(
            value(&text, "colo_blockd_commit_duration_seconds_sum").as_deref(),
            Some("20.034")
        );
    }

    #[test]
    fn exports_and_transports_are_labelled() {
        let m = Metrics::new();
        let svm = m.export("svm");
        svm.request(NbdCommand::Write, true, 4096);
        svm.request(NbdCommand::Write, false, 4096);
        svm.request(NbdCommand::Read, true, 512);
        assert!(Arc::ptr_eq(&svm, &m.export("svm")));
        let guard = m.connection_opened(Transport::Tcp);
        let text = m.render();
        for (series, expected) in [
            (
                "colo_blockd_nbd_requests_total{export=\"svm\",command=\"write\"}",
                "2",
            ),
            (
                "colo_blockd_nbd_request_errors_total{export=\"svm\",command=\"write\"}",
                "1",
            ),
            (
                "colo_blockd_nbd_bytes_total{export=\"svm\",direction=\"write\"}",
                "4096",
            ),
            (
                "colo_blockd_nbd_bytes_total{export=\"svm\",direction=\"read\"}",
                "512",
            ),
            ("colo_blockd_nbd_connections{transport=\"tcp\"}", "1"),
            ("colo_blockd_nbd_connections{transport=\"unix\"}", "0"),
        ] {
            assert_eq!(value(&text, series).as_deref(), Some(expected), "{series}");
        }
        drop(guard);
        let text = m.render();
        assert_eq!(
            value(&text, "colo_blockd_nbd_connections{transport=\"tcp\"}").as_deref(),
            Some("0")
        );
        assert_eq!(
            value(
                &text,
                "colo_blockd_nbd_connections_total{transport=\"tcp\"}"
            )
            .as_deref(),
            Some("1")
        );
    }

    #[test]
    fn refused_and_dropped_connections_are_counted_by_reason_from_zero() {
        let m = Metrics::new();
        let series = [
            "colo_blockd_nbd_connections_refused_total{reason=\"limit\"}",
            "colo_blockd_nbd_connections_dropped_total{reason=\"handshake-timeout\"}",
            "colo_blockd_nbd_connections_dropped_total{reason=\"write-timeout\"}",
            "colo_blockd_nbd_max_connections",
            "colo_blockd_nbd_connections_dropped_total{reason=\"peer-timeout\"}",
        ];
        let text = m.render();
        for s in series {
            assert_eq!(value(&text, s).as_deref(), Some("0"), "{s}: {text}");
        }
        m.connection_refused_limit();
        m.connection_refused_limit();
        m.connection_dropped(DropReason::WriteTimeout);
        m.nbd_max_connections.set(16);
        let text = m.render();
        for (s, want) in series.iter().zip(["2", "0", "1", "16", "0"]) {
            assert_eq!(value(&text, s).as_deref(), Some(want), "{s}");
        }
        assert_eq!(m.connections_refused_limit(), 2);
        assert_eq!(m.connections_dropped(DropReason::HandshakeTimeout), 0);
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new();
        m.export("a\"b\\c\nd").request(NbdCommand::Flush, true, 0);
        let text = m.render();
        assert!(
            text.contains(
                "colo_blockd_nbd_requests_total{export=\"a\\\"b\\\\c\\nd\",command=\"flush\"} 1"
            ),
            "{text}"
        );
    }

    #[test]
    fn every_family_has_help_and_type_before_its_samples() {
        let text = Metrics::new().render();
        let mut typed = std::collections::HashMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(
                    text.contains(&format!("# HELP {name} ")),
                    "{name} has no HELP"
                );
                typed.insert(name.to_owned(), kind.to_owned());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains_key(*f)))
                    .unwrap_or(name);
                assert!(typed.contains_key(family), "{name} sampled before its TYPE");
            }
        }
        assert_eq!(typed["colo_blockd_commit_duration_seconds"], "histogram");
        assert_eq!(typed["colo_blockd_checkpoints_committed_total"], "counter");
    }
}
