//! `[disk]`: who keeps the secondary's copy of the disk, and the ids and port of the wiring.

use super::field::{At, FieldError, Problem, abs_path, endpoint, port, qemu_id};
use colo_types::Address;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Who keeps the secondary's copy of the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskBackend {
    /// QEMU's own block replication: the secondary QEMU runs the
    /// `replication` driver over its image and exports it with its NBD
    /// server; the primary's quorum child is `replication,mode=primary`.
    #[default]
    Replication,
    /// colo-blockd (`colo-blockd secondary`) keeps the replica: the
    /// primary's quorum child is a plain NBD client of its `replica`
    /// export, the secondary VM's disk is its `svm` export.
    ColoBlockd,
}

impl DiskBackend {
    /// The config spelling.
    pub fn name(self) -> &'static str {
        match self {
            DiskBackend::Replication => "replication",
            DiskBackend::ColoBlockd => "colo-blockd",
        }
    }
}

/// colo-blockd's export the primary's quorum child writes.
pub const BLOCKD_REPLICA_EXPORT: &str = "replica";
/// colo-blockd's export the secondary VM's disk reads and writes.
pub const BLOCKD_SVM_EXPORT: &str = "svm";

/// Disk replication ids and port (the stock `quorum` + `replication` wiring,
/// or colo-blockd).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// Who keeps the secondary's copy.
    pub backend: DiskBackend,
    /// The quorum drive the guest's disk sits on (both sides; with
    /// colo-blockd the secondary's disk is the NBD node of this name).
    pub device: String,
    /// The secondary's base drive, exported over NBD under the same name
    /// (replication backend only).
    pub export: String,
    /// TCP port of the secondary's NBD server (on `secondary.host`): QEMU's
    /// with the replication backend, colo-blockd's with the other.
    pub nbd_port: u16,
    /// Node name of the primary's NBD child of the quorum.
    pub replication_node: String,
    /// colo-blockd backend: the Unix socket the secondary VM's disk
    /// connects to (`colo-blockd secondary --unix`); without it the VM
    /// connects over TCP to `secondary.host:nbd_port`.
    pub blockd_socket: Option<PathBuf>,
    /// colo-blockd backend: the primary QEMU's QMP monitor as colo-blockd on
    /// the secondary host reaches it (`--primary-qmp`), to ask for a
    /// checkpoint when its PVM log is full; without it a full log only
    /// spills to its file until the next periodic checkpoint.
    pub blockd_primary_qmp: Option<Address>,
}

impl DiskConfig {
    /// The export the primary's quorum child writes to.
    pub fn primary_child_export(&self) -> &str {
        match self.backend {
            DiskBackend::Replication => &self.export,
            DiskBackend::ColoBlockd => BLOCKD_REPLICA_EXPORT,
        }
    }
}

/// `[disk]` as written (every key has a default).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDisk {
    backend: Option<DiskBackend>,
    blockd_socket: Option<PathBuf>,
    blockd_primary_qmp: Option<String>,
    device: Option<String>,
    export: Option<String>,
    nbd_port: Option<u16>,
    replication_node: Option<String>,
}

const ONLY_BLOCKD: Problem = Problem::OnlyWith("disk.backend = \"colo-blockd\"");

impl TryFrom<RawDisk> for DiskConfig {
    type Error = FieldError;

    fn try_from(raw: RawDisk) -> Result<DiskConfig, FieldError> {
        let backend = raw.backend.unwrap_or_default();
        // colo-blockd's keys are refused with the replication backend: a typo in `backend`
        // would otherwise leave them silently unused.
        let blockd_only = |given: bool| match backend {
            DiskBackend::Replication if given => Err(ONLY_BLOCKD),
            _ => Ok(()),
        };
        blockd_only(raw.blockd_socket.is_some()).at("disk.blockd_socket")?;
        blockd_only(raw.blockd_primary_qmp.is_some()).at("disk.blockd_primary_qmp")?;
        let disk = DiskConfig {
            backend,
            blockd_socket: raw
                .blockd_socket
                .map(abs_path)
                .transpose()
                .at("disk.blockd_socket")?,
            blockd_primary_qmp: raw
                .blockd_primary_qmp
                .map(endpoint)
                .transpose()
                .at("disk.blockd_primary_qmp")?,
            device: qemu_id(raw.device, "colo-disk0").at("disk.device")?,
            export: qemu_id(raw.export, "parent0").at("disk.export")?,
            nbd_port: port(raw.nbd_port, 9999).at("disk.nbd_port")?,
            replication_node: qemu_id(raw.replication_node, "replication0")
                .at("disk.replication_node")?,
        };
        for (key, id) in [
            ("disk.export", &disk.export),
            ("disk.replication_node", &disk.replication_node),
        ] {
            if *id == disk.device {
                return Err(Problem::SameAs {
                    value: format!("{id:?}"),
                    other: "disk.device".into(),
                })
                .at(key);
            }
        }
        Ok(disk)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{error_key, parse};
    use super::*;

    #[test]
    fn disk_backend_and_its_keys() {
        let base = r#"
            name = "t"
            [primary]
            qmp = "unix:/run/p.qmp"
            host = "10.0.0.1"
            [secondary]
            qmp = "unix:/run/s.qmp"
            host = "10.0.0.2"
            [migration]
            secondary_incoming = "tcp:10.0.0.2:9998"
        "#;
        let vm = |overlays: &str| {
            format!(
                "[vm]\ntap = \"tap0\"\nmac = \"52:54:00:12:34:56\"\nmemory_mib = 64\n\
                 primary_image = \"/i/p.raw\"\nsecondary_image = \"/i/s.raw\"\n{overlays}"
            )
        };
        let overlays = "secondary_active = \"/i/a.qcow2\"\nsecondary_hidden = \"/i/h.qcow2\"\n";

        let stock = parse(&format!("{base}\n{}", vm(overlays))).unwrap();
        assert_eq!(stock.disk.backend, DiskBackend::Replication);
        assert_eq!(stock.disk.primary_child_export(), "parent0");

        let text = format!(
            "{base}\n[disk]\nbackend = \"colo-blockd\"\nblockd_socket = \"/run/b.sock\"\n{}",
            vm("")
        );
        let blockd = parse(&text).unwrap();
        assert_eq!(blockd.disk.backend, DiskBackend::ColoBlockd);
        assert_eq!(blockd.disk.primary_child_export(), "replica");
        assert_eq!(
            blockd.disk.blockd_socket,
            Some(PathBuf::from("/run/b.sock"))
        );
        let vm_cfg = blockd.vm.unwrap();
        assert_eq!(
            (vm_cfg.secondary_active, vm_cfg.secondary_hidden),
            (None, None)
        );

        // Each backend refuses the other's keys, and names them.
        let wrong = format!(
            "{base}\n[disk]\nblockd_socket = \"/run/b.sock\"\n{}",
            vm(overlays)
        );
        assert_eq!(error_key(&wrong), "disk.blockd_socket");
        let wrong = format!(
            "{base}\n[disk]\nbackend = \"colo-blockd\"\n{}",
            vm(overlays)
        );
        assert_eq!(error_key(&wrong), "vm.secondary_active");
        let missing = format!("{base}\n{}", vm(""));
        assert_eq!(error_key(&missing), "vm.secondary_active");
        let relative = format!(
            "{base}\n[disk]\nbackend = \"colo-blockd\"\nblockd_socket = \"b.sock\"\n{}",
            vm("")
        );
        assert_eq!(error_key(&relative), "disk.blockd_socket");
        let unknown = format!("{base}\n[disk]\nbackend = \"drbd\"\n");
        assert!(parse(&unknown).is_err());
    }
}
