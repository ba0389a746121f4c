//! `qmp-driver pki`: the layout it writes is what colo-tls loads, nothing is overwritten, and
//! `issue` re-issues a host with the same CA.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn qmp_driver(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qmp-driver"))
        .args(args)
        .output()
        .unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn create_writes_loadable_identities_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pki");
    let out_s = out.to_str().unwrap();
    let created = qmp_driver(&[
        "pki", "create", "--out", out_s, "--host", "hosta", "--host", "hostb",
    ]);
    assert!(created.status.success(), "{created:?}");
    let stdout = String::from_utf8_lossy(&created.stdout);
    assert!(
        stdout.contains(&format!("host identity: {out_s}/hosta")),
        "{stdout}"
    );
    for host in ["hosta", "hostb"] {
        let identity = colo_tls::HostIdentity::load(out.join(host)).unwrap();
        assert_eq!(identity.name(), host);
        assert_eq!(mode(&out.join(host)), 0o700);
        assert_eq!(mode(&out.join(host).join("server-key.pem")), 0o600);
        assert!(!out.join(host).join("ca-key.pem").exists());
    }
    assert_eq!(mode(&out.join("ca/ca-key.pem")), 0o600);

    let again = qmp_driver(&["pki", "create", "--out", out_s, "--host", "hosta"]);
    assert_eq!(again.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("refusing to overwrite"), "{stderr}");

    // Rotation: a new identity for hostb from the same CA, in a new directory.
    let new = dir.path().join("pki-2027");
    let issued = qmp_driver(&[
        "pki",
        "issue",
        "--ca",
        &format!("{out_s}/ca"),
        "--out",
        new.to_str().unwrap(),
        "--host",
        "hostb",
        "--days",
        "30",
    ]);
    assert!(issued.status.success(), "{issued:?}");
    let old_a = colo_tls::HostIdentity::load(out.join("hosta")).unwrap();
    let new_b = colo_tls::HostIdentity::load(new.join("hostb")).unwrap();
    assert_eq!(new_b.name(), "hostb");
    // hosta's old identity still accepts hostb's new one: the same CA.
    assert!(old_a.server_config(&["hostb".into()]).is_ok());
    assert_eq!(
        std::fs::read(out.join("hosta/ca-cert.pem")).unwrap(),
        std::fs::read(new.join("hostb/ca-cert.pem")).unwrap()
    );

    let bad = qmp_driver(&[
        "pki",
        "create",
        "--out",
        dir.path().join("x").to_str().unwrap(),
        "--host",
        "not a name",
    ]);
    assert_eq!(bad.status.code(), Some(2));

    // --address: a host's address beside its name; a malformed one, or one for a host not
    // being made, is a usage error and writes nothing.
    let with_address = dir.path().join("pki-addr");
    let made = qmp_driver(&[
        "pki",
        "create",
        "--out",
        with_address.to_str().unwrap(),
        "--host",
        "hosta",
        "--address",
        "hosta=192.168.77.1",
    ]);
    assert!(made.status.success(), "{made:?}");
    assert_eq!(
        colo_tls::HostIdentity::load(with_address.join("hosta"))
            .unwrap()
            .name(),
        "hosta"
    );
    for address in ["hosta", "hosta=near", "hostz=10.0.0.1"] {
        let target = dir.path().join("pki-bad-addr");
        let refused = qmp_driver(&[
            "pki",
            "create",
            "--out",
            target.to_str().unwrap(),
            "--host",
            "hosta",
            "--address",
            address,
        ]);
        assert_eq!(refused.status.code(), Some(2), "{address}: {refused:?}");
        assert!(!target.exists(), "{address}");
    }
}

#[test]
fn the_help_explains_layout_permissions_and_rotation() {
    let help = qmp_driver(&["pki", "create", "--help"]);
    let text = String::from_utf8_lossy(&help.stdout);
    for needle in [
        "server-cert.pem",
        "client-key.pem",
        "0600",
        "0700",
        "Rotation",
        "issue",
        "tls-creds-x509",
    ] {
        assert!(text.contains(needle), "{needle:?} not in\n{text}");
    }
}
