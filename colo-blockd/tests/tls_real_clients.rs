//! NBD STARTTLS against the real clients: QEMU's NBD block driver (`qemu-io`, `qemu-img`)
//! with a `tls-creds-x509` object on the pair's identity directory, and libnbd's `nbdinfo`
//! with `nbds://...?tls-certificates=DIR`. The server requires TLS on TCP and accepts the
//! host `primary` only. Reads and writes through TLS land where they should (checked in the
//! image file); refused clients change nothing (the image, the backend's operations) and
//! are counted.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use colo_blockd::metrics::TlsRefusal;
use colo_tls::{HostIdentity, PeerAcceptor};
use common::{TestServer, file_bytes, require_tool, run, run_ok};

const MIB: usize = 1024 * 1024;
const SIZE: usize = 4 * MIB;

/// The server's host is named `localhost` so that libnbd, which checks the server's
/// certificate against the URI's host, can verify it too; QEMU is given `tls-hostname`.
const SERVER: &str = "localhost";

struct Pki {
    _dir: tempfile::TempDir,
    root: PathBuf,
    /// Another CA's identity for the allowed name.
    stranger: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let hosts = [SERVER, "primary", "intruder"].map(String::from);
        colo_tls::pki::create_pair(dir.path(), &hosts, colo_tls::pki::Validity::days(30)).unwrap();
        let other = dir.path().join("other-ca");
        colo_tls::pki::create_pair(
            &other,
            &["primary".into()],
            colo_tls::pki::Validity::days(30),
        )
        .unwrap();
        Pki {
            root: dir.path().to_path_buf(),
            stranger: other.join("primary"),
            _dir: dir,
        }
    }

    fn host(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn server(&self) -> TestServer {
        let identity = HostIdentity::load(self.host(SERVER)).unwrap();
        let acceptor =
            PeerAcceptor::new(&identity, &["primary".into()], Duration::from_secs(5)).unwrap();
        TestServer::start_with(&[("export", SIZE, false)], Some(acceptor))
    }
}

fn original(offset: usize, len: usize) -> Vec<u8> {
    (offset..offset + len).map(|i| (i % 251) as u8).collect()
}

/// QEMU's NBD driver over TCP through TLS with the identity in `dir` (a `raw` node over an
/// `nbd` node, as the primary's quorum child is configured).
fn qemu_target(s: &TestServer, dir: Option<&Path>) -> (Vec<String>, String) {
    let mut object = Vec::new();
    let mut nbd = format!(
        r#"{{"driver":"nbd","server":{{"type":"inet","host":"127.0.0.1","port":"{}"}},"export":"export""#,
        s.tcp.port()
    );
    if let Some(dir) = dir {
        object.push("--object".to_string());
        object.push(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client,verify-peer=on",
            dir.display()
        ));
        nbd.push_str(&format!(r#","tls-creds":"tls0","tls-hostname":"{SERVER}""#));
    }
    nbd.push('}');
    (object, format!(r#"json:{{"driver":"raw","file":{nbd}}}"#))
}

fn qemu_io(s: &TestServer, dir: Option<&Path>, commands: &[&str]) -> std::process::Output {
    require_tool("qemu-io", "qemu-utils");
    let (mut args, target) = qemu_target(s, dir);
    args.extend(["-t".into(), "writeback".into(), target]);
    for c in commands {
        args.push("-c".into());
        args.push(c.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("qemu-io", &args)
}

fn assert_image_untouched(s: &TestServer) {
    assert_eq!(s.ops(0), vec![], "a refused client reached the backend");
    assert_eq!(file_bytes(&s.images[0], 0, SIZE), original(0, SIZE));
}

#[test]
#[ignore = "tier clients: needs qemu-io, qemu-img and nbdinfo (integration/setup.sh); select with --include-ignored (integration/test.sh does)"]
fn qemu_io_with_tls_creds_writes_and_reads_through_tls() {
    let pki = Pki::new();
    let s = pki.server();
    let primary = pki.host("primary");
    let out = qemu_io(
        &s,
        Some(&primary),
        &[
            "write -P 0xc3 1M 192k",
            "write -P 0x17 100001 777",
            "read -P 0xc3 1M 192k",
            "read -P 0x17 100001 777",
            "flush",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !stdout.contains("failed") && !stdout.contains("error"),
        "qemu-io through TLS failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let img = &s.images[0];
    assert_eq!(file_bytes(img, 0, 100001), original(0, 100001));
    assert_eq!(file_bytes(img, 100001, 777), vec![0x17; 777]);
    let after = 100001 + 777;
    assert_eq!(
        file_bytes(img, after as u64, MIB - after),
        original(after, MIB - after)
    );
    assert_eq!(
        file_bytes(img, MIB as u64, 192 * 1024),
        vec![0xc3; 192 * 1024]
    );
    let end = MIB + 192 * 1024;
    assert_eq!(
        file_bytes(img, end as u64, SIZE - end),
        original(end, SIZE - end)
    );
    assert_eq!(s.metrics.tls_refusals(TlsRefusal::Handshake), 0);
    assert_eq!(s.metrics.tls_refusals(TlsRefusal::NoStartTls), 0);

    // qemu-img reads the whole disk through TLS and finds it equal to the file.
    require_tool("qemu-img", "qemu-utils");
    let (mut args, target) = qemu_target(&s, Some(&primary));
    let copy = s.dir.path().join("copy.raw");
    args.insert(0, "convert".into());
    args.extend([
        "-O".into(),
        "raw".into(),
        target,
        copy.display().to_string(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_ok("qemu-img", &args);
    assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(img).unwrap());
}

#[test]
#[ignore = "tier clients: needs qemu-io, qemu-img and nbdinfo (integration/setup.sh); select with --include-ignored (integration/test.sh does)"]
fn qemu_io_without_tls_or_with_a_strangers_identity_changes_nothing() {
    let pki = Pki::new();
    let s = pki.server();
    let attempts: [(&str, Option<PathBuf>, TlsRefusal); 4] = [
        ("no tls-creds", None, TlsRefusal::NoStartTls),
        (
            "another CA",
            Some(pki.stranger.clone()),
            TlsRefusal::Handshake,
        ),
        (
            "a name not allowed",
            Some(pki.host("intruder")),
            TlsRefusal::Handshake,
        ),
        (
            "the server's own identity",
            Some(pki.host(SERVER)),
            TlsRefusal::Handshake,
        ),
    ];
    for (what, dir, reason) in attempts {
        let before = s.metrics.tls_refusals(reason);
        let out = qemu_io(&s, dir.as_deref(), &["write -P 0xee 0 64k"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            !out.status.success() || stdout.contains("failed") || stdout.is_empty(),
            "qemu-io with {what} was served:\n{stdout}"
        );
        assert!(
            !stdout.contains("wrote"),
            "qemu-io with {what} wrote:\n{stdout}"
        );
        assert!(
            refusals_above(&s, reason, before) > before,
            "{what}: refusal not counted ({reason:?})"
        );
        assert_image_untouched(&s);
    }
}

#[test]
#[ignore = "tier clients: needs qemu-io, qemu-img and nbdinfo (integration/setup.sh); select with --include-ignored (integration/test.sh does)"]
fn nbdinfo_with_the_pairs_certificates_and_without() {
    require_tool("nbdinfo", "libnbd-bin");
    let pki = Pki::new();
    let s = pki.server();
    let port = s.tcp.port();
    let with = |dir: &Path| {
        format!(
            "nbds://{SERVER}:{port}/export?tls-certificates={}",
            dir.display()
        )
    };
    let size = run_ok("nbdinfo", &["--size", &with(&pki.host("primary"))]);
    assert_eq!(size.trim(), SIZE.to_string());
    // nbd:// (TLS disabled): the server answers only NBD_REP_ERR_TLS_REQD.
    let plain = run(
        "nbdinfo",
        &["--size", &format!("nbd://127.0.0.1:{port}/export")],
    );
    assert!(!plain.status.success(), "nbdinfo without TLS was served");
    assert!(refusals_above(&s, TlsRefusal::NoStartTls, 0) >= 1);
    // A certificate of the pair's CA for a name not allowed.
    let intruder = run("nbdinfo", &["--size", &with(&pki.host("intruder"))]);
    assert!(!intruder.status.success(), "nbdinfo as intruder was served");
    assert!(refusals_above(&s, TlsRefusal::Handshake, 0) >= 1);
    assert_image_untouched(&s);
}

/// The server's count of `reason` refusals once it is above `count`, or as it is after 10 s.
/// The client may exit (its handshake failed) before the server's task has counted the
/// refusal: on a loaded machine the count lags by a scheduling slice.
fn refusals_above(s: &TestServer, reason: TlsRefusal, count: u64) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = s.metrics.tls_refusals(reason);
        if now > count || std::time::Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
