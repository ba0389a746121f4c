//! The `colo-blockd secondary` binary end to end: a relay hub in the test
//! process, qemu-io on both exports, a checkpoint barrier, SIGTERM.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use colo_control::hub::ControlHub;
use colo_control::protocol::{EventBody, EventKind};
use common::{file_bytes, require_tool, run_ok};
use tokio::net::UnixListener;

const SIZE: usize = 1 << 20;
const PATIENCE: Duration = Duration::from_secs(60);

async fn qemu_io(uri: String, commands: &'static [&'static str]) {
    let out = tokio::task::spawn_blocking(move || {
        let mut args = vec!["-f", "raw", &uri];
        for c in commands {
            args.extend(["-c", c]);
        }
        run_ok("qemu-io", &args)
    })
    .await
    .unwrap();
    assert!(!out.contains("failed"), "{commands:?}: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secondary_follows_the_relay_and_stops_on_sigterm() {
    require_tool("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("s.raw");
    std::fs::write(&image, vec![0x11; SIZE]).unwrap();
    let nbd = dir.path().join("nbd.sock");
    let control = dir.path().join("control.sock");
    let hub = ControlHub::new(UnixListener::bind(&control).unwrap());
    let mut child = Command::new(env!("CARGO_BIN_EXE_colo-blockd"))
        .arg("secondary")
        .arg("--image")
        .arg(&image)
        .arg("--unix")
        .arg(&nbd)
        .arg("--control")
        .arg(&control)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Serving and subscribed; the bound only turns a hang into a failure.
    let started = Instant::now();
    while !(nbd.exists()
        && hub
            .status()
            .subscribers
            .iter()
            .any(|s| s.sync && s.connected))
    {
        assert!(child.try_wait().unwrap().is_none(), "exited early");
        assert!(started.elapsed() < PATIENCE, "never came up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let uri = |export: &str| format!("nbd+unix:///{export}?socket={}", nbd.display());
    qemu_io(uri("replica"), &["write -P 0xaa 0 64k"]).await;
    qemu_io(uri("svm"), &["write -P 0xbb 64k 64k", "read -P 0x11 0 64k"]).await;
    for event in [EventKind::SvmEpochClosed, EventKind::CheckpointAdopted] {
        let report = hub
            .barrier(EventBody::new(event, 1), Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(report.acks.len(), 1, "{report:?}");
        assert_eq!(report.acks[0].name, "colo-blockd");
    }
    qemu_io(uri("svm"), &["read -P 0xaa 0 64k", "read -P 0x11 64k 64k"]).await;

    run_ok("kill", &["-TERM", &child.id().to_string()]);
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "colo-blockd exited with {status}");
    // A clean stop leaves the adopted checkpoint in the image itself.
    assert!(file_bytes(&image, 0, 65536).iter().all(|&b| b == 0xaa));
    assert!(file_bytes(&image, 65536, 65536).iter().all(|&b| b == 0x11));
}

#[test]
fn secondary_help_explains_the_options_and_exit_codes() {
    let out = run_ok(env!("CARGO_BIN_EXE_colo-blockd"), &["secondary", "--help"]);
    for needle in [
        "--image",
        "--unix",
        "--tcp",
        "--control",
        "--primary-qmp",
        "--log-budget",
        "--overlay-budget",
        "--name",
        "replica",
        "svm",
        "Exit codes: 0",
    ] {
        assert!(out.contains(needle), "--help lacks {needle}:\n{out}");
    }
}

#[test]
fn secondary_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let control = dir.path().join("control.sock");
    let missing = Command::new(env!("CARGO_BIN_EXE_colo-blockd"))
        .args(["secondary", "--image", "/nonexistent/s.raw", "--unix"])
        .arg(&sock)
        .arg("--control")
        .arg(&control)
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(err.contains("/nonexistent/s.raw"), "{err}");

    let bad = Command::new(env!("CARGO_BIN_EXE_colo-blockd"))
        .args(["secondary", "--image", "s.raw", "--tcp", "127.0.0.1:0"])
        .arg("--control")
        .arg(&control)
        .args(["--primary-qmp", "qmp.sock"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("unix:PATH or tcp:HOST:PORT"), "{err}");
}
