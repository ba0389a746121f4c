//! QEMU's filters kept working over QMP (`daemon::qemu_filters`), against fake chardev sockets
//! and a fake QMP monitor (`common`): a redirector whose input chardev reconnected is
//! re-created in its place before anything is written to the new connection, and the
//! primary's guest link is down while `compare0` has no connection during COLO.

mod common;

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use colo_control::hub::ControlHub;
use colo_proxyd::daemon::config::{PrimaryArgs, PrimaryConfig, SecondaryArgs, SecondaryConfig};
use colo_proxyd::daemon::{primary, secondary};
use common::*;
use serde_json::{Value, json};
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Every log line of this test binary (one subscriber for all its tests and threads).
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = buffer.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || Capture(writer.clone()))
            .init();
        buffer
    })
    .clone()
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        std::io::stderr().write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Waits until a log line contains every one of `needles`.
async fn wait_log(needles: &[&str]) {
    let logs = logs();
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
        if text
            .lines()
            .any(|line| needles.iter().all(|n| line.contains(n)))
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no log line with {needles:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The next QMP command other than `set_link`, which must be `name` with `args`.
async fn expect(qmp: &mut FakeMonitor, name: &str, args: Value) {
    loop {
        let seen = next_qmp_command(qmp, PATIENCE).await;
        if seen.as_ref().is_some_and(|(n, _)| n == "set_link") {
            continue;
        }
        assert_eq!(seen, Some((name.to_owned(), args)));
        return;
    }
}

/// The next `set_link` the fake QMP monitor saw (other commands skipped).
async fn next_set_link(qmp: &mut FakeMonitor) -> Value {
    loop {
        match next_qmp_command(qmp, PATIENCE).await {
            Some((name, args)) if name == "set_link" => return args,
            Some(_) => continue,
            None => panic!("no set_link"),
        }
    }
}

fn redire0() -> Value {
    json!({"qom-type": "filter-redirector", "id": "redire0", "netdev": "hn0", "queue": "rx",
           "indev": "compare_out", "position": "id=redire1", "insert": "before"})
}

struct Primary {
    /// `None` when QEMU's compare0 was not there at the start.
    compare0: Option<TcpListener>,
    compare0_address: std::net::SocketAddr,
    mirror0: TcpListener,
    compare_out: TcpListener,
    metrics: String,
    task: JoinHandle<()>,
}

/// The primary daemon against fake QEMU chardev servers (not accepted yet); without
/// `compare0_up`, nothing listens on compare0's address.
async fn start_primary(
    dir: &Path,
    control: &Path,
    compare0_up: bool,
    shutdown: &CancellationToken,
) -> Primary {
    let compare0 = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let compare0_address = compare0.local_addr().unwrap();
    let mirror0 = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let compare_out = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = PrimaryConfig::try_from(PrimaryArgs {
        pvm_output: Some(compare0.local_addr().unwrap().to_string()),
        mirror: Some(mirror0.local_addr().unwrap().to_string()),
        release: Some(compare_out.local_addr().unwrap().to_string()),
        link_listen: Some("127.0.0.1:0".into()),
        control: Some(control.into()),
        qmp: Some(format!("unix:{}", dir.join("qmp.sock").display())),
        metrics: Some("127.0.0.1:0".into()),
        max_hold_ms: Some(10_000),
        ..PrimaryArgs::default()
    })
    .unwrap();
    let compare0 = compare0_up.then_some(compare0);
    let listeners = primary::PrimaryListeners::bind(&config).await.unwrap();
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
        compare0,
        compare0_address,
        mirror0,
        compare_out,
        metrics,
        task,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_release_redirector_is_recreated_in_its_place_when_compare_out_reconnects() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    // No COLO: the PVM's output passes uncompared, so it reaches compare_out at once.
    let control = dir.path().join("control.sock");
    let _hub = ControlHub::new(UnixListener::bind(&control).unwrap());
    let qemu = QemuColoMode::in_colo();
    qemu.set("none", "none");
    let mut qmp = fake_qmp_with(&dir.path().join("qmp.sock"), &[], qemu);
    let shutdown = CancellationToken::new();
    let p = start_primary(dir.path(), &control, true, &shutdown).await;
    let mut compare0 = Chardev::accept(p.compare0.as_ref().unwrap()).await;
    let _mirror0 = Chardev::accept(&p.mirror0).await;
    let mut compare_out = Chardev::accept(&p.compare_out).await;
    // The first connection: re-created as a precaution (an earlier colo-proxyd may have been
    // connected), before anything is written.
    expect(&mut qmp, "object-del", json!({"id": "redire0"})).await;
    expect(&mut qmp, "object-add", redire0()).await;
    let frame = tcp(true, 1000, 1, 0x18, b"first");
    compare0.send(&frame).await;
    assert_eq!(compare_out.recv(PATIENCE).await, Some(frame));

    // QEMU closes compare_out; colo-proxyd connects again.
    drop(compare_out);
    let mut compare_out = Chardev::accept(&p.compare_out).await;
    expect(&mut qmp, "object-del", json!({"id": "redire0"})).await;
    expect(&mut qmp, "object-add", redire0()).await;
    wait_log(&[
        "WARN",
        "re-created QEMU filter redire0 after compare_out reconnected",
    ])
    .await;
    wait_metric(
        &p.metrics,
        "colo_proxyd_qemu_filters_recreated_total{filter=\"redire0\"} 2",
    )
    .await;
    let frame = tcp(true, 1005, 1, 0x18, b"second");
    compare0.send(&frame).await;
    assert_eq!(compare_out.recv(PATIENCE).await, Some(frame));
    shutdown.cancel();
    tokio::time::timeout(PATIENCE, p.task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_link_is_down_while_compare0_has_no_connection_during_colo() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let (hub, control) = hub_in_colo(dir.path(), 1);
    let mut qmp = fake_qmp(&dir.path().join("qmp.sock"), &[]);
    let shutdown = CancellationToken::new();
    let p = start_primary(dir.path(), &control, true, &shutdown).await;
    let compare0 = Chardev::accept(p.compare0.as_ref().unwrap()).await;
    let _mirror0 = Chardev::accept(&p.mirror0).await;
    let _compare_out = Chardev::accept(&p.compare_out).await;
    wait_subscribers(&hub, 1).await;
    wait_metric(&p.metrics, "colo_proxyd_comparing 1").await;
    wait_metric(&p.metrics, "colo_proxyd_guest_link_up 1").await;
    while next_qmp_command(&mut qmp, Duration::from_millis(200))
        .await
        .is_some()
    {}

    // compare0 goes away and stays away (no listener: the reconnection fails).
    // The listener first: with it, colo-proxyd would connect again at once.
    drop(p.compare0);
    drop(compare0);
    assert_eq!(
        next_set_link(&mut qmp).await,
        json!({"name": "hn0", "up": false})
    );
    wait_log(&[
        "ERROR",
        "the VM is cut off from the network until colo-proxyd",
    ])
    .await;
    wait_metric(&p.metrics, "colo_proxyd_guest_link_up 0").await;

    // QEMU's compare0 is back: colo-proxyd connects and the link goes up.
    let listener = TcpListener::bind(p.compare0_address).await.unwrap();
    let _compare0 = Chardev::accept(&listener).await;
    assert_eq!(
        next_set_link(&mut qmp).await,
        json!({"name": "hn0", "up": true})
    );
    wait_metric(&p.metrics, "colo_proxyd_guest_link_up 1").await;
    wait_metric(&p.metrics, "colo_proxyd_guest_link_downs_total 1").await;
    shutdown.cancel();
    tokio::time::timeout(PATIENCE, p.task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_started_during_colo_without_compare0_cuts_the_link() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let (hub, control) = hub_in_colo(dir.path(), 1);
    let mut qmp = fake_qmp(&dir.path().join("qmp.sock"), &[]);
    let shutdown = CancellationToken::new();
    // QEMU's compare0 is not there (yet).
    let p = start_primary(dir.path(), &control, false, &shutdown).await;
    wait_subscribers(&hub, 1).await;
    // Up at first (before the relay said COLO runs, nothing to protect), then down.
    loop {
        if next_set_link(&mut qmp).await == json!({"name": "hn0", "up": false}) {
            break;
        }
    }
    wait_log(&["ERROR", "the VM is cut off from the network"]).await;
    let listener = TcpListener::bind(p.compare0_address).await.unwrap();
    let _compare0 = Chardev::accept(&listener).await;
    assert_eq!(
        next_set_link(&mut qmp).await,
        json!({"name": "hn0", "up": true})
    );
    shutdown.cancel();
    tokio::time::timeout(PATIENCE, p.task)
        .await
        .unwrap()
        .unwrap();
}

/// The secondary daemon; returns its `red0` address, its metrics address and task.
async fn start_secondary(
    dir: &Path,
    qmp: Option<String>,
    shutdown: &CancellationToken,
) -> (String, String, JoinHandle<()>) {
    let (red0, _, metrics, task) = start_secondary_with(dir, qmp, false, shutdown).await;
    (red0, metrics, task)
}

/// The secondary daemon, with the network bridge of a failover when `bridge`; returns its
/// `red0` and `red2` (with the bridge) addresses, its metrics address and task.
async fn start_secondary_with(
    dir: &Path,
    qmp: Option<String>,
    bridge: bool,
    shutdown: &CancellationToken,
) -> (String, Option<String>, String, JoinHandle<()>) {
    let control = dir.join("control.sock");
    let _hub = ControlHub::new(UnixListener::bind(&control).unwrap());
    let bridge_port = bridge.then(|| "127.0.0.1:0".to_string());
    let config = SecondaryConfig::try_from(SecondaryArgs {
        svm_input_listen: Some("127.0.0.1:0".into()),
        svm_output_listen: Some("127.0.0.1:0".into()),
        net_output_listen: bridge_port.clone(),
        net_input_listen: bridge_port,
        // Nobody listens there: the link stays down, which does not matter here.
        primary_link: Some("127.0.0.1:9".into()),
        control: Some(control.into()),
        metrics: Some("127.0.0.1:0".into()),
        qmp,
        ..SecondaryArgs::default()
    })
    .unwrap();
    let listeners = secondary::SecondaryListeners::bind(&config).await.unwrap();
    let red0 = listeners.svm_input.local_addr().unwrap().to_string();
    let red2 = listeners
        .bridge
        .as_ref()
        .map(|b| b.net_output.local_addr().unwrap().to_string());
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
    (red0, red2, metrics, task)
}

/// QEMU's `chardev` (a client with reconnect-ms) connects to `port`, closes and connects
/// again: before each connection is written to, the daemon re-creates the filter that reads
/// it, `filter` (object-add arguments), over `qmp`, and counts it.
async fn recreated_at_each_connection(
    qmp: &mut FakeMonitor,
    port: &str,
    metrics: &str,
    chardev: &str,
    filter: Value,
) {
    let id = filter["id"].as_str().unwrap().to_owned();
    let recreated =
        |n: u32| format!("colo_proxyd_qemu_filters_recreated_total{{filter=\"{id}\"}} {n}");
    let first = Chardev::connect(port).await;
    expect(qmp, "object-del", json!({ "id": id })).await;
    expect(qmp, "object-add", filter.clone()).await;
    wait_metric(metrics, &recreated(1)).await;
    drop(first);
    wait_metric(
        metrics,
        &format!("colo_proxyd_connection_up{{port=\"{chardev}\"}} 0"),
    )
    .await;
    let _again = Chardev::connect(port).await;
    expect(qmp, "object-del", json!({ "id": id })).await;
    expect(qmp, "object-add", filter).await;
    wait_log(&[
        "WARN",
        &format!("re-created QEMU filter {id} after {chardev} reconnected"),
    ])
    .await;
    wait_metric(metrics, &recreated(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_secondary_recreates_f1_when_red0_reconnects() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let qmp_path = dir.path().join("secondary-qmp.sock");
    let mut qmp = fake_qmp(&qmp_path, &[]);
    let shutdown = CancellationToken::new();
    let (red0, metrics, task) = start_secondary(
        dir.path(),
        Some(format!("unix:{}", qmp_path.display())),
        &shutdown,
    )
    .await;
    let f1 = json!({"qom-type": "filter-redirector", "id": "f1", "netdev": "hn0", "queue": "tx",
                    "indev": "red0", "position": "id=f2", "insert": "before"});
    recreated_at_each_connection(&mut qmp, &red0, &metrics, "red0", f1).await;
    shutdown.cancel();
    tokio::time::timeout(PATIENCE, task).await.unwrap().unwrap();
}

/// After a failover the secondary bridges the SVM's traffic through QEMU's `red2`, whose
/// filter `f3` (added by qmp-driver) stops reading when a connection closes, like `f1`: a
/// colo-proxyd restarted after the failover, or a dropped connection, must re-create it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_secondary_recreates_f3_when_red2_reconnects_after_a_failover() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let qmp_path = dir.path().join("secondary-qmp.sock");
    let mut qmp = fake_qmp(&qmp_path, &[]);
    let shutdown = CancellationToken::new();
    let (_red0, red2, metrics, task) = start_secondary_with(
        dir.path(),
        Some(format!("unix:{}", qmp_path.display())),
        true,
        &shutdown,
    )
    .await;
    let red2 = red2.expect("the bridge listens for red2");
    let f3 = json!({"qom-type": "filter-redirector", "id": "f3", "netdev": "hn0", "queue": "rx",
                    "indev": "red2", "position": "id=f2", "insert": "before"});
    recreated_at_each_connection(&mut qmp, &red2, &metrics, "red2", f3).await;
    shutdown.cancel();
    tokio::time::timeout(PATIENCE, task).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_qmp_the_secondary_says_f1_must_be_recreated_by_hand() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let (red0, metrics, task) = start_secondary(dir.path(), None, &shutdown).await;
    wait_log(&["WARN", "no --qmp", "f1 must be re-created by hand"]).await;
    let first = Chardev::connect(&red0).await;
    wait_metric(&metrics, "colo_proxyd_connection_up{port=\"red0\"} 1").await;
    drop(first);
    wait_metric(&metrics, "colo_proxyd_connection_up{port=\"red0\"} 0").await;
    let _again = Chardev::connect(&red0).await;
    wait_log(&[
        "ERROR",
        "QEMU's red0 reconnected, but its filter f1 no longer reads it",
        "object_del f1; object_add filter-redirector,id=f1,netdev=hn0,queue=tx,indev=red0,position=id=f2,insert=before",
    ])
    .await;
    shutdown.cancel();
    tokio::time::timeout(PATIENCE, task).await.unwrap().unwrap();
}
