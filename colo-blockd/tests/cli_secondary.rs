//! The `colo-blockd secondary` binary end to end: a relay hub in the test
//! process, qemu-io on both exports (over a Unix socket and TCP at once), a
//! checkpoint barrier, the `/metrics` endpoint, failover, SIGTERM.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use colo_control::hub::ControlHub;
use colo_control::protocol::{EventBody, EventKind};
use colo_types::Role;
use common::exposition::{parse, scrape};
use common::{file_bytes, free_tcp_addr, require_tool, run_ok};
use tokio::net::UnixListener;

const SIZE: usize = 1 << 20;
const PATIENCE: Duration = Duration::from_secs(60);

async fn qemu_io(uri: String, commands: &[&str]) {
    let commands: Vec<String> = commands.iter().map(|c| (*c).to_owned()).collect();
    let out = tokio::task::spawn_blocking(move || {
        let mut args = vec!["-f", "raw", &uri];
        for c in &commands {
            args.extend(["-c", c]);
        }
        (run_ok("qemu-io", &args), commands)
    })
    .await
    .unwrap();
    let (out, commands) = out;
    assert!(!out.contains("failed"), "{commands:?}: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "tier clients: needs qemu-io, qemu-img and nbdinfo (integration/setup.sh); select with --include-ignored (integration/test.sh does)"]
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

/// The value of `series` (as rendered, labels included) in `samples`.
fn sample(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("no sample {series} in {samples:#?}"))
}

/// Scrapes until `series` has `value` (the daemon updates some metrics just
/// after the client saw its answer); returns that scrape.
async fn scrape_until(
    metrics: std::net::SocketAddr,
    series: &str,
    value: f64,
) -> BTreeMap<String, f64> {
    let started = Instant::now();
    loop {
        let text = tokio::task::spawn_blocking(move || scrape(metrics))
            .await
            .unwrap()
            .unwrap();
        let samples = parse(&text);
        if samples.get(series) == Some(&value) {
            return samples;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "{series} never became {value}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One daemon on a Unix socket (the SVM's side) and TCP (the primary's
/// quorum child) at once, with a fake primary QMP monitor and a small log
/// budget: every metric `colo-blockd secondary` exports moves by exactly what
/// the test did, and the text parses as the exposition format.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "tier clients: needs qemu-io, qemu-img and nbdinfo (integration/setup.sh); select with --include-ignored (integration/test.sh does)"]
async fn secondary_serves_unix_and_tcp_and_counts_everything_in_metrics() {
    require_tool("qemu-io", "qemu-utils");
    require_tool("nbdinfo", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("s.raw");
    std::fs::write(&image, vec![0x11; SIZE]).unwrap();
    let nbd = dir.path().join("nbd.sock");
    let tcp = free_tcp_addr();
    let metrics = free_tcp_addr();
    let control = dir.path().join("control.sock");
    let hub = ControlHub::new(UnixListener::bind(&control).unwrap());
    let qmp = dir.path().join("qmp.sock");
    let mut primary = common::fake_qmp::fake_primary(&qmp);
    let log = dir.path().join("blockd.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_colo-blockd"))
        .arg("secondary")
        .arg("--image")
        .arg(&image)
        .arg("--unix")
        .arg(&nbd)
        .args(["--tcp", &tcp.to_string()])
        .args(["--metrics", &metrics.to_string()])
        .arg("--control")
        .arg(&control)
        .arg("--primary-qmp")
        .arg(format!("unix:{}", qmp.display()))
        .args(["--log-budget", "4096"])
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Metrics answer once every socket is bound (they are bound last).
    let started = Instant::now();
    while scrape(metrics).is_err()
        || !hub
            .status()
            .subscribers
            .iter()
            .any(|s| s.sync && s.connected)
    {
        assert!(
            child.try_wait().unwrap().is_none(),
            "exited early: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(started.elapsed() < PATIENCE, "never came up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = parse(&scrape(metrics).unwrap());
    assert_eq!(sample(&before, "colo_blockd_relay_connected"), 1.0);
    assert_eq!(sample(&before, "colo_blockd_epoch"), 0.0);
    // Both exports' series exist before any client came.
    assert_eq!(
        sample(
            &before,
            "colo_blockd_nbd_requests_total{export=\"svm\",command=\"write\"}"
        ),
        0.0
    );
    assert_eq!(
        sample(
            &before,
            "colo_blockd_checkpoints_requested_total{reason=\"block-log-full\"}"
        ),
        0.0
    );

    // The primary writes over TCP, past the 4 KiB log budget: the write
    // spills and one checkpoint is asked for; the SVM over the Unix socket.
    let tcp_uri = |export: &str| format!("nbd://{tcp}/{export}");
    let unix_uri = |export: &str| format!("nbd+unix:///{export}?socket={}", nbd.display());
    qemu_io(tcp_uri("replica"), &["write -P 0xaa 0 64k"]).await;
    qemu_io(
        unix_uri("svm"),
        &["write -P 0xbb 64k 8k", "read -P 0x11 0 64k"],
    )
    .await;
    // Both sockets serve both exports of the same replica.
    qemu_io(tcp_uri("svm"), &["read -P 0xbb 64k 8k"]).await;
    qemu_io(unix_uri("replica"), &["read -P 0xaa 0 64k"]).await;
    for uri in [
        format!("nbd://{tcp}/"),
        format!("nbd+unix:///?socket={}", nbd.display()),
    ] {
        let list = tokio::task::spawn_blocking(move || run_ok("nbdinfo", &["--list", &uri]))
            .await
            .unwrap();
        assert!(list.contains("export=\"replica\""), "{list}");
        assert!(list.contains("export=\"svm\""), "{list}");
    }
    let asked = common::fake_qmp::next_request(&mut primary, PATIENCE)
        .await
        .expect("the full log asked for a checkpoint");
    assert_eq!(
        asked,
        serde_json::json!({"x-checkpoint-delay": common::fake_qmp::DELAY_MS})
    );

    let requested = "colo_blockd_checkpoints_requested_total{reason=\"block-log-full\"}";
    let during = scrape_until(metrics, requested, 1.0).await;
    for (series, value) in [
        ("colo_blockd_pvm_log_memory_bytes", 0),
        ("colo_blockd_pvm_log_spilled_bytes", 65536),
        ("colo_blockd_svm_overlay_memory_bytes", 8192),
        ("colo_blockd_svm_overlay_spilled_bytes", 0),
        ("colo_blockd_checkpoint_request_failures_total", 0),
        ("colo_blockd_checkpoints_committed_total", 0),
        ("colo_blockd_commit_duration_seconds_count", 0),
        (
            "colo_blockd_nbd_requests_total{export=\"replica\",command=\"write\"}",
            1,
        ),
        (
            "colo_blockd_nbd_requests_total{export=\"replica\",command=\"read\"}",
            1,
        ),
        (
            "colo_blockd_nbd_requests_total{export=\"svm\",command=\"write\"}",
            1,
        ),
        (
            "colo_blockd_nbd_requests_total{export=\"svm\",command=\"read\"}",
            2,
        ),
        (
            "colo_blockd_nbd_request_errors_total{export=\"svm\",command=\"write\"}",
            0,
        ),
        (
            "colo_blockd_nbd_bytes_total{export=\"replica\",direction=\"write\"}",
            65536,
        ),
        (
            "colo_blockd_nbd_bytes_total{export=\"svm\",direction=\"read\"}",
            65536 + 8192,
        ),
        // Two qemu-io and one nbdinfo on each socket.
        ("colo_blockd_nbd_connections_total{transport=\"tcp\"}", 3),
        ("colo_blockd_nbd_connections_total{transport=\"unix\"}", 3),
    ] {
        assert_eq!(sample(&during, series), value as f64, "{series}");
    }

    for event in [EventKind::SvmEpochClosed, EventKind::CheckpointAdopted] {
        let report = hub
            .barrier(EventBody::new(event, 1), Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(report.acks.len(), 1, "{report:?}");
    }
    // Acked after the step: the commit is counted by now.
    let after = parse(&scrape(metrics).unwrap());
    for (series, value) in [
        ("colo_blockd_epoch", 1.0),
        ("colo_blockd_checkpoints_committed_total", 1.0),
        ("colo_blockd_committed_bytes_total", 65536.0),
        ("colo_blockd_commit_duration_seconds_count", 1.0),
        (
            "colo_blockd_commit_duration_seconds_bucket{le=\"+Inf\"}",
            1.0,
        ),
        ("colo_blockd_pvm_log_spilled_bytes", 0.0),
        ("colo_blockd_svm_overlay_memory_bytes", 0.0),
        ("colo_blockd_failovers_total", 0.0),
    ] {
        assert_eq!(sample(&after, series), value, "{series}");
    }
    let commit_seconds = sample(&after, "colo_blockd_commit_duration_seconds_sum");
    assert!(
        commit_seconds > 0.0 && commit_seconds < 10.0,
        "{commit_seconds}"
    );
    // The buckets are cumulative: once the commit is in one, it is in every
    // larger one.
    let buckets: Vec<f64> = ["0.001", "0.01", "0.1", "1", "10", "+Inf"]
        .iter()
        .map(|le| {
            sample(
                &after,
                &format!("colo_blockd_commit_duration_seconds_bucket{{le=\"{le}\"}}"),
            )
        })
        .collect();
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.lines().any(|l| l.contains("checkpoint-adopted")
            && l.contains("epoch=1")
            && l.contains("bytes=65536")
            && l.contains("duration_ms=")),
        "no commit log line with epoch, bytes and duration:\n{logged}"
    );

    hub.publish(EventBody::new(EventKind::Failover, 1).with_survivor(Role::Secondary))
        .await;
    let failed_over = scrape_until(metrics, "colo_blockd_failovers_total", 1.0).await;
    assert_eq!(sample(&failed_over, "colo_blockd_epoch"), 1.0);
    // Every client has left (the server may notice a moment after them).
    scrape_until(
        metrics,
        "colo_blockd_nbd_connections{transport=\"tcp\"}",
        0.0,
    )
    .await;
    scrape_until(
        metrics,
        "colo_blockd_nbd_connections{transport=\"unix\"}",
        0.0,
    )
    .await;

    run_ok("kill", &["-TERM", &child.id().to_string()]);
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "colo-blockd exited with {status}");
}

#[test]
fn secondary_help_explains_the_options_and_exit_codes() {
    let out = run_ok(env!("CARGO_BIN_EXE_colo-blockd"), &["secondary", "--help"]);
    for needle in [
        "--image",
        "--unix",
        "--tcp",
        "--metrics",
        "both serve the same exports",
        "--control",
        "--primary-qmp",
        "--log-budget",
        "--overlay-budget",
        "--name",
        "--log-format",
        "COLO_LOG_FORMAT",
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
    assert!(err.contains("unix:PATH, tcp:HOST:PORT"), "{err}");
}

/// The logs' format is --log-format, else COLO_LOG_FORMAT, else text: shown with the error of
/// an image the daemon cannot open, one JSON object with json. A format that is neither is a
/// usage error.
#[test]
fn secondary_logs_in_the_format_of_its_flag_over_colo_log_format_over_text() {
    let dir = tempfile::tempdir().unwrap();
    let run = |flag: Option<&str>, env: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_colo-blockd"));
        cmd.args(["secondary", "--image", "/nonexistent/s.raw", "--unix"])
            .arg(dir.path().join("s.sock"))
            .arg("--control")
            .arg(dir.path().join("control.sock"))
            .env_remove("COLO_LOG_FORMAT");
        if let Some(format) = flag {
            cmd.args(["--log-format", format]);
        }
        if let Some(format) = env {
            cmd.env("COLO_LOG_FORMAT", format);
        }
        cmd.output().unwrap()
    };
    for (flag, env, json) in [
        (Some("json"), Some("text"), true),
        (Some("text"), Some("json"), false),
        (None, Some("json"), true),
        (None, None, false),
    ] {
        let out = run(flag, env);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flag:?} {env:?}: {err}");
        let line = err
            .lines()
            .find(|l| l.contains("/nonexistent/s.raw"))
            .unwrap_or_else(|| panic!("{flag:?} {env:?}: no error line in {err}"));
        let parsed = serde_json::from_str::<serde_json::Value>(line);
        assert_eq!(parsed.is_ok(), json, "{flag:?} {env:?}: {line}");
    }
    let out = run(None, Some("yaml"));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("yaml") && err.contains("json"), "{err}");
}

/// The binary takes each option from its flag, else its COLO_BLOCKD_* variable, else the
/// --config file (shown with --image: the replica it cannot open names the image it took),
/// and refuses a bad config file with exit code 2, naming the file and the key.
#[test]
fn secondary_takes_a_flag_over_its_env_var_over_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("blockd.toml");
    std::fs::write(
        &config,
        format!(
            "image = \"/nonexistent/file.raw\"\nunix = \"{}\"\ncontrol = \"{}\"\n",
            dir.path().join("s.sock").display(),
            dir.path().join("control.sock").display()
        ),
    )
    .unwrap();
    let run = |flag: Option<&str>, env: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_colo-blockd"));
        for (var, _) in std::env::vars_os() {
            if var.to_string_lossy().starts_with("COLO_BLOCKD_") {
                cmd.env_remove(var);
            }
        }
        cmd.arg("secondary").envs(env.iter().copied());
        if let Some(image) = flag {
            cmd.args(["--image", image]);
        }
        cmd.output().unwrap()
    };
    let with_config = ("COLO_BLOCKD_CONFIG", config.to_str().unwrap());
    let with_env = ("COLO_BLOCKD_IMAGE", "/nonexistent/env.raw");
    for (flag, env, took) in [
        (
            Some("/nonexistent/flag.raw"),
            &[with_config, with_env][..],
            "/nonexistent/flag.raw",
        ),
        (None, &[with_config, with_env][..], "/nonexistent/env.raw"),
        (None, &[with_config][..], "/nonexistent/file.raw"),
    ] {
        let out = run(flag, env);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flag:?} {env:?}: {err}");
        assert!(
            err.contains(&format!("cannot open the replica over {took}")),
            "{flag:?} {env:?}: {err}"
        );
    }
    // Nothing gives the image: a usage error naming the flag, the variable and the key.
    let out = run(None, &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--image") && err.contains("COLO_BLOCKD_IMAGE") && err.contains("`image`"),
        "{err}"
    );
    // A misspelt key: exit code 2, the file and the key named.
    std::fs::write(&config, "imgae = \"/s.raw\"\n").unwrap();
    let out = run(Some("/s.raw"), &[with_config]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&config.display().to_string()) && err.contains("imgae"),
        "{err}"
    );
}

/// A second `colo-blockd secondary` started on the image a running one serves exits 1 naming
/// the image, before touching the image, its journal or its spill files; the first one keeps
/// running.
#[test]
fn a_second_daemon_on_the_same_image_exits_and_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("s.raw");
    std::fs::write(&image, vec![0x5a; 1 << 20]).unwrap();
    let daemon = |sock: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_colo-blockd"));
        cmd.args(["secondary", "--image"])
            .arg(&image)
            .arg("--unix")
            .arg(dir.path().join(sock))
            // Nobody listens there: the daemon keeps retrying and keeps serving.
            .arg("--control")
            .arg(dir.path().join("control.sock"))
            .env_remove("COLO_BLOCKD_CONFIG");
        cmd
    };
    let mut first = daemon("first.sock")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Serving means the replica is open and the image locked.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !dir.path().join("first.sock").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the first daemon never served"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let spill = |suffix: &str| {
        let mut p = image.clone().into_os_string();
        p.push(suffix);
        std::fs::metadata(std::path::PathBuf::from(p)).map(|m| m.len())
    };
    let before = (spill(".colo-journal").ok(), spill(".pvm-spill-0").ok());

    let second = daemon("second.sock").output().unwrap();
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("in use by another colo-blockd"), "{err}");
    assert!(err.contains(&image.display().to_string()), "{err}");
    assert!(!dir.path().join("second.sock").exists());
    assert_eq!(
        (spill(".colo-journal").ok(), spill(".pvm-spill-0").ok()),
        before
    );
    assert!(first.try_wait().unwrap().is_none(), "the first daemon died");
    first.kill().unwrap();
    first.wait().unwrap();
}
