//! Who can connect to QEMU's own Unix sockets of the pair (its QMP monitors and the incoming
//! migration socket). QEMU creates them with its process's umask and has no option for their
//! mode: under the usual umask 022 a socket is `srwxr-xr-x` and only its owner and root may
//! connect (`connect(2)` needs write permission on the socket), but a QEMU started with umask
//! 000 or 002 serves its monitor to every local user. `status` lists the sockets of this host
//! that any local user can reach, with the fix (docs/security.md, "Local sockets").

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use colo_types::Address;
use serde::Serialize;

use crate::config::PairConfig;

/// A socket of QEMU's that every local user may connect to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OpenSocket {
    /// The pair config's key that names it.
    pub key: &'static str,
    /// Where it is.
    pub path: PathBuf,
    /// Its permission bits.
    pub mode: u32,
}

/// QEMU's Unix sockets in `cfg` that exist on this host and that any local user can connect
/// to: the socket writable by others and every directory above it searchable by others.
pub fn open_sockets(cfg: &PairConfig) -> Vec<OpenSocket> {
    let candidates: [(&'static str, Option<&Address>); 8] = [
        ("primary.qmp", Some(&cfg.primary.qmp)),
        ("primary.watch_qmp", cfg.primary.watch_qmp.as_ref()),
        ("secondary.qmp", Some(&cfg.secondary.qmp)),
        ("secondary.watch_qmp", cfg.secondary.watch_qmp.as_ref()),
        (
            "migration.secondary_incoming",
            Some(&cfg.migration.secondary_incoming),
        ),
        ("network.proxyd_qmp", cfg.network.proxyd_qmp.as_ref()),
        (
            "network.proxyd_secondary_qmp",
            cfg.network.proxyd_secondary_qmp.as_ref(),
        ),
        (
            "disk.blockd_primary_qmp",
            cfg.disk.blockd_primary_qmp.as_ref(),
        ),
    ];
    candidates
        .into_iter()
        .filter_map(|(key, address)| match address? {
            Address::Unix(path) => open_to_everyone(path).map(|mode| OpenSocket {
                key,
                path: path.clone(),
                mode,
            }),
            Address::Tcp { .. } => None,
        })
        .collect()
}

/// The socket's mode when `path` is a socket any local user can connect to.
fn open_to_everyone(path: &Path) -> Option<u32> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    if !meta.file_type().is_socket() {
        return None;
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o002 == 0 {
        return None;
    }
    // A directory others cannot search keeps them out whatever the socket's mode.
    let reachable = path.ancestors().skip(1).all(|dir| {
        dir.as_os_str().is_empty()
            || std::fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o001 != 0)
    });
    reachable.then_some(mode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::Permissions;

    fn set_mode(path: &Path, mode: u32) {
        std::fs::set_permissions(path, Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_socket_others_can_write_and_reach_is_reported() {
        let root = tempfile::tempdir().unwrap();
        set_mode(root.path(), 0o755);
        let dir = root.path().join("vm1");
        std::fs::create_dir(&dir).unwrap();
        set_mode(&dir, 0o755);
        let socket = dir.join("primary.qmp");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        // The usual umask 022: owner only.
        set_mode(&socket, 0o755);
        assert_eq!(open_to_everyone(&socket), None);
        // umask 000: everyone.
        set_mode(&socket, 0o777);
        assert_eq!(open_to_everyone(&socket), Some(0o777));
        // A 0700 directory closes it again.
        set_mode(&dir, 0o700);
        assert_eq!(open_to_everyone(&socket), None);
        // A regular file or nothing at all is not a socket of QEMU's.
        let file = root.path().join("file");
        std::fs::write(&file, b"").unwrap();
        set_mode(&file, 0o777);
        assert_eq!(open_to_everyone(&file), None);
        assert_eq!(open_to_everyone(&root.path().join("absent")), None);
    }
}
