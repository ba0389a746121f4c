//! Who may do what on the relay's control sockets (issue 13): a failover only
//! from the local operator, a TCP stranger can at most subscribe, and the
//! listeners are bounded. Every refusal is checked for having changed
//! nothing: no event reaches a subscriber (the first event it gets is a
//! marker published afterwards, with seq 1), status counters other than the
//! refusal counter are unchanged, and a real subscriber's barriers still
//! need its own ack.

use colo_control::client::{ControlError, Operator, Subscriber, notify_failover};
use colo_control::hub::{BarrierError, ControlHub, ControlListener, HubOptions, OperatorPolicy};
use colo_control::protocol::{EventBody, EventKind, MAX_LINE, RelayMessage, decode_relay_line};
use colo_types::{Address, Role};
use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixListener};

const T: Duration = Duration::from_secs(5);

/// A hub on a Unix socket and a TCP listener on loopback.
struct Bed {
    hub: ControlHub,
    unix: PathBuf,
    tcp: Address,
    _dir: tempfile::TempDir,
}

async fn bed(opts: HubOptions) -> Bed {
    let dir = tempfile::tempdir().unwrap();
    let unix = dir.path().join("control.sock");
    let hub = ControlHub::with_options(UnixListener::bind(&unix).unwrap(), opts);
    let listener = ControlListener::bind(&"tcp:127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let tcp = listener.local_address().unwrap();
    hub.listen(listener);
    Bed {
        hub,
        unix,
        tcp,
        _dir: dir,
    }
}

/// This process's uid, as the kernel gives it to the relay (the owner of a
/// file it creates).
fn my_uid(dir: &Path) -> u32 {
    let probe = dir.join("uid-probe");
    std::fs::write(&probe, b"").unwrap();
    std::fs::metadata(&probe).unwrap().uid()
}

/// A raw line-level client over any stream.
struct Raw {
    rd: BufReader<Box<dyn AsyncRead + Unpin + Send>>,
    wr: Box<dyn AsyncWrite + Unpin + Send>,
}

impl Raw {
    async fn tcp(address: &Address) -> Raw {
        let Address::Tcp { host, port } = address else {
            panic!("not tcp: {address}")
        };
        let (rd, wr) = TcpStream::connect((host.as_str(), *port))
            .await
            .unwrap()
            .into_split();
        Raw {
            rd: BufReader::new(Box::new(rd)),
            wr: Box::new(wr),
        }
    }
    async fn send(&mut self, line: &str) {
        self.wr.write_all(line.as_bytes()).await.unwrap();
        self.wr.write_all(b"\n").await.unwrap();
    }
    /// Next line, or None at EOF (or a reset: the relay closed it).
    async fn recv(&mut self) -> Option<RelayMessage> {
        let mut line = String::new();
        let n = tokio::time::timeout(T, self.rd.read_line(&mut line))
            .await
            .expect("relay answered in time")
            .unwrap_or(0);
        (n > 0).then(|| decode_relay_line(&line).unwrap_or_else(|e| panic!("{e}: {line}")))
    }
    async fn hello(&mut self, name: &str, role: &str, sync: bool) {
        self.send(&format!(
            r#"{{"type":"hello","version":1,"name":"{name}","role":"{role}","sync":{sync}}}"#
        ))
        .await;
        assert!(
            matches!(self.recv().await, Some(RelayMessage::Welcome { .. })),
            "welcomed"
        );
    }
}

async fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + T;
    while !f() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The first event `sub` gets is the marker published now: nothing was
/// delivered before it.
async fn nothing_was_published(hub: &ControlHub, sub: &mut Subscriber) {
    hub.publish(EventBody::new(EventKind::RelayError, 0).with_detail("marker"))
        .await;
    let ev = sub.next_event_timeout(T).await.unwrap().unwrap();
    assert_eq!(
        (ev.event, ev.seq, ev.detail.as_deref()),
        (EventKind::RelayError, 1, Some("marker")),
        "an event was published before the marker: {ev:?}"
    );
}

#[tokio::test]
async fn a_failover_over_tcp_is_refused_and_publishes_nothing() {
    // Root is an operator by default, and this test may run as root: TCP is
    // refused whatever uid the process has.
    let b = bed(HubOptions::default()).await;
    let mut blockd = Subscriber::connect(&b.unix, "colo-blockd", false)
        .await
        .unwrap();
    let before = b.hub.status();
    // The high-level client and a raw line, both as operator and subscriber.
    let e = notify_failover(b.tcp.clone(), Role::Secondary)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ControlError::Rejected { message, .. } if message.contains("failover refused") && message.contains("not over TCP")),
        "{e}"
    );
    let mut raw = Raw::tcp(&b.tcp).await;
    raw.hello("qmp-driver", "subscriber", false).await;
    raw.send(r#"{"type":"failover","survivor":"secondary"}"#)
        .await;
    assert!(
        matches!(raw.recv().await, Some(RelayMessage::Error { message, .. }) if message.contains("failover refused")),
    );
    // The connection stays usable for what a stranger may do.
    raw.send(r#"{"type":"status"}"#).await;
    let Some(RelayMessage::Status(after)) = raw.recv().await else {
        panic!("no status")
    };
    assert_eq!(after.refused_requests, 2);
    assert_eq!(
        (after.epoch, after.state, after.barrier_timeouts),
        (before.epoch, before.state, before.barrier_timeouts)
    );
    nothing_was_published(&b.hub, &mut blockd).await;
}

#[tokio::test]
async fn a_failover_is_accepted_only_from_an_operator_uid_on_the_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let me = my_uid(dir.path());
    // Not us: refused.
    let stranger_only = OperatorPolicy {
        uids: BTreeSet::from([me.wrapping_add(4242)]),
        gid: None,
    };
    let b = bed(HubOptions {
        operators: stranger_only,
        ..HubOptions::default()
    })
    .await;
    let mut blockd = Subscriber::connect(&b.unix, "colo-blockd", false)
        .await
        .unwrap();
    let e = Operator::connect(&b.unix, "qmp-driver")
        .await
        .unwrap()
        .failover(Role::Secondary)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ControlError::Rejected { message, .. } if message.contains(&format!("uid {me}")) && message.contains("not an operator")),
        "{e}"
    );
    assert_eq!(b.hub.status().refused_requests, 1);
    nothing_was_published(&b.hub, &mut blockd).await;

    // Us, by uid: accepted, and the event says who asked.
    let b = bed(HubOptions {
        operators: OperatorPolicy {
            uids: BTreeSet::from([me]),
            gid: None,
        },
        ..HubOptions::default()
    })
    .await;
    let mut blockd = Subscriber::connect(&b.unix, "colo-blockd", false)
        .await
        .unwrap();
    notify_failover(&b.unix, Role::Secondary).await.unwrap();
    let ev = blockd.next_event_timeout(T).await.unwrap().unwrap();
    assert_eq!(
        (ev.event, ev.survivor, ev.seq),
        (EventKind::Failover, Some(Role::Secondary), 1)
    );
    let detail = ev.detail.unwrap();
    assert!(
        detail.contains(&format!("uid={me}"))
            && detail.contains(&format!("pid={}", std::process::id())),
        "{detail}"
    );
    assert_eq!(b.hub.status().refused_requests, 0);
}

#[tokio::test]
async fn a_failover_is_accepted_from_the_operator_group() {
    let dir = tempfile::tempdir().unwrap();
    let me = my_uid(dir.path());
    let my_gid = std::fs::metadata(dir.path().join("uid-probe"))
        .unwrap()
        .gid();
    let b = bed(HubOptions {
        operators: OperatorPolicy {
            uids: BTreeSet::from([me.wrapping_add(4242)]),
            gid: Some(my_gid),
        },
        ..HubOptions::default()
    })
    .await;
    let mut blockd = Subscriber::connect(&b.unix, "colo-blockd", false)
        .await
        .unwrap();
    notify_failover(&b.unix, Role::Primary).await.unwrap();
    let ev = blockd.next_event_timeout(T).await.unwrap().unwrap();
    assert_eq!(ev.event, EventKind::Failover);
}

/// A stranger that says hello under the real subscriber's name and acks
/// every seq it sees does not pass the real subscriber's barrier.
#[tokio::test]
async fn a_stranger_cannot_ack_a_barrier_for_a_real_subscriber() {
    let b = bed(HubOptions::default()).await;
    let mut real = Subscriber::connect(&b.unix, "colo-blockd", true)
        .await
        .unwrap();
    let mut stranger = Raw::tcp(&b.tcp).await;
    stranger.hello("colo-blockd", "subscriber", false).await;
    wait_until("both subscribed", || b.hub.status().subscribers.len() == 2).await;

    let hub = b.hub.clone();
    let barrier = tokio::spawn(async move {
        hub.barrier(
            EventBody::new(EventKind::SvmEpochClosed, 1),
            Duration::from_millis(300),
        )
        .await
    });
    // The stranger sees the event (it may subscribe) and acks it, and then
    // a seq it never got.
    let Some(RelayMessage::Event(ev)) = stranger.recv().await else {
        panic!("no event")
    };
    assert!(!ev.sync, "only a sync subscriber's copy is sync");
    stranger
        .send(&format!(r#"{{"type":"ack","seq":{}}}"#, ev.seq))
        .await;
    stranger.send(r#"{"type":"ack","seq":99}"#).await;
    assert!(matches!(
        stranger.recv().await,
        Some(RelayMessage::Error { .. })
    ));
    // The real subscriber got it as sync and does not ack: the barrier waits
    // for it alone, and fails naming it.
    let real_ev = real.next_event_timeout(T).await.unwrap().unwrap();
    assert!(real_ev.sync);
    match barrier.await.unwrap() {
        Err(BarrierError::Timeout { missing, .. }) => assert_eq!(missing, ["colo-blockd"]),
        other => panic!("the stranger's ack passed the barrier: {other:?}"),
    }
    // The real ack passes the next one, with exactly one ack counted.
    let hub = b.hub.clone();
    let barrier = tokio::spawn(async move {
        hub.barrier(EventBody::new(EventKind::SvmEpochClosed, 2), T)
            .await
    });
    let real_ev = real.next_event_timeout(T).await.unwrap().unwrap();
    real.ack(real_ev.seq).await.unwrap();
    let report = barrier.await.unwrap().unwrap();
    assert_eq!(report.acks.len(), 1);
}

#[tokio::test]
async fn tcp_clients_beyond_the_limit_are_closed_unread_and_counted() {
    let b = bed(HubOptions {
        max_tcp_clients: 2,
        ..HubOptions::default()
    })
    .await;
    let mut blockd = Subscriber::connect(&b.unix, "colo-blockd", false)
        .await
        .unwrap();
    let mut first = Raw::tcp(&b.tcp).await;
    first.hello("one", "operator", false).await;
    let mut second = Raw::tcp(&b.tcp).await;
    second.hello("two", "subscriber", true).await;
    // The third is closed at once: no welcome, no error line, even to a
    // hello it sent.
    let mut third = Raw::tcp(&b.tcp).await;
    let _ = third
        .wr
        .write_all(b"{\"type\":\"hello\",\"version\":1,\"name\":\"three\",\"role\":\"operator\"}\n")
        .await;
    assert_eq!(third.recv().await, None);
    let st = b.hub.status();
    assert_eq!(st.refused_control_connections, 1);
    assert!(!st.subscribers.iter().any(|s| s.name == "three"));
    // The Unix socket has its own limit: still served.
    let mut op = Operator::connect(&b.unix, "qmp-driver").await.unwrap();
    assert_eq!(op.status().await.unwrap().refused_control_connections, 1);
    // A slot freed is usable again.
    drop(first);
    let deadline = Instant::now() + T;
    loop {
        let mut again = Raw::tcp(&b.tcp).await;
        again
            .send(r#"{"type":"hello","version":1,"name":"again","role":"operator"}"#)
            .await;
        if matches!(again.recv().await, Some(RelayMessage::Welcome { .. })) {
            break;
        }
        assert!(Instant::now() < deadline, "the freed slot was never reused");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    nothing_was_published(&b.hub, &mut blockd).await;
}

#[tokio::test]
async fn tcp_clients_from_other_addresses_are_closed_unread_when_peers_are_listed() {
    let b = bed(HubOptions {
        tcp_peers: Some(vec!["192.0.2.7".parse().unwrap()]),
        ..HubOptions::default()
    })
    .await;
    let mut stranger = Raw::tcp(&b.tcp).await;
    let _ = stranger
        .wr
        .write_all(b"{\"type\":\"hello\",\"version\":1,\"name\":\"colo-proxyd\",\"role\":\"subscriber\",\"sync\":true}\n")
        .await;
    assert_eq!(stranger.recv().await, None);
    let st = b.hub.status();
    assert_eq!(st.refused_control_connections, 1);
    assert!(st.subscribers.is_empty(), "{:?}", st.subscribers);

    // Listed: served.
    let b = bed(HubOptions {
        tcp_peers: Some(vec!["127.0.0.1".parse().unwrap()]),
        ..HubOptions::default()
    })
    .await;
    let mut listed = Raw::tcp(&b.tcp).await;
    listed.hello("colo-proxyd", "subscriber", true).await;
    assert_eq!(b.hub.status().refused_control_connections, 0);
}

/// A TCP client cannot make the relay buffer more than one line's limit:
/// an endless line is cut at [`MAX_LINE`] and the client closed.
#[tokio::test]
async fn an_endless_tcp_line_closes_the_client_without_growing() {
    let b = bed(HubOptions::default()).await;
    let mut blockd = Subscriber::connect(&b.unix, "colo-blockd", false)
        .await
        .unwrap();
    let mut raw = Raw::tcp(&b.tcp).await;
    raw.hello("flood", "subscriber", false).await;
    let chunk = vec![b'x'; 64 << 10];
    // Write until the relay closes (it stops reading after MAX_LINE bytes).
    let mut sent = 0;
    while sent <= 4 * MAX_LINE {
        if raw.wr.write_all(&chunk).await.is_err() {
            break;
        }
        sent += chunk.len();
    }
    assert!(
        matches!(raw.recv().await, Some(RelayMessage::Error { message, .. }) if message.contains("longer than"))
    );
    wait_until("flood gone", || {
        !b.hub.status().subscribers.iter().any(|s| s.name == "flood")
    })
    .await;
    nothing_was_published(&b.hub, &mut blockd).await;
}

// Mutual TLS on the TCP listener (`HubOptions::tls`): the relay runs on
// `hostb` (the secondary host) and accepts only `hosta`'s certificate.

use colo_control::client::ClientOptions;
use colo_tls::pki::{Validity, create_pair};
use colo_tls::{DEFAULT_HANDSHAKE_TIMEOUT, HostIdentity, PeerAcceptor, PeerConnector};

struct Pki {
    relay: HostIdentity,
    other: HostIdentity,
    /// Same names, another CA.
    foreign_other: HostIdentity,
    /// `foreign_other` trusting the pair's CA as well: it accepts the relay's certificate and
    /// shows its own, so it is the relay that must refuse it.
    trusting_foreign: HostIdentity,
    _dir: tempfile::TempDir,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let names = ["hosta".to_string(), "hostb".to_string()];
    let ours = create_pair(&dir.path().join("ours"), &names, Validity::days(30)).unwrap();
    let theirs = create_pair(&dir.path().join("theirs"), &names, Validity::days(30)).unwrap();
    let mixed = dir.path().join("mixed");
    std::fs::create_dir(&mixed).unwrap();
    for file in colo_tls::IDENTITY_FILES {
        // `copy` keeps the keys' 0600.
        std::fs::copy(theirs.host_dirs[0].join(file), mixed.join(file)).unwrap();
    }
    let mut cas = std::fs::read(theirs.host_dirs[0].join(colo_tls::CA_CERT)).unwrap();
    cas.extend(std::fs::read(ours.ca_dir.join(colo_tls::CA_CERT)).unwrap());
    std::fs::write(mixed.join(colo_tls::CA_CERT), cas).unwrap();
    Pki {
        other: HostIdentity::load(&ours.host_dirs[0]).unwrap(),
        relay: HostIdentity::load(&ours.host_dirs[1]).unwrap(),
        foreign_other: HostIdentity::load(&theirs.host_dirs[0]).unwrap(),
        trusting_foreign: HostIdentity::load(&mixed).unwrap(),
        _dir: dir,
    }
}

async fn tls_bed(pki: &Pki) -> Bed {
    let acceptor = PeerAcceptor::new(
        &pki.relay,
        &["hosta".to_string()],
        DEFAULT_HANDSHAKE_TIMEOUT,
    )
    .unwrap();
    bed(HubOptions {
        tls: Some(acceptor),
        ..HubOptions::default()
    })
    .await
}

fn connector(identity: &HostIdentity) -> PeerConnector {
    PeerConnector::new(identity, "hostb", DEFAULT_HANDSHAKE_TIMEOUT).unwrap()
}

#[tokio::test]
async fn over_tls_the_other_host_subscribes_and_takes_part_in_barriers() {
    let pki = pki();
    let b = tls_bed(&pki).await;
    let tls = connector(&pki.other);
    let opts = ClientOptions::default();
    let mut proxyd = Subscriber::connect_tls(&b.tcp, "colo-proxyd", true, &opts, Some(&tls))
        .await
        .unwrap();
    let hub = b.hub.clone();
    let barrier = tokio::spawn(async move {
        hub.barrier(EventBody::new(EventKind::SvmEpochClosed, 1), T)
            .await
    });
    let ev = proxyd.next_event_timeout(T).await.unwrap().unwrap();
    assert!(ev.sync);
    proxyd.ack(ev.seq).await.unwrap();
    assert_eq!(barrier.await.unwrap().unwrap().acks.len(), 1);
    // Authenticated is not local: a failover is still refused over TCP.
    let e = Operator::connect_tls(&b.tcp, "qmp-driver", &opts, Some(&tls))
        .await
        .unwrap()
        .failover(Role::Primary)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not over TCP"), "{e}");
    assert_eq!(b.hub.status().refused_control_connections, 0);
}

/// Without a certificate (plaintext), with the relay host's own identity
/// (the wrong host), and with a certificate of another CA (also from a
/// client that trusts the relay's CA): each is closed
/// before a protocol byte is read, counted, registers nothing and changes
/// nothing for a real subscriber.
#[tokio::test]
async fn over_tls_strangers_and_wrong_credentials_are_refused_and_change_nothing() {
    let pki = pki();
    let b = tls_bed(&pki).await;
    let mut blockd = Subscriber::connect(&b.unix, "colo-blockd", false)
        .await
        .unwrap();
    let opts = ClientOptions::default();
    // Plaintext: the hello is not a TLS ClientHello.
    let e = Subscriber::connect(&b.tcp, "colo-proxyd", true)
        .await
        .unwrap_err();
    assert!(
        matches!(e, ControlError::Closed { .. } | ControlError::Io { .. }),
        "{e}"
    );
    // The relay's own host identity as client: the right CA, the wrong name.
    let e = Subscriber::connect_tls(
        &b.tcp,
        "colo-proxyd",
        true,
        &opts,
        Some(&connector(&pki.relay)),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            e,
            ControlError::Connect { .. } | ControlError::Closed { .. } | ControlError::Io { .. }
        ),
        "{e}"
    );
    // Another CA: the client refuses the relay's certificate itself; the
    // relay counts the failed handshake too.
    let e = Subscriber::connect_tls(
        &b.tcp,
        "colo-proxyd",
        true,
        &opts,
        Some(&connector(&pki.foreign_other)),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, ControlError::Connect { .. }), "{e}");
    // Another CA's certificate for the allowed name, from a client that trusts the relay's CA:
    // the relay refuses it in the handshake (TLS 1.3: the client may see that at its first
    // read), never the client.
    let e = Subscriber::connect_tls(
        &b.tcp,
        "colo-proxyd",
        true,
        &opts,
        Some(&connector(&pki.trusting_foreign)),
    )
    .await
    .unwrap_err();
    assert!(
        !e.to_string().contains("invalid peer certificate"),
        "the client, not the relay, refused: {e}"
    );
    wait_until("four refusals counted", || {
        b.hub.status().refused_control_connections == 4
    })
    .await;
    let st = b.hub.status();
    assert_eq!(
        st.subscribers
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["colo-blockd"]
    );
    nothing_was_published(&b.hub, &mut blockd).await;
}
