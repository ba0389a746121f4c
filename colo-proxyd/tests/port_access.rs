//! Who may connect to the QEMU-facing ports of both roles (`docs/security.md`), against the real
//! `colo-proxyd` binary: both daemons as processes, QEMU's chardevs, the primary's QMP monitor
//! and the relay faked (`common`), and a stranger: a real process of another user (uid 65534,
//! through `setpriv`) that connects to `red0` and `red1` and writes a frame.
//!
//! The test runs as root, which the ports allow (as they allow the daemon's own uid). The
//! stranger is refused before a byte is read (closed, logged with its uid, counted in
//! `colo_proxyd_port_refused_total{port,reason="uid"}`), and QEMU's connections stay: no
//! reconnection, every frame mirrored meanwhile reaches `red0` in order, `red1` still
//! carries the SVM's output, and the stranger's frame never counts as the SVM's. With
//! `--qemu-uid 65534` the same process is served. A listen address that is not loopback is
//! refused at start.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use colo_proxyd::codec::{Frame, encode};
use common::process::{Daemon, free_addr, metric};
use common::*;
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

const EPOCH: u64 = 1;
const LINK_UP: &str = "colo_proxyd_connection_up{port=\"link\"} 1";
/// The stranger's uid: `nobody` on Debian and most distributions.
const STRANGER: u32 = 65534;

/// A client packet into the PVM, numbered: mirrored to the SVM unchanged.
fn client_frame(n: u32) -> Vec<u8> {
    tcp(
        false,
        1 + 100 * n,
        1,
        0x18,
        format!("mirrored {n}").as_bytes(),
    )
}

/// A process of uid [`STRANGER`] (no groups) that connects to `addr`, writes `frame` in
/// QEMU's framing, then reads until the connection ends; it prints `closed` when it did, and
/// exits 2 when it could not connect. bash's /dev/tcp: a real client of another user, without
/// a helper binary that user would need to be able to execute.
fn stranger(addr: &str, frame: &[u8]) -> Child {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let mut wire = Vec::new();
    encode(&Frame::ethernet(frame.to_vec()), false, &mut wire).unwrap();
    let escaped: String = wire.iter().map(|b| format!("\\x{b:02x}")).collect();
    // The write may fail when the daemon has already closed (SIGPIPE ignored, else the
    // builtin printf kills the shell): what matters is that it closes.
    let script = format!(
        "trap '' PIPE; exec 3<>/dev/tcp/{host}/{port} || exit 2; printf '{escaped}' >&3 2>/dev/null; \
         cat <&3 >/dev/null 2>&1; echo closed"
    );
    Command::new("setpriv")
        .args([
            "--reuid",
            &STRANGER.to_string(),
            "--regid",
            &STRANGER.to_string(),
            "--clear-groups",
            "bash",
            "-c",
            &script,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("setpriv runs")
}

/// Waits for the stranger to report that the daemon closed its connection.
async fn closed_by_the_daemon(child: Child, what: &str) {
    let out = tokio::time::timeout(PATIENCE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{what}: the daemon kept the stranger's connection open"))
        .unwrap();
    assert_eq!(
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).trim()
        ),
        (Some(0), "closed"),
        "{what}"
    );
}

/// Waits until the counter `name` exceeds `before`; its value.
async fn wait_above(metrics: &str, name: &str, before: u64) -> u64 {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let now = metric(metrics, name).await;
        if now > before {
            return now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never counted in {name}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// After the strangers, QEMU's connections still carry everything: every frame mirrored
/// before, between and after them reached `red0` in order (no connection was replaced), and
/// the PVM's output on `compare0`, matched by the SVM's on `red1`, is released on
/// `compare_out`.
async fn assert_qemus_paths_intact(
    red0: &mut Chardev,
    sent: &[Vec<u8>],
    compare0: &mut Chardev,
    red1: &mut Chardev,
    compare_out: &mut Chardev,
) {
    assert_eq!(
        red0.recv_n(sent.len()).await,
        sent,
        "a mirrored frame was lost"
    );
    let out = tcp(true, 5000, 1, 0x18, b"released after comparison");
    compare0.send(&out).await;
    red1.send(&out).await;
    assert_eq!(compare_out.recv(PATIENCE).await, Some(out));
}

struct Secondary {
    daemon: Daemon,
    red0_addr: String,
    red1_addr: String,
    metrics: String,
}

/// `colo-proxyd secondary` with its ports on free loopback ports; returns once it listens.
async fn spawn_secondary(control: &Path, primary_link: &str, extra: &[&str]) -> Secondary {
    let (red0_addr, red1_addr, metrics) = (free_addr(), free_addr(), free_addr());
    let mut args: Vec<String> = [
        "secondary",
        "--svm-input-listen",
        &red0_addr,
        "--svm-output-listen",
        &red1_addr,
        "--primary-link",
        primary_link,
        "--control",
        &control.display().to_string(),
        "--metrics",
        &metrics,
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|a| a.to_string()));
    let daemon = Daemon::spawn("secondary", &args);
    let deadline = std::time::Instant::now() + PATIENCE;
    while TcpStream::connect(&metrics).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the secondary never listened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Secondary {
        daemon,
        red0_addr,
        red1_addr,
        metrics,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_connection_is_refused_and_qemus_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, control) = hub_in_colo(dir.path(), EPOCH);
    let _qmp = fake_qmp(
        &dir.path().join("qmp.sock"),
        &["compare0", "compare_out", "mirror0"],
    );
    // The primary, QEMU's chardev servers faked.
    let ports = PrimaryPorts::bind().await;
    let (link, primary_metrics) = (free_addr(), free_addr());
    let args = ports.primary_args(
        &link,
        &control,
        &dir.path().join("qmp.sock"),
        &primary_metrics,
    );
    let _primary = Daemon::spawn("primary", &args);
    let mut compare0 = Chardev::accept(&ports.compare0).await;
    let mut mirror0 = Chardev::accept(&ports.mirror0).await;
    let mut compare_out = Chardev::accept(&ports.compare_out).await;
    // The secondary, QEMU's red0 and red1 connected as root (this test).
    let secondary = spawn_secondary(&control, &link, &[]).await;
    let mut red0 = Chardev::connect(&secondary.red0_addr).await;
    let mut red1 = Chardev::connect(&secondary.red1_addr).await;
    wait_subscribers(&hub, 2).await;
    wait_metric(&primary_metrics, "colo_proxyd_comparing 1").await;
    wait_metric(&secondary.metrics, &format!("colo_proxyd_epoch {EPOCH}")).await;
    wait_metric(&primary_metrics, LINK_UP).await;
    wait_metric(&secondary.metrics, LINK_UP).await;
    for port in ["red0", "red1"] {
        wait_metric(
            &secondary.metrics,
            &format!("colo_proxyd_connection_up{{port=\"{port}\"}} 1"),
        )
        .await;
    }
    secondary
        .daemon
        .wait_line(&["QEMU chardev connected", "port=\"red1\"", "uid=0"])
        .await;
    let connected_before = secondary.daemon.count_lines(&["QEMU chardev connected"]);
    let svm_frames = "colo_proxyd_svm_frames_total";
    let svm_frames_before = metric(&secondary.metrics, svm_frames).await;

    let mut sent = Vec::new();
    let mut n = 0;
    let mut mirror = |count: usize, sent: &mut Vec<Vec<u8>>| {
        (0..count)
            .map(|_| {
                n += 1;
                let frame = client_frame(n);
                sent.push(frame.clone());
                frame
            })
            .collect::<Vec<_>>()
    };
    for frame in mirror(5, &mut sent) {
        mirror0.send(&frame).await;
    }
    for port in ["red0", "red1"] {
        let addr = match port {
            "red0" => &secondary.red0_addr,
            _ => &secondary.red1_addr,
        };
        let refused = format!("colo_proxyd_port_refused_total{{port=\"{port}\",reason=\"uid\"}}");
        let before = metric(&secondary.metrics, &refused).await;
        // A fake SVM output frame, or a frame into the SVM: neither is read.
        let fake = tcp(true, 777, 1, 0x18, b"not the SVM's");
        closed_by_the_daemon(stranger(addr, &fake), port).await;
        let count = wait_above(&secondary.metrics, &refused, before).await;
        eprintln!("{port}: uid {STRANGER} refused ({refused} = {count})");
        for frame in mirror(5, &mut sent) {
            mirror0.send(&frame).await;
        }
    }
    let line = secondary
        .daemon
        .wait_line(&[
            "connection to QEMU's port refused",
            &format!("uid={STRANGER}"),
        ])
        .await;
    assert!(line.contains("WARN"), "{line}");
    assert_qemus_paths_intact(&mut red0, &sent, &mut compare0, &mut red1, &mut compare_out).await;
    assert_eq!(
        metric(&secondary.metrics, svm_frames).await,
        svm_frames_before + 1,
        "only the SVM's own frame came out of red1"
    );
    assert_eq!(
        secondary.daemon.count_lines(&["QEMU chardev connected"]),
        connected_before,
        "a connection replaced QEMU's"
    );
    assert_eq!(secondary.daemon.count_lines(&["QEMU reconnected"]), 0);
    for port in ["red0", "red1"] {
        wait_metric(
            &secondary.metrics,
            &format!("colo_proxyd_connection_up{{port=\"{port}\"}} 1"),
        )
        .await;
    }
}

/// `--qemu-uid 65534`: the same stranger is QEMU now, and served (it replaces root's
/// connection, as QEMU reconnecting does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_uid_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let (_hub, control) = hub_in_colo(dir.path(), EPOCH);
    // No primary: the secondary keeps trying its link, which does not matter here.
    let secondary = spawn_secondary(
        &control,
        &free_addr(),
        &["--qemu-uid", &STRANGER.to_string()],
    )
    .await;
    secondary
        .daemon
        .wait_line(&[
            "colo-proxyd secondary started",
            &format!("qemu_uids=[0, {STRANGER}]"),
        ])
        .await;
    let _root = Chardev::connect(&secondary.red1_addr).await;
    secondary
        .daemon
        .wait_line(&["QEMU chardev connected", "port=\"red1\"", "uid=0"])
        .await;
    let frame = tcp(true, 1, 1, 0x18, b"from QEMU's uid");
    let qemu = stranger(&secondary.red1_addr, &frame);
    secondary
        .daemon
        .wait_line(&[
            "QEMU chardev connected",
            "port=\"red1\"",
            &format!("uid={STRANGER}"),
        ])
        .await;
    secondary.daemon.wait_line(&["QEMU reconnected"]).await;
    wait_metric(
        &secondary.metrics,
        "colo_proxyd_connection_up{port=\"red1\"} 1",
    )
    .await;
    assert_eq!(
        metric(
            &secondary.metrics,
            "colo_proxyd_port_refused_total{port=\"red1\",reason=\"uid\"}"
        )
        .await,
        0
    );
    drop(qemu);
}

/// Before QEMU connects, a stranger is refused all the same and leaves the port waiting for
/// QEMU, which is then served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_before_qemu_is_refused_and_qemu_is_served_after() {
    let dir = tempfile::tempdir().unwrap();
    let (_hub, control) = hub_in_colo(dir.path(), EPOCH);
    let secondary = spawn_secondary(&control, &free_addr(), &[]).await;
    let frame = tcp(true, 1, 1, 0x18, b"not the SVM's");
    closed_by_the_daemon(stranger(&secondary.red0_addr, &frame), "red0").await;
    closed_by_the_daemon(stranger(&secondary.red1_addr, &frame), "red1").await;
    for port in ["red0", "red1"] {
        let refused = format!("colo_proxyd_port_refused_total{{port=\"{port}\",reason=\"uid\"}}");
        assert_eq!(metric(&secondary.metrics, &refused).await, 1, "{port}");
        wait_metric(
            &secondary.metrics,
            &format!("colo_proxyd_connection_up{{port=\"{port}\"}} 0"),
        )
        .await;
    }
    assert_eq!(secondary.daemon.count_lines(&["QEMU chardev connected"]), 0);
    let _red1 = Chardev::connect(&secondary.red1_addr).await;
    wait_metric(
        &secondary.metrics,
        "colo_proxyd_connection_up{port=\"red1\"} 1",
    )
    .await;
    secondary
        .daemon
        .wait_line(&["QEMU chardev connected", "port=\"red1\"", "uid=0"])
        .await;
}

/// The primary's three QEMU ports, listened on (`--*-listen`, what `qmp-driver daemon-args`
/// gives): QEMU's chardevs connect as root; a stranger on each port is refused and counted, and
/// nothing QEMU sends or receives is lost or replaced meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_on_the_primarys_ports_is_refused_and_qemus_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, control) = hub_in_colo(dir.path(), EPOCH);
    let qmp = dir.path().join("qmp.sock");
    let _qmp = fake_qmp(&qmp, &["compare0", "compare_out", "mirror0"]);
    let (compare0_addr, mirror0_addr, compare_out_addr) = (free_addr(), free_addr(), free_addr());
    let (link, primary_metrics) = (free_addr(), free_addr());
    let primary = Daemon::spawn(
        "primary",
        &[
            "primary",
            "--pvm-output-listen",
            &compare0_addr,
            "--mirror-listen",
            &mirror0_addr,
            "--release-listen",
            &compare_out_addr,
            "--link-listen",
            &link,
            "--control",
            &control.display().to_string(),
            "--qmp",
            &format!("unix:{}", qmp.display()),
            "--metrics",
            &primary_metrics,
        ]
        .map(String::from),
    );
    let deadline = std::time::Instant::now() + PATIENCE;
    while TcpStream::connect(&primary_metrics).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the primary never listened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Before QEMU: a stranger on compare_out is refused and the port waits for QEMU.
    let refused =
        |port: &str| format!("colo_proxyd_port_refused_total{{port=\"{port}\",reason=\"uid\"}}");
    let fake = tcp(false, 777, 1, 0x18, b"not from the network");
    closed_by_the_daemon(stranger(&compare_out_addr, &fake), "compare_out").await;
    assert_eq!(metric(&primary_metrics, &refused("compare_out")).await, 1);
    let mut compare0 = Chardev::connect(&compare0_addr).await;
    let mut mirror0 = Chardev::connect(&mirror0_addr).await;
    let mut compare_out = Chardev::connect(&compare_out_addr).await;
    let secondary = spawn_secondary(&control, &link, &[]).await;
    let mut red0 = Chardev::connect(&secondary.red0_addr).await;
    let mut red1 = Chardev::connect(&secondary.red1_addr).await;
    wait_subscribers(&hub, 2).await;
    wait_metric(&primary_metrics, "colo_proxyd_comparing 1").await;
    wait_metric(&primary_metrics, LINK_UP).await;
    for port in ["compare0", "mirror0", "compare_out"] {
        wait_metric(
            &primary_metrics,
            &format!("colo_proxyd_connection_up{{port=\"{port}\"}} 1"),
        )
        .await;
    }
    primary
        .wait_line(&["QEMU chardev connected", "port=\"compare_out\"", "uid=0"])
        .await;
    let connected_before = primary.count_lines(&["QEMU chardev connected"]);

    let mut sent = Vec::new();
    for (i, (port, addr)) in [
        ("compare0", &compare0_addr),
        ("mirror0", &mirror0_addr),
        ("compare_out", &compare_out_addr),
    ]
    .into_iter()
    .enumerate()
    {
        let before = metric(&primary_metrics, &refused(port)).await;
        // A forged PVM output, client packet or release: none is read.
        closed_by_the_daemon(stranger(addr, &fake), port).await;
        wait_above(&primary_metrics, &refused(port), before).await;
        for n in 0..3 {
            let frame = client_frame(10 * i as u32 + n);
            mirror0.send(&frame).await;
            sent.push(frame);
        }
    }
    assert_qemus_paths_intact(&mut red0, &sent, &mut compare0, &mut red1, &mut compare_out).await;
    assert_eq!(
        primary.count_lines(&["QEMU chardev connected"]),
        connected_before,
        "a connection replaced QEMU's"
    );
    assert_eq!(primary.count_lines(&["QEMU reconnected"]), 0);
    let line = primary
        .wait_line(&[
            "connection to QEMU's port refused",
            &format!("uid={STRANGER}"),
        ])
        .await;
    assert!(line.contains("WARN"), "{line}");
}

/// A QEMU port on an address other hosts reach is refused at start, with the option named.
#[test]
fn a_port_that_is_not_loopback_is_refused_at_start() {
    let port = free_addr().rsplit_once(':').unwrap().1.to_owned();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_colo-proxyd"))
        .args([
            "secondary",
            "--svm-input-listen",
            &format!("0.0.0.0:{port}"),
            "--svm-output-listen",
            "127.0.0.1:0",
            "--primary-link",
            "127.0.0.1:1",
            "--control",
            "/nonexistent/relay.sock",
        ])
        .env_remove("COLO_PROXYD_CONFIG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--svm-input-listen") && stderr.contains("is not a loopback address"),
        "{stderr}"
    );
}
