//! Liveness of the inter-host link (`docs/proxyd-link.md`, "Heartbeats and dead peers"), against
//! the real `colo-proxyd` binary: both daemons as processes, QEMU's chardevs, the primary's QMP
//! monitor and the relay faked in this test (`common`).
//!
//! ```text
//!  fake compare0 ─► primary ─► fake compare_out      fake red1 ─► secondary ─► fake red0
//!  fake mirror0  ─►    ▲ --link-listen                                 │ --primary-link
//!                      └──────────── stallable forwarder ◄─────────────┘
//! ```
//!
//! The forwarder stands for the network between the hosts. Stalled, it keeps every TCP
//! connection open and forwards nothing, either way, and sends no FIN: what the daemons see
//! when the network drops their packets (the local kernel still acknowledges what they write,
//! so only the application's heartbeats tell). No timing threshold is asserted: the detection
//! and healing times are printed, and each wait has the generous common `PATIENCE`.

mod common;

use std::time::{Duration, Instant};

use colo_proxyd::daemon::link::LINK_VERSION;
use common::process::{Daemon, free_addr, metric};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const EPOCH: u64 = 1;

/// The primary daemon against fake chardev servers and a fake QMP monitor in `dir`.
struct Primary {
    daemon: Daemon,
    compare0: Chardev,
    _mirror0: Chardev,
    compare_out: Chardev,
    link: String,
    metrics: String,
}

async fn start_primary(dir: &std::path::Path, control: &std::path::Path) -> Primary {
    let ports = PrimaryPorts::bind().await;
    let link = free_addr();
    let metrics = free_addr();
    let args = ports.primary_args(&link, control, &dir.join("qmp.sock"), &metrics);
    let daemon = Daemon::spawn("primary", &args);
    Primary {
        daemon,
        compare0: Chardev::accept(&ports.compare0).await,
        _mirror0: Chardev::accept(&ports.mirror0).await,
        compare_out: Chardev::accept(&ports.compare_out).await,
        link,
        metrics,
    }
}

struct Secondary {
    daemon: Daemon,
    _red0: Chardev,
    red1: Chardev,
    metrics: String,
}

async fn start_secondary(control: &std::path::Path, primary_link: &str) -> Secondary {
    let red0 = free_addr();
    let red1 = free_addr();
    let metrics = free_addr();
    let args = [
        "secondary".to_string(),
        "--svm-input-listen".into(),
        red0.clone(),
        "--svm-output-listen".into(),
        red1.clone(),
        "--primary-link".into(),
        primary_link.to_owned(),
        "--control".into(),
        control.display().to_string(),
        "--metrics".into(),
        metrics.clone(),
    ];
    let daemon = Daemon::spawn("secondary", &args);
    // The daemon binds every port before it serves any: once its metrics answer, QEMU's
    // chardev clients (reconnect-ms) find red0 and red1.
    let deadline = Instant::now() + PATIENCE;
    while TcpStream::connect(&metrics).await.is_err() {
        assert!(Instant::now() < deadline, "the secondary never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Secondary {
        daemon,
        _red0: Chardev::connect(&red0).await,
        red1: Chardev::connect(&red1).await,
        metrics,
    }
}

/// The network between the hosts: forwards connections to `target` until stalled; stalled, it
/// holds every connection open and moves no byte (no FIN either); healed, it closes what it
/// held (the daemons gave up on those long before) and forwards new connections again.
struct Forwarder {
    addr: String,
    stalled: watch::Sender<bool>,
}

impl Forwarder {
    async fn start(target: String) -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (stalled, watch) = watch::channel(false);
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let mut watch = watch.clone();
                if *watch.borrow() {
                    // Into the void: the connection is up, nothing comes back.
                    tokio::spawn(async move {
                        let _ = watch.wait_for(|s| !*s).await;
                        drop(client);
                    });
                    continue;
                }
                let Ok(upstream) = TcpStream::connect(&target).await else {
                    continue;
                };
                let (c_rd, c_wr) = client.into_split();
                let (u_rd, u_wr) = upstream.into_split();
                tokio::spawn(pump(c_rd, u_wr, watch.clone()));
                tokio::spawn(pump(u_rd, c_wr, watch));
            }
        });
        Forwarder { addr, stalled }
    }

    fn stall(&self) {
        self.stalled.send_replace(true);
    }

    fn heal(&self) {
        self.stalled.send_replace(false);
    }
}

/// One direction of a forwarded connection.
async fn pump(mut rd: OwnedReadHalf, mut wr: OwnedWriteHalf, mut stalled: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let read = tokio::select! {
            _ = stalled.wait_for(|s| *s) => None,
            r = rd.read(&mut buf) => Some(r),
        };
        match read {
            // Stalled: hold both sockets, read nothing, write nothing, until healed.
            None => {
                let _ = stalled.wait_for(|s| !*s).await;
                return;
            }
            Some(Ok(0) | Err(_)) => return,
            Some(Ok(n)) => {
                if wr.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Waits until the metric `name` at `addr` reaches at least `min`; returns the time since
/// `since` (to within the 20 ms polling).
async fn wait_count(addr: &str, name: &str, min: u64, since: Instant) -> Duration {
    loop {
        if metric(addr, name).await >= min {
            return since.elapsed();
        }
        assert!(since.elapsed() < PATIENCE, "{name} never reached {min}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One PVM frame and the SVM's identical one: released to the network, so the link carried
/// the SVM's.
async fn output_is_compared_and_released(p: &mut Primary, s: &mut Secondary, seq: u32) {
    let frame = tcp(true, seq, 1, 0x18, b"across the link");
    p.compare0.send(&frame).await;
    s.red1.send(&frame).await;
    assert_eq!(p.compare_out.recv(PATIENCE).await, Some(frame));
}

const LINK_UP: &str = "colo_proxyd_connection_up{port=\"link\"} 1";
const LINK_DOWN: &str = "colo_proxyd_connection_up{port=\"link\"} 0";
const DEAD: &str = "colo_proxyd_link_dead_peer_total";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_link_without_fin_is_detected_by_both_daemons_and_reconnects_after_healing() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, control) = hub_in_colo(dir.path(), EPOCH);
    let _qmp = fake_qmp(
        &dir.path().join("qmp.sock"),
        &["compare0", "compare_out", "mirror0"],
    );
    let mut primary = start_primary(dir.path(), &control).await;
    let forwarder = Forwarder::start(primary.link.clone()).await;
    let mut secondary = start_secondary(&control, &forwarder.addr).await;
    wait_subscribers(&hub, 2).await;
    wait_metric(&primary.metrics, "colo_proxyd_comparing 1").await;
    wait_metric(&secondary.metrics, &format!("colo_proxyd_epoch {EPOCH}")).await;
    wait_metric(&primary.metrics, LINK_UP).await;
    wait_metric(&secondary.metrics, LINK_UP).await;
    output_is_compared_and_released(&mut primary, &mut secondary, 1000).await;
    // An idle link stays up: heartbeats carry it past the dead-peer bound.
    tokio::time::sleep(Duration::from_secs(5)).await;
    wait_metric(&primary.metrics, LINK_UP).await;
    assert_eq!(metric(&primary.metrics, DEAD).await, 0);
    assert_eq!(metric(&secondary.metrics, DEAD).await, 0);

    // Packets dropped both ways, no FIN.
    forwarder.stall();
    let stalled_at = Instant::now();
    let (primary_detected, secondary_detected) = tokio::join!(
        wait_count(&primary.metrics, DEAD, 1, stalled_at),
        wait_count(&secondary.metrics, DEAD, 1, stalled_at),
    );
    wait_metric(&primary.metrics, LINK_DOWN).await;
    wait_metric(&secondary.metrics, LINK_DOWN).await;
    eprintln!(
        "stalled link detected: primary after {:.2} s, secondary after {:.2} s",
        primary_detected.as_secs_f64(),
        secondary_detected.as_secs_f64()
    );
    // The error names the peer and the silence; the secondary's peer is the address it dials.
    let line = primary
        .daemon
        .wait_line(&["ERROR", "the peer is dead", "no message for"])
        .await;
    assert!(line.contains("peer="), "{line}");
    secondary
        .daemon
        .wait_line(&[
            "ERROR",
            "the peer is dead",
            "no message for",
            &format!("peer={}", forwarder.addr),
        ])
        .await;

    // Still stalled, the secondary tries again: its connection goes nowhere (here the forwarder
    // accepts it and sends nothing back, so the hello's bound ends it; on a real network the
    // SYN is dropped and the connect's bound does). The link stays down.
    tokio::time::sleep(Duration::from_secs(2)).await;
    wait_metric(&primary.metrics, LINK_DOWN).await;
    wait_metric(&secondary.metrics, LINK_DOWN).await;

    // The network heals: the secondary reconnects, the primary accepts, output is compared.
    forwarder.heal();
    let healed_at = Instant::now();
    wait_metric(&primary.metrics, LINK_UP).await;
    wait_metric(&secondary.metrics, LINK_UP).await;
    eprintln!(
        "link up again {:.2} s after healing",
        healed_at.elapsed().as_secs_f64()
    );
    output_is_compared_and_released(&mut primary, &mut secondary, 2000).await;
    // Detected once each: the healed link is not mistaken for another dead one.
    assert_eq!(metric(&primary.metrics, DEAD).await, 1);
    assert_eq!(metric(&secondary.metrics, DEAD).await, 1);
    drop(hub);
}

/// A link peer that is not a daemon, on a raw socket: sends our hello, reads the primary's.
async fn raw_peer(link: &str, version: u16) -> (TcpStream, Vec<u8>) {
    let mut raw = TcpStream::connect(link).await.unwrap();
    let mut hello = vec![0u8, 0, 0, 0, 7, b'C', b'P', b'X', b'L'];
    hello.extend_from_slice(&version.to_be_bytes());
    hello.push(2);
    raw.write_all(&hello).await.unwrap();
    let mut theirs = vec![0u8; 12];
    tokio::time::timeout(PATIENCE, raw.read_exact(&mut theirs))
        .await
        .unwrap()
        .unwrap();
    (raw, theirs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_sends_heartbeats_drops_a_silent_peer_and_refuses_version_1() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, control) = hub_in_colo(dir.path(), EPOCH);
    let _qmp = fake_qmp(
        &dir.path().join("qmp.sock"),
        &["compare0", "compare_out", "mirror0"],
    );
    let primary = start_primary(dir.path(), &control).await;
    wait_subscribers(&hub, 1).await;

    // A peer of the previous version: refused, saying both versions.
    let (mut raw, theirs) = raw_peer(&primary.link, 1).await;
    assert_eq!(theirs[9..11], LINK_VERSION.to_be_bytes());
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(PATIENCE, raw.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the primary closes the link");
    wait_metric(&primary.metrics, "colo_proxyd_link_errors_total 1").await;
    primary
        .daemon
        .wait_line(&["the peer speaks link version 1, this build speaks 2"])
        .await;

    // A peer that says hello, then nothing: it hears heartbeats (type 3, empty), and is
    // dropped as dead.
    let (mut raw, _) = raw_peer(&primary.link, LINK_VERSION).await;
    let silent_since = Instant::now();
    wait_metric(&primary.metrics, LINK_UP).await;
    let mut beat = [0u8; 5];
    tokio::time::timeout(PATIENCE, raw.read_exact(&mut beat))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(beat, [3, 0, 0, 0, 0]);
    let took = wait_count(&primary.metrics, DEAD, 1, silent_since).await;
    wait_metric(&primary.metrics, LINK_DOWN).await;
    eprintln!(
        "silent peer dropped {:.2} s after its hello",
        took.as_secs_f64()
    );
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(PATIENCE, raw.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the primary closes the link");
    assert!(
        rest.chunks(5).all(|c| c == [3, 0, 0, 0, 0]),
        "only heartbeats came: {rest:?}"
    );
    assert_eq!(
        metric(&primary.metrics, "colo_proxyd_link_errors_total").await,
        1
    );
    drop(hub);
}
