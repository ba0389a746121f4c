//! A generated pair's identities against the handshake: the right peer passes, every other
//! certificate is refused.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::pki::{HostAddress, Validity, create_pair, create_pair_with_addresses, issue};
use crate::{HandshakeError, HostIdentity, PeerAcceptor, PeerConnector, TlsError};

const BOUND: std::time::Duration = std::time::Duration::from_secs(5);

fn hosts(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// A pair hosta/hostb under `dir`.
fn pair(dir: &Path) -> (HostIdentity, HostIdentity) {
    create_pair(dir, &hosts(&["hosta", "hostb"]), Validity::days(30)).unwrap();
    (
        HostIdentity::load(dir.join("hosta")).unwrap(),
        HostIdentity::load(dir.join("hostb")).unwrap(),
    )
}

/// What the server and the client saw of one handshake over an in-memory pipe, after the
/// client wrote a byte and the server echoed it.
struct Outcome {
    server: Result<String, HandshakeError>,
    client_read: Result<u8, std::io::Error>,
}

async fn handshake(
    acceptor: PeerAcceptor,
    client: rustls::ClientConfig,
    server_name: &str,
) -> Outcome {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let server = tokio::spawn(async move {
        let (mut stream, name) = acceptor.accept(a).await?;
        let mut byte = [0u8; 1];
        stream
            .read_exact(&mut byte)
            .await
            .map_err(HandshakeError::Failed)?;
        stream
            .write_all(&byte)
            .await
            .map_err(HandshakeError::Failed)?;
        stream.flush().await.map_err(HandshakeError::Failed)?;
        Ok(name)
    });
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client));
    let name = rustls_pki_types::ServerName::try_from(server_name.to_owned()).unwrap();
    let client_read = async {
        // With TLS 1.3 the client's handshake completes before the server checked the
        // client's certificate: a refusal shows at the first read.
        let mut stream = connector.connect(name, b).await?;
        stream.write_all(&[42]).await?;
        stream.flush().await?;
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await?;
        Ok(byte[0])
    }
    .await;
    let server = tokio::time::timeout(BOUND, server).await.unwrap().unwrap();
    Outcome {
        server,
        client_read,
    }
}

fn client_config(identity: &HostIdentity) -> rustls::ClientConfig {
    (*identity.client_config().unwrap()).clone()
}

/// hostb's client config, without a client certificate.
fn anonymous_client(identity: &HostIdentity) -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(crate::config::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(identity.roots.clone())
        .with_no_client_auth()
}

fn assert_refused(outcome: Outcome, what: &str) {
    assert!(
        outcome.server.is_err(),
        "{what}: the server accepted {:?}",
        outcome.server
    );
    assert!(
        outcome.client_read.is_err(),
        "{what}: the client read an answer"
    );
}

#[tokio::test]
async fn the_allowed_peer_is_accepted_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = pair(dir.path());
    assert_eq!((a.name(), b.name()), ("hosta", "hostb"));
    let acceptor = PeerAcceptor::new(&a, &hosts(&["hostb"]), BOUND).unwrap();
    let outcome = handshake(acceptor, client_config(&b), "hosta").await;
    assert_eq!(outcome.server.unwrap(), "hostb");
    assert_eq!(outcome.client_read.unwrap(), 42);
}

#[tokio::test]
async fn the_connector_returns_the_servers_name_and_refuses_another() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = pair(dir.path());
    let acceptor = PeerAcceptor::new(&a, &hosts(&["hostb"]), BOUND).unwrap();
    let (x, y) = tokio::io::duplex(64 * 1024);
    let server = tokio::spawn(async move { acceptor.accept(x).await.map(|(_, n)| n) });
    let connector = PeerConnector::new(&b, "hosta", BOUND).unwrap();
    let (_stream, name) = connector.connect(y).await.unwrap();
    assert_eq!(name, "hosta");
    assert_eq!(server.await.unwrap().unwrap(), "hostb");

    // hostb expecting hostc: hosta's server certificate is refused by the client.
    let acceptor = PeerAcceptor::new(&a, &hosts(&["hostb"]), BOUND).unwrap();
    let (x, y) = tokio::io::duplex(64 * 1024);
    let server = tokio::spawn(async move { acceptor.accept(x).await.map(|(_, n)| n) });
    let connector = PeerConnector::new(&b, "hostc", BOUND).unwrap();
    let err = connector.connect(y).await.unwrap_err();
    assert!(
        err.to_string().contains("not valid for name \"hostc\""),
        "{err}"
    );
    assert!(server.await.unwrap().is_err());
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = pair(dir.path());
    let acceptor = PeerAcceptor::new(&a, &hosts(&["hostb"]), BOUND).unwrap();
    let outcome = handshake(acceptor, anonymous_client(&b), "hosta").await;
    assert_refused(outcome, "no certificate");
}

#[tokio::test]
async fn a_certificate_of_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = pair(&dir.path().join("pair"));
    // Another CA issuing a certificate for the allowed name itself.
    let (_, stranger) = pair(&dir.path().join("other"));
    assert_eq!(stranger.name(), "hostb");
    let acceptor = PeerAcceptor::new(&a, &hosts(&["hostb"]), BOUND).unwrap();
    // The stranger trusts our CA (it wants to talk to us), but its own certificate is not ours.
    let mut client = rustls::ClientConfig::builder_with_provider(crate::config::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(a.roots.clone())
        .with_client_auth_cert(
            stranger.client.chain.clone(),
            stranger.client.key.clone_key(),
        )
        .unwrap();
    client.enable_sni = true;
    let outcome = handshake(acceptor, client, "hosta").await;
    assert_refused(outcome, "another CA");
}

#[tokio::test]
async fn a_certificate_of_the_pair_for_a_host_not_allowed_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _b) = pair(dir.path());
    // hosta's own client identity posing as the peer, where only hostb is allowed.
    let acceptor = PeerAcceptor::new(&a, &hosts(&["hostb"]), BOUND).unwrap();
    let outcome = handshake(acceptor, client_config(&a), "hosta").await;
    let err = outcome.server.as_ref().unwrap_err().to_string();
    assert!(err.contains("NotValidForName"), "{err}");
    assert_refused(outcome, "another host of the pair");
}

#[tokio::test]
async fn an_expired_certificate_is_refused_at_the_handshake_and_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = pair(dir.path());
    let expired = Validity {
        not_before_days_ago: 10,
        days: -1,
    };
    issue(
        &dir.path().join("ca"),
        &hosts(&["hostb"]),
        &[],
        &dir.path().join("old"),
        expired,
    )
    .unwrap();
    let err = HostIdentity::load(dir.path().join("old/hostb")).unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
    let old = dir.path().join("old/hostb");
    let chain =
        vec![rustls_pki_types::CertificateDer::from_pem_file(old.join("client-cert.pem")).unwrap()];
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(old.join("client-key.pem")).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(crate::config::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(a.roots.clone())
        .with_client_auth_cert(chain, key)
        .unwrap();
    let acceptor = PeerAcceptor::new(&a, &hosts(&["hostb"]), BOUND).unwrap();
    let outcome = handshake(acceptor, client, "hosta").await;
    let err = outcome.server.as_ref().unwrap_err().to_string();
    assert!(err.contains("certificate expired"), "{err}");
    assert_refused(outcome, "expired");
}

#[tokio::test]
async fn a_reissued_identity_works_with_the_old_one_of_the_peer() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = pair(dir.path());
    issue(
        &dir.path().join("ca"),
        &hosts(&["hostb"]),
        &[],
        &dir.path().join("new"),
        Validity::days(30),
    )
    .unwrap();
    let b2 = HostIdentity::load(dir.path().join("new/hostb")).unwrap();
    let acceptor = PeerAcceptor::new(&a, &hosts(&["hostb"]), BOUND).unwrap();
    let outcome = handshake(acceptor, client_config(&b2), "hosta").await;
    assert_eq!(outcome.server.unwrap(), "hostb");
}

#[tokio::test]
async fn a_stalled_handshake_ends_at_its_bound() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = pair(dir.path());
    let acceptor =
        PeerAcceptor::new(&a, &hosts(&["hostb"]), std::time::Duration::from_millis(50)).unwrap();
    let (x, _silent) = tokio::io::duplex(1024);
    let err = acceptor.accept(x).await.unwrap_err();
    assert!(matches!(err, HandshakeError::Timeout(_)), "{err}");
}

#[test]
fn the_layout_and_permissions_are_as_documented_and_nothing_is_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pki");
    let written = create_pair(&out, &hosts(&["hosta", "hostb"]), Validity::days(30)).unwrap();
    assert_eq!(
        written.host_dirs,
        vec![out.join("hosta"), out.join("hostb")]
    );
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&out.join("ca")), 0o700);
    assert_eq!(mode(&out.join("ca/ca-key.pem")), 0o600);
    for host in ["hosta", "hostb"] {
        let d = out.join(host);
        assert_eq!(mode(&d), 0o700);
        assert_eq!(mode(&d.join("server-key.pem")), 0o600);
        assert_eq!(mode(&d.join("client-key.pem")), 0o600);
        assert_eq!(mode(&d.join("server-cert.pem")), 0o644);
        assert!(!d.join("ca-key.pem").exists(), "the CA key stays in ca/");
        let names: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 5, "{names:?}");
    }
    let before = std::fs::read(out.join("hosta/server-key.pem")).unwrap();
    let err = create_pair(&out, &hosts(&["hosta", "hostb"]), Validity::days(30)).unwrap_err();
    assert!(err.to_string().contains("refusing to overwrite"), "{err}");
    assert_eq!(
        std::fs::read(out.join("hosta/server-key.pem")).unwrap(),
        before
    );
    let err = issue(
        &out.join("ca"),
        &hosts(&["hostb"]),
        &[],
        &out,
        Validity::days(30),
    )
    .unwrap_err();
    assert!(err.to_string().contains("hostb"), "{err}");
    assert!(
        create_pair(
            &dir.path().join("x"),
            &hosts(&["a", "a"]),
            Validity::days(1)
        )
        .is_err()
    );
    assert!(create_pair(&dir.path().join("y"), &hosts(&["ca"]), Validity::days(1)).is_err());
    assert!(
        create_pair(
            &dir.path().join("z"),
            &hosts(&["not a name"]),
            Validity::days(1)
        )
        .is_err()
    );
}

#[test]
fn loading_names_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _) = pair(dir.path());
    let host = dir.path().join("hosta");
    let expect = |fragment: &str| {
        let err: TlsError = HostIdentity::load(&host).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(fragment), "{fragment:?} not in {text:?}");
        text
    };

    std::fs::set_permissions(
        host.join("server-key.pem"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    let text = expect("readable by group or others");
    assert!(
        text.contains("server-key.pem") && text.contains("0640"),
        "{text}"
    );
    std::fs::set_permissions(
        host.join("server-key.pem"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();

    std::fs::rename(host.join("client-cert.pem"), host.join("moved")).unwrap();
    let text = expect("client-cert.pem");
    assert!(text.contains("No such file"), "{text}");
    std::fs::rename(host.join("moved"), host.join("client-cert.pem")).unwrap();

    let ca = std::fs::read(host.join("ca-cert.pem")).unwrap();
    std::fs::write(host.join("ca-cert.pem"), b"hello").unwrap();
    expect("ca-cert.pem: not a PEM certificate");
    // Another CA: the host's certificates do not chain to it.
    let other = tempfile::tempdir().unwrap();
    create_pair(other.path(), &hosts(&["hostz"]), Validity::days(1)).unwrap();
    std::fs::copy(
        other.path().join("ca/ca-cert.pem"),
        host.join("ca-cert.pem"),
    )
    .unwrap();
    expect("server-cert.pem: not signed by the CA in ca-cert.pem");
    std::fs::write(host.join("ca-cert.pem"), ca).unwrap();

    // Certificates of two hosts in one directory.
    std::fs::copy(
        dir.path().join("hostb/client-cert.pem"),
        host.join("client-cert.pem"),
    )
    .unwrap();
    std::fs::copy(
        dir.path().join("hostb/client-key.pem"),
        host.join("client-key.pem"),
    )
    .unwrap();
    expect("server-cert.pem is for \"hosta\" but client-cert.pem for \"hostb\"");
}

#[test]
fn peer_names_must_be_dns_names() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = pair(dir.path());
    assert!(PeerAcceptor::new(&a, &[], BOUND).is_err());
    assert!(PeerConnector::new(&a, "10.0.0.1", BOUND).is_err());
    assert!(PeerConnector::new(&a, "not a name", BOUND).is_err());
}

/// Runs the real `openssl` command in `dir`; panics with its stderr on failure.
fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (the operator's tool here) must be installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An operator's own PKI, made with the `openssl` command as an operator would: a root CA, an
/// intermediate CA that signs the hosts, RSA host keys (where `pki create` makes ECDSA ones).
/// Writes `dir/<host>/` in the identity layout for each of `hosts`: `ca-cert.pem` the root
/// only, each certificate file the leaf then the intermediate, keys 0600, the directory 0700.
fn operator_pki(dir: &Path, hosts: &[&str]) {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::write(
        dir.join("int.ext"),
        "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "root.key",
            "-out",
            "root.pem",
            "-days",
            "30",
            "-subj",
            "/O=Operator/CN=Operator Root CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "int.key",
            "-out",
            "int.csr",
            "-subj",
            "/O=Operator/CN=Operator COLO Intermediate",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "int.csr",
            "-CA",
            "root.pem",
            "-CAkey",
            "root.key",
            "-set_serial",
            "2",
            "-days",
            "30",
            "-extfile",
            "int.ext",
            "-out",
            "int.pem",
        ],
    );
    let intermediate = std::fs::read_to_string(dir.join("int.pem")).unwrap();
    for (n, host) in hosts.iter().enumerate() {
        std::fs::write(
            dir.join(format!("{host}.ext")),
            format!(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
                 extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=DNS:{host}\n"
            ),
        )
        .unwrap();
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{host}.key"),
                "-out",
                &format!("{host}.csr"),
                "-subj",
                &format!("/O=Operator/CN={host}"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{host}.csr"),
                "-CA",
                "int.pem",
                "-CAkey",
                "int.key",
                "-set_serial",
                &(10 + n).to_string(),
                "-days",
                "30",
                "-extfile",
                &format!("{host}.ext"),
                "-out",
                &format!("{host}.pem"),
            ],
        );
        let d = dir.join(host);
        std::fs::DirBuilder::new().mode(0o700).create(&d).unwrap();
        std::fs::copy(dir.join("root.pem"), d.join("ca-cert.pem")).unwrap();
        let leaf = std::fs::read_to_string(dir.join(format!("{host}.pem"))).unwrap();
        let key = std::fs::read(dir.join(format!("{host}.key"))).unwrap();
        for role in ["server", "client"] {
            std::fs::write(
                d.join(format!("{role}-cert.pem")),
                format!("{leaf}{intermediate}"),
            )
            .unwrap();
            let key_path = d.join(format!("{role}-key.pem"));
            std::fs::write(&key_path, &key).unwrap();
            std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
    }
}

/// "Operators may bring certificates of their own CA" (`docs/security.md`): identities made
/// with `openssl`, RSA keys, an intermediate CA in each certificate file, load; the pair
/// authenticates each other by name through the intermediate; the operator's certificate for
/// a third host is refused where only the peer is allowed, and one of `pki create`'s pair
/// for the peer's own name is refused by the operator's pair (another CA).
#[tokio::test]
async fn an_operators_own_ca_with_an_intermediate_and_rsa_keys_works() {
    let dir = tempfile::tempdir().unwrap();
    operator_pki(dir.path(), &["hosta", "hostb", "hostc"]);
    let a = HostIdentity::load(dir.path().join("hosta")).unwrap();
    let b = HostIdentity::load(dir.path().join("hostb")).unwrap();
    let c = HostIdentity::load(dir.path().join("hostc")).unwrap();
    assert_eq!((a.name(), b.name(), c.name()), ("hosta", "hostb", "hostc"));

    // The pair: each side names the other.
    let acceptor = PeerAcceptor::new(&a, &hosts(&["hostb"]), BOUND).unwrap();
    let (x, y) = tokio::io::duplex(64 * 1024);
    let server = tokio::spawn(async move { acceptor.accept(x).await.map(|(_, n)| n) });
    let connector = PeerConnector::new(&b, "hosta", BOUND).unwrap();
    let (_stream, name) = connector.connect(y).await.unwrap();
    assert_eq!(name, "hosta");
    assert_eq!(server.await.unwrap().unwrap(), "hostb");
    let acceptor = PeerAcceptor::new(&a, &hosts(&["hostb"]), BOUND).unwrap();
    let outcome = handshake(acceptor, client_config(&b), "hosta").await;
    assert_eq!(outcome.server.unwrap(), "hostb");
    assert_eq!(outcome.client_read.unwrap(), 42);

    // The operator's CA, another host: refused by name.
    let acceptor = PeerAcceptor::new(&a, &hosts(&["hostb"]), BOUND).unwrap();
    let outcome = handshake(acceptor, client_config(&c), "hosta").await;
    let err = outcome.server.as_ref().unwrap_err().to_string();
    assert!(err.contains("NotValidForName"), "{err}");
    assert_refused(outcome, "the operator's certificate for a host not allowed");

    // hostb of `pki create`'s CA, trusting the operator's root: refused (another CA).
    let (_, generated_b) = pair(&dir.path().join("generated"));
    let client = rustls::ClientConfig::builder_with_provider(crate::config::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(a.roots.clone())
        .with_client_auth_cert(
            generated_b.client.chain.clone(),
            generated_b.client.key.clone_key(),
        )
        .unwrap();
    let acceptor = PeerAcceptor::new(&a, &hosts(&["hostb"]), BOUND).unwrap();
    let outcome = handshake(acceptor, client, "hosta").await;
    assert_refused(outcome, "hostb of another CA");
}

/// `--address NAME=IP` puts the address in that host's certificates (server and client) beside
/// its DNS name, and only in that host's; an address for a host not being made is refused
/// before anything is written.
#[test]
fn a_hosts_address_is_in_its_certificates_only() {
    use x509_parser::extensions::GeneralName;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pki");
    let address: HostAddress = "hosta=192.168.77.1".parse().unwrap();
    create_pair_with_addresses(
        &out,
        &hosts(&["hosta", "hostb"]),
        std::slice::from_ref(&address),
        Validity::days(1),
    )
    .unwrap();
    let sans = |host: &str, file: &str| -> Vec<String> {
        let pem = std::fs::read(out.join(host).join(file)).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        let cert = pem.parse_x509().unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        san.value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::DNSName(d) => format!("dns:{d}"),
                GeneralName::IPAddress(ip) => format!("ip:{ip:?}"),
                other => format!("{other:?}"),
            })
            .collect()
    };
    for file in ["server-cert.pem", "client-cert.pem"] {
        assert_eq!(
            sans("hosta", file),
            ["dns:hosta", "ip:[192, 168, 77, 1]"],
            "{file}"
        );
        assert_eq!(sans("hostb", file), ["dns:hostb"], "{file}");
    }
    // The daemons still know hosta by its name.
    HostIdentity::load(out.join("hosta")).unwrap();

    let err = create_pair_with_addresses(
        &dir.path().join("other"),
        &hosts(&["hosta"]),
        &["hostc=10.0.0.1".parse().unwrap()],
        Validity::days(1),
    )
    .unwrap_err();
    assert!(err.to_string().contains("not one of the hosts"), "{err}");
    assert!(!dir.path().join("other").exists());
    assert!("hosta".parse::<HostAddress>().is_err());
    assert!("hosta=not-an-ip".parse::<HostAddress>().is_err());
}
