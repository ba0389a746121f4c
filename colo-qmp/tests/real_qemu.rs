//! The client against a real QEMU. Requires a QEMU binary (see
//! `colo_testkit::qemu::qemu_binary`); fails, never skips, when there is none, so a
//! missing setup cannot masquerade as a pass.

use colo_qmp::QmpError;
use colo_testkit::qemu::{Qemu, qemu_binary};
use serde_json::{Value, json};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const EVENT_WAIT: Duration = Duration::from_secs(10);

#[test]
#[ignore = "tier qemu: needs the patched QEMU of integration/setup.sh; select with --include-ignored (integration/test.sh does)"]
fn qemu_binary_is_available() {
    let path = qemu_binary().unwrap_or_else(|msg| panic!("{msg}"));
    assert!(path.is_file());
}

#[tokio::test]
#[ignore = "tier qemu: needs the patched QEMU of integration/setup.sh; select with --include-ignored (integration/test.sh does)"]
async fn handshake_status_errors_and_raw_commands() {
    let qemu = Qemu::start_none().await;
    let client = qemu.connect().await;

    let greeting = client.greeting();
    assert!(greeting.version.major >= 7, "{greeting:?}");
    assert!(
        greeting.capabilities.iter().any(|c| c == "oob"),
        "{greeting:?}"
    );
    assert!(client.oob_enabled());

    let status = client.query_status().await.unwrap();
    assert!(!status.running);
    // -S gives "prelaunch" before the first cont.
    assert!(
        ["prelaunch", "paused"].contains(&status.status.as_str()),
        "{status:?}"
    );

    match client.execute_raw("no-such-command", None).await {
        Err(QmpError::Qemu { class, command, .. }) => {
            assert_eq!(class, "CommandNotFound");
            assert_eq!(command, "no-such-command");
        }
        other => panic!("expected CommandNotFound, got {other:?}"),
    }

    let version = client.execute_raw("query-version", None).await.unwrap();
    assert_eq!(
        version["qemu"]["major"].as_u64(),
        Some(u64::from(greeting.version.major))
    );
    assert_eq!(
        version["package"].as_str(),
        Some(greeting.version.package.as_str())
    );

    let hmp = client.human_monitor_command("info version").await.unwrap();
    let expected = format!("{}.{}", greeting.version.major, greeting.version.minor);
    assert!(hmp.contains(&expected), "{hmp:?} lacks {expected}");

    let colo = client.query_colo_status().await.unwrap();
    assert_eq!(colo.mode, "none");

    let mig = client.query_migrate().await.unwrap();
    assert!(
        mig.status.is_none() || mig.status.as_deref() == Some("none"),
        "{mig:?}"
    );

    // yank is allow-oob; with no instances it is a no-op that succeeds.
    client.yank(json!([])).await.unwrap();
    client
        .execute_oob_raw("yank", Some(json!({"instances": []})))
        .await
        .unwrap();
    // A command that is not allow-oob is refused, and the connection lives.
    let refused = client.execute_oob_raw("query-status", None).await;
    assert!(
        matches!(&refused, Err(QmpError::Qemu { class, .. }) if class == "GenericError"),
        "{refused:?}"
    );
    assert!(client.query_status().await.is_ok());
}

fn now_micros() -> i64 {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    i64::try_from(d.as_micros()).unwrap()
}

#[tokio::test]
#[ignore = "tier qemu: needs the patched QEMU of integration/setup.sh; select with --include-ignored (integration/test.sh does)"]
async fn cont_and_stop_emit_resume_and_stop() {
    let qemu = Qemu::start_none().await;
    let client = qemu.connect().await;
    let mut events = client.subscribe();

    let before = now_micros();
    client.cont().await.unwrap();
    let resume = events.wait_for("RESUME", EVENT_WAIT).await.unwrap();
    let after = now_micros();
    let ts = resume.timestamp.as_micros();
    // QEMU stamps events with the host's wall clock.
    assert!(
        ts >= before - 5_000_000 && ts <= after + 5_000_000,
        "RESUME timestamp {ts} not near now ({before}..{after})"
    );
    assert!(resume.timestamp.to_system_time().is_some());
    assert!(client.query_status().await.unwrap().running);

    client.stop().await.unwrap();
    let stop = events.wait_for("STOP", EVENT_WAIT).await.unwrap();
    assert!(stop.timestamp >= resume.timestamp);
    let status = client.query_status().await.unwrap();
    assert!(!status.running);
    assert_eq!(status.status, "paused");
}

#[tokio::test]
#[ignore = "tier qemu: needs the patched QEMU of integration/setup.sh; select with --include-ignored (integration/test.sh does)"]
async fn x_colo_capability_and_migration_parameters() {
    let qemu = Qemu::start_none().await;
    let client = qemu.connect().await;
    client
        .migrate_set_capabilities(&[("x-colo", true)])
        .await
        .unwrap();
    let caps = client
        .execute_raw("query-migrate-capabilities", None)
        .await
        .unwrap();
    let x_colo = caps
        .as_array()
        .expect("capability list")
        .iter()
        .find(|c| c["capability"] == "x-colo")
        .unwrap_or_else(|| panic!("no x-colo in {caps}"));
    assert_eq!(x_colo["state"], true);

    client
        .migrate_set_parameters(json!({"x-checkpoint-delay": 2000}))
        .await
        .unwrap();
    let params = client
        .execute_raw("query-migrate-parameters", None)
        .await
        .unwrap();
    assert_eq!(params["x-checkpoint-delay"], 2000);

    // The VM is not in COLO mode, so failover is refused with a clean error.
    let refused = client.x_colo_lost_heartbeat().await;
    assert!(
        matches!(&refused, Err(QmpError::Qemu { .. })),
        "{refused:?}"
    );
    client.announce_self().await.unwrap();
}

#[tokio::test]
#[ignore = "tier qemu: needs the patched QEMU of integration/setup.sh; select with --include-ignored (integration/test.sh does)"]
async fn block_nbd_object_and_chardev_commands() {
    let qemu = Qemu::start_none().await;
    let client = qemu.connect().await;

    // A quorum with one child, grown and shrunk the way COLO attaches and
    // detaches the secondary's NBD disk.
    for node in ["c0", "c1"] {
        client
            .blockdev_add(json!({"driver": "null-co", "node-name": node, "size": 1048576}))
            .await
            .unwrap();
    }
    client
        .blockdev_add(json!({
            "driver": "quorum", "node-name": "colo-disk0",
            "vote-threshold": 1, "children": ["c0"]
        }))
        .await
        .unwrap();
    client
        .x_blockdev_change_add("colo-disk0", "c1")
        .await
        .unwrap();
    client
        .x_blockdev_change_remove("colo-disk0", "children.1")
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let nbd_sock = dir.path().join("nbd.sock");
    client
        .nbd_server_start_unix(nbd_sock.to_str().unwrap())
        .await
        .unwrap();
    assert!(nbd_sock.exists());
    client.nbd_server_add("c1", true).await.unwrap();
    client.nbd_server_stop().await.unwrap();
    client.nbd_server_start_inet("127.0.0.1", 0).await.unwrap();
    client.nbd_server_stop().await.unwrap();

    client.blockdev_del("colo-disk0").await.unwrap();
    client.blockdev_del("c0").await.unwrap();
    client.blockdev_del("c1").await.unwrap();
    let missing = client.blockdev_del("c1").await;
    assert!(matches!(missing, Err(QmpError::Qemu { .. })), "{missing:?}");

    client
        .object_add(json!({"qom-type": "iothread", "id": "io0"}))
        .await
        .unwrap();
    let objects = client
        .execute_raw("qom-list", Some(json!({"path": "/objects"})))
        .await
        .unwrap();
    assert!(
        objects
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["name"] == "io0"),
        "{objects}"
    );
    client.object_del("io0").await.unwrap();

    client
        .chardev_add("ch0", json!({"type": "null", "data": {}}))
        .await
        .unwrap();
    let chardevs = client.execute_raw("query-chardev", None).await.unwrap();
    assert!(
        chardevs
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["label"] == "ch0"),
        "{chardevs}"
    );
    client.chardev_remove("ch0").await.unwrap();
}

#[tokio::test]
#[ignore = "tier qemu: needs the patched QEMU of integration/setup.sh; select with --include-ignored (integration/test.sh does)"]
async fn quit_emits_shutdown_then_disconnects() {
    let mut qemu = Qemu::start_none().await;
    let client = qemu.connect().await;
    let mut events = client.subscribe();
    client.quit().await.unwrap();
    let shutdown = events.wait_for("SHUTDOWN", EVENT_WAIT).await.unwrap();
    assert_eq!(shutdown.data["guest"], Value::Bool(false));
    // The stream ends once QEMU has gone.
    let end =
        tokio::time::timeout(EVENT_WAIT, async { while events.recv().await.is_some() {} }).await;
    assert!(end.is_ok(), "event stream did not end after quit");
    assert!(!client.is_connected());
    let after = client.query_status().await;
    assert!(
        matches!(after, Err(QmpError::Disconnected { .. })),
        "{after:?}"
    );
    assert!(qemu.exited_within(EVENT_WAIT).await, "QEMU still running");
}
