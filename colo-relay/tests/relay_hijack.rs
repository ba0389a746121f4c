//! Issue 13's attacks on the relay, with fake QEMUs and real sockets: each
//! must have no effect on the pair. A second migration connection while a
//! session runs is refused unread (the real session keeps its barriers, no
//! event is published, the secondary never sees the intruder); connections
//! from addresses not listed are refused; the control socket is owner-only
//! and a failover is refused over TCP.

mod common;

use colo_control::client::{ControlError, Operator, Subscriber, notify_failover, query_status};
use colo_control::protocol::{EventKind, RelayState};
use colo_relay::{ColoMessage, QEVM_MAGIC, RelayConfig};
use colo_types::{Address, Role};
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_util::sync::CancellationToken;

/// Connects to the relay's migration listener as a stranger, sends `bytes`
/// and returns what the relay sent back before closing the connection.
async fn intrude(relay: &Address, bytes: &[u8]) -> Vec<u8> {
    let mut back = Vec::new();
    match relay {
        Address::Unix(path) => {
            let mut c = UnixStream::connect(path).await.unwrap();
            // The relay may already have closed it: a failed write is fine.
            let _ = c.write_all(bytes).await;
            let _ = within(c.read_to_end(&mut back)).await;
        }
        Address::Tcp { host, port } => {
            let mut c = TcpStream::connect((host.as_str(), *port)).await.unwrap();
            let _ = c.write_all(bytes).await;
            let _ = within(c.read_to_end(&mut back)).await;
        }
    }
    back
}

/// One checkpoint on the real session: the secondary's three messages go
/// through their barriers to the primary.
async fn checkpoint(p: &mut End, s: &mut End) {
    s.send_msgs(&CHECKPOINT).await;
    let want = encode(&CHECKPOINT);
    assert_eq!(p.recv_exact(want.len()).await, want);
}

/// The hijack of issue 13: a second connection that starts with `QEVM`
/// while a session runs. It is closed unread; the real session's barriers
/// still run, its checkpoints still count; no event is published for it
/// (closing it publishes no `colo-exit`); the secondary never gets a
/// connection for it. When the real session ends, its end is published
/// once, and a re-protect is then accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_qevm_connection_during_a_session_is_refused_and_changes_nothing() {
    for bed in [
        Bed::unix(Duration::from_secs(30)).await,
        Bed::tcp(Duration::from_secs(30)).await,
    ] {
        let blockd = acker(bed.subscriber("colo-blockd", true).await, Duration::ZERO);
        let mut monitor = bed.subscriber("monitor", false).await;
        let (mut p, mut s) = bed.open(QEVM_MAGIC).await;
        s.send_msgs(&[ColoMessage::CheckpointReady]).await;
        p.recv_exact(4).await;
        checkpoint(&mut p, &mut s).await;
        let before = bed.wait(|st| st.checkpoints == 1).await;

        // The intruder: QEVM, then what would be the secondary's messages
        // if it were parsed; a second one only QEVM; a third nothing.
        let mut attack = QEVM_MAGIC.to_be_bytes().to_vec();
        attack.extend(encode(&[ColoMessage::CheckpointReady]));
        attack.extend(b"intruder");
        assert!(intrude(&bed.relay_ep, &attack).await.is_empty());
        assert!(
            intrude(&bed.relay_ep, &QEVM_MAGIC.to_be_bytes())
                .await
                .is_empty()
        );
        assert!(intrude(&bed.relay_ep, b"").await.is_empty());
        let during = bed.wait(|st| st.refused_migration_channels == 3).await;
        assert_eq!(
            (
                during.state,
                during.epoch,
                during.checkpoints,
                during.barrier_timeouts,
                during.main_channel_connected,
                during.parse_error.clone(),
            ),
            (RelayState::Colo, before.epoch, 1, 0, true, None::<String>)
        );

        // The real session still runs its barriers: the next checkpoint is
        // acked by blockd (it gets sync events) and completes.
        checkpoint(&mut p, &mut s).await;
        bed.wait(|st| st.checkpoints == 2).await;

        // The real primary leaves: one colo-exit, naming it.
        drop(p);
        assert!(s.recv_to_end().await.is_empty());
        let mut events = Vec::new();
        loop {
            let ev = next(&mut monitor).await;
            let exit = ev.event == EventKind::ColoExit;
            events.push(ev);
            if exit {
                break;
            }
        }
        let kinds: Vec<_> = events.iter().map(|e| (e.event, e.epoch)).collect();
        assert_eq!(
            kinds,
            [
                (EventKind::ColoStarted, 1),
                (EventKind::SvmEpochClosed, 1),
                (EventKind::CheckpointAdopted, 1),
                (EventKind::CheckpointComplete, 1),
                (EventKind::SvmEpochClosed, 2),
                (EventKind::CheckpointAdopted, 2),
                (EventKind::CheckpointComplete, 2),
                (EventKind::ColoExit, 3),
            ]
        );
        assert_eq!(
            events.last().unwrap().reason.as_deref(),
            Some("channel-closed")
        );

        // Re-protect: accepted once the end was published. The secondary's
        // next connection is this one (its first bytes after the magic are
        // ours, not an intruder's).
        let (mut p2, mut s2) = bed.open(QEVM_MAGIC).await;
        p2.send(b"real").await;
        assert_eq!(s2.recv_exact(4).await, b"real");
        s2.send_msgs(&[ColoMessage::CheckpointReady]).await;
        p2.recv_exact(4).await;
        let started = next(&mut monitor).await;
        // Epochs never repeat: epoch 3 was the one running when COLO ended.
        assert_eq!((started.event, started.epoch), (EventKind::ColoStarted, 4));
        let st = bed.hub.status();
        assert_eq!((st.refused_migration_channels, st.barrier_timeouts), (3, 0));
        drop((p2, s2));
        bed.stop().await;
        // blockd acked every barrier and saw one colo-exit per real session
        // (the second when the test closed it), none for an intruder.
        let seen = within(blockd).await.unwrap();
        let exits: Vec<_> = seen
            .iter()
            .filter(|e| e.event == EventKind::ColoExit)
            .map(|e| e.epoch)
            .collect();
        assert_eq!(exits, [3, 4]);
        assert_eq!(seen.iter().filter(|e| e.sync).count(), 4);
    }
}

/// An intruder that connects before the session's end is published does
/// not get in after a barrier failure either: the failure is published
/// once, by the relay, and the next session is the operator's re-protect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_barrier_ends_the_session_once_and_frees_the_slot() {
    let bed = Bed::unix(Duration::from_millis(200)).await;
    let _mute = bed.subscriber("colo-blockd", true).await;
    let mut monitor = bed.subscriber("monitor", false).await;
    let (mut p, mut s) = bed.open(QEVM_MAGIC).await;
    s.send_msgs(&[ColoMessage::CheckpointReady]).await;
    p.recv_exact(4).await;
    assert_eq!(next(&mut monitor).await.event, EventKind::ColoStarted);
    s.send_msgs(&[ColoMessage::CheckpointReply]).await;
    // While the barrier waits: refused.
    assert_eq!(next(&mut monitor).await.event, EventKind::SvmEpochClosed);
    assert!(
        intrude(&bed.relay_ep, &QEVM_MAGIC.to_be_bytes())
            .await
            .is_empty()
    );
    let exit = next(&mut monitor).await;
    assert_eq!(
        (exit.event, exit.reason.as_deref()),
        (EventKind::ColoExit, Some("barrier-timeout"))
    );
    assert!(p.recv_to_end().await.is_empty());
    // Then the slot is free again.
    let (mut p2, mut s2) = bed.open(QEVM_MAGIC).await;
    p2.send(b"next").await;
    assert_eq!(s2.recv_exact(4).await, b"next");
    let st = bed.wait(|st| st.state == RelayState::Precopy).await;
    assert_eq!((st.refused_migration_channels, st.barrier_timeouts), (1, 1));
    drop((p2, s2, s));
    bed.stop().await;
}

/// A free TCP port on loopback (released at once; the test binds it next).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `run`: the control socket is owner-only; a failover over it is taken
/// from this process (root or the relay's own uid), never over TCP; with
/// peer lists, a migration or TCP control connection from another address
/// is closed unread and the secondary never connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_applies_the_access_rules() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control.sock");
    let sec = dir.path().join("sec.sock");
    let sec_listener = std::os::unix::net::UnixListener::bind(&sec).unwrap();
    sec_listener.set_nonblocking(true).unwrap();
    let (migration_port, control_port) = (free_port(), free_port());
    let cfg = RelayConfig {
        listen: Address::tcp("127.0.0.1", migration_port),
        target: Address::unix(&sec),
        control: control.clone(),
        control_tcp: Some(Address::tcp("127.0.0.1", control_port)),
        control_tcp_peers: vec!["192.0.2.1".parse().unwrap()],
        migration_peers: vec!["192.0.2.1".parse().unwrap()],
        ..RelayConfig::default()
    };
    let shutdown = CancellationToken::new();
    let relay = tokio::spawn(colo_relay::run(cfg, shutdown.clone()));
    let deadline = Instant::now() + T;
    let mut sub = loop {
        match Subscriber::connect(&control, "monitor", false).await {
            Ok(s) => break s,
            Err(e) => assert!(Instant::now() < deadline, "relay never came up: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let mode = std::fs::metadata(&control).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // The migration listener refuses 127.0.0.1 before reading: the
    // secondary has no connection pending.
    let relay_ep = Address::tcp("127.0.0.1", migration_port);
    let mut attack = QEVM_MAGIC.to_be_bytes().to_vec();
    attack.extend(b"ram");
    assert!(intrude(&relay_ep, &attack).await.is_empty());
    // So does the TCP control listener.
    let tcp = Address::tcp("127.0.0.1", control_port);
    let e = query_status(&tcp).await.unwrap_err();
    assert!(
        matches!(e, ControlError::Closed { .. } | ControlError::Io { .. }),
        "{e}"
    );
    let st = Operator::connect(&control, "qmp-driver")
        .await
        .unwrap()
        .status()
        .await
        .unwrap();
    assert_eq!(
        (
            st.refused_migration_channels,
            st.refused_control_connections,
            st.state
        ),
        (1, 1, RelayState::Waiting)
    );
    assert_eq!(
        sec_listener.accept().unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock,
        "the secondary was connected for a refused channel"
    );

    // The local operator's failover is accepted, once.
    notify_failover(&control, Role::Primary).await.unwrap();
    let ev = next(&mut sub).await;
    assert_eq!((ev.event, ev.seq), (EventKind::Failover, 1));
    assert!(ev.detail.unwrap().contains("uid="));

    shutdown.cancel();
    within(relay).await.unwrap().unwrap();
    assert!(!control.exists());
}

/// `run` with a control group: mode 0660 and that group.
#[tokio::test]
async fn run_gives_the_control_socket_to_its_group() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let gid = std::fs::metadata(dir.path()).unwrap().gid();
    let control = dir.path().join("control.sock");
    let cfg = RelayConfig {
        listen: Address::unix(dir.path().join("in.sock")),
        target: Address::unix(dir.path().join("sec.sock")),
        control: control.clone(),
        control_group: Some(gid),
        ..RelayConfig::default()
    };
    let shutdown = CancellationToken::new();
    let relay = tokio::spawn(colo_relay::run(cfg, shutdown.clone()));
    let deadline = Instant::now() + T;
    while query_status(&control).await.is_err() {
        assert!(Instant::now() < deadline, "relay never came up");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let meta = std::fs::metadata(&control).unwrap();
    assert_eq!(
        (meta.permissions().mode() & 0o777, meta.gid()),
        (0o660, gid)
    );
    shutdown.cancel();
    within(relay).await.unwrap().unwrap();
}

/// `run` with a Unix migration listener (`--listen unix:`): the socket is
/// owner-only (0600) as soon as it exists, like the control socket, so only
/// this user and root can connect (the stream is the guest's RAM and the
/// first connection becomes the session). Its owner still migrates through
/// it: the secondary gets the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_binds_a_unix_migration_listener_owner_only() {
    let dir = tempfile::tempdir().unwrap();
    let listen = dir.path().join("in.sock");
    let sec = dir.path().join("sec.sock");
    let sec_listener = tokio::net::UnixListener::bind(&sec).unwrap();
    let control = dir.path().join("control.sock");
    let cfg = RelayConfig {
        listen: Address::unix(&listen),
        target: Address::unix(&sec),
        control: control.clone(),
        ..RelayConfig::default()
    };
    let shutdown = CancellationToken::new();
    let relay = tokio::spawn(colo_relay::run(cfg, shutdown.clone()));
    let deadline = Instant::now() + T;
    while query_status(&control).await.is_err() || !listen.exists() {
        assert!(Instant::now() < deadline, "relay never came up");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mode = std::fs::metadata(&listen).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "migration listener mode {mode:o}");
    // No temporary directory of the no-window bind is left beside it.
    let mut left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["control.sock", "in.sock", "sec.sock"]);

    let mut primary = UnixStream::connect(&listen).await.unwrap();
    primary.write_all(&QEVM_MAGIC.to_be_bytes()).await.unwrap();
    primary.write_all(b"ram").await.unwrap();
    let (mut secondary, _) = within(sec_listener.accept()).await.unwrap();
    let mut got = [0u8; 7];
    within(secondary.read_exact(&mut got)).await.unwrap();
    assert_eq!(&got[..4], &QEVM_MAGIC.to_be_bytes());
    assert_eq!(&got[4..], b"ram");
    assert_eq!(
        query_status(&control)
            .await
            .unwrap()
            .refused_migration_channels,
        0
    );
    drop((primary, secondary));
    shutdown.cancel();
    within(relay).await.unwrap().unwrap();
    assert!(!listen.exists());
}

/// `run` with `--tls-dir`/`--tls-peer`: the TCP control listener serves the
/// other host's certificate only; a plaintext client (a stranger, or a
/// daemon not configured for TLS) is refused and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_requires_mutual_tls_on_the_control_tcp_listener() {
    use colo_control::client::ClientOptions;
    use colo_relay::ControlTls;
    use colo_tls::pki::{Validity, create_pair};
    use colo_tls::{DEFAULT_HANDSHAKE_TIMEOUT, HostIdentity, PeerConnector};
    let dir = tempfile::tempdir().unwrap();
    let names = ["hosta".to_string(), "hostb".to_string()];
    let pair = create_pair(&dir.path().join("pki"), &names, Validity::days(30)).unwrap();
    let control = dir.path().join("control.sock");
    let port = free_port();
    let tcp = Address::tcp("127.0.0.1", port);
    let cfg = RelayConfig {
        listen: Address::unix(dir.path().join("in.sock")),
        target: Address::unix(dir.path().join("sec.sock")),
        control: control.clone(),
        control_tcp: Some(tcp.clone()),
        control_tls: Some(ControlTls {
            dir: pair.host_dirs[1].clone(),
            peer: "hosta".into(),
        }),
        ..RelayConfig::default()
    };
    let shutdown = CancellationToken::new();
    let relay = tokio::spawn(colo_relay::run(cfg, shutdown.clone()));
    let hosta = HostIdentity::load(&pair.host_dirs[0]).unwrap();
    let tls = PeerConnector::new(&hosta, "hostb", DEFAULT_HANDSHAKE_TIMEOUT).unwrap();
    let opts = ClientOptions::default();
    let deadline = Instant::now() + T;
    let mut proxyd = loop {
        match Subscriber::connect_tls(&tcp, "colo-proxyd", false, &opts, Some(&tls)).await {
            Ok(s) => break s,
            Err(e) => assert!(Instant::now() < deadline, "relay never came up: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(query_status(&tcp).await.is_err(), "plaintext served");
    let st = query_status(&control).await.unwrap();
    assert_eq!(st.refused_control_connections, 1);
    assert!(st.subscribers.iter().any(|s| s.name == "colo-proxyd"));
    // The authenticated daemon gets the relay's events.
    notify_failover(&control, Role::Primary).await.unwrap();
    let ev = proxyd.next_event_timeout(T).await.unwrap().unwrap();
    assert_eq!(ev.event, EventKind::Failover);
    shutdown.cancel();
    within(relay).await.unwrap().unwrap();
}
