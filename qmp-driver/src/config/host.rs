//! `[primary]` and `[secondary]`: one host of the pair each, with the same keys.

use super::field::{At, FieldError, endpoint, host, required};
use colo_types::{Address, Role};
use serde::Deserialize;

/// One host of the pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    /// Its QEMU's QMP socket.
    pub qmp: Address,
    /// A second QMP socket for the watch agent (`qmp-driver watch`), which keeps its
    /// connection for ever: QEMU serves one client per monitor, so the agent on `qmp` would
    /// lock the operator's commands out.
    pub watch_qmp: Option<Address>,
    /// The host's address on the replication link: the primary's filter
    /// sockets listen there; the secondary's NBD server listens there.
    pub host: String,
}

/// `[primary]` or `[secondary]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHost {
    qmp: Option<String>,
    watch_qmp: Option<String>,
    host: Option<String>,
}

impl HostConfig {
    /// Validates the section of `side` (`[primary]` or `[secondary]`).
    pub(super) fn validate(side: Role, raw: RawHost) -> Result<HostConfig, FieldError> {
        let section = side.name();
        Ok(HostConfig {
            qmp: required(raw.qmp, "the QEMU's QMP socket, unix:PATH or tcp:HOST:PORT")
                .and_then(endpoint)
                .at(format!("{section}.qmp"))?,
            watch_qmp: raw
                .watch_qmp
                .map(endpoint)
                .transpose()
                .at(format!("{section}.watch_qmp"))?,
            host: required(
                raw.host,
                "the host's address on the replication link, e.g. \"192.168.77.1\"",
            )
            .and_then(host)
            .at(format!("{section}.host"))?,
        })
    }
}
