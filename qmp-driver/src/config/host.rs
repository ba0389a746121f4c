//! `[primary]` and `[secondary]`: one host of the pair each, with the same keys.

use super::field::{At, FieldError, endpoint, host, required};
use colo_types::{Address, Role};
use serde::Deserialize;

/// One host of the pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    /// Its QEMU's QMP socket.
    pub qmp: Address,
    /// The host's address on the replication link: the primary's filter
    /// sockets listen there; the secondary's NBD server listens there.
    pub host: String,
}

/// `[primary]` or `[secondary]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHost {
    qmp: Option<String>,
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
            host: required(
                raw.host,
                "the host's address on the replication link, e.g. \"192.168.77.1\"",
            )
            .and_then(host)
            .at(format!("{section}.host"))?,
        })
    }
}
