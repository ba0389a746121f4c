//! The secondary daemon after a failover to the secondary, in process, against fakes: QEMU's
//! chardev clients `red0`..`red3`, a fake primary daemon on the link, and the relay (an
//! in-process hub).
//!
//! ```text
//!  fake primary (link) ─► secondary ─► fake red0 (into the SVM)
//!  fake red1 (SVM output) ─►   │  ─► fake red2 (to the network, after the failover)
//!  fake red3 (from the network) ─┘
//! ```
//!
//! The daemon's logs go to one process-wide buffer; each test runs its daemon in a span named
//! after the test, so it finds its own lines (the role loop's, which runs in that span).

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use colo_control::hub::ControlHub;
use colo_control::protocol::{EventBody, EventKind};
use colo_proxyd::daemon::config::{SecondaryArgs, SecondaryConfig};
use colo_proxyd::daemon::link::{self, LINK_VERSION, LinkDecoder, LinkMessage};
use colo_proxyd::daemon::secondary;
use colo_types::Role;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

const EPOCH: u64 = 1;
/// Nothing should come within this; a wrong frame comes within milliseconds.
const QUIET: Duration = Duration::from_millis(300);

/// Every log line of this test binary.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    /// The process-wide buffer, installed as the global subscriber's output on first use.
    fn get() -> &'static Logs {
        static LOGS: OnceLock<Logs> = OnceLock::new();
        LOGS.get_or_init(|| {
            let logs = Logs::default();
            let writer = logs.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_ansi(false)
                .with_max_level(tracing::Level::INFO)
                .with_writer(move || writer.clone())
                .finish();
            tracing::subscriber::set_global_default(subscriber).unwrap();
            logs
        })
    }

    /// The lines the daemon of test `test` wrote (see [`start`]).
    fn of(test: &str) -> Vec<String> {
        let marker = format!("{{test={test}}}");
        let logs = Logs::get().0.lock().unwrap();
        String::from_utf8_lossy(&logs)
            .lines()
            .filter(|l| l.contains(&marker))
            .map(str::to_owned)
            .collect()
    }

    /// The first line of test `test` containing `needle`; panics when none came in time.
    async fn wait_line(test: &str, needle: &str) -> String {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            if let Some(line) = Logs::of(test).into_iter().find(|l| l.contains(needle)) {
                return line;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{test} never logged {needle:?}:\n{}",
                Logs::of(test).join("\n")
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The primary's end of the link: sends mirrored frames, collects what the secondary sends.
struct FakePrimary {
    to_secondary: mpsc::UnboundedSender<Vec<u8>>,
    from_secondary: mpsc::UnboundedReceiver<LinkMessage>,
}

impl FakePrimary {
    /// Listens for the secondary's link on a free port; returns the address too.
    async fn listen() -> (FakePrimary, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (to_secondary, mut outgoing) = mpsc::unbounded_channel::<Vec<u8>>();
        let (incoming, from_secondary) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (mut rd, mut wr) = stream.into_split();
            let mut hello = Vec::new();
            link::encode(
                &LinkMessage::Hello {
                    version: LINK_VERSION,
                    role: Role::Primary,
                },
                &mut hello,
            )
            .unwrap();
            wr.write_all(&hello).await.unwrap();
            tokio::spawn(async move {
                while let Some(frame) = outgoing.recv().await {
                    let mut wire = Vec::new();
                    link::encode(&LinkMessage::Inbound(frame.into()), &mut wire).unwrap();
                    if wr.write_all(&wire).await.is_err() {
                        return;
                    }
                }
            });
            let mut decoder = LinkDecoder::new(Role::Primary);
            let mut buf = vec![0u8; 65536];
            loop {
                let n = match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                decoder.feed(&buf[..n]);
                while let Some(message) = decoder.next_message().unwrap() {
                    if !matches!(message, LinkMessage::Hello { .. }) {
                        let _ = incoming.send(message);
                    }
                }
            }
        });
        (
            FakePrimary {
                to_secondary,
                from_secondary,
            },
            address,
        )
    }

    fn mirror(&self, frame: &[u8]) {
        self.to_secondary.send(frame.to_vec()).unwrap();
    }

    /// The next SVM frame the secondary sent, or `None` within `within`.
    async fn svm_output(&mut self, within: Duration) -> Option<(u64, Vec<u8>)> {
        match tokio::time::timeout(within, self.from_secondary.recv()).await {
            Ok(Some(LinkMessage::SvmOutput { epoch, frame })) => Some((epoch, frame.to_vec())),
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => None,
        }
    }
}

struct Secondary {
    _dir: tempfile::TempDir,
    hub: ControlHub,
    primary: FakePrimary,
    red0: Chardev,
    red1: Chardev,
    /// QEMU's `red2` and `red3` addresses (connected by the test, as QEMU does only after
    /// the failover); `None` without the bridge.
    bridge: Option<(String, String)>,
    metrics: String,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

/// The secondary daemon in COLO at [`EPOCH`], its link to the fake primary up and `red0`,
/// `red1` connected. Its role loop logs in the span `daemon{test=TEST}`.
async fn start(test: &'static str, with_bridge: bool) -> Secondary {
    Logs::get();
    let dir = tempfile::tempdir().unwrap();
    let (hub, control) = hub_in_colo(dir.path(), EPOCH);
    let (primary, link_address) = FakePrimary::listen().await;
    let any = || Some("127.0.0.1:0".to_owned());
    let config = SecondaryConfig::try_from(SecondaryArgs {
        svm_input_listen: any(),
        svm_output_listen: any(),
        net_output_listen: any().filter(|_| with_bridge),
        net_input_listen: any().filter(|_| with_bridge),
        primary_link: Some(link_address),
        control: Some(control.as_path().into()),
        metrics: any(),
        ..SecondaryArgs::default()
    })
    .unwrap();
    let listeners = secondary::SecondaryListeners::bind(&config).await.unwrap();
    let address = |l: &TcpListener| l.local_addr().unwrap().to_string();
    let red0 = address(&listeners.svm_input);
    let red1 = address(&listeners.svm_output);
    let bridge = listeners
        .bridge
        .as_ref()
        .map(|b| (address(&b.net_output), address(&b.net_input)));
    let metrics = address(listeners.metrics.as_ref().unwrap());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { secondary::run(config, listeners, shutdown).await.unwrap() }
            .instrument(tracing::info_span!("daemon", test = %test))
    });
    let s = Secondary {
        _dir: dir,
        hub,
        primary,
        red0: Chardev::connect(&red0).await,
        red1: Chardev::connect(&red1).await,
        bridge,
        metrics,
        shutdown,
        task,
    };
    wait_subscribers(&s.hub, 1).await;
    wait_metric(&s.metrics, &format!("colo_proxyd_epoch {EPOCH}")).await;
    for port in ["link", "red0", "red1"] {
        wait_metric(
            &s.metrics,
            &format!("colo_proxyd_connection_up{{port=\"{port}\"}} 1"),
        )
        .await;
    }
    s
}

impl Secondary {
    /// QEMU's `red2` (to the network) connects.
    async fn connect_red2(&self) -> Chardev {
        let red2 = Chardev::connect(&self.bridge.as_ref().unwrap().0).await;
        wait_metric(&self.metrics, "colo_proxyd_connection_up{port=\"red2\"} 1").await;
        red2
    }

    /// QEMU's `red3` (from the network) connects.
    async fn connect_red3(&self) -> Chardev {
        let red3 = Chardev::connect(&self.bridge.as_ref().unwrap().1).await;
        wait_metric(&self.metrics, "colo_proxyd_connection_up{port=\"red3\"} 1").await;
        red3
    }

    /// The client opens a connection to the VM in this epoch; the PVM answers with ISN 5000,
    /// the SVM with 9000. Returns after the client's handshake ACK reached the SVM.
    async fn open_shifted_connection(&mut self) {
        let syn = checksummed(tcp(false, 100, 0, 0x02, b""));
        self.primary.mirror(&syn);
        assert_eq!(self.red0.recv(PATIENCE).await, Some(syn));
        let svm_syn_ack = checksummed(tcp(true, 9000, 101, 0x12, b""));
        self.red1.send(&svm_syn_ack).await;
        assert_eq!(
            self.primary.svm_output(PATIENCE).await,
            Some((EPOCH, svm_syn_ack)),
            "during COLO the SVM's output goes to the primary, in its own numbers"
        );
        self.primary
            .mirror(&checksummed(tcp(false, 101, 5001, 0x10, b"")));
        let ack = self.red0.recv(PATIENCE).await.unwrap();
        assert_eq!((seq_of(&ack), ack_of(&ack)), (101, 9001));
        assert!(checksum_ok(&ack));
    }

    async fn failover_to_secondary(&self) {
        self.hub
            .publish(EventBody::new(EventKind::Failover, EPOCH).with_survivor(Role::Secondary))
            .await;
        wait_metric(&self.metrics, "colo_proxyd_comparing 0").await;
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("the daemon stops on shutdown")
            .unwrap();
    }
}

/// `frame` (IPv4 TCP from `common::tcp`) with a correct TCP checksum.
fn checksummed(mut frame: Vec<u8>) -> Vec<u8> {
    frame[50..52].copy_from_slice(&[0, 0]);
    let sum = tcp_sum(&frame);
    frame[50..52].copy_from_slice(&(!sum).to_be_bytes());
    frame
}

/// Whether the TCP checksum of an IPv4 frame is right.
fn checksum_ok(frame: &[u8]) -> bool {
    tcp_sum(frame) == 0xffff
}

/// The ones'-complement sum of the TCP pseudo-header and segment, checksum field included.
fn tcp_sum(frame: &[u8]) -> u16 {
    let segment = &frame[34..];
    let mut bytes = frame[26..34].to_vec();
    bytes.extend_from_slice(&[0, 6]);
    bytes.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    bytes.extend_from_slice(segment);
    if bytes.len() % 2 == 1 {
        bytes.push(0);
    }
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn seq_of(frame: &[u8]) -> u32 {
    u32::from_be_bytes(frame[38..42].try_into().unwrap())
}

fn ack_of(frame: &[u8]) -> u32 {
    u32::from_be_bytes(frame[42..46].try_into().unwrap())
}

/// The same frame on another client port (source port of a client frame, destination port
/// of a VM frame), checksum fixed.
fn on_client_port(mut frame: Vec<u8>, port: u16) -> Vec<u8> {
    let at = if frame[34..36] == 80u16.to_be_bytes() {
        36
    } else {
        34
    };
    frame[at..at + 2].copy_from_slice(&port.to_be_bytes());
    checksummed(frame)
}

#[tokio::test]
async fn after_a_failover_a_connection_of_the_last_epoch_keeps_the_pvms_numbers() {
    let mut s = start("rewrite", true).await;
    s.open_shifted_connection().await;
    s.failover_to_secondary().await;
    let line = Logs::wait_line("rewrite", "failover: bridging SVM traffic").await;
    assert!(line.contains("connections_with_offset=1"), "{line}");
    wait_metric(&s.metrics, "colo_proxyd_failover_offset_connections 1").await;

    let mut red2 = s.connect_red2().await;
    let mut red3 = s.connect_red3().await;
    let body = b"HTTP/1.0 200 OK\r\n\r\nhello from the SVM";
    let svm = segments(9001, 101, body, 16);
    for frame in &svm {
        s.red1.send(&checksummed(frame.clone())).await;
    }
    let to_client = red2.recv_n(svm.len()).await;
    for (i, (got, sent)) in to_client.iter().zip(&svm).enumerate() {
        assert_eq!(seq_of(got), 5001 + 16 * i as u32, "segment {i}");
        assert_eq!(ack_of(got), 101);
        assert!(checksum_ok(got), "segment {i}: checksum");
        assert_eq!(got[54..], sent[54..], "segment {i}: payload");
    }
    // The client acknowledges in the PVM's numbers; the SVM gets its own.
    let client_ack = checksummed(tcp(false, 101, 5001 + body.len() as u32, 0x10, b""));
    red3.send(&client_ack).await;
    let into_svm = s.red0.recv(PATIENCE).await.unwrap();
    assert_eq!(ack_of(&into_svm), 9001 + body.len() as u32);
    assert_eq!(seq_of(&into_svm), 101);
    assert!(checksum_ok(&into_svm));

    assert_eq!(
        s.primary.svm_output(QUIET).await,
        None,
        "nothing goes to the primary after the failover"
    );
    wait_metric(
        &s.metrics,
        &format!(
            "colo_proxyd_failover_rewritten_frames_total{{direction=\"out_of_svm\"}} {}",
            svm.len()
        ),
    )
    .await;
    wait_metric(
        &s.metrics,
        "colo_proxyd_failover_rewritten_frames_total{direction=\"into_svm\"} 1",
    )
    .await;
    wait_metric(&s.metrics, "colo_proxyd_dropped_frames_total 0").await;
    s.stop().await;
}

#[tokio::test]
async fn after_a_failover_frames_without_offset_pass_byte_identical() {
    let mut s = start("identical", true).await;
    s.open_shifted_connection().await;
    s.failover_to_secondary().await;
    let mut red2 = s.connect_red2().await;
    let mut red3 = s.connect_red3().await;
    // A connection older than the last checkpoint (never seen since): offset 0.
    let old_out = on_client_port(tcp(true, 777, 333, 0x18, b"old data"), 40001);
    let old_in = on_client_port(tcp(false, 333, 785, 0x10, b""), 40001);
    // A connection opened after the failover: the client learns the SVM's own ISN.
    let new_syn = on_client_port(tcp(false, 50, 0, 0x02, b""), 40002);
    let new_syn_ack = on_client_port(tcp(true, 12345, 51, 0x12, b""), 40002);
    let new_ack = on_client_port(tcp(false, 51, 12346, 0x10, b""), 40002);
    let new_data = on_client_port(tcp(true, 12346, 51, 0x18, b"new"), 40002);
    // Not TCP at all (an ARP request).
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 9, 0x08, 0x06]);
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&[
        0x52, 0x54, 0, 0, 0, 9, 10, 0, 0, 9, 0, 0, 0, 0, 0, 0, 10, 0, 0, 2,
    ]);

    s.red1.send(&old_out).await;
    assert_eq!(red2.recv(PATIENCE).await.as_ref(), Some(&old_out));
    red3.send(&old_in).await;
    assert_eq!(s.red0.recv(PATIENCE).await.as_ref(), Some(&old_in));
    red3.send(&new_syn).await;
    assert_eq!(s.red0.recv(PATIENCE).await.as_ref(), Some(&new_syn));
    s.red1.send(&new_syn_ack).await;
    assert_eq!(red2.recv(PATIENCE).await.as_ref(), Some(&new_syn_ack));
    red3.send(&new_ack).await;
    assert_eq!(s.red0.recv(PATIENCE).await.as_ref(), Some(&new_ack));
    s.red1.send(&new_data).await;
    assert_eq!(red2.recv(PATIENCE).await.as_ref(), Some(&new_data));
    red3.send(&arp).await;
    assert_eq!(s.red0.recv(PATIENCE).await.as_ref(), Some(&arp));
    s.red1.send(&arp).await;
    assert_eq!(red2.recv(PATIENCE).await.as_ref(), Some(&arp));

    // Mirrored frames the old primary still sends would duplicate the network's: ignored.
    s.primary.mirror(&old_in);
    assert_eq!(s.red0.recv(QUIET).await, None);
    wait_metric(
        &s.metrics,
        "colo_proxyd_failover_bridged_frames_total{direction=\"out_of_svm\"} 4",
    )
    .await;
    wait_metric(
        &s.metrics,
        "colo_proxyd_failover_bridged_frames_total{direction=\"into_svm\"} 4",
    )
    .await;
    let text = scrape(&s.metrics).await;
    for direction in ["out_of_svm", "into_svm"] {
        let line =
            format!("colo_proxyd_failover_rewritten_frames_total{{direction=\"{direction}\"}} 0");
        assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
    }
    s.stop().await;
}

#[tokio::test]
async fn output_before_red2_connects_is_flushed_in_order_when_it_does() {
    let mut s = start("backlog", true).await;
    s.open_shifted_connection().await;
    s.failover_to_secondary().await;
    // The SVM talks before QEMU's red2 connected.
    let svm = segments(
        9001,
        101,
        b"early bytes, before QEMU's chardev connected",
        8,
    );
    for frame in &svm {
        s.red1.send(&checksummed(frame.clone())).await;
    }
    wait_metric(
        &s.metrics,
        &format!(
            "colo_proxyd_failover_bridged_frames_total{{direction=\"out_of_svm\"}} {}",
            svm.len()
        ),
    )
    .await;
    let mut red2 = s.connect_red2().await;
    let flushed = red2.recv_n(svm.len()).await;
    let seqs: Vec<u32> = flushed.iter().map(|f| seq_of(f)).collect();
    let want: Vec<u32> = (0..svm.len() as u32).map(|i| 5001 + 8 * i).collect();
    assert_eq!(
        seqs, want,
        "every waiting frame, in order, in the PVM's numbers"
    );
    assert!(flushed.iter().all(|f| checksum_ok(f)));
    // Later output follows them.
    let next = checksummed(tcp(true, 9001 + 8 * svm.len() as u32, 101, 0x18, b"later"));
    s.red1.send(&next).await;
    let got = red2.recv(PATIENCE).await.unwrap();
    assert_eq!(seq_of(&got), 5001 + 8 * svm.len() as u32);
    assert_eq!(red2.recv(QUIET).await, None);
    wait_metric(&s.metrics, "colo_proxyd_dropped_frames_total 0").await;
    s.stop().await;
}

#[tokio::test]
async fn without_the_bridge_options_a_failover_warns_and_changes_nothing_else() {
    let mut s = start("no-bridge", false).await;
    s.open_shifted_connection().await;
    s.failover_to_secondary().await;
    let line = Logs::wait_line(
        "no-bridge",
        "connections opened in the last epoch will break",
    )
    .await;
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("connections_with_offset=1"), "{line}");
    let logs = Logs::of("no-bridge");
    assert!(
        !logs.iter().any(|l| l.contains("bridging SVM traffic")),
        "{logs:#?}"
    );
    // The primary's mirror still reaches the SVM, rewritten as before.
    s.primary
        .mirror(&checksummed(tcp(false, 101, 5002, 0x10, b"")));
    let ack = s.red0.recv(PATIENCE).await.unwrap();
    assert_eq!(ack_of(&ack), 9002);
    let text = scrape(&s.metrics).await;
    assert!(
        text.lines()
            .any(|l| l == "colo_proxyd_dropped_frames_total 0"),
        "{text}"
    );
    assert!(!text.contains("port=\"red2\""), "no bridge ports: {text}");
    assert!(!text.contains("port=\"red3\""), "no bridge ports: {text}");
    s.stop().await;
}

/// Issue 12: a secondary daemon (re)started after the failover to the secondary, with the
/// relay unable to tell it (its state is `exited`, the primary's host is gone), learns the
/// failover from its own QEMU (`query-colo-status`: mode `none`, last mode `secondary`) and
/// bridges the SVM's traffic again instead of sending it to the dead primary.
#[tokio::test]
async fn a_secondary_restarted_after_its_failover_bridges_again() {
    Logs::get();
    let dir = tempfile::tempdir().unwrap();
    let (hub, control) = hub_in_colo(dir.path(), EPOCH);
    hub.update_status(|s| s.state = colo_control::protocol::RelayState::Exited);
    let qemu = QemuColoMode::in_colo();
    qemu.set("none", "secondary");
    let qmp_path = dir.path().join("qmp.sock");
    let _qmp = fake_qmp_with(&qmp_path, &[], qemu);
    let any = || Some("127.0.0.1:0".to_owned());
    let config = SecondaryConfig::try_from(SecondaryArgs {
        svm_input_listen: any(),
        svm_output_listen: any(),
        net_output_listen: any(),
        net_input_listen: any(),
        // The primary's host is gone: nothing listens there.
        primary_link: Some("127.0.0.1:1".to_owned()),
        control: Some(control.as_path().into()),
        metrics: any(),
        qmp: Some(format!("unix:{}", qmp_path.display())),
        ..SecondaryArgs::default()
    })
    .unwrap();
    let listeners = secondary::SecondaryListeners::bind(&config).await.unwrap();
    let address = |l: &TcpListener| l.local_addr().unwrap().to_string();
    let red0 = address(&listeners.svm_input);
    let red1 = address(&listeners.svm_output);
    let bridge = listeners.bridge.as_ref().unwrap();
    let (red2, red3) = (address(&bridge.net_output), address(&bridge.net_input));
    let metrics = address(listeners.metrics.as_ref().unwrap());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { secondary::run(config, listeners, shutdown).await.unwrap() }
            .instrument(tracing::info_span!("daemon", test = %"restarted"))
    });
    let mut red0 = Chardev::connect(&red0).await;
    let mut red1 = Chardev::connect(&red1).await;
    let mut red2 = Chardev::connect(&red2).await;
    let mut red3 = Chardev::connect(&red3).await;
    Logs::wait_line("restarted", "QEMU left COLO by a failover to the secondary").await;
    let out = on_client_port(tcp(true, 777, 333, 0x18, b"after restart"), 40001);
    red1.send(&out).await;
    assert_eq!(red2.recv(PATIENCE).await.as_ref(), Some(&out));
    let into = on_client_port(tcp(false, 333, 790, 0x10, b""), 40001);
    red3.send(&into).await;
    assert_eq!(red0.recv(PATIENCE).await.as_ref(), Some(&into));
    wait_metric(
        &metrics,
        "colo_proxyd_failover_bridged_frames_total{direction=\"out_of_svm\"} 1",
    )
    .await;
    shutdown.cancel();
    tokio::time::timeout(PATIENCE, task)
        .await
        .expect("the daemon stops on shutdown")
        .unwrap();
}
