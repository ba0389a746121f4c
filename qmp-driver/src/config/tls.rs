//! `[tls]`: the pair's host identities (`qmp-driver pki`, `docs/security.md`). With it, every
//! inter-host channel colo generates a command line for runs over mutual TLS: the migration
//! (the primary QEMU's `tls-creds`, terminated by the relay), the relay's TCP control
//! listener, colo-proxyd's link and its control connection to the relay, and with
//! `disk.backend = "colo-blockd"` the primary's NBD child of colo-blockd (`daemon-args`,
//! `start`). On QEMU's stock stack too: with `disk.backend = "replication"` the secondary
//! QEMU's NBD server and the primary's replication child, with `network.backend =
//! "colo-compare"` the chardevs between the secondary's redirectors and the primary's
//! colo-compare (`qemu-args`, `start`). Without it nothing changes (plaintext, as on the test
//! bed's other pairs).

use super::field::{At, FieldError, Problem, abs_path, required};
use serde::Deserialize;
use std::path::PathBuf;

/// The id of the `tls-creds-x509` object `qemu-args` gives the primary QEMU, and that
/// `start` names in `migrate-set-parameters tls-creds`.
pub const TLS_CREDS_ID: &str = "colo-tls0";

/// The id of the `tls-creds-x509` server object (`endpoint=server`, `verify-peer=on`) of a
/// QEMU that accepts the other host's QEMU on the stock stack: the secondary's NBD server
/// (`disk.backend = "replication"`), the primary's colo-compare chardevs (`network.backend =
/// "colo-compare"`). The secondary's QEMU also gets a client object, named [`TLS_CREDS_ID`]
/// like the primary's, for its chardevs to the primary.
pub const TLS_SERVER_CREDS_ID: &str = "colo-tls-server0";

/// The id of the `authz-list` object beside [`TLS_SERVER_CREDS_ID`]: only the other host's
/// certificate (its distinguished name starts with `CN=<its name>`) may connect.
pub const TLS_AUTHZ_ID: &str = "colo-tls-peer0";

/// The `authz-list` object [`TLS_AUTHZ_ID`] that allows only `peer`'s certificate. QEMU
/// matches the certificate's distinguished name as gnutls writes it (RFC 4514, CN first):
/// `CN=<peer>` exactly (`qmp-driver pki`'s), or followed by other attributes (an operator's
/// own CA). The same object on a command line (`-object` takes JSON) and in `object-add`.
pub fn peer_authz(peer: &TlsHost) -> serde_json::Value {
    serde_json::json!({
        "qom-type": "authz-list",
        "id": TLS_AUTHZ_ID,
        "policy": "deny",
        "rules": [
            { "match": format!("CN={}", peer.name), "policy": "allow", "format": "exact" },
            { "match": format!("CN={},*", peer.name), "policy": "allow", "format": "glob" },
        ],
    })
}

/// One host's identity: its directory (on that host) and its name (in its certificates).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsHost {
    /// The identity directory in QEMU's `tls-creds-x509` layout.
    pub dir: PathBuf,
    /// The DNS name its certificates carry, which the other host names as its peer.
    pub name: String,
}

/// The `[tls]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// The primary host's identity.
    pub primary: TlsHost,
    /// The secondary host's identity (the relay's host).
    pub secondary: TlsHost,
}

/// `[tls]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    primary_dir: Option<PathBuf>,
    primary_name: Option<String>,
    secondary_dir: Option<PathBuf>,
    secondary_name: Option<String>,
}

impl TryFrom<RawTls> for TlsConfig {
    type Error = FieldError;

    fn try_from(raw: RawTls) -> Result<TlsConfig, FieldError> {
        let dir = |value: Option<PathBuf>, key: &str| {
            required(
                value,
                "the host's identity directory (qmp-driver pki), e.g. \"/etc/colo/pki\"",
            )
            .and_then(abs_path)
            .and_then(no_comma)
            .at(key)
        };
        let name = |value: Option<String>, key: &str| {
            required(
                value,
                "the host's name as its certificates carry it, e.g. \"hosta\"",
            )
            .and_then(dns_name)
            .at(key)
        };
        let primary = TlsHost {
            dir: dir(raw.primary_dir, "tls.primary_dir")?,
            name: name(raw.primary_name, "tls.primary_name")?,
        };
        let secondary = TlsHost {
            dir: dir(raw.secondary_dir, "tls.secondary_dir")?,
            name: name(raw.secondary_name, "tls.secondary_name")?,
        };
        if primary.name == secondary.name {
            return Err(Problem::SameAs {
                value: secondary.name,
                other: "tls.primary_name: each host needs its own identity".into(),
            })
            .at("tls.secondary_name");
        }
        Ok(TlsConfig { primary, secondary })
    }
}

/// QEMU's `dir=` would need `,,` for a comma, and colo's daemons take the path as it is:
/// simpler to refuse one.
fn no_comma(path: PathBuf) -> Result<PathBuf, Problem> {
    if path.to_string_lossy().contains(',') {
        return Err(Problem::Comma(path));
    }
    Ok(path)
}

/// A DNS name (what `qmp-driver pki --host` puts in a certificate): labels of letters,
/// digits and `-`, separated by dots; not an IP address.
fn dns_name(name: String) -> Result<String, Problem> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    let is_ip = name.parse::<std::net::IpAddr>().is_ok();
    if is_ip || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(Problem::NotDnsName(name));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::super::testing::{MINIMAL, error_key, parse};
    use super::*;

    const RELAY: &str = r#"
        [relay]
        listen = "tcp:192.168.77.2:9997"
        control = "/run/colo/vm1/relay.sock"
    "#;
    const TLS: &str = r#"
        [tls]
        primary_dir = "/etc/colo/pki"
        primary_name = "hosta"
        secondary_dir = "/etc/colo/pki-b"
        secondary_name = "hostb.example"
    "#;

    fn with(sections: &str) -> String {
        MINIMAL.replace(
            "[migration]\n",
            "[migration]\n        primary_target = \"tcp:192.168.77.2:9997\"\n",
        ) + sections
    }

    #[test]
    fn the_tls_section_names_both_hosts_and_the_relay_gets_its_side() {
        let cfg = parse(&with(&format!("{RELAY}{TLS}"))).unwrap();
        let tls = cfg.tls.as_ref().unwrap();
        assert_eq!(tls.primary.dir, PathBuf::from("/etc/colo/pki"));
        assert_eq!(tls.primary.name, "hosta");
        assert_eq!(tls.secondary.name, "hostb.example");
        // The relay runs on the secondary host and accepts only the primary host.
        let relay_tls = cfg.relay.unwrap().tls.unwrap();
        assert_eq!(relay_tls.dir, PathBuf::from("/etc/colo/pki-b"));
        assert_eq!(relay_tls.peer, "hosta");
        // Without [tls], nothing.
        let cfg = parse(&with(RELAY)).unwrap();
        assert_eq!((cfg.tls, cfg.relay.unwrap().tls), (None, None));
    }

    /// `TLS` with `key`'s line replaced by `line` (removed when empty).
    fn tls_with(key: &str, line: &str) -> String {
        TLS.lines()
            .map(|l| {
                if l.trim().starts_with(&format!("{key} ")) {
                    format!("{line}\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect()
    }

    #[test]
    fn bad_tls_keys_are_named() {
        let cases: &[(&str, &str)] = &[
            ("primary_dir", ""),
            ("primary_dir", "primary_dir = \"pki\""),
            ("primary_dir", "primary_dir = \"/etc/colo/a,b\""),
            ("primary_name", ""),
            ("primary_name", "primary_name = \"192.168.77.1\""),
            ("primary_name", "primary_name = \"host a\""),
            ("primary_name", "primary_name = \"-a\""),
            ("secondary_dir", ""),
            ("secondary_name", "secondary_name = \"hosta\""),
        ];
        for (key, line) in cases {
            let text = with(&format!("{RELAY}{}", tls_with(key, line)));
            assert_eq!(error_key(&text), format!("tls.{key}"), "{line:?}");
        }
        // The relay terminates the migration's TLS: [tls] needs a [relay].
        assert_eq!(error_key(&with(TLS)), "tls");
        let e = error_key(&with(&format!("{RELAY}{TLS}verify = true\n")));
        assert!(e.contains("unknown field"), "{e}");
    }
}
