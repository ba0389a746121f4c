//! Client behaviour against an in-process fake QMP server.

use colo_qmp::{ConnectOptions, QmpClient, QmpError, Timestamp};
use colo_testkit::fake_qmp::{Fake, connect, greeting, quick_opts};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tokio::time::timeout;

/// Upper bound for "promptly": generous for a loaded CI box, but far below
/// the command timeout so a hang is caught.
const PROMPT: Duration = Duration::from_secs(2);

#[test]
fn public_types_are_thread_safe() {
    fn assert_send_sync<T: Send + Sync + Clone + std::fmt::Debug>() {}
    fn assert_send<T: Send + std::fmt::Debug>() {}
    assert_send_sync::<QmpClient>();
    assert_send_sync::<colo_qmp::Event>();
    assert_send::<colo_qmp::EventStream>();
    assert_send::<QmpError>();
    let opts = ConnectOptions::default();
    assert_eq!(opts.command_timeout, Duration::from_secs(10));
    assert_eq!(opts.connect_timeout, Duration::from_secs(5));
    assert!(opts.enable_oob);
    assert_eq!(opts.max_line_bytes, 16 * 1024 * 1024);
}

#[tokio::test]
async fn negotiates_oob_when_offered() {
    let (client, _fake, caps) = connect(&["oob"], quick_opts()).await;
    assert_eq!(caps["execute"], "qmp_capabilities");
    assert_eq!(caps["arguments"], json!({"enable": ["oob"]}));
    assert!(client.oob_enabled());
    assert_eq!(client.greeting().version.major, 10);
    assert_eq!(client.greeting().version.micro, 2);
    assert_eq!(client.greeting().version.package, "fake");
    assert_eq!(client.greeting().capabilities, vec!["oob".to_owned()]);
    assert!(client.is_connected());
}

#[tokio::test]
async fn no_oob_when_not_offered() {
    let (client, mut fake, caps) = connect(&[], quick_opts()).await;
    assert_eq!(caps["execute"], "qmp_capabilities");
    assert!(caps.get("arguments").is_none(), "sent {caps}");
    assert!(!client.oob_enabled());
    assert!(matches!(
        client.execute_oob_raw("yank", None).await,
        Err(QmpError::OobUnavailable)
    ));

    // Without OOB, yank falls back to an in-band execute.
    let c = client.clone();
    let call = tokio::spawn(async move { c.yank(json!([])).await });
    let cmd = fake.expect("yank").await;
    assert_eq!(cmd["arguments"], json!({"instances": []}));
    fake.reply(&cmd, json!({})).await;
    call.await.unwrap().unwrap();
}

#[tokio::test]
async fn oob_not_requested_when_disabled_in_options() {
    let opts = ConnectOptions {
        enable_oob: false,
        ..quick_opts()
    };
    let (client, _fake, caps) = connect(&["oob"], opts).await;
    assert!(caps.get("arguments").is_none(), "sent {caps}");
    assert!(!client.oob_enabled());
}

#[tokio::test]
async fn yank_uses_exec_oob_and_out_of_order_oob_reply_is_routed() {
    let (client, mut fake, _) = connect(&["oob"], quick_opts()).await;
    let c = client.clone();
    let slow = tokio::spawn(async move { c.execute_raw("query-status", None).await });
    let inband = fake.expect("query-status").await;

    let c = client.clone();
    let yank = tokio::spawn(async move { c.yank(json!([{"type": "migration"}])).await });
    let oob = fake.recv_cmd().await;
    assert_eq!(oob["exec-oob"], "yank");
    assert!(oob.get("execute").is_none());
    assert_eq!(
        oob["arguments"],
        json!({"instances": [{"type": "migration"}]})
    );
    assert_ne!(oob["id"], inband["id"]);

    // The OOB reply overtakes the in-band one, as it does in QEMU.
    fake.reply(&oob, json!({})).await;
    timeout(PROMPT, yank).await.unwrap().unwrap().unwrap();
    assert!(!slow.is_finished());
    fake.reply(&inband, json!({"running": true, "status": "running"}))
        .await;
    let status = slow.await.unwrap().unwrap();
    assert_eq!(status["status"], "running");
}

#[tokio::test]
async fn events_between_command_and_reply_arrive_in_order() {
    let (client, mut fake, _) = connect(&["oob"], quick_opts()).await;
    let mut events = client.subscribe();
    let mut second = client.subscribe();

    let c = client.clone();
    let call = tokio::spawn(async move { c.query_status().await });
    let cmd = fake.expect("query-status").await;
    fake.event("STOP", 1_700_000_000, 1, None).await;
    fake.event("RESUME", 1_700_000_000, 999_999, Some(json!({"x": 1})))
        .await;
    fake.reply(
        &cmd,
        json!({"running": true, "status": "running", "singlestep": false}),
    )
    .await;
    let status = call.await.unwrap().unwrap();
    assert!(status.running);
    assert_eq!(status.status, "running");

    // Events that preceded the reply on the wire are already buffered by
    // the time the reply is handed out.
    for stream in [&mut events, &mut second] {
        let stop = stream.try_recv().expect("STOP buffered before reply");
        assert_eq!(stop.name, "STOP");
        assert_eq!(stop.data, Value::Null);
        assert_eq!(
            stop.timestamp,
            Timestamp {
                seconds: 1_700_000_000,
                microseconds: 1
            }
        );
        let resume = stream.try_recv().expect("RESUME buffered before reply");
        assert_eq!(resume.name, "RESUME");
        assert_eq!(resume.data, json!({"x": 1}));
        assert_eq!(resume.timestamp.as_micros(), 1_700_000_000_999_999);
        assert!(stop.timestamp < resume.timestamp);
        assert!(stream.try_recv().is_none());
    }
}

#[tokio::test]
async fn with_events_constructor_sees_events_sent_right_after_handshake() {
    let (client_side, server_side) = tokio::io::duplex(4096);
    let mut fake = Fake::new(server_side);
    fake.send(&greeting(&["oob"])).await;
    // Queue the capabilities reply and an event back to back in one write,
    // before the client has even sent qmp_capabilities: by the time the
    // caller runs again, the reader has dispatched both.
    let connect = tokio::spawn(QmpClient::connect_stream_with_events(
        client_side,
        "early".into(),
        quick_opts(),
    ));
    let caps = fake.expect("qmp_capabilities").await;
    let id = &caps["id"];
    let burst = format!(
        "{{\"return\": {{}}, \"id\": {id}}}\r\n{{\"event\": \"EARLY\", \"timestamp\": {{\"seconds\": 1, \"microseconds\": 2}}}}\r\n"
    );
    fake.send_raw(burst.as_bytes()).await;
    let (client, mut events) = connect.await.unwrap().unwrap();
    let ev = timeout(PROMPT, events.recv()).await.unwrap().unwrap();
    assert_eq!(ev.name, "EARLY");
    assert_eq!(ev.timestamp.microseconds, 2);
    assert!(client.oob_enabled());
}

#[tokio::test]
async fn subscriber_only_sees_events_after_subscribing() {
    let (client, mut fake, _) = connect(&[], quick_opts()).await;
    let mut early = client.subscribe();
    fake.event("FIRST", 1, 0, None).await;
    assert_eq!(
        timeout(PROMPT, early.recv()).await.unwrap().unwrap().name,
        "FIRST"
    );
    let mut late = client.subscribe();
    fake.event("SECOND", 2, 0, None).await;
    assert_eq!(
        timeout(PROMPT, late.recv()).await.unwrap().unwrap().name,
        "SECOND"
    );
    assert_eq!(
        timeout(PROMPT, early.recv()).await.unwrap().unwrap().name,
        "SECOND"
    );
    assert!(late.try_recv().is_none());
}

#[tokio::test]
async fn out_of_order_replies_are_routed_by_id() {
    let (client, mut fake, _) = connect(&["oob"], quick_opts()).await;
    let (c1, c2) = (client.clone(), client.clone());
    let first = tokio::spawn(async move { c1.execute_raw("cmd-a", Some(json!({"n": 1}))).await });
    let a = fake.recv_cmd().await;
    let second = tokio::spawn(async move { c2.execute_raw("cmd-b", None).await });
    let b = fake.recv_cmd().await;
    assert_eq!(a["execute"], "cmd-a");
    assert_eq!(a["arguments"], json!({"n": 1}));
    assert_eq!(b["execute"], "cmd-b");
    assert_ne!(a["id"], b["id"]);

    fake.reply(&b, json!("answer-b")).await;
    fake.reply(&a, json!("answer-a")).await;
    assert_eq!(second.await.unwrap().unwrap(), json!("answer-b"));
    assert_eq!(first.await.unwrap().unwrap(), json!("answer-a"));
}

#[tokio::test]
async fn unknown_event_is_delivered_and_connection_survives() {
    let (client, mut fake, _) = connect(&["oob"], quick_opts()).await;
    let mut events = client.subscribe();
    let odd = json!({"nested": [1, {"deep": null}], "ünïcode": "\u{1F600}", "n": -1.5});
    fake.event("SOME_FUTURE_EVENT", 42, 7, Some(odd.clone()))
        .await;
    // An event with data that is not even an object.
    fake.send(&json!({"event": "SCALAR_DATA", "data": 5, "timestamp": {"seconds": 43, "microseconds": 0}}))
        .await;

    let ev = timeout(PROMPT, events.recv()).await.unwrap().unwrap();
    assert_eq!(ev.name, "SOME_FUTURE_EVENT");
    assert_eq!(ev.data, odd);
    assert_eq!(ev.timestamp.seconds, 42);
    let ev = timeout(PROMPT, events.recv()).await.unwrap().unwrap();
    assert_eq!(ev.name, "SCALAR_DATA");
    assert_eq!(ev.data, json!(5));

    let c = client.clone();
    let call = tokio::spawn(async move { c.execute_raw("query-version", None).await });
    let cmd = fake.expect("query-version").await;
    fake.reply(&cmd, json!({"qemu": {"major": 10}})).await;
    assert_eq!(call.await.unwrap().unwrap()["qemu"]["major"], 10);
    assert!(client.is_connected());
}

#[tokio::test]
async fn malformed_lines_are_skipped() {
    let (client, mut fake, _) = connect(&["oob"], quick_opts()).await;
    let mut events = client.subscribe();
    let c = client.clone();
    let call = tokio::spawn(async move { c.execute_raw("query-name", None).await });
    let cmd = fake.expect("query-name").await;
    fake.send_raw(b"{not json\r\n[1,2]\n\"str\"\n{\"foo\":1}\n\n   \n\xff\xfe\n{\"return\": {}}\n{\"return\": 1, \"id\": \"not-ours\"}\n{\"QMP\": {}}\n{\"event\": 5}\n")
        .await;
    fake.event("AFTER_JUNK", 1, 2, None).await;
    fake.reply(&cmd, json!({"name": "vm0"})).await;
    assert_eq!(call.await.unwrap().unwrap(), json!({"name": "vm0"}));
    assert_eq!(events.try_recv().unwrap().name, "AFTER_JUNK");
    assert!(events.try_recv().is_none());

    let c = client.clone();
    let call = tokio::spawn(async move { c.execute_raw("query-name", None).await });
    let cmd = fake.expect("query-name").await;
    fake.reply(&cmd, json!({})).await;
    assert_eq!(call.await.unwrap().unwrap(), json!({}));
    assert!(client.is_connected());
}

#[tokio::test]
async fn qemu_error_reply_is_qemu_error_and_connection_survives() {
    let (client, mut fake, _) = connect(&["oob"], quick_opts()).await;
    let c = client.clone();
    let call = tokio::spawn(async move { c.execute_raw("nosuch", None).await });
    let cmd = fake.expect("nosuch").await;
    fake.reply_error(
        &cmd,
        "CommandNotFound",
        "The command nosuch has not been found",
    )
    .await;
    match call.await.unwrap() {
        Err(QmpError::Qemu {
            command,
            class,
            desc,
        }) => {
            assert_eq!(command, "nosuch");
            assert_eq!(class, "CommandNotFound");
            assert_eq!(desc, "The command nosuch has not been found");
        }
        other => panic!("expected Qemu error, got {other:?}"),
    }

    let c = client.clone();
    let call = tokio::spawn(async move { c.stop().await });
    let cmd = fake.expect("stop").await;
    fake.reply(&cmd, json!({})).await;
    call.await.unwrap().unwrap();
}

#[tokio::test]
async fn disconnect_mid_reply_fails_pending_and_later_calls() {
    let (client, mut fake, _) = connect(&["oob"], quick_opts()).await;
    let c = client.clone();
    let call = tokio::spawn(async move { c.execute_raw("query-status", None).await });
    let _cmd = fake.expect("query-status").await;
    fake.send_raw(b"{\"return\": {\"status\": \"runn").await;
    let started = Instant::now();
    drop(fake);

    let result = timeout(PROMPT, call)
        .await
        .expect("pending call hung")
        .unwrap();
    assert!(
        matches!(result, Err(QmpError::Disconnected { .. })),
        "{result:?}"
    );
    assert!(started.elapsed() < PROMPT);
    assert!(!client.is_connected());

    let later = timeout(PROMPT, client.execute_raw("query-status", None))
        .await
        .expect("call after disconnect hung");
    assert!(
        matches!(later, Err(QmpError::Disconnected { .. })),
        "{later:?}"
    );
    let typed = timeout(PROMPT, client.cont()).await.unwrap();
    assert!(
        typed.as_ref().is_err_and(QmpError::is_disconnected),
        "{typed:?}"
    );
}

#[tokio::test]
async fn disconnect_fails_every_pending_call() {
    let (client, mut fake, _) = connect(&["oob"], quick_opts()).await;
    let mut calls = Vec::new();
    for i in 0..5 {
        let c = client.clone();
        calls.push(tokio::spawn(async move {
            c.execute_raw(&format!("cmd-{i}"), None).await
        }));
        fake.recv_cmd().await;
    }
    drop(fake);
    for call in calls {
        let r = timeout(PROMPT, call)
            .await
            .expect("pending call hung")
            .unwrap();
        assert!(matches!(r, Err(QmpError::Disconnected { .. })), "{r:?}");
    }
}

#[tokio::test]
async fn silent_server_gives_timeout_and_late_reply_is_dropped() {
    let opts = ConnectOptions {
        command_timeout: Duration::from_millis(300),
        ..quick_opts()
    };
    let (client, mut fake, _) = connect(&["oob"], opts).await;
    let started = Instant::now();
    let c = client.clone();
    let call = tokio::spawn(async move { c.execute_raw("query-status", None).await });
    let first = fake.expect("query-status").await;
    let result = call.await.unwrap();
    let elapsed = started.elapsed();
    match result {
        Err(QmpError::Timeout { command, after, .. }) => {
            assert_eq!(command, "query-status");
            assert_eq!(after, Duration::from_millis(300));
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(elapsed >= Duration::from_millis(290), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(1500), "{elapsed:?}");

    // The late reply must not be mistaken for the next command's reply.
    let c = client.clone();
    let call = tokio::spawn(async move { c.execute_raw("query-name", None).await });
    let second = fake.expect("query-name").await;
    fake.reply(&first, json!("stale")).await;
    fake.reply(&second, json!("fresh")).await;
    assert_eq!(call.await.unwrap().unwrap(), json!("fresh"));
    assert!(client.is_connected());

    // Explicit per-call timeout.
    let c = client.clone();
    let started = Instant::now();
    let call = tokio::spawn(async move {
        c.execute_raw_timeout("query-name", None, Duration::from_millis(100))
            .await
    });
    fake.expect("query-name").await;
    match call.await.unwrap() {
        Err(QmpError::Timeout { after, .. }) => assert_eq!(after, Duration::from_millis(100)),
        other => panic!("expected Timeout, got {other:?}"),
    }
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(95), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(1500), "{elapsed:?}");
}

#[tokio::test]
async fn event_stream_ends_after_disconnect() {
    let (client, mut fake, _) = connect(&["oob"], quick_opts()).await;
    let mut events = client.subscribe();
    let mut waiter = client.subscribe();
    fake.event("LAST_WORDS", 9, 9, None).await;
    drop(fake);

    let ev = timeout(PROMPT, events.recv()).await.unwrap();
    assert_eq!(ev.unwrap().name, "LAST_WORDS");
    assert!(timeout(PROMPT, events.recv()).await.unwrap().is_none());
    assert!(events.try_recv().is_none());

    // Buffered events are still found by wait_for; then it reports the
    // disconnect instead of waiting out the timeout.
    let found = waiter.wait_for("LAST_WORDS", PROMPT).await.unwrap();
    assert_eq!(found.timestamp.seconds, 9);
    let started = Instant::now();
    let gone = waiter.wait_for("NEVER", Duration::from_secs(30)).await;
    assert!(
        matches!(gone, Err(QmpError::Disconnected { .. })),
        "{gone:?}"
    );
    assert!(started.elapsed() < PROMPT);

    // Subscribing after the close yields an already-finished stream.
    let mut after = client.subscribe();
    assert!(timeout(PROMPT, after.recv()).await.unwrap().is_none());
}

#[tokio::test]
async fn wait_for_skips_other_events_and_times_out_naming_the_event() {
    let (client, mut fake, _) = connect(&["oob"], quick_opts()).await;
    let mut events = client.subscribe();
    fake.event("NOISE", 1, 0, None).await;
    fake.event("TARGET", 2, 0, Some(json!({"k": "v"}))).await;
    fake.event("AFTER", 3, 0, None).await;
    let ev = events.wait_for("TARGET", PROMPT).await.unwrap();
    assert_eq!(ev.data, json!({"k": "v"}));
    assert_eq!(events.recv().await.unwrap().name, "AFTER");

    let started = Instant::now();
    match events.wait_for("MISSING", Duration::from_millis(200)).await {
        Err(QmpError::Timeout { command, after, .. }) => {
            assert!(command.contains("MISSING"), "{command}");
            assert_eq!(after, Duration::from_millis(200));
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(190));
}

#[tokio::test]
async fn overlong_line_is_protocol_error_and_closes() {
    let opts = ConnectOptions {
        max_line_bytes: 1024,
        ..quick_opts()
    };
    let (client, mut fake, _) = connect(&["oob"], opts).await;
    let mut events = client.subscribe();
    let c = client.clone();
    let call = tokio::spawn(async move { c.execute_raw("query-status", None).await });
    let cmd = fake.expect("query-status").await;
    let big = json!({"return": "x".repeat(4096), "id": cmd["id"]});
    fake.send(&big).await;

    let result = timeout(PROMPT, call).await.unwrap().unwrap();
    match result {
        Err(QmpError::Protocol { detail, .. }) => assert!(detail.contains("1024"), "{detail}"),
        other => panic!("expected Protocol, got {other:?}"),
    }
    assert!(!client.is_connected());
    assert!(matches!(
        client.execute_raw("query-status", None).await,
        Err(QmpError::Disconnected { .. })
    ));
    assert!(timeout(PROMPT, events.recv()).await.unwrap().is_none());
    // The client also hangs up its side.
    assert!(fake.client_closed().await);
}

#[tokio::test]
async fn overlong_line_without_newline_is_detected_early() {
    let opts = ConnectOptions {
        max_line_bytes: 1024,
        ..quick_opts()
    };
    let (client, mut fake, _) = connect(&["oob"], opts).await;
    let c = client.clone();
    let call = tokio::spawn(async move { c.execute_raw("query-status", None).await });
    fake.expect("query-status").await;
    // Never terminated: the client must not wait for the newline.
    fake.send_raw(&[b'x'; 4096]).await;
    let result = timeout(PROMPT, call).await.unwrap().unwrap();
    assert!(
        matches!(result, Err(QmpError::Protocol { .. })),
        "{result:?}"
    );
}

#[tokio::test]
async fn qemu_reply_of_wrong_shape_is_decode_error() {
    let (client, mut fake, _) = connect(&["oob"], quick_opts()).await;
    let c = client.clone();
    let call = tokio::spawn(async move { c.query_status().await });
    let cmd = fake.expect("query-status").await;
    fake.reply(&cmd, json!({"foo": 1})).await;
    match call.await.unwrap() {
        Err(QmpError::Decode { command, .. }) => assert_eq!(command, "query-status"),
        other => panic!("expected Decode, got {other:?}"),
    }
    assert!(client.is_connected());
}

#[tokio::test]
async fn quit_counts_hangup_as_success() {
    let (client, mut fake, _) = connect(&["oob"], quick_opts()).await;
    let c = client.clone();
    let call = tokio::spawn(async move { c.quit().await });
    fake.expect("quit").await;
    drop(fake); // QEMU exits without a reply
    timeout(PROMPT, call).await.unwrap().unwrap().unwrap();
    assert!(!client.is_connected());
    // Once the connection is gone, quit is no longer "sent".
    assert!(matches!(
        client.quit().await,
        Err(QmpError::Disconnected { .. })
    ));
}

#[tokio::test]
async fn quit_with_reply_then_hangup() {
    let (client, mut fake, _) = connect(&["oob"], quick_opts()).await;
    let mut events = client.subscribe();
    let c = client.clone();
    let call = tokio::spawn(async move { c.quit().await });
    let cmd = fake.expect("quit").await;
    fake.event(
        "SHUTDOWN",
        5,
        0,
        Some(json!({"guest": false, "reason": "host-qmp-quit"})),
    )
    .await;
    fake.reply(&cmd, json!({})).await;
    drop(fake);
    timeout(PROMPT, call).await.unwrap().unwrap().unwrap();
    let ev = events.wait_for("SHUTDOWN", PROMPT).await.unwrap();
    assert_eq!(ev.data["reason"], "host-qmp-quit");
}

#[tokio::test]
async fn greeting_timeout_and_malformed_greeting() {
    let opts = ConnectOptions {
        connect_timeout: Duration::from_millis(300),
        ..quick_opts()
    };
    // Silent peer (like a second client queued on QEMU's single-client
    // socket): bounded by connect_timeout.
    let (client_side, _server_side) = tokio::io::duplex(1024);
    let started = Instant::now();
    let r = QmpClient::connect_stream(client_side, "silent".into(), opts.clone()).await;
    match r {
        Err(QmpError::Timeout { command, peer, .. }) => {
            assert_eq!(command, "greeting");
            assert_eq!(peer, "silent");
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_millis(1500));

    let (client_side, server_side) = tokio::io::duplex(1024);
    let mut fake = Fake::new(server_side);
    fake.send_raw(b"{\"return\": {}}\n").await;
    let r = QmpClient::connect_stream(client_side, "bad".into(), opts.clone()).await;
    assert!(matches!(r, Err(QmpError::Protocol { .. })), "{r:?}");

    // Greets but never answers qmp_capabilities.
    let (client_side, server_side) = tokio::io::duplex(1024);
    let mut fake = Fake::new(server_side);
    fake.send(&greeting(&["oob"])).await;
    let r = QmpClient::connect_stream(client_side, "mute".into(), opts.clone()).await;
    match r {
        Err(QmpError::Timeout { command, after, .. }) => {
            assert_eq!(command, "qmp_capabilities");
            assert_eq!(after, Duration::from_millis(300));
        }
        other => panic!("expected Timeout, got {other:?}"),
    }

    // Closes right away.
    let (client_side, server_side) = tokio::io::duplex(1024);
    drop(server_side);
    let r = QmpClient::connect_stream(client_side, "gone".into(), opts).await;
    assert!(matches!(r, Err(QmpError::Disconnected { .. })), "{r:?}");
}

#[tokio::test]
async fn capabilities_rejected_is_qemu_error() {
    let (client_side, server_side) = tokio::io::duplex(1024);
    let mut fake = Fake::new(server_side);
    let connecting = tokio::spawn(QmpClient::connect_stream(
        client_side,
        "f".into(),
        quick_opts(),
    ));
    fake.send(&greeting(&["oob"])).await;
    let caps = fake.expect("qmp_capabilities").await;
    fake.reply_error(&caps, "GenericError", "nope").await;
    let r = connecting.await.unwrap();
    assert!(
        matches!(&r, Err(QmpError::Qemu { class, .. }) if class == "GenericError"),
        "{r:?}"
    );
}

#[tokio::test]
async fn dropping_last_client_closes_connection() {
    let (client, mut fake, _) = connect(&["oob"], quick_opts()).await;
    let mut events = client.subscribe();
    let clone = client.clone();
    drop(client);
    // A clone keeps the connection alive.
    fake.event("STILL_HERE", 1, 0, None).await;
    assert_eq!(
        timeout(PROMPT, events.recv()).await.unwrap().unwrap().name,
        "STILL_HERE"
    );
    drop(clone);
    assert!(fake.client_closed().await);
    assert!(timeout(PROMPT, events.recv()).await.unwrap().is_none());
}

#[tokio::test]
async fn connect_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut fake = Fake::new(stream);
        fake.handshake(&[]).await;
        let cmd = fake.expect("query-status").await;
        fake.reply(&cmd, json!({"running": false, "status": "prelaunch"}))
            .await;
        fake
    });
    let client = QmpClient::connect_unix(&path, quick_opts()).await.unwrap();
    let status = client.query_status().await.unwrap();
    assert!(!status.running);
    assert_eq!(status.status, "prelaunch");
    assert_eq!(client.peer(), path.display().to_string());
    assert!(format!("{client:?}").contains("qmp.sock"));
    drop(server.await.unwrap());

    let missing = QmpClient::connect_unix(dir.path().join("nope.sock"), quick_opts()).await;
    assert!(matches!(missing, Err(QmpError::Io { .. })), "{missing:?}");
}

#[tokio::test]
async fn connect_tcp_loopback() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut fake = Fake::new(stream);
        fake.handshake(&["oob"]).await;
        let cmd = fake.expect("cont").await;
        fake.reply(&cmd, json!({})).await;
        fake
    });
    let client = QmpClient::connect_tcp(&addr, quick_opts()).await.unwrap();
    assert!(client.oob_enabled());
    client.cont().await.unwrap();
    drop(server.await.unwrap());
}

/// Runs `call` against the fake, answers with `ret`, and returns the
/// command the client sent together with the call's result.
async fn exchange<T, F>(
    client: &QmpClient,
    fake: &mut Fake<tokio::io::DuplexStream>,
    ret: Value,
    call: impl FnOnce(QmpClient) -> F,
) -> (Value, T)
where
    T: Send + std::fmt::Debug + 'static,
    F: Future<Output = colo_qmp::Result<T>> + Send + 'static,
{
    let task = tokio::spawn(call(client.clone()));
    let cmd = fake.recv_cmd().await;
    fake.reply(&cmd, ret).await;
    let out = timeout(PROMPT, task).await.unwrap().unwrap();
    let out = out.unwrap_or_else(|e| panic!("{} failed: {e}", cmd["execute"]));
    (cmd, out)
}

#[tokio::test]
async fn typed_commands_send_qapi_shaped_arguments() {
    let (client, mut fake, _) = connect(&["oob"], quick_opts()).await;
    let f = &mut fake;
    let c = &client;
    let empty = || json!({});

    let (cmd, ()) = exchange(c, f, empty(), |c| async move {
        c.migrate_set_capabilities(&[("x-colo", true), ("events", false)])
            .await
    })
    .await;
    assert_eq!(cmd["execute"], "migrate-set-capabilities");
    assert_eq!(
        cmd["arguments"],
        json!({"capabilities": [{"capability": "x-colo", "state": true}, {"capability": "events", "state": false}]})
    );

    let (cmd, ()) = exchange(c, f, empty(), |c| async move {
        c.migrate_set_parameters(json!({"x-checkpoint-delay": 2000}))
            .await
    })
    .await;
    assert_eq!(cmd["execute"], "migrate-set-parameters");
    assert_eq!(cmd["arguments"], json!({"x-checkpoint-delay": 2000}));

    let (cmd, ()) = exchange(c, f, empty(), |c| async move {
        c.migrate("tcp:127.0.0.1:9998").await
    })
    .await;
    assert_eq!(
        (cmd["execute"].clone(), cmd["arguments"].clone()),
        (json!("migrate"), json!({"uri": "tcp:127.0.0.1:9998"}))
    );

    let (cmd, ()) = exchange(c, f, empty(), |c| async move {
        c.migrate_incoming("tcp:0:9998").await
    })
    .await;
    assert_eq!(
        (cmd["execute"].clone(), cmd["arguments"].clone()),
        (json!("migrate-incoming"), json!({"uri": "tcp:0:9998"}))
    );

    let (cmd, ()) = exchange(
        c,
        f,
        empty(),
        |c| async move { c.x_colo_lost_heartbeat().await },
    )
    .await;
    assert_eq!(cmd["execute"], "x-colo-lost-heartbeat");
    assert!(cmd.get("arguments").is_none());

    let (cmd, ()) = exchange(c, f, empty(), |c| async move {
        c.nbd_server_start_inet("0.0.0.0", 9999).await
    })
    .await;
    assert_eq!(cmd["execute"], "nbd-server-start");
    assert_eq!(
        cmd["arguments"],
        json!({"addr": {"type": "inet", "data": {"host": "0.0.0.0", "port": "9999"}}})
    );

    let (cmd, ()) = exchange(c, f, empty(), |c| async move {
        c.nbd_server_start_inet_tls("10.0.0.2", 10809, Some(("tls0", "authz0")))
            .await
    })
    .await;
    assert_eq!(
        cmd["arguments"],
        json!({
            "addr": {"type": "inet", "data": {"host": "10.0.0.2", "port": "10809"}},
            "tls-creds": "tls0",
            "tls-authz": "authz0"
        })
    );

    let (cmd, ()) = exchange(c, f, empty(), |c| async move {
        c.nbd_server_start_unix("/tmp/nbd.sock").await
    })
    .await;
    assert_eq!(
        cmd["arguments"],
        json!({"addr": {"type": "unix", "data": {"path": "/tmp/nbd.sock"}}})
    );

    let (cmd, ()) = exchange(c, f, empty(), |c| async move {
        c.nbd_server_add("parent0", true).await
    })
    .await;
    assert_eq!(cmd["execute"], "nbd-server-add");
    assert_eq!(
        cmd["arguments"],
        json!({"device": "parent0", "writable": true})
    );

    let (cmd, ()) = exchange(c, f, empty(), |c| async move { c.nbd_server_stop().await }).await;
    assert_eq!(cmd["execute"], "nbd-server-stop");

    let opts = json!({"driver": "null-co", "node-name": "n0"});
    let sent = opts.clone();
    let (cmd, ()) = exchange(c, f, empty(), |c| async move { c.blockdev_add(sent).await }).await;
    assert_eq!(
        (cmd["execute"].clone(), cmd["arguments"].clone()),
        (json!("blockdev-add"), opts)
    );

    let (cmd, ()) = exchange(c, f, empty(), |c| async move { c.blockdev_del("n0").await }).await;
    assert_eq!(cmd["arguments"], json!({"node-name": "n0"}));

    let (cmd, ()) = exchange(c, f, empty(), |c| async move {
        c.x_blockdev_change_add("colo-disk0", "nbd_client0").await
    })
    .await;
    assert_eq!(cmd["execute"], "x-blockdev-change");
    assert_eq!(
        cmd["arguments"],
        json!({"parent": "colo-disk0", "node": "nbd_client0"})
    );

    let (cmd, ()) = exchange(c, f, empty(), |c| async move {
        c.x_blockdev_change_remove("colo-disk0", "children.1").await
    })
    .await;
    assert_eq!(
        cmd["arguments"],
        json!({"parent": "colo-disk0", "child": "children.1"})
    );

    let (cmd, ()) = exchange(c, f, empty(), |c| async move {
        c.object_add(json!({"qom-type": "iothread", "id": "io0"}))
            .await
    })
    .await;
    assert_eq!(cmd["execute"], "object-add");
    assert_eq!(
        cmd["arguments"],
        json!({"qom-type": "iothread", "id": "io0"})
    );

    let (cmd, ()) = exchange(c, f, empty(), |c| async move { c.object_del("io0").await }).await;
    assert_eq!(
        (cmd["execute"].clone(), cmd["arguments"].clone()),
        (json!("object-del"), json!({"id": "io0"}))
    );

    let (cmd, ()) = exchange(c, f, empty(), |c| async move {
        c.chardev_add("c0", json!({"type": "null", "data": {}}))
            .await
    })
    .await;
    assert_eq!(cmd["execute"], "chardev-add");
    assert_eq!(
        cmd["arguments"],
        json!({"id": "c0", "backend": {"type": "null", "data": {}}})
    );

    let (cmd, ()) = exchange(
        c,
        f,
        empty(),
        |c| async move { c.chardev_remove("c0").await },
    )
    .await;
    assert_eq!(
        (cmd["execute"].clone(), cmd["arguments"].clone()),
        (json!("chardev-remove"), json!({"id": "c0"}))
    );

    let (cmd, ()) = exchange(c, f, empty(), |c| async move { c.announce_self().await }).await;
    assert_eq!(cmd["execute"], "announce-self");
    assert_eq!(
        cmd["arguments"],
        json!({"initial": 50, "max": 550, "rounds": 5, "step": 100})
    );

    for (name, call) in [("stop", 0), ("cont", 1)] {
        let (cmd, ()) = exchange(c, f, empty(), move |c| async move {
            if call == 0 {
                c.stop().await
            } else {
                c.cont().await
            }
        })
        .await;
        assert_eq!(cmd["execute"], name);
        assert!(cmd.get("arguments").is_none());
    }

    let (cmd, text) = exchange(c, f, json!("10.0.2\r\n"), |c| async move {
        c.human_monitor_command("info version").await
    })
    .await;
    assert_eq!(cmd["execute"], "human-monitor-command");
    assert_eq!(cmd["arguments"], json!({"command-line": "info version"}));
    assert_eq!(text, "10.0.2\r\n");

    let (_, colo) = exchange(
        c,
        f,
        json!({"mode": "secondary", "last-mode": "none", "reason": "none"}),
        |c| async move { c.query_colo_status().await },
    )
    .await;
    assert_eq!(colo.mode, "secondary");
    assert_eq!(colo.last_mode.as_deref(), Some("none"));
    assert_eq!(colo.reason, "none");

    let (_, mig) = exchange(
        c,
        f,
        json!({"status": "colo", "total-time": 12}),
        |c| async move { c.query_migrate().await },
    )
    .await;
    assert_eq!(mig.status.as_deref(), Some("colo"));
    assert_eq!(mig.extra["total-time"], 12);

    let (_, mig) = exchange(c, f, json!({}), |c| async move { c.query_migrate().await }).await;
    assert_eq!(mig.status, None);
}
