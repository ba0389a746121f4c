//! The relay between a fake primary and a fake secondary QEMU (plain
//! sockets in a temp dir, one test over TCP), with control-protocol
//! subscribers watching.

use colo_control::client::{Operator, Subscriber, query_status};
use colo_control::hub::ControlHub;
use colo_control::protocol::{EventKind, RelayState};
use colo_relay::{ColoMessage, MULTIFD_MAGIC, QEVM_MAGIC, RelayArgs, RelayConfig, RelayListener};
use colo_types::Address;
use colo_types::Role;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

mod common;
use common::*;

/// (a) Bulk primary-to-secondary data arrives intact and in order.
async fn bulk_intact(bed: &Bed) {
    let (mut p, mut s) = bed.open(QEVM_MAGIC).await;
    let data = pseudo_random(8 << 20, 0x9E37_79B9_7F4A_7C15);
    let sender = {
        let data = data.clone();
        tokio::spawn(async move {
            // Uneven writes, to cross every buffer boundary.
            for chunk in data.chunks(100_003) {
                p.send(chunk).await;
            }
            p
        })
    };
    let got = s.recv_exact(data.len()).await;
    assert!(got == data, "8 MiB arrived altered or reordered");
    let mut p = sender.await.unwrap();
    // Close: the secondary sees EOF right after the data.
    within(p.wr.shutdown()).await.unwrap();
    assert!(s.recv_to_end().await.is_empty());
}

#[tokio::test]
async fn a_bulk_primary_data_arrives_intact_over_unix() {
    let bed = Bed::unix(Duration::from_secs(2)).await;
    bulk_intact(&bed).await;
    bed.stop().await;
}

#[tokio::test]
async fn a_bulk_primary_data_arrives_intact_over_tcp() {
    let bed = Bed::tcp(Duration::from_secs(2)).await;
    bulk_intact(&bed).await;
    // The COLO path over TCP too: one checkpoint with a sync subscriber.
    let sync = acker(bed.subscriber("colo-blockd", true).await, Duration::ZERO);
    let (mut p, mut s) = bed.open(QEVM_MAGIC).await;
    let mut wire = encode(&[ColoMessage::CheckpointReady]);
    wire.extend(encode(&CHECKPOINT));
    s.send(&wire).await;
    assert_eq!(p.recv_exact(wire.len()).await, wire);
    let st = bed.wait(|st| st.checkpoints == 1).await;
    assert_eq!(st.state, RelayState::Colo);
    drop((p, s));
    bed.stop().await;
    let seen = within(sync).await.unwrap();
    assert!(
        seen.iter()
            .any(|e| e.event == EventKind::CheckpointComplete)
    );
}

/// (b) COLO messages reach the primary intact, and subscribers see the
/// epochs in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_colo_messages_forwarded_and_events_in_epoch_order() {
    let bed = Bed::unix(Duration::from_secs(2)).await;
    let mut monitor = bed.subscriber("monitor", false).await;
    let sync = acker(bed.subscriber("colo-blockd", true).await, Duration::ZERO);
    let (mut p, mut s) = bed.open(QEVM_MAGIC).await;

    // Precopy: primary streams, nothing comes back.
    p.send(&pseudo_random(4096, 1)).await;
    assert_eq!(s.recv_exact(4096).await, pseudo_random(4096, 1));
    assert_eq!(bed.hub.status().state, RelayState::Precopy);
    assert!(bed.hub.status().main_channel_connected);

    s.send_msgs(&[ColoMessage::CheckpointReady]).await;
    assert_eq!(
        p.recv_exact(4).await,
        encode(&[ColoMessage::CheckpointReady])
    );

    let mut expected = Vec::new();
    for round in 0..3 {
        // The primary asks; the secondary answers (first two rounds one
        // message per write, the third all at once in a single write, with a
        // held message followed by more bytes in the same read).
        p.send_msgs(&[ColoMessage::CheckpointRequest]).await;
        assert_eq!(
            s.recv_exact(4).await,
            encode(&[ColoMessage::CheckpointRequest])
        );
        if round < 2 {
            for m in CHECKPOINT {
                s.send_msgs(&[m]).await;
                assert_eq!(p.recv_exact(4).await, encode(&[m]));
            }
        } else {
            s.send_msgs(&CHECKPOINT).await;
            assert_eq!(p.recv_exact(12).await, encode(&CHECKPOINT));
        }
        let epoch = round + 1;
        expected.extend([
            (EventKind::SvmEpochClosed, epoch),
            (EventKind::CheckpointAdopted, epoch),
            (EventKind::CheckpointComplete, epoch),
        ]);
    }

    let mut got = Vec::new();
    let first = next(&mut monitor).await;
    assert_eq!(
        (first.event, first.epoch, first.seq),
        (EventKind::ColoStarted, 1, 1)
    );
    let mut last_seq = first.seq;
    for _ in 0..expected.len() {
        let e = next(&mut monitor).await;
        assert_eq!(e.seq, last_seq + 1, "seq grows by one");
        assert!(!e.sync, "an async subscriber is never asked to ack");
        last_seq = e.seq;
        got.push((e.event, e.epoch));
    }
    assert_eq!(got, expected);

    let st = bed.wait(|st| st.checkpoints == 3).await;
    assert_eq!(st.epoch, 4, "epoch after three checkpoints");
    assert_eq!(st.state, RelayState::Colo);
    assert!(st.last_pause_us.is_some());
    assert_eq!(st.checkpoint_rate_per_min, 3.0);
    assert_eq!(st.barrier_timeouts, 0);
    assert_eq!(st.parse_error, None);
    let blockd = st
        .subscribers
        .iter()
        .find(|s| s.name == "colo-blockd")
        .unwrap();
    assert!(blockd.sync && blockd.healthy && blockd.last_ack_latency_us.is_some());

    // The secondary's QEMU goes away: colo-exit, channel-closed.
    drop(s);
    assert!(p.recv_to_end().await.is_empty());
    let exit = next(&mut monitor).await;
    assert_eq!(exit.event, EventKind::ColoExit);
    assert_eq!(exit.reason.as_deref(), Some("channel-closed"));
    assert!(exit.detail.unwrap().contains("secondary"));
    let st = bed.wait(|st| st.state == RelayState::Exited).await;
    assert!(!st.main_channel_connected);
    bed.stop().await;

    let seen = within(sync).await.unwrap();
    let synced: Vec<_> = seen
        .iter()
        .filter(|e| e.sync)
        .map(|e| (e.event, e.epoch))
        .collect();
    assert_eq!(synced.len(), 6, "two barriers per checkpoint: {synced:?}");
    assert!(
        synced
            .iter()
            .all(|(k, _)| matches!(k, EventKind::SvmEpochClosed | EventKind::CheckpointAdopted))
    );
}

/// A relay with `reply_timeout` whose session is in COLO (after some precopy), a blockd that
/// acks at once, and a monitor that saw `colo-started`.
async fn colo_with_reply_timeout(reply_timeout: Duration) -> (Bed, Subscriber, (End, End)) {
    let bed = Bed::unix_with((Duration::from_secs(2), reply_timeout)).await;
    let mut monitor = bed.subscriber("monitor", false).await;
    // Acks until the relay goes away; the task ends with it.
    drop(acker(
        bed.subscriber("colo-blockd", true).await,
        Duration::ZERO,
    ));
    let (mut p, mut s) = bed.open(QEVM_MAGIC).await;
    p.send(&pseudo_random(4096, 2)).await;
    assert_eq!(s.recv_exact(4096).await, pseudo_random(4096, 2));
    s.send_msgs(&[ColoMessage::CheckpointReady]).await;
    p.recv_exact(4).await;
    assert_eq!(next(&mut monitor).await.event, EventKind::ColoStarted);
    (bed, monitor, (p, s))
}

/// A secondary QEMU that never answers the primary's checkpoint request (frozen, or stuck
/// stopping its VM) would keep the primary waiting for ever with its output held: the relay
/// ends COLO after the reply timeout. A quiet COLO (no request) and a reply that comes within
/// the bound end nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_checkpoint_request_ends_colo_after_the_reply_timeout() {
    let reply_timeout = Duration::from_millis(500);
    let (bed, mut monitor, (mut p, mut s)) = colo_with_reply_timeout(reply_timeout).await;

    // No request for longer than the bound: nothing is due.
    tokio::time::sleep(reply_timeout * 3).await;
    assert_eq!(bed.hub.status().state, RelayState::Colo);

    // A request answered within the bound, then a quiet time after the checkpoint.
    p.send_msgs(&[ColoMessage::CheckpointRequest]).await;
    s.recv_exact(4).await;
    tokio::time::sleep(reply_timeout / 2).await;
    for m in CHECKPOINT {
        s.send_msgs(&[m]).await;
        assert_eq!(p.recv_exact(4).await, encode(&[m]));
    }
    bed.wait(|st| st.checkpoints == 1).await;
    tokio::time::sleep(reply_timeout * 3).await;
    assert_eq!(bed.hub.status().state, RelayState::Colo);

    // The next request goes unanswered: COLO ends, both channels close.
    let asked = Instant::now();
    p.send_msgs(&[ColoMessage::CheckpointRequest]).await;
    s.recv_exact(4).await;
    assert!(p.recv_to_end().await.is_empty());
    assert!(
        asked.elapsed() >= reply_timeout,
        "ended before the bound: {:?}",
        asked.elapsed()
    );
    assert!(
        s.recv_to_end().await.is_empty(),
        "the secondary's side closed too"
    );
    let exit = loop {
        let e = next(&mut monitor).await;
        if e.event == EventKind::ColoExit {
            break e;
        }
    };
    assert_eq!(exit.reason.as_deref(), Some("reply-timeout"));
    let detail = exit.detail.unwrap();
    assert!(
        detail.contains("did not answer the checkpoint request"),
        "{detail}"
    );
    let st = bed.wait(|st| st.state == RelayState::Exited).await;
    assert!(!st.main_channel_connected);
    assert_eq!(st.checkpoints, 1);
    bed.stop().await;
}

/// The primary's side of the channel ends while its request waits (a failover, a crash):
/// COLO ended with `channel-closed`, and the unanswered request must not end it a second time
/// (nor count in a later session) once the reply timeout has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ended_by_the_primary_is_not_ended_again_by_its_reply_timeout() {
    let reply_timeout = Duration::from_millis(300);
    let (bed, mut monitor, (mut p, mut s)) = colo_with_reply_timeout(reply_timeout).await;

    p.send_msgs(&[ColoMessage::CheckpointRequest]).await;
    s.recv_exact(4).await;
    drop(p);
    let exit = next(&mut monitor).await;
    assert_eq!(exit.event, EventKind::ColoExit);
    assert_eq!(exit.reason.as_deref(), Some("channel-closed"));

    // The secondary's side stays open (frozen): well past the reply timeout, nothing more.
    let more = monitor.next_event_timeout(reply_timeout * 4).await;
    assert!(
        matches!(more, Err(colo_control::ControlError::Timeout { .. })),
        "a second event: {more:?}"
    );
    let st = bed.hub.status();
    assert_eq!(st.state, RelayState::Exited);
    assert_eq!(st.barrier_timeouts, 0);
    drop(s);
    bed.stop().await;
}

/// (c) The barrier holds checkpoint-reply until the sync subscriber acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_reply_reaches_the_primary_only_after_the_delayed_ack() {
    let bed = Bed::unix(Duration::from_secs(2)).await;
    let delay = Duration::from_millis(50);
    let sync = acker(bed.subscriber("colo-blockd", true).await, delay);
    let (mut p, mut s) = bed.open(QEVM_MAGIC).await;
    s.send_msgs(&[ColoMessage::CheckpointReady]).await;
    p.recv_exact(4).await;
    for _ in 0..3 {
        let sent = Instant::now();
        s.send_msgs(&[ColoMessage::CheckpointReply]).await;
        assert_eq!(
            p.recv_exact(4).await,
            encode(&[ColoMessage::CheckpointReply])
        );
        let held = sent.elapsed();
        assert!(
            held >= delay,
            "checkpoint-reply reached the primary after {held:?}, before the ack"
        );

        let sent = Instant::now();
        s.send_msgs(&[ColoMessage::VmstateReceived, ColoMessage::VmstateLoaded])
            .await;
        assert_eq!(
            p.recv_exact(8).await,
            encode(&[ColoMessage::VmstateReceived, ColoMessage::VmstateLoaded])
        );
        assert!(sent.elapsed() >= delay, "vmstate-received not held");
    }
    let st = bed.wait(|st| st.checkpoints == 3).await;
    assert!(st.last_pause_us.unwrap() >= 2 * delay.as_micros() as u64);
    let blockd = &st.subscribers[0];
    assert!(blockd.last_ack_latency_us.unwrap() >= delay.as_micros() as u64);
    drop((p, s));
    bed.stop().await;
    within(sync).await.unwrap();
}

/// (d) A sync subscriber that never acks: COLO ends on both sides within
/// the ack timeout, everyone is told, and the relay lives on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_missing_ack_ends_colo_on_both_sides_and_the_relay_lives_on() {
    let ack_timeout = Duration::from_millis(300);
    let bed = Bed::unix(ack_timeout).await;
    let _mute = bed.subscriber("colo-blockd", true).await;
    let mut monitor = bed.subscriber("monitor", false).await;
    let (mut p, mut s) = bed.open(QEVM_MAGIC).await;

    s.send_msgs(&[ColoMessage::CheckpointReady]).await;
    p.recv_exact(4).await;
    assert_eq!(next(&mut monitor).await.event, EventKind::ColoStarted);

    let t0 = Instant::now();
    s.send_msgs(&[ColoMessage::CheckpointReply]).await;
    // The primary never sees the reply: its connection just closes.
    let to_primary = p.recv_to_end().await;
    let elapsed = t0.elapsed();
    assert!(to_primary.is_empty(), "held reply leaked: {to_primary:?}");
    assert!(
        elapsed >= ack_timeout,
        "closed before the ack timeout: {elapsed:?}"
    );
    assert!(
        elapsed < ack_timeout + Duration::from_secs(3),
        "closed too late: {elapsed:?}"
    );
    assert!(
        s.recv_to_end().await.is_empty(),
        "secondary side closed too"
    );

    let closed = next(&mut monitor).await;
    assert_eq!((closed.event, closed.epoch), (EventKind::SvmEpochClosed, 1));
    let exit = next(&mut monitor).await;
    assert_eq!(exit.event, EventKind::ColoExit);
    assert_eq!(exit.reason.as_deref(), Some("barrier-timeout"));
    let detail = exit.detail.unwrap();
    assert!(detail.contains("colo-blockd"), "{detail}");

    let st = within(query_status(&bed.control)).await.unwrap();
    assert_eq!(st.barrier_timeouts, 1);
    assert_eq!(st.state, RelayState::Exited);
    assert!(!st.main_channel_connected);
    let blockd = st
        .subscribers
        .iter()
        .find(|s| s.name == "colo-blockd")
        .unwrap();
    assert!(!blockd.healthy);
    assert_eq!(st.checkpoints, 0);

    // Re-protect: a new migration goes through the same relay.
    let (mut p2, mut s2) = bed.open(QEVM_MAGIC).await;
    bed.wait(|st| st.state == RelayState::Precopy).await;
    p2.send(b"more ram").await;
    assert_eq!(s2.recv_exact(8).await, b"more ram");
    s2.send_msgs(&[ColoMessage::CheckpointReady]).await;
    p2.recv_exact(4).await;
    let started = next(&mut monitor).await;
    assert_eq!((started.event, started.epoch), (EventKind::ColoStarted, 2));
    drop((p2, s2));
    bed.stop().await;
}

/// A sync subscriber that disconnects in the middle of a barrier fails it
/// at once, long before the ack timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_subscriber_disconnect_mid_barrier_ends_colo_at_once() {
    let bed = Bed::unix(Duration::from_secs(30)).await;
    let mut quitter = bed.subscriber("colo-proxyd", true).await;
    let mut monitor = bed.subscriber("monitor", false).await;
    let (mut p, mut s) = bed.open(QEVM_MAGIC).await;
    s.send_msgs(&[ColoMessage::CheckpointReady]).await;
    p.recv_exact(4).await;
    let t0 = Instant::now();
    s.send_msgs(&[ColoMessage::CheckpointReply]).await;
    assert_eq!(next(&mut quitter).await.event, EventKind::ColoStarted);
    let ev = next(&mut quitter).await;
    assert!(ev.sync && ev.event == EventKind::SvmEpochClosed);
    drop(quitter);
    assert!(p.recv_to_end().await.is_empty());
    assert!(s.recv_to_end().await.is_empty());
    assert!(t0.elapsed() < Duration::from_secs(10));
    let mut exit = next(&mut monitor).await;
    while exit.event != EventKind::ColoExit {
        exit = next(&mut monitor).await;
    }
    assert_eq!(exit.reason.as_deref(), Some("barrier-timeout"));
    assert!(exit.detail.unwrap().contains("colo-proxyd disconnected"));
    assert_eq!(bed.hub.status().barrier_timeouts, 1);
    bed.stop().await;
}

/// (e) An unknown code: the relay reports it, stops parsing, and forwards
/// every byte untouched (no barrier holds anything any more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e_garbage_is_reported_and_forwarded_untouched() {
    let bed = Bed::unix(Duration::from_secs(30)).await;
    // Would block any barrier for 30 s: proves no barrier runs after the error.
    let _mute = bed.subscriber("colo-blockd", true).await;
    let mut monitor = bed.subscriber("monitor", false).await;
    let (mut p, mut s) = bed.open(QEVM_MAGIC).await;
    s.send_msgs(&[ColoMessage::CheckpointReady]).await;
    p.recv_exact(4).await;
    assert_eq!(next(&mut monitor).await.event, EventKind::ColoStarted);

    // A return-path style message (be16 type 3, be16 len 4) then data that
    // would be COLO messages, split awkwardly across writes.
    let mut tail = vec![0, 3, 0, 4, 0xde, 0xad, 0xbe, 0xef];
    tail.extend(encode(&CHECKPOINT));
    tail.extend(pseudo_random(70_000, 7));
    let t0 = Instant::now();
    s.send(&tail[..3]).await;
    s.send(&tail[3..10]).await;
    s.send(&tail[10..]).await;
    assert_eq!(
        p.recv_exact(tail.len()).await,
        tail,
        "bytes altered after the parse error"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "stream stalled after the parse error"
    );

    let err = next(&mut monitor).await;
    assert_eq!(err.event, EventKind::RelayError);
    let detail = err.detail.unwrap();
    assert!(
        detail.contains("0x00030004") && detail.contains("byte 4"),
        "{detail}"
    );
    let st = bed.hub.status();
    assert!(st.parse_error.unwrap().contains("0x00030004"));
    assert_eq!(st.checkpoints, 0);

    // Primary to secondary still flows.
    p.send(b"still here").await;
    assert_eq!(s.recv_exact(10).await, b"still here");
    // Nothing but the channel's end follows.
    drop((p, s));
    let exit = next(&mut monitor).await;
    assert_eq!(
        (exit.event, exit.reason.as_deref()),
        (EventKind::ColoExit, Some("channel-closed"))
    );
    bed.stop().await;
}

/// (f) A channel that does not start with `QEVM` (multifd, which COLO does
/// not use, or anything else) is refused: closed, counted, and the
/// secondary is never connected for it, so its incoming migration stays
/// free for the real main channel, which is then served as usual.
#[tokio::test]
async fn f_a_channel_that_is_not_a_main_channel_is_refused_and_never_reaches_the_secondary() {
    let bed = Bed::unix(Duration::from_secs(30)).await;
    let mut monitor = bed.subscriber("monitor", false).await;
    let Address::Unix(path) = &bed.relay_ep else {
        unreachable!()
    };
    // Multifd magic with data after it; then a channel that closes after 2
    // bytes.
    let mut multifd = UnixStream::connect(path).await.unwrap();
    let _ = multifd.write_all(&MULTIFD_MAGIC.to_be_bytes()).await;
    let _ = multifd.write_all(b"ram").await;
    let mut rest = Vec::new();
    let _ = within(multifd.read_to_end(&mut rest)).await;
    assert!(rest.is_empty());
    bed.wait(|st| st.refused_migration_channels == 1).await;
    let mut short = UnixStream::connect(path).await.unwrap();
    short.write_all(b"QE").await.unwrap();
    short.shutdown().await.unwrap();
    let _ = within(short.read_to_end(&mut rest)).await;
    assert!(rest.is_empty());
    let st = bed.wait(|st| st.refused_migration_channels == 2).await;
    assert_eq!(
        (
            st.state,
            st.epoch,
            st.main_channel_connected,
            st.passthrough_channels
        ),
        (RelayState::Waiting, 0, false, 0)
    );
    // The first connection the secondary sees is the real main channel
    // (`open` checks that the QEVM magic arrives first).
    let (mut p, mut s) = bed.open(QEVM_MAGIC).await;
    s.send_msgs(&[ColoMessage::CheckpointReady]).await;
    p.recv_exact(4).await;
    let ev = next(&mut monitor).await;
    assert_eq!(
        (ev.event, ev.seq),
        (EventKind::ColoStarted, 1),
        "nothing before it"
    );
    drop((p, s));
    bed.stop().await;
}

/// The primary's connection fails with a socket error instead of an EOF, as it does when the
/// primary's host vanished and keepalive or `TCP_USER_TIMEOUT` gave up on it (`ETIMEDOUT`; a
/// reset here, which takes the same path): the relay ends the session as on an EOF, with
/// `colo-exit` (reason `channel-closed`) naming the error, and closes the secondary's side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_channel_failing_with_an_error_ends_colo_like_an_eof() {
    let bed = Bed::tcp(Duration::from_secs(2)).await;
    let mut monitor = bed.subscriber("monitor", false).await;
    let Address::Tcp { host, port } = &bed.relay_ep else {
        unreachable!()
    };
    let mut primary = TcpStream::connect((host.as_str(), *port)).await.unwrap();
    primary.write_all(&QEVM_MAGIC.to_be_bytes()).await.unwrap();
    let SecListener::Tcp(l) = &bed.secondary else {
        unreachable!()
    };
    let (secondary, _) = within(l.accept()).await.unwrap();
    let mut secondary = End::new({
        let (r, w) = secondary.into_split();
        (Box::new(r), Box::new(w))
    });
    assert_eq!(secondary.recv_exact(4).await, QEVM_MAGIC.to_be_bytes());
    secondary.send_msgs(&[ColoMessage::CheckpointReady]).await;
    let mut ready = [0u8; 4];
    within(primary.read_exact(&mut ready)).await.unwrap();
    assert_eq!(next(&mut monitor).await.event, EventKind::ColoStarted);

    // Close with a reset: the relay's read fails instead of seeing the end.
    socket2::SockRef::from(&primary)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(primary);
    let exit = next(&mut monitor).await;
    assert_eq!(exit.event, EventKind::ColoExit);
    assert_eq!(exit.reason.as_deref(), Some("channel-closed"));
    let detail = exit.detail.unwrap();
    assert!(
        detail.contains("reading from the primary failed"),
        "{detail}"
    );
    assert!(secondary.recv_to_end().await.is_empty());
    let st = bed.wait(|st| !st.main_channel_connected).await;
    assert_eq!(st.state, RelayState::Exited);
    bed.stop().await;
}

/// (g) Operator requests through the relay's control socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g_operator_requests() {
    let bed = Bed::unix(Duration::from_secs(2)).await;
    let mut proxyd = bed.subscriber("colo-proxyd", false).await;
    let sync = acker(bed.subscriber("colo-blockd", true).await, Duration::ZERO);
    let (mut p, mut s) = bed.open(QEVM_MAGIC).await;
    s.send_msgs(&[ColoMessage::CheckpointReady]).await;
    p.recv_exact(4).await;
    s.send_msgs(&CHECKPOINT).await;
    p.recv_exact(12).await;
    bed.wait(|st| st.checkpoints == 1).await;

    let mut op = Operator::connect(&bed.control, "qmp-driver").await.unwrap();
    assert_eq!(op.welcome().state, RelayState::Colo);
    assert_eq!(op.welcome().epoch, 2);
    op.checkpoint_requested("proxy-mismatch").await.unwrap();
    op.checkpoint_requested("block-log-full").await.unwrap();
    op.checkpoint_requested("proxy-mismatch").await.unwrap();
    let st = op.status().await.unwrap();
    assert_eq!(st.version, 1);
    assert_eq!(st.state, RelayState::Colo);
    assert_eq!(st.epoch, 2);
    assert_eq!(st.checkpoints, 1);
    assert!(st.last_pause_us.is_some());
    assert_eq!(st.checkpoint_rate_per_min, 1.0);
    assert_eq!(st.last_request_reason.as_deref(), Some("proxy-mismatch"));
    assert_eq!(st.requests_by_reason.get("proxy-mismatch"), Some(&2));
    assert_eq!(st.requests_by_reason.get("block-log-full"), Some(&1));
    assert_eq!(st.parse_error, None);
    assert!(st.main_channel_connected);
    assert_eq!(st.passthrough_channels, 0);
    assert_eq!(st.barrier_timeouts, 0);
    let mut names: Vec<_> = st
        .subscribers
        .iter()
        .map(|s| (s.name.as_str(), s.sync))
        .collect();
    names.sort();
    assert_eq!(names, [("colo-blockd", true), ("colo-proxyd", false)]);
    assert!(
        st.subscribers
            .iter()
            .all(|s| s.healthy && s.connected_since_us > 0)
    );

    op.failover(Role::Secondary).await.unwrap();
    let mut ev = next(&mut proxyd).await;
    while ev.event != EventKind::Failover {
        ev = next(&mut proxyd).await;
    }
    assert_eq!(
        (ev.survivor, ev.epoch, ev.sync),
        (Some(Role::Secondary), 2, false)
    );
    assert!(ev.detail.unwrap().contains("qmp-driver"));
    drop((p, s));
    bed.stop().await;
    let seen = within(sync).await.unwrap();
    assert!(seen.iter().any(|e| e.event == EventKind::Failover));
}

/// `run` binds from a config, replaces a stale control socket, serves, and
/// removes its socket files on shutdown.
#[tokio::test]
async fn run_binds_serves_and_cleans_up() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        relay: RelayArgs,
    }
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control.sock");
    let listen = dir.path().join("in.sock");
    let sec = dir.path().join("sec.sock");
    // A stale socket file from a crashed run.
    drop(std::os::unix::net::UnixListener::bind(&control).unwrap());
    let sec_listener = UnixListener::bind(&sec).unwrap();
    let cli = Cli::try_parse_from([
        "relay".to_string(),
        format!("--listen=unix:{}", listen.display()),
        format!("--target=unix:{}", sec.display()),
        format!("--control={}", control.display()),
        "--ack-timeout-ms=500".to_string(),
    ])
    .unwrap();
    let cfg = RelayConfig::try_from(cli.relay).unwrap();
    assert_eq!(cfg.ack_timeout, Duration::from_millis(500));
    let shutdown = CancellationToken::new();
    let relay = tokio::spawn(colo_relay::run(cfg.clone(), shutdown.clone()));

    // Wait for the control socket, then use both sockets.
    let deadline = Instant::now() + T;
    let st = loop {
        match query_status(&control).await {
            Ok(st) => break st,
            Err(e) => assert!(Instant::now() < deadline, "relay never came up: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(st.state, RelayState::Waiting);
    let mut sub = Subscriber::connect(&control, "monitor", false)
        .await
        .unwrap();
    let mut p = UnixStream::connect(&listen).await.unwrap();
    p.write_all(&QEVM_MAGIC.to_be_bytes()).await.unwrap();
    let (mut s, _) = within(sec_listener.accept()).await.unwrap();
    let mut magic = [0; 4];
    s.read_exact(&mut magic).await.unwrap();
    s.write_all(&encode(&[ColoMessage::CheckpointReady]))
        .await
        .unwrap();
    assert_eq!(next(&mut sub).await.event, EventKind::ColoStarted);

    // A second relay on the same control socket must refuse, not steal it.
    let err = colo_relay::run(cfg, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("in use"), "{err}");

    shutdown.cancel();
    within(relay).await.unwrap().unwrap();
    let exit = next(&mut sub).await;
    assert_eq!(
        (exit.event, exit.reason.as_deref()),
        (EventKind::ColoExit, Some("relay-shutdown"))
    );
    assert_eq!(sub.next_event_timeout(T).await.unwrap(), None);
    let mut rest = Vec::new();
    within(p.read_to_end(&mut rest)).await.unwrap();
    assert_eq!(rest, encode(&[ColoMessage::CheckpointReady]));
    assert!(
        !control.exists() && !listen.exists(),
        "socket files removed"
    );
}

/// The secondary's address refuses connections: the primary's channel is
/// closed and subscribers hear a relay-error.
#[tokio::test]
async fn unreachable_secondary_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let listener = RelayListener::bind(&Address::Unix(dir.path().join("in.sock")))
        .await
        .unwrap();
    let relay_ep = listener.local_endpoint().unwrap();
    let control = dir.path().join("c.sock");
    let hub = ControlHub::new(UnixListener::bind(&control).unwrap());
    let shutdown = CancellationToken::new();
    let relay = tokio::spawn(colo_relay::serve(
        listener,
        Address::Unix(dir.path().join("nobody.sock")),
        hub.clone(),
        (Duration::from_secs(1), colo_relay::DEFAULT_REPLY_TIMEOUT),
        shutdown.clone(),
    ));
    let mut sub = Subscriber::connect(&control, "monitor", false)
        .await
        .unwrap();
    let Address::Unix(path) = relay_ep else {
        unreachable!()
    };
    let mut p = UnixStream::connect(&path).await.unwrap();
    // The relay connects to the secondary once it knows a main channel came.
    p.write_all(&QEVM_MAGIC.to_be_bytes()).await.unwrap();
    let ev = next(&mut sub).await;
    assert_eq!(ev.event, EventKind::RelayError);
    assert!(ev.detail.unwrap().contains("nobody.sock"));
    let mut rest = Vec::new();
    let _ = within(p.read_to_end(&mut rest)).await;
    assert!(rest.is_empty());
    shutdown.cancel();
    within(relay).await.unwrap();
    hub.shutdown().await;
}

/// Shutting the relay down in the middle of a barrier does not wait out the
/// ack timeout; the held message is not forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_a_barrier_is_prompt() {
    let bed = Bed::unix(Duration::from_secs(60)).await;
    let mut mute = bed.subscriber("colo-blockd", true).await;
    let (mut p, mut s) = bed.open(QEVM_MAGIC).await;
    s.send_msgs(&[ColoMessage::CheckpointReady]).await;
    p.recv_exact(4).await;
    s.send_msgs(&[ColoMessage::CheckpointReply]).await;
    assert_eq!(next(&mut mute).await.event, EventKind::ColoStarted);
    assert!(next(&mut mute).await.sync, "barrier under way");
    let t0 = Instant::now();
    bed.stop().await;
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert!(p.recv_to_end().await.is_empty(), "held reply must not leak");
    assert!(s.recv_to_end().await.is_empty());
}

/// `run` with `--control-tcp` also serves the control protocol on TCP: a
/// sync subscriber there (the daemon on the other host) holds the barrier
/// until it acks, exactly like one on the Unix socket, and the port is
/// closed with the relay.
#[tokio::test]
async fn run_serves_the_control_protocol_on_tcp_too() {
    use clap::Parser;
    use colo_types::Address;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        relay: RelayArgs,
    }
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control.sock");
    let listen = dir.path().join("in.sock");
    let sec = dir.path().join("sec.sock");
    let sec_listener = UnixListener::bind(&sec).unwrap();
    // A free port (released at once; nothing else in this test binds one).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cli = Cli::try_parse_from([
        "relay".to_string(),
        format!("--listen=unix:{}", listen.display()),
        format!("--target=unix:{}", sec.display()),
        format!("--control={}", control.display()),
        format!("--control-tcp=127.0.0.1:{port}"),
        "--ack-timeout-ms=5000".to_string(),
    ])
    .unwrap();
    let cfg = RelayConfig::try_from(cli.relay).unwrap();
    let tcp = Address::tcp("127.0.0.1", port);
    assert_eq!(cfg.control_tcp.as_ref(), Some(&tcp));
    let shutdown = CancellationToken::new();
    let relay = tokio::spawn(colo_relay::run(cfg, shutdown.clone()));

    let deadline = Instant::now() + T;
    loop {
        match query_status(&tcp).await {
            Ok(st) => break assert_eq!(st.state, RelayState::Waiting),
            Err(e) => assert!(Instant::now() < deadline, "relay never came up: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut remote = Subscriber::connect(&tcp, "colo-proxyd-primary", true)
        .await
        .unwrap();

    let mut p = End::new({
        let (rd, wr) = UnixStream::connect(&listen).await.unwrap().into_split();
        (Box::new(rd) as Rd, Box::new(wr) as Wr)
    });
    p.send(&QEVM_MAGIC.to_be_bytes()).await;
    let mut s = End::new({
        let (st, _) = within(sec_listener.accept()).await.unwrap();
        let (rd, wr) = st.into_split();
        (Box::new(rd) as Rd, Box::new(wr) as Wr)
    });
    s.recv_exact(4).await;
    s.send_msgs(&[ColoMessage::CheckpointReady]).await;
    let ready = encode(&[ColoMessage::CheckpointReady]);
    assert_eq!(p.recv_exact(ready.len()).await, ready);
    assert_eq!(next(&mut remote).await.event, EventKind::ColoStarted);

    // The barrier holds checkpoint-reply until the TCP subscriber acks.
    s.send_msgs(&[ColoMessage::CheckpointReply]).await;
    let ev = next(&mut remote).await;
    assert_eq!((ev.event, ev.sync), (EventKind::SvmEpochClosed, true));
    let mut held = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(100), p.rd.read(&mut held)).await;
    assert!(early.is_err(), "checkpoint-reply forwarded before the ack");
    remote.ack(ev.seq).await.unwrap();
    let reply = encode(&[ColoMessage::CheckpointReply]);
    assert_eq!(p.recv_exact(reply.len()).await, reply);
    // Both transports show the same relay, and it lists the TCP subscriber.
    let st = query_status(&control).await.unwrap();
    let sub = st
        .subscribers
        .iter()
        .find(|s| s.name == "colo-proxyd-primary")
        .unwrap();
    assert!(sub.sync && sub.healthy && sub.last_ack_latency_us.is_some());

    shutdown.cancel();
    within(relay).await.unwrap().unwrap();
    assert!(query_status(&tcp).await.is_err(), "TCP port still served");
}
