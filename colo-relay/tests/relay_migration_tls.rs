//! Migration TLS terminated by the relay (`--migration-tls`), with real QEMUs (the qemu
//! tier: the patched QEMU of `integration/setup.sh`, see `colo_testkit::qemu::qemu_binary`;
//! fails, never skips, without it). QEMU needs GnuTLS for `tls-creds-x509` ("TLS credentials
//! support requires GNUTLS" otherwise): `integration/build-qemu.sh` must configure with
//! `--enable-gnutls`; until then `COLO_QEMU=/usr/bin/qemu-system-x86_64` (Debian's 10.0.2,
//! which has it; these tests use no COLO patch) runs them. The other tests here need no QEMU.
//!
//! The primary QEMU migrates with `tls-creds` (a `tls-creds-x509` object, `endpoint=client`,
//! on the primary host's identity directory) and `tls-hostname` (the secondary host's name)
//! over a `unix:` URI to the relay, which is the TLS server and forwards the decrypted stream
//! to the secondary QEMU's plaintext incoming socket.

mod common;

use colo_control::client::query_status;
use colo_relay::{ControlTls, RelayConfig};
use colo_testkit::qemu::Qemu;
use colo_tls::pki::{Validity, Written, create_pair};
use colo_types::Address;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Bound of every wait: a failure shows as a panic, not a hang.
const T: Duration = Duration::from_secs(60);

/// A `-machine none` guest whose RAM is `mib` MiB, read from `ram` when given (random bytes:
/// every page is migrated in full), else zero; `extra` appended.
async fn guest(mib: u64, ram: Option<&Path>, extra: &[String]) -> Qemu {
    let backend = match ram {
        Some(file) => format!(
            "memory-backend-file,id=ram0,size={mib}M,mem-path={},share=off,prealloc=on",
            file.display()
        ),
        None => format!("memory-backend-ram,id=ram0,size={mib}M"),
    };
    let mut args: Vec<String> = [
        "-machine",
        "none,memory-backend=ram0",
        "-m",
        &format!("{mib}M"),
        "-object",
        &backend,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().cloned());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Qemu::start(&refs).await
}

fn tls_object(id: &str, dir: &Path) -> [String; 2] {
    [
        "-object".into(),
        format!(
            "tls-creds-x509,id={id},dir={},endpoint=client",
            dir.display()
        ),
    ]
}

/// Starts `migrate` to `uri` and waits for its end: `completed` or `failed` (with QEMU's
/// error), and how long it took.
async fn migrate(source: &Qemu, uri: &str) -> (String, Value, Duration) {
    let client = source.connect().await;
    let start = Instant::now();
    client.migrate(uri).await.expect("migrate");
    let deadline = Instant::now() + T;
    loop {
        let info = client
            .execute_raw("query-migrate", None)
            .await
            .expect("query-migrate");
        let status = info["status"].as_str().unwrap_or("").to_string();
        if status == "completed" || status == "failed" {
            return (status, info, start.elapsed());
        }
        assert!(
            Instant::now() < deadline,
            "migration still {status}: {info}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Sets `tls-creds`/`tls-hostname` (empty strings: plaintext) and no bandwidth limit.
async fn set_tls(source: &Qemu, creds: &str, hostname: &str) {
    source
        .connect()
        .await
        .migrate_set_parameters(json!({
            "tls-creds": creds,
            "tls-hostname": hostname,
            "max-bandwidth": 100u64 << 30,
        }))
        .await
        .expect("migrate-set-parameters");
}

async fn incoming_status(dest: &Qemu) -> Value {
    dest.connect()
        .await
        .execute_raw("query-migrate", None)
        .await
        .expect("query-migrate on the destination")
}

/// Waits until the destination's incoming migration is `want` (panics if it fails).
async fn wait_incoming(dest: &Qemu, want: &str) -> Value {
    let deadline = Instant::now() + T;
    loop {
        let incoming = incoming_status(dest).await;
        if incoming["status"] == want {
            return incoming;
        }
        assert_ne!(incoming["status"], "failed", "destination: {incoming}");
        assert!(Instant::now() < deadline, "destination: {incoming}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

struct Relay {
    listen: String,
    control: PathBuf,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), colo_relay::RelayError>>,
}

async fn relay(dir: &Path, name: &str, target: &Path, tls: Option<ControlTls>) -> Relay {
    let listen = dir.join(format!("{name}-in.sock"));
    let control = dir.join(format!("{name}-control.sock"));
    let cfg = RelayConfig {
        listen: Address::unix(&listen),
        target: Address::unix(target),
        control: control.clone(),
        migration_tls: tls,
        ..RelayConfig::default()
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(colo_relay::run(cfg, shutdown.clone()));
    let deadline = Instant::now() + T;
    while query_status(&Address::unix(&control)).await.is_err() {
        assert!(Instant::now() < deadline, "the relay did not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Relay {
        listen: format!("unix:{}", listen.display()),
        control,
        shutdown,
        task,
    }
}

impl Relay {
    async fn refused(&self) -> u64 {
        query_status(&Address::unix(&self.control))
            .await
            .expect("relay status")
            .refused_migration_channels
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(T, self.task)
            .await
            .expect("the relay stops")
            .expect("relay task")
            .expect("relay run");
    }
}

/// The pair's keys under `dir/sub`: a CA and the identities of `hosta` (the primary host)
/// and `hostb` (the secondary host, the relay's).
fn pair_keys(dir: &Path, sub: &str) -> Written {
    let names = ["hosta".to_string(), "hostb".to_string()];
    create_pair(&dir.join(sub), &names, Validity::days(30)).unwrap()
}

/// The relay on `hostb` with mutual TLS for `hosta` only, forwarding to `incoming`.
async fn tls_relay(dir: &Path, keys: &Written, incoming: &Path) -> Relay {
    let tls = ControlTls {
        dir: keys.host_dirs[1].clone(),
        peer: "hosta".into(),
    };
    relay(dir, "relay", incoming, Some(tls)).await
}

/// Waits until the relay has counted `n` refusals (it counts after the failed handshake,
/// which may end after QEMU has reported the migration failed).
async fn await_refused(relay: &Relay, n: u64) {
    let deadline = Instant::now() + T;
    loop {
        let got = relay.refused().await;
        if got == n {
            return;
        }
        assert!(got < n, "refused {got}, expected {n}");
        assert!(Instant::now() < deadline, "refused {got}, expected {n}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Plaintext, the secondary host's own identity, a host of another CA, and a primary that
/// expects another server name are all refused (counted, the secondary QEMU never sees a
/// byte: its one incoming migration is still free); then the primary host's identity
/// migrates through the relay and the migration completes on both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "tier qemu: needs the patched QEMU of integration/setup.sh; select with --include-ignored (integration/test.sh does)"]
async fn qemu_migrates_through_the_relay_over_mutual_tls_and_strangers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pair = pair_keys(dir.path(), "pki");
    let other = pair_keys(dir.path(), "other");
    let (hosta, hostb) = (&pair.host_dirs[0], &pair.host_dirs[1]);

    let incoming = dir.path().join("secondary-incoming.sock");
    let dest = guest(
        16,
        None,
        &["-incoming".into(), format!("unix:{}", incoming.display())],
    )
    .await;
    let mut extra = Vec::new();
    extra.extend(tls_object("tls-a", hosta));
    extra.extend(tls_object("tls-b", hostb));
    extra.extend(tls_object("tls-other", &other.host_dirs[0]));
    let source = guest(16, None, &extra).await;
    // With the return path the primary waits for the secondary's answer, so a migration the
    // relay refuses fails visibly (without it, a small guest's whole stream fits in the
    // socket's buffer and the primary reports completed).
    source
        .connect()
        .await
        .migrate_set_capabilities(&[("return-path", true)])
        .await
        .expect("return-path");
    let relay = relay(
        dir.path(),
        "relay",
        &incoming,
        Some(ControlTls {
            dir: hostb.clone(),
            peer: "hosta".into(),
        }),
    )
    .await;

    let attempts = [
        ("plaintext", "", ""),
        ("the secondary host's own identity", "tls-b", "hostb"),
        ("hosta of another CA", "tls-other", "hostb"),
        // The relay's certificate is for hostb: QEMU itself refuses it (and the relay counts
        // the aborted handshake).
        ("a primary that expects another server", "tls-a", "hostc"),
    ];
    for (n, (what, creds, hostname)) in attempts.iter().enumerate() {
        set_tls(&source, creds, hostname).await;
        let (status, info, _) = migrate(&source, &relay.listen).await;
        assert_eq!(status, "failed", "{what}: {info}");
        await_refused(&relay, n as u64 + 1).await;
        let incoming = incoming_status(&dest).await;
        // `setup`: still waiting for its one incoming connection.
        assert_eq!(
            incoming["status"], "setup",
            "{what} reached the secondary: {incoming}"
        );
    }

    set_tls(&source, "tls-a", "hostb").await;
    let (status, info, _) = migrate(&source, &relay.listen).await;
    assert_eq!(status, "completed", "{info}");
    wait_incoming(&dest, "completed").await;
    assert_eq!(relay.refused().await, attempts.len() as u64);
    relay.stop().await;
}

/// The cost of TLS on a checkpoint-free migration: the same 256 MiB of random RAM migrated
/// through the relay in plaintext and over TLS, alternating in one run, into fresh
/// destinations. Prints the times and the ratio of the medians; asserts only that every
/// migration completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "tier qemu: needs the patched QEMU of integration/setup.sh; select with --include-ignored (integration/test.sh does)"]
async fn migration_time_with_and_without_tls() {
    const MIB: u64 = 256;
    let dir = tempfile::tempdir().unwrap();
    let pair = pair_keys(dir.path(), "pki");
    let ram = dir.path().join("ram.img");
    // Incompressible and not zero: every page crosses in full.
    let mut bytes = vec![0u8; (MIB << 20) as usize];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in bytes.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(&ram, &bytes).unwrap();
    drop(bytes);

    let mut times = Vec::new();
    // Round 0 warms the page cache and the allocator up and is not counted; then the two
    // modes alternate, so that a change in the machine's load hits both.
    let rounds = [false, false, true, false, true, false, true, false, true];
    for (round, tls) in rounds.into_iter().enumerate() {
        let incoming = dir.path().join(format!("incoming-{round}.sock"));
        let dest = guest(
            MIB,
            None,
            &["-incoming".into(), format!("unix:{}", incoming.display())],
        )
        .await;
        let source = guest(MIB, Some(&ram), &tls_object("tls-a", &pair.host_dirs[0])).await;
        let relay = relay(
            dir.path(),
            &format!("relay-{round}"),
            &incoming,
            tls.then(|| ControlTls {
                dir: pair.host_dirs[1].clone(),
                peer: "hosta".into(),
            }),
        )
        .await;
        if tls {
            set_tls(&source, "tls-a", "hostb").await;
        } else {
            set_tls(&source, "", "").await;
        }
        let started = Instant::now();
        let (status, info, _) = migrate(&source, &relay.listen).await;
        assert_eq!(status, "completed", "tls={tls}: {info}");
        // The primary is done once its last byte is in its socket; the relay may still be
        // forwarding (and decrypting) the tail. The migration ends when the secondary has
        // loaded it.
        let incoming = wait_incoming(&dest, "completed").await;
        let took = started.elapsed();
        eprintln!(
            "migration of {MIB} MiB through the relay, tls={tls}: {took:?} until the secondary \
             loaded it (the primary's total-time {} ms; the secondary: {})",
            info["total-time"], incoming["status"]
        );
        if round > 0 {
            times.push((tls, took));
        }
        relay.stop().await;
        drop((source, dest));
    }
    let median = |tls: bool| {
        let mut v: Vec<f64> = times
            .iter()
            .filter(|t| t.0 == tls)
            .map(|t| t.1.as_secs_f64())
            .collect();
        v.sort_by(f64::total_cmp);
        (v[(v.len() - 1) / 2] + v[v.len() / 2]) / 2.0
    };
    assert_eq!(times.len(), rounds.len() - 1);
    eprintln!(
        "migration time with TLS / without: {:.2}x (medians of 4: {:.3} s / {:.3} s)",
        median(true) / median(false),
        median(true),
        median(false)
    );
}

/// A copy of the identity directory `host` whose `ca-cert.pem` also holds the CA of `ca_dir`:
/// a host of another CA that trusts the pair's CA as well, so that it completes its side of the
/// handshake with the pair's servers and presents its own certificate.
fn trusting_both(host: &Path, ca_dir: &Path, out: &Path) -> PathBuf {
    std::fs::create_dir(out).unwrap();
    for file in colo_tls::IDENTITY_FILES {
        // `copy` keeps the keys' 0600.
        std::fs::copy(host.join(file), out.join(file)).unwrap();
    }
    let mut cas = std::fs::read(host.join(colo_tls::CA_CERT)).unwrap();
    cas.extend(std::fs::read(ca_dir.join("ca-cert.pem")).unwrap());
    std::fs::write(out.join(colo_tls::CA_CERT), cas).unwrap();
    out.to_path_buf()
}

/// The same rules with rustls clients and a fake secondary (no QEMU needed): plaintext, the
/// secondary host's own certificate and another CA's (also one that trusts the pair's CA) are
/// refused and counted before the secondary is connected; the primary host's certificate gets
/// a session whose stream reaches the secondary decrypted, and whose return path comes back
/// through the same TLS session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_primary_hosts_certificate_reaches_the_secondary() {
    use colo_relay::QEVM_MAGIC;
    use colo_tls::{DEFAULT_HANDSHAKE_TIMEOUT, HostIdentity, PeerConnector};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{UnixListener, UnixStream};

    let dir = tempfile::tempdir().unwrap();
    let pair = pair_keys(dir.path(), "pki");
    let other = pair_keys(dir.path(), "other");
    let incoming = dir.path().join("secondary-incoming.sock");
    let secondary = UnixListener::bind(&incoming).unwrap();
    let relay = tls_relay(dir.path(), &pair, &incoming).await;
    let relay_sock = dir.path().join("relay-in.sock");
    // Sees every event the relay publishes from here on.
    let mut monitor =
        colo_control::client::Subscriber::connect(Address::unix(&relay.control), "monitor", false)
            .await
            .unwrap();
    let magic = QEVM_MAGIC.to_be_bytes();

    // Plaintext: closed by the relay without an answer.
    let mut plain = UnixStream::connect(&relay_sock).await.unwrap();
    plain.write_all(&magic).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(T, plain.read(&mut buf)).await.unwrap();
    assert!(
        matches!(n, Ok(0) | Err(_)) || buf[0] == 0x15,
        "plaintext got a session: {:?}",
        &buf[..]
    );
    await_refused(&relay, 1).await;
    // The wrong identities fail the handshake: the secondary host's own, hosta of another CA,
    // and hosta of another CA that trusts the pair's CA too (so it accepts the relay's
    // certificate and shows its own: the relay itself must refuse it).
    let trusting = trusting_both(&other.host_dirs[0], &pair.ca_dir, &dir.path().join("mixed"));
    for (n, identity) in [&pair.host_dirs[1], &other.host_dirs[0], &trusting]
        .into_iter()
        .enumerate()
    {
        let id = HostIdentity::load(identity).unwrap();
        let tls = PeerConnector::new(&id, "hostb", DEFAULT_HANDSHAKE_TIMEOUT).unwrap();
        let io = UnixStream::connect(&relay_sock).await.unwrap();
        // TLS 1.3: the client's handshake may finish before the server's verdict arrives,
        // which then fails the first read.
        match tls.connect(io).await {
            Ok((mut s, _)) => {
                let _ = s.write_all(&magic).await;
                let got = tokio::time::timeout(T, s.read(&mut buf)).await.unwrap();
                assert!(
                    matches!(got, Ok(0) | Err(_)),
                    "{} was served",
                    identity.display()
                );
            }
            // The client that trusts the pair's CA accepts the relay's certificate: if its
            // handshake fails, it is the relay that refused.
            Err(e) if identity == &trusting => assert!(
                !e.to_string().contains("invalid peer certificate"),
                "the client, not the relay, refused: {e}"
            ),
            Err(_) => {}
        }
        await_refused(&relay, n as u64 + 2).await;
    }

    // Nothing was published for the refused connections: the operator's failover (only an
    // announcement to subscribers), as a marker, is the first event.
    colo_control::client::notify_failover(&relay.control, colo_types::Role::Primary)
        .await
        .unwrap();
    let ev = monitor.next_event_timeout(T).await.unwrap().unwrap();
    assert_eq!(
        (ev.event, ev.seq),
        (colo_control::protocol::EventKind::Failover, 1),
        "an event before the marker: {ev:?}"
    );

    // The primary host: its stream reaches the secondary decrypted, the answer comes back.
    let hosta = HostIdentity::load(&pair.host_dirs[0]).unwrap();
    let tls = PeerConnector::new(&hosta, "hostb", DEFAULT_HANDSHAKE_TIMEOUT).unwrap();
    let io = UnixStream::connect(&relay_sock).await.unwrap();
    let (mut primary, peer) = tls.connect(io).await.unwrap();
    assert_eq!(peer, "hostb");
    primary.write_all(&magic).await.unwrap();
    primary.write_all(b"ram pages").await.unwrap();
    primary.flush().await.unwrap();
    // The first connection the secondary ever sees is this one.
    let (mut sec, _) = tokio::time::timeout(T, secondary.accept())
        .await
        .unwrap()
        .unwrap();
    let mut got = [0u8; 13];
    tokio::time::timeout(T, sec.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got[..4], &magic);
    assert_eq!(&got[4..], b"ram pages");
    sec.write_all(b"return path").await.unwrap();
    let mut back = [0u8; 11];
    tokio::time::timeout(T, primary.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"return path");
    let st = query_status(&Address::unix(&relay.control)).await.unwrap();
    assert!(st.main_channel_connected);
    assert_eq!(st.refused_migration_channels, 4);
    drop((primary, sec));
    relay.stop().await;
}

/// Strangers that connect first and stall in the TLS handshake do not keep the real primary
/// out: a handshake does not hold the session slot, so the primary, connecting after them,
/// authenticates, takes the session and reaches the secondary (the first connection it ever
/// sees). While the session runs, a new connection is refused unread; beyond
/// `MAX_PENDING_HANDSHAKES` handshakes at once, one more is refused at once; the stalled ones
/// are counted as refused when they give up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_stalling_their_handshake_do_not_keep_the_primary_out() {
    use colo_relay::{MAX_PENDING_HANDSHAKES, QEVM_MAGIC};
    use colo_tls::{DEFAULT_HANDSHAKE_TIMEOUT, HostIdentity, PeerConnector};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{UnixListener, UnixStream};

    let dir = tempfile::tempdir().unwrap();
    let pair = pair_keys(dir.path(), "pki");
    let incoming = dir.path().join("secondary-incoming.sock");
    let secondary = UnixListener::bind(&incoming).unwrap();
    let relay = tls_relay(dir.path(), &pair, &incoming).await;
    let relay_sock = dir.path().join("relay-in.sock");

    // Every handshake place but one taken by silent strangers, who connected first (the
    // relay accepts in order: without TLS, the first of them would hold the session slot).
    let mut silent = Vec::new();
    for _ in 0..MAX_PENDING_HANDSHAKES - 1 {
        silent.push(UnixStream::connect(&relay_sock).await.unwrap());
    }
    assert_eq!(relay.refused().await, 0);

    // The primary host, after them: authenticated, served.
    let hosta = HostIdentity::load(&pair.host_dirs[0]).unwrap();
    let tls = PeerConnector::new(&hosta, "hostb", DEFAULT_HANDSHAKE_TIMEOUT).unwrap();
    let io = UnixStream::connect(&relay_sock).await.unwrap();
    let (mut primary, _) = tls.connect(io).await.unwrap();
    primary.write_all(&QEVM_MAGIC.to_be_bytes()).await.unwrap();
    primary.write_all(b"ram").await.unwrap();
    primary.flush().await.unwrap();
    let (mut sec, _) = tokio::time::timeout(T, secondary.accept())
        .await
        .unwrap()
        .unwrap();
    let mut got = [0u8; 7];
    tokio::time::timeout(T, sec.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got[..4], &QEVM_MAGIC.to_be_bytes());
    assert_eq!(&got[4..], b"ram");
    let st = query_status(&Address::unix(&relay.control)).await.unwrap();
    assert!(st.main_channel_connected);
    assert_eq!(st.refused_migration_channels, 0);

    // While the session runs: refused unread.
    let mut late = UnixStream::connect(&relay_sock).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(T, late.read(&mut buf)).await.unwrap();
    assert!(matches!(n, Ok(0) | Err(_)), "served during a session");
    await_refused(&relay, 1).await;

    // The stalled ones give up: each a failed handshake, counted; the session is untouched.
    drop(silent);
    await_refused(&relay, MAX_PENDING_HANDSHAKES as u64).await;
    sec.write_all(b"still").await.unwrap();
    let mut back = [0u8; 5];
    tokio::time::timeout(T, primary.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"still");
    drop((primary, sec));
    relay.stop().await;
}

/// With no session, the handshakes in progress are bounded: one connection beyond
/// `MAX_PENDING_HANDSHAKES` is refused at once (and the secondary is never connected).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_in_progress_are_bounded() {
    use colo_relay::MAX_PENDING_HANDSHAKES;
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixStream;

    let dir = tempfile::tempdir().unwrap();
    let pair = pair_keys(dir.path(), "pki");
    let incoming = dir.path().join("secondary-incoming.sock");
    let secondary = std::os::unix::net::UnixListener::bind(&incoming).unwrap();
    secondary.set_nonblocking(true).unwrap();
    let relay = tls_relay(dir.path(), &pair, &incoming).await;
    let relay_sock = dir.path().join("relay-in.sock");
    let mut silent = Vec::new();
    for _ in 0..MAX_PENDING_HANDSHAKES {
        silent.push(UnixStream::connect(&relay_sock).await.unwrap());
    }
    let mut extra = UnixStream::connect(&relay_sock).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(T, extra.read(&mut buf)).await.unwrap();
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "one beyond the bound was served"
    );
    await_refused(&relay, 1).await;
    drop(silent);
    await_refused(&relay, 1 + MAX_PENDING_HANDSHAKES as u64).await;
    let st = query_status(&Address::unix(&relay.control)).await.unwrap();
    assert!(!st.main_channel_connected);
    assert_eq!(
        secondary.accept().unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock,
        "the secondary was connected for a refused connection"
    );
    relay.stop().await;
}

/// A COLO session over TLS (fake QEMUs, rustls client): the relay parses the decrypted
/// return path, runs every barrier with its sync subscriber, and each COLO message reaches the
/// primary through the TLS session on its own, with no later write to push it out (the
/// primary would otherwise wait for it forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_run_their_barriers_over_a_tls_session() {
    use colo_control::client::Subscriber;
    use colo_control::protocol::EventKind;
    use colo_relay::{ColoMessage, QEVM_MAGIC};
    use colo_tls::{DEFAULT_HANDSHAKE_TIMEOUT, HostIdentity, PeerConnector};
    use common::{CHECKPOINT, End, Rd, Wr, acker, encode, within};
    use tokio::io::AsyncWriteExt;
    use tokio::net::{UnixListener, UnixStream};

    let dir = tempfile::tempdir().unwrap();
    let pair = pair_keys(dir.path(), "pki");
    let incoming = dir.path().join("secondary-incoming.sock");
    let secondary = UnixListener::bind(&incoming).unwrap();
    let relay = tls_relay(dir.path(), &pair, &incoming).await;
    let sub = Subscriber::connect(Address::unix(&relay.control), "colo-blockd", true)
        .await
        .unwrap();
    let events = acker(sub, Duration::ZERO);

    let hosta = HostIdentity::load(&pair.host_dirs[0]).unwrap();
    let tls = PeerConnector::new(&hosta, "hostb", DEFAULT_HANDSHAKE_TIMEOUT).unwrap();
    let io = UnixStream::connect(dir.path().join("relay-in.sock"))
        .await
        .unwrap();
    let (stream, _) = tls.connect(io).await.unwrap();
    let (rd, wr) = tokio::io::split(stream);
    let mut primary = End::new((Box::new(rd) as Rd, Box::new(wr) as Wr));
    primary.send(&QEVM_MAGIC.to_be_bytes()).await;
    within(primary.wr.flush()).await.unwrap();
    let (sec, _) = within(secondary.accept()).await.unwrap();
    let (r, w) = sec.into_split();
    let mut secondary = End::new((Box::new(r) as Rd, Box::new(w) as Wr));
    assert_eq!(secondary.recv_exact(4).await, QEVM_MAGIC.to_be_bytes());

    secondary.send_msgs(&[ColoMessage::CheckpointReady]).await;
    let ready = encode(&[ColoMessage::CheckpointReady]);
    assert_eq!(primary.recv_exact(ready.len()).await, ready);
    const CHECKPOINTS: usize = 5;
    for round in 0..CHECKPOINTS {
        // The primary's side: a request and some RAM, forwarded raw.
        let ram = common::pseudo_random(100_000, round as u64 + 1);
        primary.send_msgs(&[ColoMessage::CheckpointRequest]).await;
        primary.send(&ram).await;
        within(primary.wr.flush()).await.unwrap();
        let request = encode(&[ColoMessage::CheckpointRequest]);
        assert_eq!(secondary.recv_exact(request.len()).await, request);
        assert_eq!(secondary.recv_exact(ram.len()).await, ram);
        // The secondary's answers, one at a time: each must arrive on its own.
        for msg in CHECKPOINT {
            secondary.send_msgs(&[msg]).await;
            let wire = encode(&[msg]);
            assert_eq!(primary.recv_exact(wire.len()).await, wire, "{msg}");
        }
    }
    let st = query_status(&Address::unix(&relay.control)).await.unwrap();
    assert_eq!(st.checkpoints, CHECKPOINTS as u64);
    assert_eq!(st.barrier_timeouts, 0);
    drop((primary, secondary));
    relay.stop().await;
    let seen: Vec<EventKind> = within(events)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event)
        .collect();
    let barriers = |kind| seen.iter().filter(|k| **k == kind).count();
    assert_eq!(barriers(EventKind::ColoStarted), 1, "{seen:?}");
    assert_eq!(barriers(EventKind::SvmEpochClosed), CHECKPOINTS, "{seen:?}");
    assert_eq!(
        barriers(EventKind::CheckpointAdopted),
        CHECKPOINTS,
        "{seen:?}"
    );
    assert_eq!(
        barriers(EventKind::CheckpointComplete),
        CHECKPOINTS,
        "{seen:?}"
    );
}
