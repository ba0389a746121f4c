//! `[network]`: who compares the two VMs' network output, and the ids and ports of the
//! wiring.

use super::field::{At, FieldError, Problem, endpoint, port, qemu_id};
use colo_types::Address;
use serde::{Deserialize, Serialize};

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
    netdev: Option<String>,
    mirror_port: Option<u16>,
    compare_port: Option<u16>,
    compare_primary_in_port: Option<u16>,
    compare_out_port: Option<u16>,
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
