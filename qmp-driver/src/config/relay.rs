//! `[relay]`: the checkpoint-barrier relay on the secondary's host (`qmp-driver relay`).

use super::field::{
    At, FieldError, Problem, abs_path, endpoint, listen_endpoint, nonzero, required,
};
use colo_types::Address;
use serde::Deserialize;
use std::net::IpAddr;
use std::path::PathBuf;

/// Default `relay.ack_timeout_ms` (the relay's own default).
pub const DEFAULT_ACK_TIMEOUT_MS: u64 = 2000;

/// The `[relay]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelaySettings {
    /// Where the relay accepts the primary's migration connection.
    pub listen: Address,
    /// Where the relay forwards it (the secondary QEMU's incoming address).
    pub target: Address,
    /// The relay's control socket (status, failover notes, subscribers).
    pub control: PathBuf,
    /// `control_tcp`: where the relay also serves the control protocol over
    /// TCP, for the daemons on the other host (always a TCP address).
    pub control_tcp: Option<Address>,
    /// How long a checkpoint barrier waits for a subscriber's ack, in ms.
    pub ack_timeout_ms: u64,
    /// `control_group`: the control socket's group (mode 0660).
    pub control_group: Option<u32>,
    /// `operator_uids`: who may announce a failover, besides root and the relay's user.
    pub operator_uids: Vec<u32>,
    /// `operator_gid`: a primary group whose members may announce a failover.
    pub operator_gid: Option<u32>,
    /// `control_tcp_peers`: the only addresses served on `control_tcp` (none: anyone).
    pub control_tcp_peers: Vec<IpAddr>,
    /// `migration_peers`: the only addresses whose migration connections are accepted.
    pub migration_peers: Vec<IpAddr>,
    /// From `[tls]`: the secondary host's identity and the primary host's name, for the
    /// migration listener (always) and `control_tcp` (when set).
    pub tls: Option<RelayTls>,
}

/// The relay's side of `[tls]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayTls {
    /// The relay host's (the secondary's) identity directory: `--tls-dir`.
    pub dir: PathBuf,
    /// The primary host's name, the only peer accepted: `--tls-peer`.
    pub peer: String,
}

/// `[relay]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRelay {
    listen: Option<String>,
    target: Option<String>,
    control: Option<PathBuf>,
    control_tcp: Option<String>,
    ack_timeout_ms: Option<u64>,
    control_group: Option<u32>,
    #[serde(default)]
    operator_uids: Vec<u32>,
    operator_gid: Option<u32>,
    #[serde(default)]
    control_tcp_peers: Vec<IpAddr>,
    #[serde(default)]
    migration_peers: Vec<IpAddr>,
}

/// `[relay]`, validated on its own: `target` defaults to `migration.secondary_incoming`,
/// which [`super::PairConfig`] settles.
#[derive(Debug)]
pub(super) struct RelaySection {
    pub(super) listen: Address,
    pub(super) target: Option<Address>,
    pub(super) control: PathBuf,
    pub(super) control_tcp: Option<Address>,
    pub(super) ack_timeout_ms: u64,
    pub(super) control_group: Option<u32>,
    pub(super) operator_uids: Vec<u32>,
    pub(super) operator_gid: Option<u32>,
    pub(super) control_tcp_peers: Vec<IpAddr>,
    pub(super) migration_peers: Vec<IpAddr>,
}

impl TryFrom<RawRelay> for RelaySection {
    type Error = FieldError;

    fn try_from(raw: RawRelay) -> Result<RelaySection, FieldError> {
        let listen = required(
            raw.listen,
            "where the relay accepts the primary's migration, e.g. \"tcp:0.0.0.0:9998\"",
        )
        .and_then(listen_endpoint)
        .at("relay.listen")?;
        let target = raw.target.map(endpoint).transpose().at("relay.target")?;
        let control = required(
            raw.control,
            "the relay's control socket path, e.g. \"/run/colo/vm1/relay.sock\"",
        )
        .and_then(abs_path)
        .at("relay.control")?;
        let control_tcp = raw
            .control_tcp
            .map(|s| control_tcp(&s, &listen))
            .transpose()
            .at("relay.control_tcp")?;
        let ack_timeout_ms = nonzero(
            raw.ack_timeout_ms.unwrap_or(DEFAULT_ACK_TIMEOUT_MS),
            "give at least 1 ms",
        )
        .at("relay.ack_timeout_ms")?;
        if control_tcp.is_none() && !raw.control_tcp_peers.is_empty() {
            return Err(Problem::OnlyWith("relay.control_tcp")).at("relay.control_tcp_peers");
        }
        if !listen.is_tcp() && !raw.migration_peers.is_empty() {
            return Err(Problem::OnlyWith(
                "a TCP relay.listen (a Unix socket has no peer address)",
            ))
            .at("relay.migration_peers");
        }
        Ok(RelaySection {
            listen,
            target,
            control,
            control_tcp,
            ack_timeout_ms,
            control_group: raw.control_group,
            operator_uids: raw.operator_uids,
            operator_gid: raw.operator_gid,
            control_tcp_peers: raw.control_tcp_peers,
            migration_peers: raw.migration_peers,
        })
    }
}

/// `control_tcp`: `HOST:PORT` (or `tcp:HOST:PORT`) with a fixed port the daemons connect to,
/// not the migration's `listen`.
fn control_tcp(value: &str, listen: &Address) -> Result<Address, Problem> {
    let address = Address::parse_host_port(value)?;
    if matches!(address, Address::Tcp { port: 0, .. }) {
        return Err(Problem::PortZero(address));
    }
    if address == *listen {
        return Err(Problem::SameAs {
            value: address.to_string(),
            other: "relay.listen".into(),
        });
    }
    Ok(address)
}

#[cfg(test)]
mod tests {
    use super::super::testing::{MINIMAL, error_key, parse};
    use super::*;

    fn relay_config(relay: &str) -> String {
        MINIMAL.replace(
            "[migration]\n",
            "[migration]\n        primary_target = \"tcp:192.168.77.2:9997\"\n",
        ) + relay
    }

    #[test]
    fn relay_section_defaults_and_errors() {
        let cfg = parse(&relay_config(
            "[relay]\nlisten = \"tcp:0.0.0.0:9997\"\ncontrol = \"/run/colo/vm1/relay.sock\"",
        ))
        .unwrap();
        let relay = cfg.relay.unwrap();
        assert_eq!(relay.target, cfg.migration.secondary_incoming);
        assert_eq!(relay.ack_timeout_ms, DEFAULT_ACK_TIMEOUT_MS);
        assert_eq!(relay.control_tcp, None);
        let cfg = parse(&relay_config(
            "[relay]\nlisten = \"tcp:0.0.0.0:9997\"\ncontrol = \"/r\"\ncontrol_tcp = \"192.168.77.2:9990\"",
        ))
        .unwrap();
        assert_eq!(
            cfg.relay.unwrap().control_tcp.unwrap().to_string(),
            "tcp:192.168.77.2:9990"
        );
        let cases: &[(&str, &str)] = &[
            (
                "[relay]\nlisten = \"tcp:0.0.0.0:9997\"\ncontrol = \"/r\"\ncontrol_tcp = \"9990\"",
                "relay.control_tcp",
            ),
            (
                "[relay]\nlisten = \"tcp:0.0.0.0:9997\"\ncontrol = \"/r\"\ncontrol_tcp = \"unix:/r2\"",
                "relay.control_tcp",
            ),
            (
                "[relay]\nlisten = \"tcp:0.0.0.0:9997\"\ncontrol = \"/r\"\ncontrol_tcp = \"192.168.77.2:0\"",
                "relay.control_tcp",
            ),
            (
                "[relay]\nlisten = \"tcp:0.0.0.0:9997\"\ncontrol = \"/r\"\ncontrol_tcp = \"0.0.0.0:9997\"",
                "relay.control_tcp",
            ),
            ("[relay]\ncontrol = \"/r.sock\"", "relay.listen"),
            ("[relay]\nlisten = \"tcp:0.0.0.0:9997\"", "relay.control"),
            (
                "[relay]\nlisten = \"tcp:0.0.0.0:9997\"\ncontrol = \"r.sock\"",
                "relay.control",
            ),
            (
                "[relay]\nlisten = \"tcp:0.0.0.0:9997\"\ncontrol = \"/r\"\nack_timeout_ms = 0",
                "relay.ack_timeout_ms",
            ),
            (
                "[relay]\nlisten = \"tcp:0.0.0.0:9997\"\ncontrol = \"/r\"\ntarget = \"tcp:0.0.0.0:9997\"",
                "relay.target",
            ),
            (
                "[relay]\nlisten = \"tcp:0.0.0.0:9997\"\ncontrol = \"/r\"\ntarget = \"bogus\"",
                "relay.target",
            ),
        ];
        for (relay, key) in cases {
            assert_eq!(error_key(&relay_config(relay)), *key, "{relay}");
        }
    }

    #[test]
    fn the_access_keys() {
        let base = "[relay]\nlisten = \"tcp:0.0.0.0:9997\"\ncontrol = \"/r\"\n";
        let cfg = parse(&relay_config(&format!(
            "{base}control_tcp = \"192.168.77.2:9990\"\ncontrol_group = 990\n\
             operator_uids = [1000, 1001]\noperator_gid = 991\n\
             control_tcp_peers = [\"192.168.77.1\"]\nmigration_peers = [\"192.168.77.1\"]\n"
        )))
        .unwrap();
        let relay = cfg.relay.unwrap();
        let primary: IpAddr = "192.168.77.1".parse().unwrap();
        assert_eq!(relay.control_group, Some(990));
        assert_eq!(relay.operator_uids, [1000, 1001]);
        assert_eq!(relay.operator_gid, Some(991));
        assert_eq!(relay.control_tcp_peers, [primary]);
        assert_eq!(relay.migration_peers, [primary]);
        let relay = parse(&relay_config(base)).unwrap().relay.unwrap();
        assert!(relay.operator_uids.is_empty() && relay.migration_peers.is_empty());
        assert_eq!(
            error_key(&relay_config(&format!(
                "{base}control_tcp_peers = [\"192.168.77.1\"]\n"
            ))),
            "relay.control_tcp_peers"
        );
        let unix = "[relay]\nlisten = \"unix:/run/in.sock\"\ncontrol = \"/r\"\n";
        assert_eq!(
            error_key(&relay_config(&format!(
                "{unix}migration_peers = [\"192.168.77.1\"]\n"
            ))),
            "relay.migration_peers"
        );
        let e = error_key(&relay_config(&format!(
            "{base}operator_uids = [\"root\"]\n"
        )));
        assert!(
            e.contains("operator_uids") || e.contains("invalid type"),
            "{e}"
        );
    }
}
