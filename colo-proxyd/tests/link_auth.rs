//! Who may be the link's peer (`docs/security.md`), against the real `colo-proxyd` binary:
//! both daemons as processes, QEMU's chardevs, the primary's QMP monitor and the relay faked
//! (`common`).
//!
//! While the link is live, strangers connect to the primary's link port: a bare connect, one
//! that says nothing, garbage, hellos of the wrong role or version, a good secondary hello,
//! more at once than the pending bound; with TLS also a plaintext hello, a TLS client without a
//! certificate, one with a certificate of another CA, the primary's own identity posing as the
//! secondary, and even the secondary's own identity while its link is healthy.
//! Each is refused (counted by reason), the link stays up throughout, the secondary never
//! reconnects, and every frame sent into `mirror0` during the attacks reaches `red0`, in order.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use colo_proxyd::daemon::link::{LINK_VERSION, LinkMessage, encode};
use colo_proxyd::daemon::peer::MAX_PENDING;
use colo_tls::pki::{Validity, create_pair};
use colo_types::Role;
use common::process::{Daemon, free_addr, metric};
use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const EPOCH: u64 = 1;
const LINK_UP: &str = "colo_proxyd_connection_up{port=\"link\"} 1";

/// The primary daemon and the fake QEMU's sockets it uses here.
struct Primary {
    daemon: Daemon,
    compare0: Chardev,
    mirror0: Chardev,
    compare_out: Chardev,
    link: String,
    metrics: String,
}

async fn start_primary(dir: &Path, control: &Path, extra: &[String]) -> Primary {
    let ports = PrimaryPorts::bind().await;
    let link = free_addr();
    let metrics = free_addr();
    let mut args = ports.primary_args(&link, control, &dir.join("qmp.sock"), &metrics);
    args.extend_from_slice(extra);
    let daemon = Daemon::spawn("primary", &args);
    Primary {
        daemon,
        compare0: Chardev::accept(&ports.compare0).await,
        mirror0: Chardev::accept(&ports.mirror0).await,
        compare_out: Chardev::accept(&ports.compare_out).await,
        link,
        metrics,
    }
}

struct Secondary {
    daemon: Daemon,
    red0: Chardev,
    red1: Chardev,
    metrics: String,
}

async fn start_secondary(control: &Path, primary_link: &str, extra: &[String]) -> Secondary {
    let red0 = free_addr();
    let red1 = free_addr();
    let metrics = free_addr();
    let mut args = vec![
        "secondary".to_string(),
        "--svm-input-listen".into(),
        red0.clone(),
        "--svm-output-listen".into(),
        red1.clone(),
        "--primary-link".into(),
        primary_link.to_owned(),
        "--control".into(),
        control.display().to_string(),
        "--metrics".into(),
        metrics.clone(),
    ];
    args.extend_from_slice(extra);
    let daemon = Daemon::spawn("secondary", &args);
    let deadline = std::time::Instant::now() + PATIENCE;
    while TcpStream::connect(&metrics).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the secondary never listened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Secondary {
        daemon,
        red0: Chardev::connect(&red0).await,
        red1: Chardev::connect(&red1).await,
        metrics,
    }
}

/// `--tls-dir DIR/host --tls-peer peer`.
fn tls_args(pki: &Path, host: &str, peer: &str) -> Vec<String> {
    vec![
        "--tls-dir".into(),
        pki.join(host).display().to_string(),
        "--tls-peer".into(),
        peer.into(),
    ]
}

fn hello(role: Role, version: u16) -> Vec<u8> {
    let mut out = Vec::new();
    encode(&LinkMessage::Hello { version, role }, &mut out).unwrap();
    out
}

/// A client packet into the PVM, numbered: mirrored to the SVM unchanged.
fn client_frame(n: u32) -> Vec<u8> {
    tcp(
        false,
        1 + 100 * n,
        1,
        0x18,
        format!("mirrored {n}").as_bytes(),
    )
}

/// The pair, both daemons linked, comparing at [`EPOCH`].
struct Pair {
    primary: Primary,
    secondary: Secondary,
    _hub: colo_control::hub::ControlHub,
    _qmp: FakeMonitor,
}

async fn pair(dir: &Path, primary_extra: &[String], secondary_extra: &[String]) -> Pair {
    let (hub, control) = hub_in_colo(dir, EPOCH);
    let qmp = fake_qmp(
        &dir.join("qmp.sock"),
        &["compare0", "compare_out", "mirror0"],
    );
    let primary = start_primary(dir, &control, primary_extra).await;
    let secondary = start_secondary(&control, &primary.link, secondary_extra).await;
    wait_subscribers(&hub, 2).await;
    wait_metric(&primary.metrics, "colo_proxyd_comparing 1").await;
    wait_metric(&secondary.metrics, &format!("colo_proxyd_epoch {EPOCH}")).await;
    wait_metric(&primary.metrics, LINK_UP).await;
    wait_metric(&secondary.metrics, LINK_UP).await;
    Pair {
        primary,
        secondary,
        _hub: hub,
        _qmp: qmp,
    }
}

impl Pair {
    /// The link carries both ways: a mirrored frame reaches red0, and the SVM's identical
    /// output releases the PVM's.
    async fn link_works(&mut self, n: u32) {
        let frame = client_frame(n);
        self.primary.mirror0.send(&frame).await;
        assert_eq!(self.secondary.red0.recv(PATIENCE).await, Some(frame));
        let out = tcp(true, 5000 + 100 * n, 1, 0x18, b"released after comparison");
        self.primary.compare0.send(&out).await;
        self.secondary.red1.send(&out).await;
        assert_eq!(self.primary.compare_out.recv(PATIENCE).await, Some(out));
    }

    /// Runs `attacks` one after the other while frames go into mirror0 before, between and
    /// after them; checks after each that the link is still up, then that every frame reached
    /// red0 in order and that neither daemon's link was replaced or reconnected.
    async fn under_attack(&mut self, attacks: Vec<Attack>) {
        // Its log line may trail the metric: wait for it before counting.
        self.secondary.daemon.wait_line(&["link: connected"]).await;
        let connected_before = self.secondary.daemon.count_lines(&["link: connected"]);
        self.primary.daemon.wait_line(&["link: connected"]).await;
        let primary_connected_before = self.primary.daemon.count_lines(&["link: connected"]);
        let mut sent = Vec::new();
        let mut n = 1000;
        for attack in attacks {
            for _ in 0..5 {
                let frame = client_frame(n);
                n += 1;
                self.primary.mirror0.send(&frame).await;
                sent.push(frame);
            }
            let what = attack.what;
            let refused = format!(
                "colo_proxyd_link_refused_total{{reason=\"{}\"}}",
                attack.reason
            );
            let before = metric(&self.primary.metrics, &refused).await;
            (attack.run)(self.primary.link.clone()).await;
            let count = wait_above(&self.primary.metrics, &refused, before, what).await;
            assert!(
                scrape(&self.primary.metrics)
                    .await
                    .lines()
                    .any(|l| l == LINK_UP),
                "{what}: the link went down"
            );
            eprintln!("{what}: refused ({refused} = {count}), the link is up");
        }
        for _ in 0..5 {
            let frame = client_frame(n);
            n += 1;
            self.primary.mirror0.send(&frame).await;
            sent.push(frame);
        }
        let received = self.secondary.red0.recv_n(sent.len()).await;
        assert_eq!(received, sent, "a mirrored frame was lost or reordered");
        assert_eq!(
            self.primary.daemon.count_lines(&["link: connected"]),
            primary_connected_before,
            "another connection became the link"
        );
        assert_eq!(
            self.secondary.daemon.count_lines(&["link: connected"]),
            connected_before,
            "the secondary reconnected"
        );
        wait_metric(&self.primary.metrics, "colo_proxyd_link_pending 0").await;
        wait_metric(&self.secondary.metrics, LINK_UP).await;
    }
}

/// Waits until the counter `name` exceeds `before`; its value.
async fn wait_above(metrics: &str, name: &str, before: u64, what: &str) -> u64 {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let now = metric(metrics, name).await;
        if now > before {
            return now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: never counted in {name}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

type AttackFn = Box<dyn FnOnce(String) -> std::pin::Pin<Box<dyn Future<Output = ()>>>>;

/// One stranger's attempt on the link port; `reason` is the label it must be refused with.
struct Attack {
    what: &'static str,
    reason: &'static str,
    run: AttackFn,
}

fn attack<F, Fut>(what: &'static str, reason: &'static str, run: F) -> Attack
where
    F: FnOnce(String) -> Fut + 'static,
    Fut: Future<Output = ()> + 'static,
{
    Attack {
        what,
        reason,
        run: Box::new(move |link| Box::pin(run(link))),
    }
}

/// Reads what the primary sends until it closes; the bytes.
async fn until_closed(stream: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest))
        .await
        .expect("the primary closes the stranger's connection");
    rest
}

/// Says `bytes` on a fresh plaintext connection; waits until the primary closed it.
async fn say(link: String, bytes: Vec<u8>) {
    let mut raw = TcpStream::connect(&link).await.unwrap();
    let _ = raw.write_all(&bytes).await;
    until_closed(&mut raw).await;
}

/// The strangers that fail without TLS too.
fn plaintext_attacks() -> Vec<Attack> {
    vec![
        attack(
            "a bare connect, closed at once",
            "closed",
            |link| async move {
                drop(TcpStream::connect(&link).await.unwrap());
            },
        ),
        attack(
            "a stranger with a good secondary hello",
            "link-busy",
            |link| async move {
                let mut raw = TcpStream::connect(&link).await.unwrap();
                raw.write_all(&hello(Role::Secondary, LINK_VERSION))
                    .await
                    .unwrap();
                let heard = until_closed(&mut raw).await;
                // The primary's hello, then nothing: no frame, until it closes.
                assert_eq!(heard, hello(Role::Primary, LINK_VERSION));
            },
        ),
        attack("a hello of the primary's role", "hello", |link| {
            say(link, hello(Role::Primary, LINK_VERSION))
        }),
        attack("a hello of link version 1", "hello", |link| {
            say(link, hello(Role::Secondary, 1))
        }),
        attack("not colo-proxyd at all", "hello", |link| {
            say(link, b"GET / HTTP/1.1\r\n\r\n".to_vec())
        }),
        attack(
            "more silent connections than the pending bound",
            "too-many-pending",
            |link| async move {
                let mut silent = Vec::new();
                for _ in 0..MAX_PENDING + 2 {
                    silent.push(TcpStream::connect(&link).await.unwrap());
                }
                // The ones beyond the bound are closed at once; the others at the hello's
                // bound, all while the link carries on.
                for mut s in silent {
                    until_closed(&mut s).await;
                }
            },
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_never_disturb_a_live_plaintext_link() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = pair(dir.path(), &[], &[]).await;
    p.primary
        .daemon
        .wait_line(&["link: plaintext and unauthenticated"])
        .await;
    wait_metric(&p.primary.metrics, "colo_proxyd_link_unauthenticated 1").await;
    wait_metric(&p.secondary.metrics, "colo_proxyd_link_unauthenticated 1").await;
    p.link_works(1).await;
    p.under_attack(plaintext_attacks()).await;
    // A silent connection ends at the hello's bound, as a timeout.
    assert!(
        metric(
            &p.primary.metrics,
            "colo_proxyd_link_refused_total{reason=\"timeout\"}"
        )
        .await
            >= 1
    );
    p.link_works(2).await;
}

/// A TLS client config trusting the pair's CA at `ca`, presenting `identity` (a cert and key
/// file pair) or nothing.
#[allow(deprecated)] // the ring provider, as colo-tls (docs/dependencies.md)
fn tls_client(ca: &Path, identity: Option<(&Path, &Path)>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(ca).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    Arc::new(match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_file(cert).unwrap()],
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
    })
}

/// A TLS client that completes its side of the handshake (TLS 1.3 does before the server
/// checked the client's certificate), says hello as the secondary, and must hear nothing but
/// the close: no hello, no frame.
async fn tls_stranger(link: String, config: Arc<rustls::ClientConfig>) {
    let tcp = TcpStream::connect(&link).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = ServerName::try_from("hosta").unwrap();
    let Ok(mut tls) = connector.connect(name, tcp).await else {
        return; // refused within the handshake already
    };
    let _ = tls.write_all(&hello(Role::Secondary, LINK_VERSION)).await;
    let _ = tls.flush().await;
    let heard = read_until_error(&mut tls).await;
    assert!(heard.is_empty(), "the primary sent a stranger {heard:?}");
}

/// Everything readable until EOF or an error (a TLS alert).
async fn read_until_error(stream: &mut (impl AsyncRead + AsyncWrite + Unpin)) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await {
            Err(_) => panic!("the primary kept the stranger's connection open"),
            Ok(Ok(0) | Err(_)) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_only_the_named_peer_is_the_link() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    create_pair(&pki, &names(&["hosta", "hostb"]), Validity::days(1)).unwrap();
    let other = dir.path().join("other");
    create_pair(&other, &names(&["hostb"]), Validity::days(1)).unwrap();

    let mut p = pair(
        dir.path(),
        &tls_args(&pki, "hosta", "hostb"),
        &tls_args(&pki, "hostb", "hosta"),
    )
    .await;
    p.primary
        .daemon
        .wait_line(&["link: mutual TLS", "hostb"])
        .await;
    p.primary
        .daemon
        .wait_line(&["link: connected", "tls_peer=hostb"])
        .await;
    wait_metric(&p.primary.metrics, "colo_proxyd_link_unauthenticated 0").await;
    wait_metric(&p.secondary.metrics, "colo_proxyd_link_unauthenticated 0").await;
    // Frames through both ways, output released after comparison.
    p.link_works(1).await;

    let ca = pki.join("hosta/ca-cert.pem");
    let no_cert = tls_client(&ca, None);
    let other_ca = tls_client(
        &ca,
        Some((
            &other.join("hostb/client-cert.pem"),
            &other.join("hostb/client-key.pem"),
        )),
    );
    let own = tls_client(
        &ca,
        Some((
            &pki.join("hosta/client-cert.pem"),
            &pki.join("hosta/client-key.pem"),
        )),
    );
    let mut attacks = vec![
        attack("a plaintext hello as the secondary", "tls", |link| {
            say(link, hello(Role::Secondary, LINK_VERSION))
        }),
        attack("a TLS client without a certificate", "tls", move |link| {
            tls_stranger(link, no_cert)
        }),
        attack(
            "a certificate for hostb from another CA",
            "tls",
            move |link| tls_stranger(link, other_ca),
        ),
        attack(
            "the primary's own identity posing as the secondary",
            "tls",
            move |link| tls_stranger(link, own),
        ),
    ];
    let real = tls_client(
        &ca,
        Some((
            &pki.join("hostb/client-cert.pem"),
            &pki.join("hostb/client-key.pem"),
        )),
    );
    attacks.push(attack(
        "the secondary's own identity while its link is healthy",
        "link-busy",
        move |link| async move {
            let tcp = TcpStream::connect(&link).await.unwrap();
            let connector = tokio_rustls::TlsConnector::from(real);
            let name = ServerName::try_from("hosta").unwrap();
            let mut tls = connector.connect(name, tcp).await.unwrap();
            tls.write_all(&hello(Role::Secondary, LINK_VERSION))
                .await
                .unwrap();
            tls.flush().await.unwrap();
            let heard = read_until_error(&mut tls).await;
            assert_eq!(heard, hello(Role::Primary, LINK_VERSION));
        },
    ));
    attacks.extend(
        plaintext_attacks()
            .into_iter()
            .filter(|a| !matches!(a.reason, "hello" | "link-busy")),
    );
    p.under_attack(attacks).await;
    p.primary
        .daemon
        .wait_line(&["link: refused a connection", "TLS handshake failed"])
        .await;
    p.link_works(2).await;

    // The secondary replaced: the new one's authenticated connection waits while the old link
    // is healthy, and takes over when the old daemon is gone.
    let waiting = ["an authenticated new connection waits for the live link to end"];
    let waited_before = p.primary.daemon.count_lines(&waiting);
    let control = dir.path().join("control.sock");
    let first = std::mem::replace(
        &mut p.secondary,
        start_secondary(&control, &p.primary.link, &tls_args(&pki, "hostb", "hosta")).await,
    );
    let deadline = std::time::Instant::now() + PATIENCE;
    while p.primary.daemon.count_lines(&waiting) == waited_before {
        assert!(
            std::time::Instant::now() < deadline,
            "the new secondary never connected"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(first);
    wait_metric(&p.secondary.metrics, LINK_UP).await;
    wait_metric(&p.primary.metrics, LINK_UP).await;
    wait_metric(&p.secondary.metrics, &format!("colo_proxyd_epoch {EPOCH}")).await;
    p.link_works(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_secondary_refuses_a_primary_with_another_name_and_bad_tls_options_do_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    create_pair(
        &pki,
        &names(&["hosta", "hostb", "hostc"]),
        Validity::days(1),
    )
    .unwrap();
    let (hub, control) = hub_in_colo(dir.path(), EPOCH);
    let _qmp = fake_qmp(
        &dir.path().join("qmp.sock"),
        &["compare0", "compare_out", "mirror0"],
    );
    // hostc runs the primary; the secondary expects hosta there.
    let primary = start_primary(dir.path(), &control, &tls_args(&pki, "hostc", "hostb")).await;
    let secondary =
        start_secondary(&control, &primary.link, &tls_args(&pki, "hostb", "hosta")).await;
    wait_subscribers(&hub, 2).await;
    secondary
        .daemon
        .wait_line(&["link: closing the connection", "not valid for name"])
        .await;
    assert!(
        metric(
            &secondary.metrics,
            "colo_proxyd_link_refused_total{reason=\"tls\"}"
        )
        .await
            >= 1
    );
    assert_eq!(
        metric(&primary.metrics, "colo_proxyd_connection_up{port=\"link\"}").await,
        0
    );

    // A key readable by others, and --tls-dir without --tls-peer: configuration errors (2).
    let key = pki.join("hostb/client-key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    for (extra, says) in [
        (
            tls_args(&pki, "hostb", "hosta"),
            "client-key.pem: the key is readable by group or others",
        ),
        (
            vec!["--tls-dir".into(), pki.join("hosta").display().to_string()],
            "tls-peer",
        ),
        (tls_args(&pki, "hosta", "hosta"), "this host's own name"),
    ] {
        let mut args = vec![
            "secondary".to_string(),
            "--svm-input-listen".into(),
            free_addr(),
            "--svm-output-listen".into(),
            free_addr(),
            "--primary-link".into(),
            "127.0.0.1:9".into(),
            "--control".into(),
            control.display().to_string(),
        ];
        args.extend(extra);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_colo-proxyd"))
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(says), "{says:?} not in {stderr}");
    }
}
