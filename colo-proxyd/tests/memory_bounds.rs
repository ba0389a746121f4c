//! Memory bounds under a flood of connections (issue 12; `docs/memory-bounds.md`), against the
//! real `colo-proxyd` binary: both daemons as processes, QEMU's chardevs, the primary's QMP
//! monitor and the relay faked in this test (`common`).
//!
//! ```text
//!  mirror0 (client SYNs, ACKs) ─► primary ─► compare_out (drained, probes timed)
//!  compare0 (PVM SYN-ACKs, data) ─►  ▲ link ◄── secondary ◄── red1 (SVM SYN-ACKs, data)
//!                                               │   ▲ red3 (after the failover: the network)
//!                            red0 (drained) ◄───┘   └─► red2 (drained)
//! ```
//!
//! Phase 1, COLO: rounds of thousands of connections (half-open handshakes, the answers to a
//! SYN flood, and established connections that then stay idle; the SVM picks other ISNs, as a
//! real guest does), checkpoints as the primary asks for them (a full flow table, hold
//! timeouts) and periodically. Phase 2, after a failover to the secondary: the same through the
//! secondary's network bridge, with the last epoch's connections' offsets kept. The flow table and the rewrite
//! table are given small bounds so that the flood is many times larger than either. Asserted:
//! the tables never pass their bounds, a full table asks for a checkpoint and holds (nothing is
//! released uncompared or lost: every PVM frame comes out), and each daemon's RSS stays flat
//! from round to round. Latency is printed, not asserted: the p99 of a normal client's
//! exchange, idle and during the flood.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use colo_control::hub::ControlHub;
use colo_control::protocol::{EventBody, EventKind};
use colo_proxyd::codec::{Frame, FrameDecoder, encode};
use colo_types::Role;
use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The bounds given to the daemons: the flood is many times larger.
const MAX_FLOWS: u64 = 4096;
const MAX_REWRITE: u64 = 4096;
/// Connections per round, rounds per phase.
const PER_ROUND: u32 = 5000;
const ROUNDS: u32 = 5;
/// One established (then idle) connection in this many; the others stay half-open.
const ESTABLISHED_EVERY: u32 = 4;
/// The flood's rate: new connections per second, in batches of [`BATCH`], one a millisecond
/// (tokio's timer resolution). Fifty at a time every 10 ms, as this test once sent them, put
/// each probe behind a burst of some 190 frames: the probe measured the burst, not the flood.
const RATE: u32 = 5000;
const BATCH: u32 = 5;
/// A normal client's exchange, timed, every this many new connections of the flood.
const PROBE_EVERY: u32 = 25;
/// QEMU's periodic checkpoint, scaled down from its 20 s.
const CHECKPOINT_PERIOD: Duration = Duration::from_secs(2);
const PROBE_PORT: u16 = 2000;
/// A normal client's exchanges before the flood, one every 2 ms.
const IDLE_PROBES: u32 = 500;
/// RSS may grow this much from the second round to the last (allocator noise); a flood that
/// leaked its tables would add tens of MiB.
const RSS_SLACK_KIB: u64 = 6 * 1024;

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// A `colo-proxyd` process, killed on drop.
struct Daemon(Child);

impl Daemon {
    fn spawn(args: &[String]) -> Daemon {
        let child = Command::new(env!("CARGO_BIN_EXE_colo-proxyd"))
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Daemon(child)
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.0.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TCP frame between the VM (10.0.0.2:80) and the client port `port` of 10.0.0.9.
fn conn(port: u16, from_vm: bool, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = tcp(from_vm, seq, ack, flags, payload);
    let at = if from_vm { 36 } else { 34 };
    f[at..at + 2].copy_from_slice(&port.to_be_bytes());
    f
}

fn client_port(f: &[u8], from_vm: bool) -> u16 {
    let at = if from_vm { 36 } else { 34 };
    u16::from_be_bytes([f[at], f[at + 1]])
}

fn seq_of(f: &[u8]) -> u32 {
    u32::from_be_bytes(f[38..42].try_into().unwrap())
}

/// Frames for one chardev, written in batches (one write per batch, as a busy QEMU does).
struct Writer {
    stream: TcpStream,
    wire: Vec<u8>,
}

impl Writer {
    fn new(stream: TcpStream) -> Writer {
        stream.set_nodelay(true).unwrap();
        Writer {
            stream,
            wire: Vec::new(),
        }
    }

    fn push(&mut self, frame: Vec<u8>) {
        encode(&Frame::ethernet(frame), false, &mut self.wire).unwrap();
    }

    async fn flush(&mut self) {
        self.stream.write_all(&self.wire).await.unwrap();
        self.wire.clear();
    }
}

/// Reads every frame the daemon writes to `stream`, counting them; the probe's frames (client
/// port [`PROBE_PORT`]) go to `probes` as (sequence number, arrival). On a thread of its own,
/// blocked in `read`: an arrival is stamped when the kernel hands it over, not when this
/// test's runtime, busy writing the flood, gets round to it.
fn drain(
    stream: TcpStream,
    from_vm: bool,
    count: Arc<AtomicU64>,
    probes: mpsc::UnboundedSender<(u32, Instant)>,
) {
    let mut stream = stream.into_std().unwrap();
    stream.set_nonblocking(false).unwrap();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut decoder = FrameDecoder::new(false);
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let now = Instant::now();
            while let Ok(Some(frame)) = decoder.next_frame() {
                count.fetch_add(1, Ordering::Relaxed);
                if client_port(&frame.data, from_vm) == PROBE_PORT {
                    let _ = probes.send((seq_of(&frame.data), now));
                }
            }
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => decoder.feed(&buf[..n]),
            }
        }
    });
}

async fn accept(listener: &TcpListener) -> TcpStream {
    tokio::time::timeout(PATIENCE, listener.accept())
        .await
        .expect("the daemon connects in time")
        .unwrap()
        .0
}

async fn connect_when_listening(addr: &str) -> TcpStream {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Ok(stream) = TcpStream::connect(addr).await {
            return stream;
        }
        assert!(Instant::now() < deadline, "{addr} never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of the metrics line `name` (exactly, labels included), 0 when absent.
async fn metric(addr: &str, name: &str) -> u64 {
    scrape(addr)
        .await
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

async fn wait_metric_at_least(addr: &str, name: &str, min: u64) {
    let deadline = Instant::now() + PATIENCE;
    while metric(addr, name).await < min {
        assert!(Instant::now() < deadline, "{name} never reached {min}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `count` reaches `n`.
async fn wait_count(count: &AtomicU64, n: u64, what: &str) {
    let deadline = Instant::now() + PATIENCE;
    while count.load(Ordering::Relaxed) < n {
        assert!(
            Instant::now() < deadline,
            "{what}: {} of {n}",
            count.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Latencies of the probes sent (seq → sent), matched with their arrivals.
struct Probes {
    sent: std::collections::HashMap<u32, Instant>,
    arrived: mpsc::UnboundedReceiver<(u32, Instant)>,
    next_seq: u32,
}

impl Probes {
    fn new(arrived: mpsc::UnboundedReceiver<(u32, Instant)>) -> Probes {
        Probes {
            sent: Default::default(),
            arrived,
            next_seq: 100_000,
        }
    }

    /// The next probe's sequence number, noted as sent now.
    fn next(&mut self) -> u32 {
        let seq = self.next_seq;
        self.next_seq += 6;
        self.sent.insert(seq, Instant::now());
        seq
    }

    /// Waits for every probe sent; returns their latencies.
    async fn collect(&mut self) -> Latencies {
        let mut latencies = Vec::new();
        while !self.sent.is_empty() {
            let (seq, at) = tokio::time::timeout(PATIENCE, self.arrived.recv())
                .await
                .expect("every probe arrives")
                .unwrap();
            if let Some(sent) = self.sent.remove(&seq) {
                latencies.push((sent, at - sent));
            }
        }
        Latencies(latencies)
    }
}

/// A normal client's exchanges over some span: when each was sent, and its latency.
#[derive(Clone, Default)]
struct Latencies(Vec<(Instant, Duration)>);

impl Latencies {
    /// The latency `q` of the way up (0.5: the median).
    fn quantile(&self, q: f64) -> Duration {
        let mut sorted: Vec<Duration> = self.0.iter().map(|(_, latency)| *latency).collect();
        sorted.sort_unstable();
        sorted[((sorted.len() - 1) as f64 * q) as usize]
    }

    fn pooled(all: &[Latencies]) -> Latencies {
        Latencies(all.iter().flat_map(|l| l.0.iter().copied()).collect())
    }

    /// Of the slowest 1 % of the exchanges, how many overlapped a checkpoint (its span, from
    /// the first barrier to the acknowledged last, widened by a millisecond on each side).
    fn slowest_during_checkpoints(&self, checkpoints: &[(Instant, Instant)]) -> (usize, usize) {
        let mut by_latency = self.0.clone();
        by_latency.sort_unstable_by_key(|(_, latency)| std::cmp::Reverse(*latency));
        let slowest = &by_latency[..by_latency.len().div_ceil(100)];
        let margin = Duration::from_millis(1);
        let overlapping = slowest
            .iter()
            .filter(|(sent, latency)| {
                checkpoints
                    .iter()
                    .any(|(start, end)| *start < *sent + *latency + margin && *end + margin > *sent)
            })
            .count();
        (slowest.len(), overlapping)
    }
}

/// When each checkpoint ran: from its first barrier to its last acknowledged.
type CheckpointSpans = Arc<std::sync::Mutex<Vec<(Instant, Instant)>>>;

/// QEMU's and the relay's side of checkpoints: one (the relay's two barriers) at each request
/// colo-proxyd sends over QMP, and one every [`CHECKPOINT_PERIOD`] without a request (QEMU's
/// periodic checkpoint, scaled down), until `stop`; returns the epoch then.
async fn checkpoints_on_request(
    hub: ControlHub,
    mut monitor: FakeMonitor,
    mut epoch: u64,
    stop: CancellationToken,
    done: CheckpointSpans,
) -> u64 {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return epoch,
            _ = monitor.recv_named("migrate-set-parameters", CHECKPOINT_PERIOD) => {}
        }
        let start = Instant::now();
        for kind in [EventKind::SvmEpochClosed, EventKind::CheckpointAdopted] {
            hub.barrier(EventBody::new(kind, epoch), Duration::from_secs(10))
                .await
                .expect("barrier acknowledged");
        }
        epoch += 1;
        done.lock().unwrap().push((start, Instant::now()));
    }
}

/// Waits until connection `i` of a round started at `start` is due at [`RATE`].
async fn pace(start: tokio::time::Instant, i: u32) {
    let due = Duration::from_secs_f64(f64::from(i) / f64::from(RATE));
    tokio::time::sleep_until(start + due).await;
}

fn p(label: &str, latencies: &Latencies) {
    eprintln!(
        "{label}: p50 {:?}, p99 {:?}, max {:?} ({} probes)",
        latencies.quantile(0.5),
        latencies.quantile(0.99),
        latencies.quantile(1.0),
        latencies.0.len()
    );
}

/// Prints each flood round's latencies, then the whole flood's p99 against the idle one and
/// the worst round's (200 probes a round: its p99 is about its third slowest).
fn report_flood(phase: &str, what: &str, idle: &Latencies, during: &[Latencies]) {
    for (round, latencies) in during.iter().enumerate() {
        p(&format!("{phase}, flood round {round}: {what}"), latencies);
    }
    let pooled = Latencies::pooled(during);
    p(&format!("{phase}, the whole flood: {what}"), &pooled);
    let idle_p99 = idle.quantile(0.99).as_secs_f64();
    let worst = during.iter().map(|l| l.quantile(0.99)).max().unwrap();
    eprintln!(
        "{phase} p99 ratio flood/idle: {:.2} (worst round's p99: {:.2})",
        pooled.quantile(0.99).as_secs_f64() / idle_p99,
        worst.as_secs_f64() / idle_p99,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_connections_stays_within_the_bounds_through_checkpoints_and_a_failover() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, control) = hub_in_colo(dir.path(), 1);
    let qmp = dir.path().join("qmp.sock");
    let monitor = fake_qmp(&qmp, &["compare0", "compare_out", "mirror0"]);

    let ports = PrimaryPorts::bind().await;
    let (link, p_metrics) = (free_addr(), free_addr());
    let mut args = ports.primary_args(&link, &control, &qmp, &p_metrics);
    args.extend(["--max-flows".into(), MAX_FLOWS.to_string()]);
    let primary = Daemon::spawn(&args);
    let mut pvm = Writer::new(accept(&ports.compare0).await);
    let mut mirror = Writer::new(accept(&ports.mirror0).await);
    let released = Arc::new(AtomicU64::new(0));
    let (probe_tx, probe_rx) = mpsc::unbounded_channel();
    drain(
        accept(&ports.compare_out).await,
        true,
        released.clone(),
        probe_tx.clone(),
    );

    let (red0, red1, red2, red3, s_metrics) = (
        free_addr(),
        free_addr(),
        free_addr(),
        free_addr(),
        free_addr(),
    );
    let secondary = Daemon::spawn(&[
        "secondary".into(),
        "--svm-input-listen".into(),
        red0.clone(),
        "--svm-output-listen".into(),
        red1.clone(),
        "--net-output-listen".into(),
        red2.clone(),
        "--net-input-listen".into(),
        red3.clone(),
        "--primary-link".into(),
        link,
        "--control".into(),
        control.display().to_string(),
        "--metrics".into(),
        s_metrics.clone(),
        "--rewrite-max-connections".into(),
        MAX_REWRITE.to_string(),
    ]);
    let into_svm = Arc::new(AtomicU64::new(0));
    let (svm_probe_tx, svm_probe_rx) = mpsc::unbounded_channel();
    drain(
        connect_when_listening(&red0).await,
        false,
        into_svm.clone(),
        svm_probe_tx,
    );
    let mut svm = Writer::new(connect_when_listening(&red1).await);
    wait_subscribers(&hub, 2).await;
    wait_metric(&p_metrics, "colo_proxyd_comparing 1").await;
    wait_metric(&p_metrics, "colo_proxyd_connection_up{port=\"link\"} 1").await;
    wait_metric(&s_metrics, "colo_proxyd_connection_up{port=\"link\"} 1").await;

    // --- Phase 1: COLO. ---
    let stop = CancellationToken::new();
    let checkpoints = CheckpointSpans::default();
    let qemu = tokio::spawn(checkpoints_on_request(
        hub.clone(),
        monitor,
        1,
        stop.clone(),
        checkpoints.clone(),
    ));
    let mut probes = Probes::new(probe_rx);
    // A normal client, idle system: its request's answer from both VMs, released.
    for _ in 0..IDLE_PROBES {
        let seq = probes.next();
        pvm.push(conn(PROBE_PORT, true, seq, 1, 0x18, b"answer"));
        pvm.flush().await;
        svm.push(conn(PROBE_PORT, true, seq, 1, 0x18, b"answer"));
        svm.flush().await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let idle = probes.collect().await;
    p("COLO, idle: a normal client's answer released after", &idle);

    eprintln!(
        "before the flood: primary RSS {} KiB, secondary RSS {} KiB",
        primary.rss_kib(),
        secondary.rss_kib()
    );
    let mut pvm_frames = u64::from(IDLE_PROBES);
    let mut rss = Vec::new();
    let mut flows_seen = Vec::new();
    let mut during = Vec::new();
    for round in 0..ROUNDS {
        let base = 10_000 + (round * PER_ROUND) as u16 as u32;
        let start = tokio::time::Instant::now();
        for i in 0..PER_ROUND {
            if i % BATCH == 0 {
                pace(start, i).await;
            }
            if i % PROBE_EVERY == 0 {
                let seq = probes.next();
                pvm.push(conn(PROBE_PORT, true, seq, 1, 0x18, b"answer"));
                pvm.flush().await;
                svm.push(conn(PROBE_PORT, true, seq, 1, 0x18, b"answer"));
                svm.flush().await;
                pvm_frames += 1;
            }
            let port = (base + i) as u16;
            let svm_isn = 50_000 + i;
            mirror.push(conn(port, false, 500, 0, 0x02, b""));
            pvm.push(conn(port, true, 1000, 501, 0x12, b""));
            svm.push(conn(port, true, svm_isn, 501, 0x12, b""));
            pvm_frames += 1;
            if i % ESTABLISHED_EVERY == 0 {
                mirror.push(conn(port, false, 501, 1001, 0x10, b""));
                pvm.push(conn(port, true, 1001, 501, 0x18, b"hello"));
                svm.push(conn(port, true, svm_isn + 1, 501, 0x18, b"hello"));
                pvm_frames += 1;
            }
            if i % BATCH == BATCH - 1 {
                mirror.flush().await;
                pvm.flush().await;
                svm.flush().await;
            }
        }
        mirror.flush().await;
        pvm.flush().await;
        svm.flush().await;
        during.push(probes.collect().await);
        flows_seen.push(metric(&p_metrics, "colo_proxyd_flows").await);
        flows_seen.push(metric(&s_metrics, "colo_proxyd_flows").await);
        // What waits (new flows of a full table) goes at the checkpoint it asked for.
        wait_count(&released, pvm_frames, "PVM frames released").await;
        wait_metric(&p_metrics, "colo_proxyd_held_packets 0").await;
        rss.push((primary.rss_kib(), secondary.rss_kib()));
        eprintln!(
            "COLO round {round}: {} checkpoints so far; primary flows {}, RSS {} KiB; \
             secondary connections {}, RSS {} KiB",
            checkpoints.lock().unwrap().len(),
            flows_seen[flows_seen.len() - 2],
            rss[rss.len() - 1].0,
            flows_seen[flows_seen.len() - 1],
            rss[rss.len() - 1].1,
        );
    }
    report_flood(
        "COLO",
        "a normal client's answer released after",
        &idle,
        &during,
    );
    let (slowest, overlapping) =
        Latencies::pooled(&during).slowest_during_checkpoints(&checkpoints.lock().unwrap());
    eprintln!(
        "COLO: of the flood's {slowest} slowest exchanges, {overlapping} overlapped a checkpoint"
    );
    assert!(
        flows_seen.iter().all(|&n| n <= MAX_FLOWS.max(MAX_REWRITE)),
        "{flows_seen:?}"
    );
    // Each round had more new connections than the tables hold.
    wait_metric_at_least(
        &p_metrics,
        "colo_proxyd_checkpoints_needed_total{reason=\"flow-table-full\"}",
        1,
    )
    .await;
    wait_metric_at_least(
        &p_metrics,
        "colo_proxyd_table_forgotten_entries_total{table=\"flows\",why=\"evicted\"}",
        1,
    )
    .await;
    wait_metric_at_least(
        &s_metrics,
        "colo_proxyd_table_full_refusals_total{table=\"rewrite\",why=\"full\"}",
        1,
    )
    .await;
    assert_eq!(
        released.load(Ordering::Relaxed),
        pvm_frames,
        "no PVM frame lost"
    );
    let flat = |which: &str, kib: &[u64]| {
        let growth = kib[kib.len() - 1].saturating_sub(kib[1]);
        eprintln!("{which} RSS growth from round 1 to the last: {growth} KiB ({kib:?})");
        assert!(growth <= RSS_SLACK_KIB, "{which}: {kib:?}");
    };
    flat("primary", &rss.iter().map(|r| r.0).collect::<Vec<_>>());
    flat(
        "secondary (COLO)",
        &rss.iter().map(|r| r.1).collect::<Vec<_>>(),
    );

    // --- Phase 2: a failover to the secondary; its bridge carries the SVM's traffic. ---
    // Connections opened in the last epoch before the failover have offsets (the SVM's ISNs
    // differ): their state must outlive the failover.
    stop.cancel();
    let epoch = qemu.await.unwrap();
    let last_epoch = PER_ROUND / ESTABLISHED_EVERY;
    for i in 0..last_epoch {
        let port = (60_000 + i) as u16;
        mirror.push(conn(port, false, 500, 0, 0x02, b""));
        svm.push(conn(port, true, 50_000 + i, 501, 0x12, b""));
        mirror.push(conn(port, false, 501, 1001, 0x10, b""));
    }
    mirror.flush().await;
    svm.flush().await;
    // Besides what the last round left since its checkpoint.
    wait_metric_at_least(&s_metrics, "colo_proxyd_flows", u64::from(last_epoch)).await;
    hub.publish(EventBody::new(EventKind::Failover, epoch).with_survivor(Role::Secondary))
        .await;
    let to_network = Arc::new(AtomicU64::new(0));
    let (net_probe_tx, _net_probes) = mpsc::unbounded_channel();
    drain(
        connect_when_listening(&red2).await,
        true,
        to_network.clone(),
        net_probe_tx,
    );
    let mut network = Writer::new(connect_when_listening(&red3).await);
    wait_metric(&s_metrics, "colo_proxyd_comparing 0").await;
    let kept = metric(&s_metrics, "colo_proxyd_flows").await;
    let shifted = metric(&s_metrics, "colo_proxyd_failover_offset_connections").await;
    eprintln!("failover: the secondary keeps {kept} connections' state, {shifted} with an offset");
    assert!(
        kept >= u64::from(last_epoch) && kept <= MAX_REWRITE,
        "{kept}"
    );

    let mut svm_probes = Probes::new(svm_probe_rx);
    let before = into_svm.load(Ordering::Relaxed);
    for _ in 0..IDLE_PROBES {
        let seq = svm_probes.next();
        network.push(conn(PROBE_PORT, false, seq, 1, 0x18, b"answer"));
        network.flush().await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let idle = svm_probes.collect().await;
    p(
        "failover, idle: a normal client's request into the SVM after",
        &idle,
    );
    let mut into_svm_frames = before + u64::from(IDLE_PROBES);
    let mut svm_frames = 0u64;
    let mut rss = Vec::new();
    let mut during = Vec::new();
    for round in 0..ROUNDS {
        let base = 10_000 + (round * PER_ROUND) as u16 as u32;
        let start = tokio::time::Instant::now();
        for i in 0..PER_ROUND {
            if i % BATCH == 0 {
                pace(start, i).await;
            }
            if i % PROBE_EVERY == 0 {
                let seq = svm_probes.next();
                network.push(conn(PROBE_PORT, false, seq, 1, 0x18, b"answer"));
                network.flush().await;
                into_svm_frames += 1;
            }
            let port = (base + i) as u16;
            let isn = 70_000 + i;
            network.push(conn(port, false, 500, 0, 0x02, b""));
            svm.push(conn(port, true, isn, 501, 0x12, b""));
            into_svm_frames += 1;
            svm_frames += 1;
            if i % ESTABLISHED_EVERY == 0 {
                network.push(conn(port, false, 501, isn + 1, 0x10, b""));
                svm.push(conn(port, true, isn + 1, 501, 0x18, b"hello"));
                into_svm_frames += 1;
                svm_frames += 1;
            }
            if i % BATCH == BATCH - 1 {
                network.flush().await;
                svm.flush().await;
            }
        }
        network.flush().await;
        svm.flush().await;
        during.push(svm_probes.collect().await);
        wait_count(&into_svm, into_svm_frames, "frames into the SVM").await;
        wait_count(&to_network, svm_frames, "SVM frames to the network").await;
        let connections = metric(&s_metrics, "colo_proxyd_flows").await;
        rss.push(secondary.rss_kib());
        eprintln!(
            "failover round {round}: secondary connections {connections}, RSS {} KiB",
            rss[rss.len() - 1]
        );
        assert!(
            connections <= kept,
            "new connections after the failover take no state: {connections} > {kept}"
        );
    }
    report_flood(
        "failover",
        "a normal client's request into the SVM after",
        &idle,
        &during,
    );
    flat("secondary (failed over)", &rss);
    drop((primary, secondary));
}
