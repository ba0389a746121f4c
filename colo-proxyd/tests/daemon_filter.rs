//! The filter-mode daemons end to end, in process, against fakes (`common`): both QEMUs'
//! net-filter chardevs, the primary's QMP monitor, and the relay (an in-process hub).
//!
//! ```text
//!  fake compare0 ─► primary ─► fake compare_out       fake red1 (SVM output) ─► secondary
//!  fake mirror0  ─►    ▲  link ◄──────────────────────────────────────────────────┘  │
//!                      └─────────────────────────────────────────────────────────► fake red0
//! ```

mod common;

use std::time::Duration;

use colo_control::hub::ControlHub;
use colo_control::protocol::{EventBody, EventKind};
use colo_proxyd::daemon::config::{PrimaryArgs, PrimaryConfig, SecondaryArgs, SecondaryConfig};
use colo_proxyd::daemon::{primary, secondary};
use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const EPOCH: u64 = 1;
/// Nothing should happen within this; a wrong release or request comes within milliseconds.
const QUIET: Duration = Duration::from_millis(400);

struct Primary {
    compare0: Chardev,
    mirror0: Chardev,
    compare_out: Chardev,
    link: String,
    metrics: String,
    task: JoinHandle<()>,
}

/// Starts the primary daemon against fake QEMU chardev servers.
async fn start_primary(
    dir: &std::path::Path,
    control: &std::path::Path,
    max_hold_ms: u64,
    shutdown: &CancellationToken,
) -> Primary {
    let compare0 = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mirror0 = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let compare_out = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let qmp = dir.join("qmp.sock");
    let config = PrimaryConfig::try_from(PrimaryArgs {
        pvm_output: Some(compare0.local_addr().unwrap().to_string()),
        mirror: Some(mirror0.local_addr().unwrap().to_string()),
        release: Some(compare_out.local_addr().unwrap().to_string()),
        link_listen: Some("127.0.0.1:0".into()),
        control: Some(control.into()),
        qmp: Some(format!("unix:{}", qmp.display())),
        metrics: Some("127.0.0.1:0".into()),
        max_hold_ms: Some(max_hold_ms),
        chardev_check_ms: Some(200),
        ..PrimaryArgs::default()
    })
    .unwrap();
    let listeners = primary::PrimaryListeners::bind(&config).await.unwrap();
    let link = listeners.link.local_addr().unwrap().to_string();
    let metrics = listeners
        .metrics
        .as_ref()
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { primary::run(config, listeners, shutdown).await.unwrap() }
    });
    Primary {
        compare0: Chardev::accept(&compare0).await,
        mirror0: Chardev::accept(&mirror0).await,
        compare_out: Chardev::accept(&compare_out).await,
        link,
        metrics,
        task,
    }
}

struct Secondary {
    red0: Chardev,
    red1: Chardev,
    metrics: String,
    task: JoinHandle<()>,
}

/// Starts the secondary daemon and connects fake QEMU chardev clients to it.
async fn start_secondary(
    control: &std::path::Path,
    primary_link: &str,
    shutdown: &CancellationToken,
) -> Secondary {
    let config = SecondaryConfig::try_from(SecondaryArgs {
        svm_input_listen: Some("127.0.0.1:0".into()),
        svm_output_listen: Some("127.0.0.1:0".into()),
        primary_link: Some(primary_link.to_owned()),
        control: Some(control.into()),
        metrics: Some("127.0.0.1:0".into()),
        ..SecondaryArgs::default()
    })
    .unwrap();
    let listeners = secondary::SecondaryListeners::bind(&config).await.unwrap();
    let red0 = listeners.svm_input.local_addr().unwrap().to_string();
    let red1 = listeners.svm_output.local_addr().unwrap().to_string();
    let metrics = listeners
        .metrics
        .as_ref()
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { secondary::run(config, listeners, shutdown).await.unwrap() }
    });
    Secondary {
        red0: Chardev::connect(&red0).await,
        red1: Chardev::connect(&red1).await,
        metrics,
        task,
    }
}

struct Pair {
    _dir: tempfile::TempDir,
    hub: ControlHub,
    qmp: FakeMonitor,
    primary: Primary,
    secondary: Secondary,
    shutdown: CancellationToken,
}

/// Both daemons, subscribed to a relay in COLO at [`EPOCH`], the link up, comparing.
async fn pair(max_hold_ms: u64) -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let (hub, control) = hub_in_colo(dir.path(), EPOCH);
    let qmp = fake_qmp(
        &dir.path().join("qmp.sock"),
        &["compare0", "compare_out", "mirror0"],
    );
    let shutdown = CancellationToken::new();
    let primary = start_primary(dir.path(), &control, max_hold_ms, &shutdown).await;
    let secondary = start_secondary(&control, &primary.link, &shutdown).await;
    wait_subscribers(&hub, 2).await;
    wait_metric(&primary.metrics, "colo_proxyd_comparing 1").await;
    wait_metric(&primary.metrics, &format!("colo_proxyd_epoch {EPOCH}")).await;
    wait_metric(&secondary.metrics, &format!("colo_proxyd_epoch {EPOCH}")).await;
    wait_metric(
        &primary.metrics,
        "colo_proxyd_connection_up{port=\"link\"} 1",
    )
    .await;
    wait_metric(
        &secondary.metrics,
        "colo_proxyd_connection_up{port=\"link\"} 1",
    )
    .await;
    Pair {
        _dir: dir,
        hub,
        qmp,
        primary,
        secondary,
        shutdown,
    }
}

impl Pair {
    async fn stop(self) {
        self.shutdown.cancel();
        for task in [self.primary.task, self.secondary.task] {
            tokio::time::timeout(PATIENCE, task)
                .await
                .expect("the daemons stop on shutdown")
                .unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_output_is_released_in_order_without_a_checkpoint() {
    let mut p = pair(10_000).await;
    let data: Vec<u8> = (0..6000u32).map(|i| (i * 7 % 251) as u8).collect();
    // The PVM and the SVM send the same stream with different segmentation.
    let pvm = segments(1000, 1, &data, 1400);
    let svm = segments(1000, 1, &data, 512);
    for frame in &pvm {
        p.primary.compare0.send(frame).await;
    }
    assert_eq!(
        p.primary.compare_out.recv(QUIET).await,
        None,
        "nothing is released before the SVM's output arrived"
    );
    for frame in &svm {
        p.secondary.red1.send(frame).await;
    }
    let released = p.primary.compare_out.recv_n(pvm.len()).await;
    assert_eq!(released, pvm, "the PVM's frames, byte-exact and in order");
    assert_eq!(p.primary.compare_out.recv(QUIET).await, None);
    assert_eq!(next_checkpoint_request(&mut p.qmp, QUIET).await, None);

    // The mirror path: a client packet into the PVM reaches the SVM.
    let client = tcp(false, 1, 1000 + data.len() as u32, 0x10, b"");
    p.primary.mirror0.send(&client).await;
    assert_eq!(p.secondary.red0.recv(PATIENCE).await, Some(client));

    wait_metric(&p.primary.metrics, "colo_proxyd_held_packets 0").await;
    // The fail-open check: QEMU (the fake) shows each chardev with its peer.
    for id in ["compare0", "compare_out", "mirror0"] {
        wait_metric(
            &p.primary.metrics,
            &format!("colo_proxyd_qemu_chardev_connected{{chardev=\"{id}\"}} 1"),
        )
        .await;
    }
    let text = scrape(&p.primary.metrics).await;
    assert!(
        text.contains(&format!("colo_proxyd_released_packets_total {}", pvm.len())),
        "{text}"
    );
    assert!(
        !text.contains("colo_proxyd_checkpoint_requests_total{"),
        "{text}"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_divergent_byte_requests_a_checkpoint_and_is_released_only_at_adoption() {
    let mut p = pair(10_000).await;
    let same = tcp(true, 1000, 1, 0x18, b"GET / HTTP/1.0\r\n");
    p.primary.compare0.send(&same).await;
    p.secondary.red1.send(&same).await;
    assert_eq!(p.primary.compare_out.recv(PATIENCE).await, Some(same));

    let pvm = tcp(true, 1016, 1, 0x18, b"status: ok\r\n");
    let svm = tcp(true, 1016, 1, 0x18, b"status: OK\r\n");
    p.primary.compare0.send(&pvm).await;
    p.secondary.red1.send(&svm).await;
    let request = next_checkpoint_request(&mut p.qmp, PATIENCE)
        .await
        .expect("a checkpoint request");
    assert_eq!(request, json!({"x-checkpoint-delay": DELAY_MS}));
    assert_eq!(
        p.primary.compare_out.recv(QUIET).await,
        None,
        "the divergent packet is held"
    );
    // Another connection diverges before the checkpoint: the request is coalesced.
    let other_pvm = on_client_port(tcp(true, 7000, 1, 0x18, b"a"), 40001);
    p.primary.compare0.send(&other_pvm).await;
    p.secondary
        .red1
        .send(&on_client_port(tcp(true, 7000, 1, 0x18, b"b"), 40001))
        .await;
    assert_eq!(next_checkpoint_request(&mut p.qmp, QUIET).await, None);

    // The checkpoint: the relay's barriers, acknowledged by both daemons.
    let closed = p
        .hub
        .barrier(
            EventBody::new(EventKind::SvmEpochClosed, EPOCH),
            Duration::from_secs(10),
        )
        .await
        .expect("svm-epoch-closed acknowledged");
    assert_eq!(closed.acks.len(), 2, "{closed:?}");
    assert_eq!(
        p.primary.compare_out.recv(QUIET).await,
        None,
        "still held until the adoption"
    );
    // The PVM's last packet of the epoch, just before it stopped: drained at the adoption.
    let last = tcp(true, 1028, 1, 0x18, b"tail");
    p.primary.compare0.send(&last).await;
    let adopted = p
        .hub
        .barrier(
            EventBody::new(EventKind::CheckpointAdopted, EPOCH),
            Duration::from_secs(10),
        )
        .await
        .expect("checkpoint-adopted acknowledged");
    assert_eq!(adopted.acks.len(), 2, "{adopted:?}");
    assert_eq!(
        p.primary.compare_out.recv_n(3).await,
        vec![pvm, other_pvm, last],
        "every held packet, in arrival order"
    );

    // The next epoch compares afresh, and the SVM's output is tagged with it.
    wait_metric(
        &p.primary.metrics,
        &format!("colo_proxyd_epoch {}", EPOCH + 1),
    )
    .await;
    wait_metric(
        &p.secondary.metrics,
        &format!("colo_proxyd_epoch {}", EPOCH + 1),
    )
    .await;
    let next = tcp(true, 1032, 1, 0x18, b"more");
    p.primary.compare0.send(&next).await;
    p.secondary.red1.send(&next).await;
    assert_eq!(p.primary.compare_out.recv(PATIENCE).await, Some(next));
    wait_metric(
        &p.primary.metrics,
        "colo_proxyd_checkpoint_requests_total{reason=\"payload-differs\"} 1",
    )
    .await;
    wait_metric(&p.primary.metrics, "colo_proxyd_barriers_total 2").await;
    wait_metric(
        &p.primary.metrics,
        "colo_proxyd_checkpoints_needed_total{reason=\"payload-differs\"} 2",
    )
    .await;
    // The reason was noted to the relay too.
    let deadline = std::time::Instant::now() + PATIENCE;
    while !p
        .hub
        .status()
        .requests_by_reason
        .contains_key("proxy-payload-differs")
    {
        assert!(std::time::Instant::now() < deadline, "reason never noted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmatched_packet_past_the_hold_time_requests_a_checkpoint() {
    let mut p = pair(100).await;
    p.primary
        .compare0
        .send(&tcp(true, 1000, 1, 0x18, b"lonely"))
        .await;
    assert!(
        next_checkpoint_request(&mut p.qmp, PATIENCE)
            .await
            .is_some()
    );
    // The metric follows QEMU's answer.
    wait_metric(
        &p.primary.metrics,
        "colo_proxyd_checkpoint_requests_total{reason=\"hold-timeout\"} 1",
    )
    .await;
    wait_metric(&p.primary.metrics, "colo_proxyd_held_packets 1").await;
    p.stop().await;
}

/// Reads the primary's hello from a raw link connection.
async fn read_hello(stream: &mut TcpStream) -> Vec<u8> {
    let mut hello = vec![0u8; 12];
    tokio::time::timeout(PATIENCE, stream.read_exact(&mut hello))
        .await
        .unwrap()
        .unwrap();
    hello
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_link_message_closes_the_link_without_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, control) = hub_in_colo(dir.path(), EPOCH);
    let _qmp = fake_qmp(&dir.path().join("qmp.sock"), &[]);
    let shutdown = CancellationToken::new();
    let mut primary = start_primary(dir.path(), &control, 10_000, &shutdown).await;
    wait_subscribers(&hub, 1).await;
    // This fake QEMU has none of the chardevs: the fail-open check says so.
    wait_metric(
        &primary.metrics,
        "colo_proxyd_qemu_chardev_connected{chardev=\"compare0\"} 0",
    )
    .await;

    // A peer that sends an unknown message type after a good hello.
    let mut raw = TcpStream::connect(&primary.link).await.unwrap();
    let hello = read_hello(&mut raw).await;
    assert_eq!(&hello[..9], &[0, 0, 0, 0, 7, b'C', b'P', b'X', b'L']);
    raw.write_all(&hello_of(colo_types::Role::Secondary))
        .await
        .unwrap();
    raw.write_all(&[9, 0, 0, 0, 1, 0]).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(PATIENCE, raw.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the primary closes the link");
    wait_metric(&primary.metrics, "colo_proxyd_link_errors_total 1").await;

    // A peer that is not colo-proxyd at all.
    let mut raw = TcpStream::connect(&primary.link).await.unwrap();
    read_hello(&mut raw).await;
    raw.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let closed = tokio::time::timeout(PATIENCE, raw.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the primary closes the link");
    wait_metric(&primary.metrics, "colo_proxyd_link_errors_total 2").await;

    // The daemon still runs: a real secondary connects and output is compared.
    let mut secondary = start_secondary(&control, &primary.link, &shutdown).await;
    wait_subscribers(&hub, 2).await;
    wait_metric(
        &primary.metrics,
        "colo_proxyd_connection_up{port=\"link\"} 1",
    )
    .await;
    wait_metric(&secondary.metrics, &format!("colo_proxyd_epoch {EPOCH}")).await;
    let frame = tcp(true, 1000, 1, 0x18, b"still alive");
    primary.compare0.send(&frame).await;
    secondary.red1.send(&frame).await;
    assert_eq!(primary.compare_out.recv(PATIENCE).await, Some(frame));
    shutdown.cancel();
    for task in [primary.task, secondary.task] {
        tokio::time::timeout(PATIENCE, task).await.unwrap().unwrap();
    }
}

/// The hello of this build's link version, as `role` sends it.
fn hello_of(role: colo_types::Role) -> Vec<u8> {
    use colo_proxyd::daemon::link::{LINK_VERSION, LinkMessage, encode};
    let mut out = Vec::new();
    encode(
        &LinkMessage::Hello {
            version: LINK_VERSION,
            role,
        },
        &mut out,
    )
    .unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_secondary_drops_a_malformed_primary_and_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, control) = hub_in_colo(dir.path(), EPOCH);
    let fake_primary = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let shutdown = CancellationToken::new();
    let secondary = start_secondary(
        &control,
        &fake_primary.local_addr().unwrap().to_string(),
        &shutdown,
    )
    .await;
    wait_subscribers(&hub, 1).await;
    let (mut raw, _) = tokio::time::timeout(PATIENCE, fake_primary.accept())
        .await
        .unwrap()
        .unwrap();
    let hello = read_hello(&mut raw).await;
    assert_eq!(hello[11], 2, "the secondary says it is the secondary");
    // A good hello, then an oversized message.
    let mut bytes = hello_of(colo_types::Role::Primary);
    bytes.extend_from_slice(&[1, 0xff, 0xff, 0xff, 0xff]);
    raw.write_all(&bytes).await.unwrap();
    let mut rest = Vec::new();
    assert!(
        tokio::time::timeout(PATIENCE, raw.read_to_end(&mut rest))
            .await
            .is_ok(),
        "the secondary closes the link"
    );
    wait_metric(&secondary.metrics, "colo_proxyd_link_errors_total 1").await;
    // ... and connects again.
    let (mut again, _) = tokio::time::timeout(PATIENCE, fake_primary.accept())
        .await
        .expect("the secondary reconnects")
        .unwrap();
    read_hello(&mut again).await;
    shutdown.cancel();
    tokio::time::timeout(PATIENCE, secondary.task)
        .await
        .unwrap()
        .unwrap();
}

/// The same frame from the VM to another client port.
fn on_client_port(mut frame: Vec<u8>, port: u16) -> Vec<u8> {
    frame[36..38].copy_from_slice(&port.to_be_bytes());
    frame
}

fn ack_of(frame: &[u8]) -> u32 {
    u32::from_be_bytes(frame[42..46].try_into().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_svm_opened_with_another_isn_is_rewritten_and_matches() {
    let mut p = pair(10_000).await;
    // The client opens a connection; the SYN is mirrored into the SVM unchanged.
    let syn = tcp(false, 100, 0, 0x02, b"");
    p.primary.mirror0.send(&syn).await;
    assert_eq!(p.secondary.red0.recv(PATIENCE).await, Some(syn));
    // Each VM answers with its own ISN.
    let pvm_syn_ack = tcp(true, 5000, 101, 0x12, b"");
    p.primary.compare0.send(&pvm_syn_ack).await;
    p.secondary
        .red1
        .send(&tcp(true, 9000, 101, 0x12, b""))
        .await;
    assert_eq!(
        p.primary.compare_out.recv(PATIENCE).await,
        Some(pvm_syn_ack)
    );
    // The client acknowledges the PVM's SYN; the SVM gets the ACK in its own numbers.
    p.primary
        .mirror0
        .send(&tcp(false, 101, 5001, 0x10, b""))
        .await;
    let into_svm = p.secondary.red0.recv(PATIENCE).await.unwrap();
    assert_eq!(ack_of(&into_svm), 9001);
    // The answer: the SVM's sequence numbers are rewritten to the PVM's before comparison.
    let pvm_data = segments(5001, 101, b"HTTP/1.0 200 OK\r\n\r\nhello", 7);
    let svm_data = segments(9001, 101, b"HTTP/1.0 200 OK\r\n\r\nhello", 25);
    for frame in &svm_data {
        p.secondary.red1.send(frame).await;
    }
    for frame in &pvm_data {
        p.primary.compare0.send(frame).await;
    }
    assert_eq!(p.primary.compare_out.recv_n(pvm_data.len()).await, pvm_data);
    assert_eq!(next_checkpoint_request(&mut p.qmp, QUIET).await, None);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_passes_before_colo_and_a_failover_to_the_primary_releases_what_was_held() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control.sock");
    let hub = ControlHub::new(tokio::net::UnixListener::bind(&control).unwrap());
    let qemu = QemuColoMode::in_colo();
    qemu.set("none", "none");
    let _qmp = fake_qmp_with(&dir.path().join("qmp.sock"), &[], qemu.clone());
    let shutdown = CancellationToken::new();
    let mut primary = start_primary(dir.path(), &control, 10_000, &shutdown).await;
    wait_subscribers(&hub, 1).await;
    // No COLO yet: nothing to compare with, the PVM's output passes.
    let early = tcp(true, 1000, 1, 0x18, b"before");
    primary.compare0.send(&early).await;
    assert_eq!(primary.compare_out.recv(PATIENCE).await, Some(early));

    qemu.set("primary", "none");
    hub.publish(EventBody::new(EventKind::ColoStarted, 1)).await;
    wait_metric(&primary.metrics, "colo_proxyd_comparing 1").await;
    let held = tcp(true, 1006, 1, 0x18, b"during");
    primary.compare0.send(&held).await;
    assert_eq!(primary.compare_out.recv(QUIET).await, None);
    // The secondary is gone: COLO ends, the operator keeps the primary.
    hub.publish(EventBody::new(EventKind::ColoExit, 1).with_reason("channel-closed"))
        .await;
    assert_eq!(primary.compare_out.recv(QUIET).await, None);
    hub.publish(EventBody::new(EventKind::Failover, 1).with_survivor(colo_types::Role::Primary))
        .await;
    qemu.set("none", "primary");
    assert_eq!(primary.compare_out.recv(PATIENCE).await, Some(held));
    let after = tcp(true, 1012, 1, 0x18, b"after");
    primary.compare0.send(&after).await;
    assert_eq!(primary.compare_out.recv(PATIENCE).await, Some(after));
    shutdown.cancel();
    tokio::time::timeout(PATIENCE, primary.task)
        .await
        .unwrap()
        .unwrap();
}

/// Issue 12: a primary daemon (re)started after COLO ended, with the relay unable to say more
/// than "exited" (or unreachable, on the dead host), releases nothing until its own QEMU says
/// a failover to the primary ended COLO (the watch agent's or the operator's
/// `x-colo-lost-heartbeat`), and then releases what it held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_restarted_after_colo_ended_holds_until_qemu_says_it_survived() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, control) = hub_in_colo(dir.path(), 7);
    hub.update_status(|s| s.state = colo_control::protocol::RelayState::Exited);
    // QEMU is still a COLO primary, waiting for a failover decision.
    let qemu = QemuColoMode::in_colo();
    let mut qmp = fake_qmp_with(&dir.path().join("qmp.sock"), &[], qemu.clone());
    let shutdown = CancellationToken::new();
    let mut primary = start_primary(dir.path(), &control, 10_000, &shutdown).await;
    wait_subscribers(&hub, 1).await;
    qmp.recv_named("query-colo-status", PATIENCE)
        .await
        .expect("the daemon asks QEMU");
    let held = tcp(true, 1000, 1, 0x18, b"held");
    primary.compare0.send(&held).await;
    assert_eq!(
        primary.compare_out.recv(QUIET).await,
        None,
        "released uncompared"
    );
    // Several answers later, still held: no decision yet.
    for _ in 0..3 {
        qmp.recv_named("query-colo-status", PATIENCE).await.unwrap();
    }
    assert_eq!(
        primary.compare_out.recv(QUIET).await,
        None,
        "released uncompared"
    );
    // The failover to the primary ran; the relay on the other host could not be told.
    qemu.set("none", "primary");
    assert_eq!(primary.compare_out.recv(PATIENCE).await, Some(held));
    let after = tcp(true, 1004, 1, 0x18, b"after");
    primary.compare0.send(&after).await;
    assert_eq!(primary.compare_out.recv(PATIENCE).await, Some(after));
    shutdown.cancel();
    tokio::time::timeout(PATIENCE, primary.task)
        .await
        .unwrap()
        .unwrap();
}

/// A primary whose QEMU cannot be asked holds, even before COLO: it cannot tell "before COLO"
/// from "COLO ended, no decision".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_cannot_ask_its_qemu_releases_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control.sock");
    let hub = ControlHub::new(tokio::net::UnixListener::bind(&control).unwrap());
    let shutdown = CancellationToken::new();
    // No monitor at qmp.sock.
    let mut primary = start_primary(dir.path(), &control, 10_000, &shutdown).await;
    wait_subscribers(&hub, 1).await;
    let frame = tcp(true, 1000, 1, 0x18, b"unknown");
    primary.compare0.send(&frame).await;
    assert_eq!(
        primary.compare_out.recv(QUIET).await,
        None,
        "released uncompared"
    );
    shutdown.cancel();
    tokio::time::timeout(PATIENCE, primary.task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svm_output_after_the_epoch_closed_is_compared_in_the_next_epoch() {
    let mut p = pair(10_000).await;
    let a = tcp(true, 1000, 1, 0x18, b"aaaa");
    p.primary.compare0.send(&a).await;
    p.secondary.red1.send(&a).await;
    p.hub
        .barrier(
            EventBody::new(EventKind::SvmEpochClosed, EPOCH),
            Duration::from_secs(10),
        )
        .await
        .expect("svm-epoch-closed acknowledged");
    assert_eq!(p.primary.compare_out.recv(PATIENCE).await, Some(a));
    // The SVM resumed the adopted state before anyone heard of the adoption: its output
    // belongs to the next epoch.
    let b = tcp(true, 1004, 1, 0x18, b"bbbb");
    p.secondary.red1.send(&b).await;
    p.hub
        .barrier(
            EventBody::new(EventKind::CheckpointAdopted, EPOCH),
            Duration::from_secs(10),
        )
        .await
        .expect("checkpoint-adopted acknowledged");
    p.primary.compare0.send(&b).await;
    assert_eq!(p.primary.compare_out.recv(PATIENCE).await, Some(b));
    assert_eq!(next_checkpoint_request(&mut p.qmp, QUIET).await, None);
    let text = scrape(&p.primary.metrics).await;
    assert!(
        text.contains("colo_proxyd_stale_svm_frames_total 0"),
        "{text}"
    );
    p.stop().await;
}
