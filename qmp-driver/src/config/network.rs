//! `[network]`: who compares the two VMs' network output, and the ids and ports of the
//! wiring.

use super::field::{At, FieldError, Problem, endpoint, port, qemu_id};
use colo_types::Address;
use serde::de::{self, Deserializer, SeqAccess, Unexpected, Visitor};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Who compares the two VMs' network output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NetworkBackend {
    /// QEMU's colo-compare object on the primary, filter-rewriter on the
    /// secondary.
    #[default]
    ColoCompare,
    /// colo-proxyd on both hosts: the primary QEMU's filter sockets are
    /// served on its loopback for `colo-proxyd primary`; the secondary QEMU's
    /// redirectors connect to `colo-proxyd secondary` on its own loopback;
    /// the two daemons talk over `primary.host:network.link_port`.
    ColoProxyd,
}

impl NetworkBackend {
    /// The config spelling.
    pub fn name(self) -> &'static str {
        match self {
            NetworkBackend::ColoCompare => "colo-compare",
            NetworkBackend::ColoProxyd => "colo-proxyd",
        }
    }
}

/// Network filter ids and ports (the stock colo-compare wiring, or
/// colo-proxyd's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// Who compares.
    pub backend: NetworkBackend,
    /// colo-proxyd: the port of the link between the two daemons, on
    /// `primary.host`.
    pub link_port: u16,
    /// colo-proxyd, after a failover to the secondary: the port on the
    /// secondary's loopback where `colo-proxyd secondary` hands the SVM's
    /// rewritten output back to QEMU for the network (chardev `red2`).
    pub net_output_port: u16,
    /// colo-proxyd, after a failover to the secondary: the port on the
    /// secondary's loopback where QEMU hands the network's packets to
    /// `colo-proxyd secondary` to rewrite for the SVM (chardev `red3`).
    pub net_input_port: u16,
    /// colo-proxyd: a QMP monitor of the primary QEMU for `colo-proxyd
    /// primary` alone (checkpoint requests, the fail-open check); the
    /// generated primary command line opens it.
    pub proxyd_qmp: Option<Address>,
    /// colo-proxyd: a QMP monitor of the secondary QEMU for `colo-proxyd
    /// secondary` alone (it re-creates `f1` after `red0` reconnects); the
    /// generated secondary command line opens it.
    pub proxyd_secondary_qmp: Option<Address>,
    /// colo-proxyd: the uids, besides root and colo-proxyd's own, that may connect to
    /// colo-proxyd's QEMU ports on both hosts (`--qemu-uid`): the user QEMU runs as when
    /// that is neither (libvirt's `qemu`). Empty when not set.
    pub qemu_uids: Vec<u32>,
    /// The guest NIC's netdev id (both sides).
    pub netdev: String,
    /// filter-mirror's output on the primary (the secondary's `red0` connects).
    pub mirror_port: u16,
    /// colo-compare's secondary input on the primary (the secondary's `red1`
    /// connects).
    pub compare_port: u16,
    /// Loopback pair redirector → colo-compare primary input, on the primary.
    pub compare_primary_in_port: u16,
    /// Loopback pair colo-compare output → redirector, on the primary.
    pub compare_out_port: u16,
}

/// `[network]` as written (every key has a default).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNetwork {
    backend: Option<NetworkBackend>,
    link_port: Option<u16>,
    proxyd_secondary_qmp: Option<String>,
    net_output_port: Option<u16>,
    net_input_port: Option<u16>,
    proxyd_qmp: Option<String>,
    qemu_uid: Option<Uids>,
    netdev: Option<String>,
    mirror_port: Option<u16>,
    compare_port: Option<u16>,
    compare_primary_in_port: Option<u16>,
    compare_out_port: Option<u16>,
}

/// `qemu_uid` as written: one uid (`qemu_uid = 107`) or a list (`qemu_uid = [107, 108]`).
#[derive(Debug, Default)]
struct Uids(Vec<u32>);

/// What a uid may be: `uid_t`, less `(uid_t)-1`, which `chown` and `setreuid` take as "no
/// change" and no socket is ever owned by.
const UID_RANGE: &str = "a uid from 0 to 4294967294";

fn uid<E: de::Error>(value: i128) -> Result<u32, E> {
    match u32::try_from(value) {
        Ok(uid) if uid != u32::MAX => Ok(uid),
        _ => Err(E::invalid_value(
            match i64::try_from(value) {
                Ok(v) => Unexpected::Signed(v),
                Err(_) => Unexpected::Other("a larger integer"),
            },
            &UID_RANGE,
        )),
    }
}

/// One uid; its own type so that a list's element is checked with the same message.
struct Uid(u32);

impl<'de> Deserialize<'de> for Uid {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Uid, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Uid;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(UID_RANGE)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Uid, E> {
                uid(v.into()).map(Uid)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Uid, E> {
                uid(v.into()).map(Uid)
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Uids {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Uids, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Uids;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "{UID_RANGE}, or a list of them")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Uids, E> {
                Ok(Uids(vec![uid(v.into())?]))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Uids, E> {
                Ok(Uids(vec![uid(v.into())?]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Uids, A::Error> {
                let mut uids = Vec::new();
                while let Some(Uid(u)) = seq.next_element()? {
                    uids.push(u);
                }
                Ok(Uids(uids))
            }
        }
        d.deserialize_any(V)
    }
}

const ONLY_PROXYD: Problem = Problem::OnlyWith("network.backend = \"colo-proxyd\"");

impl TryFrom<RawNetwork> for NetworkConfig {
    type Error = FieldError;

    fn try_from(raw: RawNetwork) -> Result<NetworkConfig, FieldError> {
        let backend = raw.backend.unwrap_or_default();
        // colo-proxyd's monitors are refused with colo-compare: a typo in `backend` would
        // otherwise leave them silently unused.
        let proxyd_only = |given: bool| match backend {
            NetworkBackend::ColoCompare if given => Err(ONLY_PROXYD),
            _ => Ok(()),
        };
        proxyd_only(raw.proxyd_qmp.is_some()).at("network.proxyd_qmp")?;
        proxyd_only(raw.proxyd_secondary_qmp.is_some()).at("network.proxyd_secondary_qmp")?;
        // Only colo-proxyd checks who connects to QEMU's ports; with colo-compare
        // QEMU listens itself and the key would promise a restriction nobody enforces.
        proxyd_only(raw.qemu_uid.is_some()).at("network.qemu_uid")?;
        let qemu_uids = raw.qemu_uid.unwrap_or_default().0;
        for (i, uid) in qemu_uids.iter().enumerate() {
            if qemu_uids[..i].contains(uid) {
                return Err(Problem::SameAs {
                    value: uid.to_string(),
                    other: "an earlier entry of the list".into(),
                })
                .at("network.qemu_uid");
            }
        }
        let network = NetworkConfig {
            backend,
            proxyd_qmp: raw
                .proxyd_qmp
                .map(endpoint)
                .transpose()
                .at("network.proxyd_qmp")?,
            proxyd_secondary_qmp: raw
                .proxyd_secondary_qmp
                .map(endpoint)
                .transpose()
                .at("network.proxyd_secondary_qmp")?,
            qemu_uids,
            link_port: port(raw.link_port, 9006).at("network.link_port")?,
            net_output_port: port(raw.net_output_port, 9007).at("network.net_output_port")?,
            net_input_port: port(raw.net_input_port, 9008).at("network.net_input_port")?,
            netdev: qemu_id(raw.netdev, "hn0").at("network.netdev")?,
            mirror_port: port(raw.mirror_port, 9003).at("network.mirror_port")?,
            compare_port: port(raw.compare_port, 9004).at("network.compare_port")?,
            compare_primary_in_port: port(raw.compare_primary_in_port, 9001)
                .at("network.compare_primary_in_port")?,
            compare_out_port: port(raw.compare_out_port, 9005).at("network.compare_out_port")?,
        };
        // All listen on the primary host (two on its loopback); colo-proxyd's secondary
        // listens on the mirror and compare ports of the secondary's loopback.
        let ports = [
            ("network.mirror_port", network.mirror_port),
            ("network.compare_port", network.compare_port),
            (
                "network.compare_primary_in_port",
                network.compare_primary_in_port,
            ),
            ("network.compare_out_port", network.compare_out_port),
            ("network.link_port", network.link_port),
            ("network.net_output_port", network.net_output_port),
            ("network.net_input_port", network.net_input_port),
        ];
        for (i, (key, port)) in ports.iter().enumerate() {
            if let Some((other, _)) = ports[..i].iter().find(|(_, p)| p == port) {
                return Err(Problem::PortTaken { port: *port, other }).at(*key);
            }
        }
        Ok(network)
    }
}

#[cfg(test)]
mod tests {
    use super::super::ConfigError;
    use super::super::testing::{MINIMAL, error_key, parse};

    fn proxyd(keys: &str) -> String {
        format!("{MINIMAL}\n[network]\nbackend = \"colo-proxyd\"\n{keys}\n")
    }

    #[test]
    fn qemu_uid_is_one_uid_or_a_list_and_defaults_to_none() {
        let uids = |keys: &str| parse(&proxyd(keys)).unwrap().network.qemu_uids;
        assert!(uids("").is_empty());
        assert_eq!(uids("qemu_uid = 107"), [107]);
        assert_eq!(uids("qemu_uid = [107, 64055]"), [107, 64055]);
        assert!(uids("qemu_uid = []").is_empty());
        // Root is always allowed; naming it is harmless (a QEMU run as root).
        assert_eq!(uids("qemu_uid = 0"), [0]);
        assert_eq!(uids("qemu_uid = 4294967294"), [4294967294]);
    }

    #[test]
    fn a_qemu_uid_that_is_no_uid_is_refused_naming_the_key() {
        for bad in [
            "-1",
            "4294967295",
            "4294967296",
            "\"qemu\"",
            "[107, -1]",
            "[\"qemu\"]",
            "1.5",
        ] {
            let err = parse(&proxyd(&format!("qemu_uid = {bad}"))).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, ConfigError::Syntax { .. }), "{bad}: {msg}");
            assert!(msg.contains("qemu_uid"), "{bad}: {msg}");
            assert!(msg.contains("4294967294"), "{bad}: {msg}");
        }
    }

    #[test]
    fn qemu_uid_is_refused_twice_or_without_colo_proxyd() {
        assert_eq!(
            error_key(&proxyd("qemu_uid = [107, 108, 107]")),
            "network.qemu_uid"
        );
        let err = parse(&proxyd("qemu_uid = [107, 107]")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "test.toml: network.qemu_uid: 107 is also an earlier entry of the list"
        );
        let compare = format!("{MINIMAL}\n[network]\nqemu_uid = 107\n");
        let err = parse(&compare).unwrap_err();
        assert_eq!(
            err.to_string(),
            "test.toml: network.qemu_uid: only used with network.backend = \"colo-proxyd\""
        );
        let err = parse(&proxyd("qemu_uids = 107")).unwrap_err();
        assert!(err.to_string().contains("qemu_uids"), "{err}");
    }
}
