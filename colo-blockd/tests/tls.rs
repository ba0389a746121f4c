//! NBD STARTTLS: a server with TLS requires it of every TCP client. A client that does not
//! start TLS hears only `NBD_REP_ERR_TLS_REQD` (or a closed socket for
//! `NBD_OPT_EXPORT_NAME`); a client without a certificate, with another CA's, or with a name
//! not allowed is refused in the TLS handshake. None of them reaches an export: the backend
//! records no operation and the image keeps every byte. The allowed peer reads and writes
//! through TLS; the Unix socket needs no TLS.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use colo_blockd::metrics::TlsRefusal;
use colo_blockd::proto::consts::{IHAVEOPT, NBD_MAGIC, OPTION_REPLY_MAGIC, cmd, opt, rep};
use colo_blockd::proto::handshake::OptionHeader;
use colo_blockd::proto::request::RequestHeader;
use colo_tls::{HostIdentity, PeerAcceptor, PeerConnector};
use common::raw::RawClient;
use common::{TestServer, file_bytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const MIB: usize = 1024 * 1024;
/// Only turns a hang into a failure; measures nothing.
const STUCK: Duration = Duration::from_secs(30);

/// A pair's identities (`secondary` serves, `primary` connects, `intruder` is of the same CA
/// but not allowed), a `stranger` of another CA with the primary's name, and `trusting`, the
/// stranger trusting the pair's CA too (so its client accepts the server's certificate and
/// presents its own: the server must refuse it).
struct Pki {
    _dir: tempfile::TempDir,
    root: PathBuf,
    stranger: PathBuf,
    trusting: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let hosts = ["secondary", "primary", "intruder"].map(String::from);
        colo_tls::pki::create_pair(dir.path(), &hosts, colo_tls::pki::Validity::days(30)).unwrap();
        let other = dir.path().join("other-ca");
        colo_tls::pki::create_pair(
            &other,
            &["primary".into()],
            colo_tls::pki::Validity::days(30),
        )
        .unwrap();
        let stranger = other.join("primary");
        let trusting = dir.path().join("trusting");
        std::fs::create_dir(&trusting).unwrap();
        for file in colo_tls::IDENTITY_FILES {
            // `copy` keeps the keys' 0600.
            std::fs::copy(stranger.join(file), trusting.join(file)).unwrap();
        }
        let mut cas = std::fs::read(stranger.join(colo_tls::CA_CERT)).unwrap();
        cas.extend(std::fs::read(dir.path().join("ca").join(colo_tls::CA_CERT)).unwrap());
        std::fs::write(trusting.join(colo_tls::CA_CERT), cas).unwrap();
        Pki {
            root: dir.path().to_path_buf(),
            stranger,
            trusting,
            _dir: dir,
        }
    }

    fn host(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn acceptor(&self) -> PeerAcceptor {
        let identity = HostIdentity::load(self.host("secondary")).unwrap();
        PeerAcceptor::new(&identity, &["primary".into()], Duration::from_secs(5)).unwrap()
    }

    /// Connects as the host whose identity is `dir`, to the server named `secondary`.
    fn connector(dir: &Path) -> PeerConnector {
        let identity = HostIdentity::load(dir).unwrap();
        PeerConnector::new(&identity, "secondary", Duration::from_secs(5)).unwrap()
    }
}

fn server(pki: &Pki) -> TestServer {
    TestServer::start_with(&[("export", 4 * MIB, false)], Some(pki.acceptor()))
}

fn original(offset: usize, len: usize) -> Vec<u8> {
    (offset..offset + len).map(|i| (i % 251) as u8).collect()
}

/// Nothing reached the export: no backend operation, every byte as it was.
fn assert_export_untouched(s: &TestServer) {
    assert_eq!(s.ops(0), vec![], "a refused client reached the backend");
    assert_eq!(file_bytes(&s.images[0], 0, 4 * MIB), original(0, 4 * MIB));
}

async fn read_n<S: AsyncRead + Unpin>(s: &mut S, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(STUCK, s.read_exact(&mut buf))
        .await
        .expect("server stuck")
        .unwrap();
    buf
}

/// The greeting, answered with fixed newstyle and no zeroes.
async fn greet<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    let g = read_n(s, 18).await;
    assert_eq!(&g[..8], &NBD_MAGIC.to_be_bytes());
    assert_eq!(&g[8..16], &IHAVEOPT.to_be_bytes());
    s.write_all(&3u32.to_be_bytes()).await.unwrap();
}

async fn send_option<S: AsyncWrite + Unpin>(s: &mut S, option: u32, data: &[u8]) {
    let h = OptionHeader {
        option,
        length: data.len() as u32,
    };
    s.write_all(&h.encode()).await.unwrap();
    s.write_all(data).await.unwrap();
}

/// (option, reply type, data)
async fn option_reply<S: AsyncRead + Unpin>(s: &mut S) -> (u32, u32, Vec<u8>) {
    let h = read_n(s, 20).await;
    assert_eq!(&h[..8], &OPTION_REPLY_MAGIC.to_be_bytes());
    let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    (option, kind, read_n(s, len as usize).await)
}

fn go_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

/// Whether the server closed (end of stream or reset), reading whatever it still sends.
async fn closed<S: AsyncRead + Unpin>(s: &mut S) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(STUCK, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// Greets and asks for TLS; the server's acknowledgement.
async fn starttls(s: &mut TcpStream) {
    greet(s).await;
    send_option(s, opt::STARTTLS, &[]).await;
    assert_eq!(option_reply(s).await, (opt::STARTTLS, rep::ACK, vec![]));
}

#[tokio::test]
async fn a_client_without_starttls_hears_only_tls_required_and_reaches_no_export() {
    let pki = Pki::new();
    let s = server(&pki);
    let mut c = TcpStream::connect(s.tcp).await.unwrap();
    greet(&mut c).await;
    for (option, data) in [
        (opt::LIST, vec![]),
        (opt::STRUCTURED_REPLY, vec![]),
        (opt::INFO, go_data("export")),
        (opt::GO, go_data("export")),
        (opt::GO, go_data("")),
        // Malformed data is refused for TLS too, before it is parsed.
        (opt::GO, vec![0xff; 3]),
        (opt::SET_META_CONTEXT, b"junk".to_vec()),
    ] {
        send_option(&mut c, option, &data).await;
        let (o, kind, _) = option_reply(&mut c).await;
        assert_eq!((o, kind), (option, rep::ERR_TLS_REQD), "option {option}");
    }
    // NBD_OPT_EXPORT_NAME has no error reply: the server closes.
    send_option(&mut c, opt::EXPORT_NAME, b"export").await;
    assert!(
        closed(&mut c).await,
        "EXPORT_NAME before STARTTLS must close"
    );
    assert_eq!(s.metrics.tls_refusals(TlsRefusal::NoStartTls), 1);

    // A second one that only says EXPORT_NAME: closed, counted.
    let mut c = TcpStream::connect(s.tcp).await.unwrap();
    greet(&mut c).await;
    send_option(&mut c, opt::EXPORT_NAME, b"").await;
    assert!(closed(&mut c).await);
    assert_eq!(s.metrics.tls_refusals(TlsRefusal::NoStartTls), 2);
    assert_eq!(s.metrics.tls_refusals(TlsRefusal::Handshake), 0);
    assert_export_untouched(&s);
}

#[tokio::test]
async fn abort_before_starttls_is_acknowledged() {
    let pki = Pki::new();
    let s = server(&pki);
    let mut c = TcpStream::connect(s.tcp).await.unwrap();
    greet(&mut c).await;
    send_option(&mut c, opt::ABORT, &[]).await;
    assert_eq!(option_reply(&mut c).await.1, rep::ACK);
    assert!(closed(&mut c).await);
    assert_eq!(s.metrics.tls_refusals(TlsRefusal::NoStartTls), 0);
    assert_export_untouched(&s);
}

#[tokio::test]
async fn the_allowed_peer_reads_and_writes_through_tls() {
    let pki = Pki::new();
    let s = server(&pki);
    let mut c = TcpStream::connect(s.tcp).await.unwrap();
    starttls(&mut c).await;
    let (mut t, peer) = Pki::connector(&pki.host("primary"))
        .connect(c)
        .await
        .unwrap();
    assert_eq!(peer, "secondary");
    // Haggling restarts inside TLS: a second STARTTLS is invalid, the rest is served.
    send_option(&mut t, opt::STARTTLS, &[]).await;
    assert_eq!(option_reply(&mut t).await.1, rep::ERR_INVALID);
    send_option(&mut t, opt::GO, &go_data("export")).await;
    loop {
        let (o, kind, _) = option_reply(&mut t).await;
        assert_eq!(o, opt::GO);
        match kind {
            rep::INFO => continue,
            rep::ACK => break,
            other => panic!("GO through TLS failed: {other:#x}"),
        }
    }
    let offset = 3 * MIB as u64 + 17;
    let payload = vec![0x5a; 70_000];
    let write = RequestHeader {
        flags: 0,
        command: cmd::WRITE,
        handle: 1,
        offset,
        length: payload.len() as u32,
    };
    t.write_all(&write.encode()).await.unwrap();
    t.write_all(&payload).await.unwrap();
    let r = read_n(&mut t, 16).await;
    assert_eq!(&r[4..8], &[0, 0, 0, 0], "write failed");
    let read = RequestHeader {
        flags: 0,
        command: cmd::READ,
        handle: 2,
        offset: 0,
        length: 4096,
    };
    t.write_all(&read.encode()).await.unwrap();
    let r = read_n(&mut t, 16 + 4096).await;
    assert_eq!(&r[4..8], &[0, 0, 0, 0], "read failed");
    assert_eq!(&r[16..], &original(0, 4096)[..]);
    let flush = RequestHeader {
        flags: 0,
        command: cmd::FLUSH,
        handle: 3,
        offset: 0,
        length: 0,
    };
    t.write_all(&flush.encode()).await.unwrap();
    assert_eq!(&read_n(&mut t, 16).await[4..8], &[0, 0, 0, 0]);
    // The write landed exactly there.
    let at = offset as usize;
    assert_eq!(file_bytes(&s.images[0], offset, payload.len()), payload);
    assert_eq!(file_bytes(&s.images[0], 0, at), original(0, at));
    let end = at + payload.len();
    assert_eq!(
        file_bytes(&s.images[0], end as u64, 4 * MIB - end),
        original(end, 4 * MIB - end)
    );
    assert_eq!(s.metrics.tls_refusals(TlsRefusal::Handshake), 0);
    assert_eq!(s.metrics.tls_refusals(TlsRefusal::NoStartTls), 0);
}

/// STARTTLS acknowledged, then the handshake of `attempt` on the raw socket; asserts the
/// server refused it and nothing reached the export.
async fn assert_refused_in_handshake(s: &TestServer, before: u64, attempt: Attempt) {
    let mut c = TcpStream::connect(s.tcp).await.unwrap();
    starttls(&mut c).await;
    let refused = match attempt {
        Attempt::Identity(dir) => match Pki::connector(&dir).connect(c).await {
            Err(_) => true,
            Ok((t, _)) => refused_after_handshake(t).await,
        },
        Attempt::ServerMustRefuse(dir) => match Pki::connector(&dir).connect(c).await {
            // The client accepted the server's certificate: a failure is the server's alert.
            Err(e) => {
                assert!(
                    !e.to_string().contains("invalid peer certificate"),
                    "the client, not the server, refused: {e}"
                );
                true
            }
            Ok((t, _)) => refused_after_handshake(t).await,
        },
        Attempt::NoCertificate(ca) => {
            let name = rustls::pki_types::ServerName::try_from("secondary").unwrap();
            let connector = tokio_rustls::TlsConnector::from(no_certificate_client(&ca));
            match connector.connect(name, c).await {
                Err(_) => true,
                Ok(t) => refused_after_handshake(t).await,
            }
        }
    };
    assert!(refused, "the handshake succeeded");
    // The server counts the refusal once its handshake has failed.
    let deadline = tokio::time::Instant::now() + STUCK;
    while s.metrics.tls_refusals(TlsRefusal::Handshake) == before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "refusal not counted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(s.metrics.tls_refusals(TlsRefusal::Handshake), before + 1);
    assert_export_untouched(s);
}

/// TLS 1.3: the client's side of the handshake finishes before the server has checked the
/// client's certificate; the server's refusal arrives as an alert (or the end) on the next
/// read, never as an option reply.
async fn refused_after_handshake<S: AsyncRead + AsyncWrite + Unpin>(mut t: S) -> bool {
    let h = OptionHeader {
        option: opt::LIST,
        length: 0,
    };
    if t.write_all(&h.encode()).await.is_err() || t.flush().await.is_err() {
        return true;
    }
    let mut buf = [0u8; 64];
    match tokio::time::timeout(STUCK, t.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        other => panic!("a refused client was answered: {other:?}"),
    }
}

enum Attempt {
    Identity(PathBuf),
    /// An identity whose client trusts the server: only the server can refuse it.
    ServerMustRefuse(PathBuf),
    /// Trusts the CA of this identity dir, presents no certificate.
    NoCertificate(PathBuf),
}

fn no_certificate_client(dir: &Path) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(dir.join(colo_tls::CA_CERT)).unwrap() {
        roots.add(ca.unwrap()).unwrap();
    }
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

#[tokio::test]
async fn strangers_are_refused_in_the_tls_handshake_and_change_nothing() {
    let pki = Pki::new();
    let s = server(&pki);
    // No certificate at all.
    assert_refused_in_handshake(&s, 0, Attempt::NoCertificate(pki.host("primary"))).await;
    // Another CA's certificate, even for the allowed name.
    assert_refused_in_handshake(&s, 1, Attempt::Identity(pki.stranger.clone())).await;
    // The pair's CA, but a name not in the allowed list.
    assert_refused_in_handshake(&s, 2, Attempt::Identity(pki.host("intruder"))).await;
    // The secondary's own identity is not the primary's either.
    assert_refused_in_handshake(&s, 3, Attempt::Identity(pki.host("secondary"))).await;
    // Another CA's certificate for the allowed name, from a client that trusts the pair's CA:
    // the server's own check refuses it.
    assert_refused_in_handshake(&s, 4, Attempt::ServerMustRefuse(pki.trusting.clone())).await;
    assert_eq!(s.metrics.tls_refusals(TlsRefusal::NoStartTls), 0);
}

#[tokio::test]
async fn plaintext_bytes_after_starttls_are_a_failed_handshake() {
    let pki = Pki::new();
    let s = server(&pki);
    let mut c = TcpStream::connect(s.tcp).await.unwrap();
    starttls(&mut c).await;
    // A client that ignores the upgrade and goes on in NBD.
    send_option(&mut c, opt::GO, &go_data("export")).await;
    assert!(closed(&mut c).await);
    let deadline = tokio::time::Instant::now() + STUCK;
    while s.metrics.tls_refusals(TlsRefusal::Handshake) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "refusal not counted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_export_untouched(&s);
}

#[test]
fn the_unix_socket_needs_no_tls_and_does_not_offer_it() {
    let pki = Pki::new();
    let s = server(&pki);
    let mut c = RawClient::connect(&s.socket);
    c.greet(3);
    c.send_option(opt::STARTTLS, &[]);
    assert_eq!(c.read_option_reply().1, rep::ERR_UNSUP);
    let (size, _) = c.go("export");
    assert_eq!(size, 4 * MIB as u64);
    assert_eq!(s.metrics.tls_refusals(TlsRefusal::NoStartTls), 0);
}

#[test]
fn without_tls_starttls_is_unsupported_on_tcp_too() {
    let s = TestServer::start(&[("export", MIB, false)]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = TcpStream::connect(s.tcp).await.unwrap();
        greet(&mut c).await;
        send_option(&mut c, opt::STARTTLS, &[]).await;
        assert_eq!(option_reply(&mut c).await.1, rep::ERR_UNSUP);
        send_option(&mut c, opt::LIST, &[]).await;
        assert_eq!(option_reply(&mut c).await.1, rep::SERVER);
    });
}
