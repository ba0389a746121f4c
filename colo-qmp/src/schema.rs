//! Argument and reply shapes for the typed commands. Enum-valued fields are
//! plain `String`s on purpose: a QEMU newer than this code may report values
//! we have never heard of, and that must not turn into a decode error.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Reply of `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// Whether the vCPUs are running.
    pub running: bool,
    /// Run state, e.g. `prelaunch`, `paused`, `running`, `colo`,
    /// `inmigrate`, `postmigrate`, `shutdown`.
    pub status: String,
}

/// Reply of `query-colo-status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColoStatus {
    /// Current COLO mode: `none`, `primary` or `secondary`.
    pub mode: String,
    /// Mode before the last failover, if QEMU reports one.
    #[serde(rename = "last-mode", default)]
    pub last_mode: Option<String>,
    /// Why COLO last exited: `none`, `request`, `error`, `processing`.
    #[serde(default)]
    pub reason: String,
}

/// Reply of `query-migrate`. Only `status` is typed; everything else QEMU
/// reports (RAM stats, `error-desc`, COLO checkpoint details, ...) is kept
/// verbatim in `extra` because its shape varies by state and version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationInfo {
    /// `setup`, `active`, `completed`, `failed`, `colo`, ...; absent before
    /// any migration was started.
    #[serde(default)]
    pub status: Option<String>,
    /// All other members of the reply object.
    #[serde(flatten)]
    pub extra: Value,
}

/// Timing of `announce-self` (self-announcement of the guest NICs after
/// failover, so switches relearn where the MAC lives). All in milliseconds
/// except `rounds`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnounceParameters {
    /// Delay before the first announcement.
    pub initial: i64,
    /// Upper bound for the delay between announcements.
    pub max: i64,
    /// Number of announcements.
    pub rounds: i64,
    /// Increase of the delay after each round.
    pub step: i64,
}

impl Default for AnnounceParameters {
    /// QEMU's own migration defaults (`announce-initial` etc.).
    fn default() -> Self {
        Self {
            initial: 50,
            max: 550,
            rounds: 5,
            step: 100,
        }
    }
}

#[derive(Serialize)]
pub(crate) struct MigrateCapability<'a> {
    pub(crate) capability: &'a str,
    pub(crate) state: bool,
}

#[derive(Serialize)]
pub(crate) struct MigrateSetCapabilitiesArgs<'a> {
    pub(crate) capabilities: Vec<MigrateCapability<'a>>,
}

#[derive(Serialize)]
pub(crate) struct UriArgs<'a> {
    pub(crate) uri: &'a str,
}

/// QEMU's `SocketAddressLegacy`, still used by `nbd-server-start`: a
/// `type` tag plus the address wrapped in `data`.
#[derive(Serialize)]
#[serde(tag = "type", content = "data", rename_all = "lowercase")]
pub(crate) enum SocketAddressLegacy<'a> {
    Inet {
        host: &'a str,
        /// QAPI types the port as a string (it may be a service name).
        port: String,
    },
    Unix {
        path: &'a str,
    },
}

#[derive(Serialize)]
pub(crate) struct NbdServerStartArgs<'a> {
    pub(crate) addr: SocketAddressLegacy<'a>,
    #[serde(rename = "tls-creds", skip_serializing_if = "Option::is_none")]
    pub(crate) tls_creds: Option<&'a str>,
    #[serde(rename = "tls-authz", skip_serializing_if = "Option::is_none")]
    pub(crate) tls_authz: Option<&'a str>,
}

#[derive(Serialize)]
pub(crate) struct NbdServerAddArgs<'a> {
    pub(crate) device: &'a str,
    pub(crate) writable: bool,
}

#[derive(Serialize)]
pub(crate) struct NodeNameArgs<'a> {
    #[serde(rename = "node-name")]
    pub(crate) node_name: &'a str,
}

#[derive(Serialize)]
pub(crate) struct XBlockdevChangeArgs<'a> {
    pub(crate) parent: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) child: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) node: Option<&'a str>,
}

#[derive(Serialize)]
pub(crate) struct IdArgs<'a> {
    pub(crate) id: &'a str,
}

#[derive(Serialize)]
pub(crate) struct ChardevAddArgs<'a> {
    pub(crate) id: &'a str,
    pub(crate) backend: Value,
}

#[derive(Serialize)]
pub(crate) struct YankArgs {
    pub(crate) instances: Value,
}

#[derive(Serialize)]
pub(crate) struct HumanMonitorCommandArgs<'a> {
    #[serde(rename = "command-line")]
    pub(crate) command_line: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nbd_addresses_use_legacy_shape() {
        let inet = serde_json::to_value(NbdServerStartArgs {
            addr: SocketAddressLegacy::Inet {
                host: "0.0.0.0",
                port: "9999".into(),
            },
            tls_creds: None,
            tls_authz: None,
        })
        .unwrap();
        assert_eq!(
            inet,
            json!({"addr": {"type": "inet", "data": {"host": "0.0.0.0", "port": "9999"}}})
        );
        let unix = serde_json::to_value(NbdServerStartArgs {
            addr: SocketAddressLegacy::Unix { path: "/tmp/n" },
            tls_creds: None,
            tls_authz: None,
        })
        .unwrap();
        assert_eq!(
            unix,
            json!({"addr": {"type": "unix", "data": {"path": "/tmp/n"}}})
        );
    }

    #[test]
    fn blockdev_change_skips_absent_fields() {
        let v = serde_json::to_value(XBlockdevChangeArgs {
            parent: "colo-disk0",
            child: Some("children.1"),
            node: None,
        })
        .unwrap();
        assert_eq!(v, json!({"parent": "colo-disk0", "child": "children.1"}));
    }

    #[test]
    fn replies_tolerate_unknown_values_and_fields() {
        let s: StatusInfo = serde_json::from_value(
            json!({"status": "some-new-state", "running": false, "singlestep": false}),
        )
        .unwrap();
        assert_eq!(s.status, "some-new-state");
        let c: ColoStatus =
            serde_json::from_value(json!({"mode": "none", "reason": "none"})).unwrap();
        assert_eq!(c.last_mode, None);
        let m: MigrationInfo = serde_json::from_value(json!({})).unwrap();
        assert_eq!(m.status, None);
        let m: MigrationInfo =
            serde_json::from_value(json!({"status": "colo", "ram": {"total": 1}})).unwrap();
        assert_eq!(m.status.as_deref(), Some("colo"));
        assert_eq!(m.extra["ram"]["total"], 1);
    }
}
