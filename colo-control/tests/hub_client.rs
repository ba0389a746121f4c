//! ControlHub against the real client and against raw sockets.

use colo_control::client::{
    ClientOptions, ControlError, Operator, Subscriber, note_checkpoint_request, notify_failover,
    query_status,
};
use colo_control::hub::{BarrierError, ControlHub, ControlListener, HubOptions};
use colo_control::protocol::{
    EventBody, EventKind, MAX_LINE, RelayMessage, RelayState, decode_relay_line,
};
use colo_types::Address;
use colo_types::Role;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

const T: Duration = Duration::from_secs(5);

struct Bed {
    hub: ControlHub,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

fn bed() -> Bed {
    bed_with(HubOptions::default())
}

fn bed_with(opts: HubOptions) -> Bed {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.sock");
    let hub = ControlHub::with_options(UnixListener::bind(&path).unwrap(), opts);
    Bed {
        hub,
        path,
        _dir: dir,
    }
}

/// A raw line-level client, to test what the high-level client never sends.
struct Raw {
    rd: BufReader<tokio::net::unix::OwnedReadHalf>,
    wr: tokio::net::unix::OwnedWriteHalf,
}

impl Raw {
    async fn connect(path: &Path) -> Raw {
        let (rd, wr) = UnixStream::connect(path).await.unwrap().into_split();
        Raw {
            rd: BufReader::new(rd),
            wr,
        }
    }
    async fn send(&mut self, line: &str) {
        self.wr.write_all(line.as_bytes()).await.unwrap();
        self.wr.write_all(b"\n").await.unwrap();
    }
    /// Next line, or None at EOF.
    async fn recv(&mut self) -> Option<RelayMessage> {
        let mut line = String::new();
        let n = tokio::time::timeout(T, self.rd.read_line(&mut line))
            .await
            .expect("relay answered in time")
            .unwrap_or(0);
        (n > 0).then(|| decode_relay_line(&line).unwrap_or_else(|e| panic!("{e}: {line}")))
    }
}

async fn wait_subscribers(hub: &ControlHub, n: usize) {
    let deadline = Instant::now() + T;
    while hub
        .status()
        .subscribers
        .iter()
        .filter(|s| s.connected)
        .count()
        != n
    {
        assert!(Instant::now() < deadline, "subscribers never reached {n}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn welcome_carries_epoch_and_state() {
    let b = bed();
    b.hub.update_status(|s| {
        s.state = RelayState::Colo;
        s.epoch = 7;
    });
    let sub = Subscriber::connect(&b.path, "colo-blockd", true)
        .await
        .unwrap();
    let w = sub.welcome();
    assert_eq!((w.version, w.epoch, w.state), (1, 7, RelayState::Colo));
}

#[tokio::test]
async fn unsupported_version_is_refused_with_the_supported_list_and_closed() {
    let b = bed();
    let mut raw = Raw::connect(&b.path).await;
    raw.send(r#"{"type":"hello","version":2,"name":"future","role":"subscriber"}"#)
        .await;
    match raw.recv().await {
        Some(RelayMessage::Error { message, supported }) => {
            assert!(message.contains("supports version(s) 1"), "{message}");
            assert_eq!(supported, Some(vec![1]));
        }
        other => panic!("expected error, got {other:?}"),
    }
    assert_eq!(raw.recv().await, None, "connection closed after refusal");
}

#[tokio::test]
async fn first_line_must_be_hello() {
    let b = bed();
    let mut raw = Raw::connect(&b.path).await;
    raw.send(r#"{"type":"status"}"#).await;
    assert!(matches!(raw.recv().await, Some(RelayMessage::Error { .. })));
    assert_eq!(raw.recv().await, None);
}

#[tokio::test]
async fn silent_client_is_dropped_after_the_hello_timeout() {
    let b = bed_with(HubOptions {
        hello_timeout: Duration::from_millis(100),
        ..HubOptions::default()
    });
    let mut raw = Raw::connect(&b.path).await;
    let t0 = Instant::now();
    assert!(matches!(raw.recv().await, Some(RelayMessage::Error { .. })));
    assert_eq!(raw.recv().await, None);
    assert!(t0.elapsed() >= Duration::from_millis(90));
}

#[tokio::test]
async fn over_long_line_closes_the_connection() {
    let b = bed();
    let mut raw = Raw::connect(&b.path).await;
    raw.send(r#"{"type":"hello","version":1,"name":"x","role":"operator"}"#)
        .await;
    assert!(matches!(
        raw.recv().await,
        Some(RelayMessage::Welcome { .. })
    ));
    raw.send(&"y".repeat(MAX_LINE + 10)).await;
    assert!(matches!(raw.recv().await, Some(RelayMessage::Error { .. })));
    assert_eq!(raw.recv().await, None);
}

#[tokio::test]
async fn bad_lines_are_answered_and_the_connection_stays() {
    let b = bed();
    let mut raw = Raw::connect(&b.path).await;
    raw.send(r#"{"type":"hello","version":1,"name":"x","role":"operator","extra":{"later":1}}"#)
        .await;
    assert!(matches!(
        raw.recv().await,
        Some(RelayMessage::Welcome { .. })
    ));
    raw.send("not json").await;
    assert!(matches!(raw.recv().await, Some(RelayMessage::Error { .. })));
    raw.send(r#"{"type":"frobnicate"}"#).await;
    assert!(matches!(raw.recv().await, Some(RelayMessage::Error { .. })));
    raw.send(r#"{"type":"ack","seq":5}"#).await; // nothing was sent yet
    match raw.recv().await {
        Some(RelayMessage::Error { message, .. }) => {
            assert!(message.contains("seq 5"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    raw.send(r#"{"type":"status"}"#).await;
    assert!(matches!(raw.recv().await, Some(RelayMessage::Status(_))));
}

#[tokio::test]
async fn events_are_numbered_per_connection_and_sync_only_for_sync_subscribers() {
    let b = bed();
    let mut early = Subscriber::connect(&b.path, "monitor", false)
        .await
        .unwrap();
    b.hub
        .publish(EventBody::new(EventKind::ColoStarted, 1))
        .await;
    let mut sync = Subscriber::connect(&b.path, "colo-blockd", true)
        .await
        .unwrap();
    let hub = b.hub.clone();
    let barrier = tokio::spawn(async move {
        hub.barrier(EventBody::new(EventKind::SvmEpochClosed, 1), T)
            .await
    });
    let e = early.next_event_timeout(T).await.unwrap().unwrap();
    assert_eq!(
        (e.seq, e.event, e.epoch, e.sync),
        (1, EventKind::ColoStarted, 1, false)
    );
    let e = early.next_event_timeout(T).await.unwrap().unwrap();
    assert_eq!(
        (e.seq, e.event, e.sync),
        (2, EventKind::SvmEpochClosed, false)
    );
    let s = sync.next_event_timeout(T).await.unwrap().unwrap();
    assert_eq!(
        (s.seq, s.event, s.sync),
        (1, EventKind::SvmEpochClosed, true)
    );
    assert!(s.time_us > 1_600_000_000_000_000);
    sync.ack(s.seq).await.unwrap();
    let report = barrier.await.unwrap().unwrap();
    assert_eq!(report.acks.len(), 1);
    assert_eq!(report.acks[0].name, "colo-blockd");
    let st = b.hub.status();
    let blockd = st
        .subscribers
        .iter()
        .find(|s| s.name == "colo-blockd")
        .unwrap();
    assert!(blockd.healthy && blockd.sync && blockd.last_ack_us.is_some());
    assert!(blockd.last_ack_latency_us.is_some());
}

#[tokio::test]
async fn barrier_without_sync_subscribers_returns_at_once() {
    let b = bed();
    let _async_only = Subscriber::connect(&b.path, "monitor", false)
        .await
        .unwrap();
    let t0 = Instant::now();
    let r = b
        .hub
        .barrier(EventBody::new(EventKind::CheckpointAdopted, 1), T)
        .await
        .unwrap();
    assert!(r.acks.is_empty());
    assert!(t0.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn barrier_waits_for_the_ack_of_every_sync_subscriber() {
    let b = bed();
    let mut subs = Vec::new();
    for name in ["colo-blockd", "colo-proxyd"] {
        subs.push(Subscriber::connect(&b.path, name, true).await.unwrap());
    }
    let hub = b.hub.clone();
    let t0 = Instant::now();
    let barrier = tokio::spawn(async move {
        hub.barrier(EventBody::new(EventKind::SvmEpochClosed, 3), T)
            .await
    });
    // First acks at once, second after 80 ms.
    let e = subs[0].next_event_timeout(T).await.unwrap().unwrap();
    subs[0].ack(e.seq).await.unwrap();
    let e = subs[1].next_event_timeout(T).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert!(
        !barrier.is_finished(),
        "barrier passed before the second ack"
    );
    subs[1].ack(e.seq).await.unwrap();
    let r = barrier.await.unwrap().unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(80));
    let names: Vec<_> = r.acks.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["colo-blockd", "colo-proxyd"]);
    assert!(r.acks[1].latency >= Duration::from_millis(80));
}

#[tokio::test]
async fn barrier_times_out_naming_the_silent_subscriber() {
    let b = bed();
    b.hub.update_status(|s| s.state = RelayState::Colo);
    let mut good = Subscriber::connect(&b.path, "colo-proxyd", true)
        .await
        .unwrap();
    let _silent = Subscriber::connect(&b.path, "colo-blockd", true)
        .await
        .unwrap();
    let acker = tokio::spawn(async move {
        let e = good.next_event().await.unwrap().unwrap();
        good.ack(e.seq).await.unwrap();
        good
    });
    let t0 = Instant::now();
    let err = b
        .hub
        .barrier(
            EventBody::new(EventKind::SvmEpochClosed, 1),
            Duration::from_millis(150),
        )
        .await
        .unwrap_err();
    let elapsed = t0.elapsed();
    assert!(
        elapsed >= Duration::from_millis(150) && elapsed < Duration::from_secs(2),
        "{elapsed:?}"
    );
    assert_eq!(
        err,
        BarrierError::Timeout {
            missing: vec!["colo-blockd".into()],
            after: Duration::from_millis(150)
        }
    );
    assert!(err.to_string().contains("colo-blockd"));
    let _good = acker.await.unwrap();
    let st = b.hub.status();
    let silent = st
        .subscribers
        .iter()
        .find(|s| s.name == "colo-blockd")
        .unwrap();
    assert!(!silent.healthy);
    let good = st
        .subscribers
        .iter()
        .find(|s| s.name == "colo-proxyd")
        .unwrap();
    assert!(good.healthy);
}

#[tokio::test]
async fn disconnect_during_a_barrier_fails_it_at_once() {
    let b = bed();
    b.hub.update_status(|s| s.state = RelayState::Colo);
    let mut quitter = Subscriber::connect(&b.path, "colo-blockd", true)
        .await
        .unwrap();
    let hub = b.hub.clone();
    let t0 = Instant::now();
    let barrier = tokio::spawn(async move {
        hub.barrier(
            EventBody::new(EventKind::CheckpointAdopted, 2),
            Duration::from_secs(10),
        )
        .await
    });
    let _ = quitter.next_event_timeout(T).await.unwrap().unwrap();
    drop(quitter);
    let err = barrier.await.unwrap().unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(5));
    match &err {
        BarrierError::Disconnected { disconnected, .. } => {
            assert_eq!(disconnected, &["colo-blockd".to_string()]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(err.culprits(), ["colo-blockd"]);
}

#[tokio::test]
async fn sync_subscriber_that_left_during_colo_fails_the_next_barrier_until_the_session_ends() {
    let b = bed();
    b.hub.update_status(|s| s.state = RelayState::Colo);
    let sub = Subscriber::connect(&b.path, "colo-blockd", true)
        .await
        .unwrap();
    wait_subscribers(&b.hub, 1).await;
    drop(sub);
    wait_subscribers(&b.hub, 0).await;
    let st = b.hub.status();
    assert_eq!(
        st.subscribers.len(),
        1,
        "departed sync subscriber stays listed"
    );
    assert!(!st.subscribers[0].connected && !st.subscribers[0].healthy);

    let err = b
        .hub
        .barrier(EventBody::new(EventKind::SvmEpochClosed, 5), T)
        .await
        .unwrap_err();
    assert!(
        matches!(err, BarrierError::Disconnected { ref disconnected, .. } if disconnected == &["colo-blockd"])
    );

    // The session ends; a new one starts: the departed record is forgotten.
    b.hub.update_status(|s| s.state = RelayState::Exited);
    b.hub.update_status(|s| s.state = RelayState::Precopy);
    assert!(b.hub.status().subscribers.is_empty());
    b.hub
        .barrier(EventBody::new(EventKind::SvmEpochClosed, 6), T)
        .await
        .unwrap();
}

#[tokio::test]
async fn operator_requests() {
    let b = bed();
    let mut sub = Subscriber::connect(&b.path, "colo-proxyd", false)
        .await
        .unwrap();
    let mut op = Operator::connect(&b.path, "qmp-driver").await.unwrap();
    op.checkpoint_requested("proxy-mismatch").await.unwrap();
    op.checkpoint_requested("proxy-mismatch").await.unwrap();
    note_checkpoint_request(&b.path, "cli").await.unwrap();
    b.hub.update_status(|s| {
        s.state = RelayState::Colo;
        s.epoch = 4;
    });
    b.hub.record_checkpoint(Some(Duration::from_micros(1234)));
    let st = op.status().await.unwrap();
    assert_eq!(st.version, 1);
    assert_eq!(st.state, RelayState::Colo);
    assert_eq!(st.epoch, 4);
    assert_eq!(st.checkpoints, 1);
    assert_eq!(st.last_pause_us, Some(1234));
    assert_eq!(st.checkpoint_rate_per_min, 1.0);
    assert_eq!(st.last_request_reason.as_deref(), Some("cli"));
    assert_eq!(st.requests_by_reason["proxy-mismatch"], 2);
    assert_eq!(st.requests_by_reason["cli"], 1);
    assert_eq!(st.subscribers.len(), 1, "operators are not listed");
    assert_eq!(query_status(&b.path).await.unwrap().epoch, 4);

    notify_failover(&b.path, Role::Secondary).await.unwrap();
    let ev = sub.next_event_timeout(T).await.unwrap().unwrap();
    assert_eq!(ev.event, EventKind::Failover);
    assert_eq!(ev.survivor, Some(Role::Secondary));
    assert_eq!(ev.epoch, 4);
    assert!(!ev.sync);
}

#[tokio::test]
async fn operator_subscribe_receives_events_after_ok() {
    let b = bed();
    let mut raw = Raw::connect(&b.path).await;
    raw.send(r#"{"type":"hello","version":1,"name":"watch","role":"operator"}"#)
        .await;
    assert!(matches!(
        raw.recv().await,
        Some(RelayMessage::Welcome { .. })
    ));
    b.hub
        .publish(EventBody::new(EventKind::ColoStarted, 1))
        .await;
    raw.send(r#"{"type":"subscribe"}"#).await;
    assert_eq!(raw.recv().await, Some(RelayMessage::Ok));
    b.hub
        .publish(EventBody::new(EventKind::CheckpointComplete, 1))
        .await;
    match raw.recv().await {
        Some(RelayMessage::Event(e)) => {
            assert_eq!((e.seq, e.event), (1, EventKind::CheckpointComplete));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn reasons_beyond_the_limit_share_one_bucket() {
    let b = bed();
    let mut op = Operator::connect(&b.path, "spammer").await.unwrap();
    for i in 0..(colo_control::hub::MAX_REASONS + 10) {
        op.checkpoint_requested(&format!("r{i}")).await.unwrap();
    }
    let st = op.status().await.unwrap();
    assert_eq!(
        st.requests_by_reason.len(),
        colo_control::hub::MAX_REASONS + 1
    );
    assert_eq!(st.requests_by_reason[colo_control::hub::OTHER_REASONS], 10);
}

#[tokio::test]
async fn vanished_relay_gives_errors_not_hangs() {
    let dir = tempfile::tempdir().unwrap();
    // Nobody listening.
    let err = query_status(dir.path().join("none.sock"))
        .await
        .unwrap_err();
    assert!(matches!(err, ControlError::Connect { .. }), "{err}");

    // A "relay" that accepts and never answers.
    let mute = dir.path().join("mute.sock");
    let listener = UnixListener::bind(&mute).unwrap();
    let _keep = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let opts = ClientOptions {
        timeout: Duration::from_millis(200),
    };
    let t0 = Instant::now();
    let err = Operator::connect_with(&mute, "op", &opts)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ControlError::Timeout {
                what: "welcome",
                ..
            }
        ),
        "{err}"
    );
    assert!(t0.elapsed() < Duration::from_secs(2));

    // A subscriber whose relay shuts down sees the end of the stream.
    let b = bed();
    let mut sub = Subscriber::connect(&b.path, "colo-blockd", true)
        .await
        .unwrap();
    b.hub.shutdown().await;
    assert_eq!(sub.next_event_timeout(T).await.unwrap(), None);
    let err = sub.next_event_timeout(Duration::from_millis(50)).await;
    assert!(matches!(err, Ok(None)), "{err:?}");
}

#[tokio::test]
async fn stuck_subscriber_is_disconnected_not_waited_for() {
    let b = bed_with(HubOptions {
        queue_depth: 4,
        write_timeout: Duration::from_millis(200),
        ..HubOptions::default()
    });
    // Never reads: its socket buffer fills, then its queue.
    let mut raw = Raw::connect(&b.path).await;
    raw.send(r#"{"type":"hello","version":1,"name":"stuck","role":"subscriber"}"#)
        .await;
    wait_subscribers(&b.hub, 1).await;
    let detail = "z".repeat(16 * 1024);
    let t0 = Instant::now();
    for i in 0..200 {
        b.hub
            .publish(EventBody::new(EventKind::RelayError, i).with_detail(detail.clone()))
            .await;
    }
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "publish must never block"
    );
    wait_subscribers(&b.hub, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_the_last_events_before_closing() {
    let b = bed();
    let mut sub = Subscriber::connect(&b.path, "colo-blockd", false)
        .await
        .unwrap();
    wait_subscribers(&b.hub, 1).await;
    for epoch in 1..=50 {
        b.hub
            .publish(EventBody::new(EventKind::CheckpointComplete, epoch))
            .await;
    }
    b.hub
        .publish(EventBody::new(EventKind::ColoExit, 51).with_reason("relay-shutdown"))
        .await;
    b.hub.shutdown().await;
    for epoch in 1..=50 {
        assert_eq!(
            sub.next_event_timeout(T).await.unwrap().unwrap().epoch,
            epoch
        );
    }
    let last = sub.next_event_timeout(T).await.unwrap().unwrap();
    assert_eq!(last.event, EventKind::ColoExit);
    assert_eq!(sub.next_event_timeout(T).await.unwrap(), None);
    // A closed hub refuses barriers instead of waiting.
    assert_eq!(
        b.hub
            .barrier(EventBody::new(EventKind::SvmEpochClosed, 1), T)
            .await,
        Err(BarrierError::Closed)
    );
}

// ---------------------------------------------------------------------------
// TCP: the daemon on the other host of the pair connects over TCP; to the hub
// it is a subscriber like any other.

/// A hub serving its Unix socket and a TCP listener on loopback.
struct TcpBed {
    bed: Bed,
    tcp: Address,
}

async fn tcp_bed() -> TcpBed {
    let bed = bed();
    let listener = ControlListener::bind(&"tcp:127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let tcp = listener.local_address().unwrap();
    assert!(tcp.is_tcp() && !tcp.to_string().ends_with(":0"), "{tcp}");
    bed.hub.listen(listener);
    TcpBed { bed, tcp }
}

#[tokio::test]
async fn tcp_subscriber_takes_part_in_barriers_like_a_unix_one() {
    let TcpBed { bed: b, tcp } = tcp_bed().await;
    b.hub.update_status(|s| {
        s.state = RelayState::Colo;
        s.epoch = 7;
    });
    let mut local = Subscriber::connect(&b.path, "colo-blockd", true)
        .await
        .unwrap();
    let mut remote = Subscriber::connect(&tcp, "colo-proxyd-primary", true)
        .await
        .unwrap();
    assert_eq!(remote.welcome().epoch, 7);
    assert_eq!(remote.welcome().state, RelayState::Colo);

    // Both must ack; the TCP one acks 80 ms late and the barrier waits.
    let hub = b.hub.clone();
    let t0 = Instant::now();
    let barrier = tokio::spawn(async move {
        hub.barrier(EventBody::new(EventKind::SvmEpochClosed, 7), T)
            .await
    });
    let e = local.next_event_timeout(T).await.unwrap().unwrap();
    local.ack(e.seq).await.unwrap();
    let e = remote.next_event_timeout(T).await.unwrap().unwrap();
    assert_eq!(
        (e.seq, e.event, e.epoch, e.sync),
        (1, EventKind::SvmEpochClosed, 7, true)
    );
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert!(!barrier.is_finished(), "barrier passed before the TCP ack");
    remote.ack(e.seq).await.unwrap();
    let report = barrier.await.unwrap().unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(80));
    let names: Vec<_> = report.acks.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["colo-blockd", "colo-proxyd-primary"]);

    // Asynchronous events reach it too, numbered per connection.
    b.hub
        .publish(EventBody::new(EventKind::CheckpointComplete, 7))
        .await;
    let e = remote.next_event_timeout(T).await.unwrap().unwrap();
    assert_eq!(
        (e.seq, e.event, e.sync),
        (2, EventKind::CheckpointComplete, false)
    );

    // Status, asked over TCP, lists both as healthy sync subscribers.
    let st = query_status(&tcp).await.unwrap();
    assert_eq!(st.epoch, 7);
    for name in ["colo-blockd", "colo-proxyd-primary"] {
        let s = st.subscribers.iter().find(|s| s.name == name).unwrap();
        assert!(s.sync && s.healthy && s.connected, "{s:?}");
        assert!(s.last_ack_us.is_some() && s.last_ack_latency_us.is_some());
    }
    let remote_latency = st
        .subscribers
        .iter()
        .find(|s| s.name == "colo-proxyd-primary")
        .unwrap()
        .last_ack_latency_us
        .unwrap();
    assert!(remote_latency >= 80_000, "{remote_latency}");
}

#[tokio::test]
async fn silent_or_departing_tcp_subscriber_fails_the_barrier() {
    let TcpBed { bed: b, tcp } = tcp_bed().await;
    b.hub.update_status(|s| s.state = RelayState::Colo);
    let mut local = Subscriber::connect(&b.path, "colo-blockd", true)
        .await
        .unwrap();
    let mut silent = Subscriber::connect(&tcp, "colo-proxyd-primary", true)
        .await
        .unwrap();
    let acker = tokio::spawn(async move {
        let e = local.next_event().await.unwrap().unwrap();
        local.ack(e.seq).await.unwrap();
        local
    });
    let t0 = Instant::now();
    let err = b
        .hub
        .barrier(
            EventBody::new(EventKind::CheckpointAdopted, 1),
            Duration::from_millis(150),
        )
        .await
        .unwrap_err();
    assert!(t0.elapsed() >= Duration::from_millis(150));
    assert_eq!(
        err,
        BarrierError::Timeout {
            missing: vec!["colo-proxyd-primary".into()],
            after: Duration::from_millis(150)
        }
    );
    let _local = acker.await.unwrap();
    let st = b.hub.status();
    let s = st
        .subscribers
        .iter()
        .find(|s| s.name == "colo-proxyd-primary")
        .unwrap();
    assert!(!s.healthy && s.connected);

    // It reads the event it missed; then its TCP connection drops during
    // the next barrier, which fails at once, long before its timeout.
    let missed = silent.next_event_timeout(T).await.unwrap().unwrap();
    assert_eq!(missed.event, EventKind::CheckpointAdopted);
    let hub = b.hub.clone();
    let barrier = tokio::spawn(async move {
        hub.barrier(EventBody::new(EventKind::SvmEpochClosed, 2), T)
            .await
    });
    let e = silent.next_event_timeout(T).await.unwrap().unwrap();
    assert_eq!(e.event, EventKind::SvmEpochClosed);
    let t0 = Instant::now();
    drop(silent);
    let err = barrier.await.unwrap().unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert!(
        matches!(&err, BarrierError::Disconnected { disconnected, .. }
            if disconnected == &["colo-proxyd-primary"]),
        "{err}"
    );
    // It stays listed as departed, like a Unix subscriber would.
    let st = b.hub.status();
    let s = st
        .subscribers
        .iter()
        .find(|s| s.name == "colo-proxyd-primary")
        .unwrap();
    assert!(!s.connected && !s.healthy);
}

/// Status and checkpoint reasons work over TCP; a failover does not (it is
/// the local operator's, over the Unix socket: `hub_security.rs`).
#[tokio::test]
async fn operator_helpers_work_over_tcp() {
    let TcpBed { bed: b, tcp } = tcp_bed().await;
    let mut sub = Subscriber::connect(&b.path, "colo-blockd", false)
        .await
        .unwrap();
    note_checkpoint_request(&tcp, "proxy-mismatch")
        .await
        .unwrap();
    let e = notify_failover(tcp.clone(), Role::Primary)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ControlError::Rejected { message, .. } if message.contains("not over TCP")),
        "{e}"
    );
    notify_failover(&b.path, Role::Primary).await.unwrap();
    let ev = sub.next_event_timeout(T).await.unwrap().unwrap();
    assert_eq!(ev.event, EventKind::Failover);
    assert_eq!(ev.survivor, Some(Role::Primary));
    assert_eq!(ev.seq, 1, "the refused failover published nothing");
    let mut op = Operator::connect(tcp, "qmp-driver").await.unwrap();
    let st = op.status().await.unwrap();
    assert_eq!(st.requests_by_reason["proxy-mismatch"], 1);
    // The same relay answers on its Unix socket, given as an address too.
    let unix: Address = format!("unix:{}", b.path.display()).parse().unwrap();
    assert_eq!(
        query_status(unix)
            .await
            .unwrap()
            .last_request_reason
            .as_deref(),
        Some("proxy-mismatch")
    );
}

#[tokio::test]
async fn bad_or_unreachable_tcp_addresses_give_clear_errors() {
    for (input, needle) in [
        ("192.168.77.2:9990", "write tcp:192.168.77.2:9990"),
        ("tcp:192.168.77.2", "expected HOST:PORT"),
        ("tcp:relay:http", "is not a number"),
        ("relay.sock", "relative path needs the unix: prefix"),
        (
            "http://relay:9990",
            "unix:PATH, tcp:HOST:PORT or an absolute path",
        ),
    ] {
        let err = input.parse::<Address>().unwrap_err().to_string();
        assert!(err.starts_with("invalid address"), "{err}");
        assert!(err.contains(needle), "{input}: {err}");
    }

    // Nobody listening on that port: a connect error naming the address.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let address = Address::tcp("127.0.0.1", port);
    let err = query_status(&address).await.unwrap_err();
    assert!(matches!(err, ControlError::Connect { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("control socket tcp:127.0.0.1:{port}")),
        "{err}"
    );
}
