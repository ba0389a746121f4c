//! The `qmp-driver` binary's output and exit codes against a fake server.

use colo_testkit::fake_qmp::{Answer, Fake, FakeMonitor};
use serde_json::{Value, json};
use std::path::Path;
use std::process::Output;
use std::time::Duration;
use tokio::net::UnixListener;
use tokio::process::Command;

async fn run_cli(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_qmp-driver"))
        .args(args)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(20), out)
        .await
        .expect("qmp-driver hung")
        .expect("run qmp-driver")
}

/// A monitor answering every command with `answer`.
fn serve(path: &Path, answer: Answer) -> FakeMonitor {
    FakeMonitor::serve_unix(path, &["oob"], move |_| answer.clone())
}

#[tokio::test]
async fn raw_prints_return_value_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("q.sock");
    let mut qmp = serve(
        &sock,
        Answer::ret(json!({"running": false, "status": "prelaunch"})),
    );
    let out = run_cli(&[
        "raw",
        "--socket",
        sock.to_str().unwrap(),
        "query-status",
        r#"{"x": 1}"#,
    ])
    .await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed, json!({"running": false, "status": "prelaunch"}));
    let cmd = qmp.recv().await;
    assert_eq!(cmd.name, "query-status");
    assert_eq!(cmd.args, json!({"x": 1}));
}

#[tokio::test]
async fn raw_exits_one_on_qemu_error() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("q.sock");
    let mut qmp = serve(
        &sock,
        Answer::error("CommandNotFound", "The command nosuch has not been found"),
    );
    let out = run_cli(&["raw", "--socket", sock.to_str().unwrap(), "nosuch"]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("CommandNotFound"));
    assert_eq!(qmp.recv().await.name, "nosuch");
}

#[tokio::test]
async fn raw_exits_two_on_connection_or_input_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.sock");
    let out = run_cli(&["raw", "--socket", missing.to_str().unwrap(), "query-status"]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = run_cli(&["raw", "--socket", missing.to_str().unwrap(), "x", "{bad"]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[tokio::test]
async fn events_prints_json_lines_until_peer_closes() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("q.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut fake = Fake::new(stream);
        fake.handshake(&["oob"]).await;
        // Sent right after the handshake on purpose: the CLI must not lose
        // events that race with its own setup.
        fake.event("STOP", 10, 20, None).await;
        fake.event("FUTURE_THING", 11, 0, Some(json!({"a": [1]})))
            .await;
    });
    let out = run_cli(&["events", "--socket", sock.to_str().unwrap()]).await;
    server.await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines,
        vec![
            json!({"name": "STOP", "data": null, "timestamp": {"seconds": 10, "microseconds": 20}}),
            json!({"name": "FUTURE_THING", "data": {"a": [1]}, "timestamp": {"seconds": 11, "microseconds": 0}}),
        ]
    );
}
