//! The config file of one protected VM pair (TOML), and its validation.
//!
//! Each section has its own file: its raw form as written (every key optional, unknown keys
//! refused) and its validation into a typed section, on its own. This module reads the file,
//! validates the sections in the file's order and then checks what spans sections (the
//! relay's addresses against `[migration]`, the `[vm]` overlays against `disk.backend`), so
//! that every error names the full dotted key (`migration.checkpoint_delay_ms`) and says
//! what is wrong once: `FILE: KEY: PROBLEM`. The fully commented example is
//! `qemu-configs/pair.example.toml`.
//!
//! | file | section |
//! |---|---|
//! | `name.rs` | the top level: `name` |
//! | `host.rs` | `[primary]`, `[secondary]` |
//! | `migration.rs` | `[migration]` |
//! | `relay.rs` | `[relay]` |
//! | `disk.rs` | `[disk]` |
//! | `network.rs` | `[network]` |
//! | `failover.rs` | `[failover]` |
//! | `vm.rs` | `[vm]` |
//! | `tls.rs` | `[tls]` |
//! | `field.rs` | the checks the sections share, and [`Problem`] |
//!
//! ```
//! use qmp_driver::config::PairConfig;
//!
//! let cfg = PairConfig::from_toml(
//!     r#"
//!     name = "vm1"
//!     [primary]
//!     qmp = "unix:/run/colo/vm1/primary.qmp"
//!     host = "192.168.77.1"
//!     [secondary]
//!     qmp = "tcp:192.168.77.2:4444"
//!     host = "192.168.77.2"
//!     [migration]
//!     secondary_incoming = "tcp:192.168.77.2:9998"
//!     "#,
//!     "inline",
//! )
//! .unwrap();
//! assert_eq!(cfg.migration.checkpoint_delay_ms, 2000);
//! assert_eq!(cfg.migration.primary_target.to_string(), "tcp:192.168.77.2:9998");
//! ```

mod disk;
mod failover;
mod field;
mod host;
mod migration;
mod name;
mod network;
mod relay;
#[cfg(test)]
pub(crate) mod testing;
mod tls;
mod vm;

pub use disk::{BLOCKD_REPLICA_EXPORT, BLOCKD_SVM_EXPORT, DiskBackend, DiskConfig};
pub use failover::FailoverConfig;
pub use field::Problem;
pub use host::HostConfig;
pub use migration::{DEFAULT_CHECKPOINT_DELAY_MS, MigrationConfig};
pub use network::{NetworkBackend, NetworkConfig};
pub use relay::{DEFAULT_ACK_TIMEOUT_MS, RelaySettings, RelayTls};
pub use tls::{TLS_AUTHZ_ID, TLS_CREDS_ID, TLS_SERVER_CREDS_ID, TlsConfig, TlsHost, peer_authz};
pub use vm::{ImageFormat, MemoryBackend, VmConfig};

use colo_types::Role;
use field::{At, FieldError, required};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Environment variable naming the config file when `--config` is not given.
pub const CONFIG_ENV: &str = "COLO_CONFIG";

/// Why a config could not be loaded. Every variant but [`ConfigError::Missing`] names the
/// file (or the origin given to [`PairConfig::from_toml`]); [`ConfigError::Invalid`] also
/// names the dotted key. Each message is complete on one line, its cause said once (the CLI
/// prints it as it is), so no variant repeats its cause as [`std::error::Error::source`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Neither `--config` nor `COLO_CONFIG` was given.
    #[error("no config file: pass --config PATH or set {CONFIG_ENV}")]
    Missing,
    /// The file could not be read.
    #[error("cannot read config file {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// Not valid TOML, a value of the wrong type, or an unknown key. TOML's
    /// message shows the offending line, key included.
    #[error("{origin}: {message}")]
    Syntax {
        /// File name or other origin.
        origin: String,
        /// The parser's message.
        message: String,
    },
    /// A key is missing or its value is not acceptable.
    #[error("{origin}: {key}: {problem}")]
    Invalid {
        /// File name or other origin.
        origin: String,
        /// Full dotted key, e.g. `network.mirror_port`.
        key: String,
        /// What is wrong and what is expected.
        problem: Problem,
    },
}

impl ConfigError {
    /// The dotted key a [`ConfigError::Invalid`] is about.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// One protected VM pair, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct PairConfig {
    /// Name of the pair (the libvirt domain name, in file names and logs).
    pub name: String,
    /// The primary host and its QEMU.
    pub primary: HostConfig,
    /// The secondary host and its QEMU.
    pub secondary: HostConfig,
    /// Migration addresses and checkpoint period.
    pub migration: MigrationConfig,
    /// The checkpoint-barrier relay, when one runs on the secondary host.
    pub relay: Option<RelaySettings>,
    /// Disk replication ids.
    pub disk: DiskConfig,
    /// Network filter ids and ports.
    pub network: NetworkConfig,
    /// Hooks run at failover.
    pub failover: FailoverConfig,
    /// VM settings for the command-line generator (`qemu-args`).
    pub vm: Option<VmConfig>,
    /// The hosts' TLS identities: mutual TLS on the inter-host channels.
    pub tls: Option<TlsConfig>,
}

/// The whole file as written: the sections' raw forms.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    name: Option<String>,
    primary: Option<host::RawHost>,
    secondary: Option<host::RawHost>,
    migration: Option<migration::RawMigration>,
    relay: Option<relay::RawRelay>,
    #[serde(default)]
    disk: disk::RawDisk,
    #[serde(default)]
    network: network::RawNetwork,
    #[serde(default)]
    failover: failover::RawFailover,
    vm: Option<vm::RawVm>,
    tls: Option<tls::RawTls>,
}

impl PairConfig {
    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<PairConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        PairConfig::from_toml(&text, &path.display().to_string())
    }

    /// Parses and validates TOML text. `origin` (a file name) prefixes every
    /// error message.
    pub fn from_toml(text: &str, origin: &str) -> Result<PairConfig, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            origin: origin.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        PairConfig::assemble(raw).map_err(|FieldError { key, problem }| ConfigError::Invalid {
            origin: origin.to_string(),
            key,
            problem,
        })
    }

    /// Validates each section on its own, in the file's order, then what spans sections.
    fn assemble(raw: RawConfig) -> Result<PairConfig, FieldError> {
        let name = name::validate(raw.name)?;
        let host = |side: Role, raw| {
            let raw = required(raw, "the section with `qmp` and `host`").at(side.name())?;
            HostConfig::validate(side, raw)
        };
        let primary = host(Role::Primary, raw.primary)?;
        let secondary = host(Role::Secondary, raw.secondary)?;
        let migration: migration::MigrationSection =
            required(raw.migration, "the section with `secondary_incoming`")
                .at("migration")?
                .try_into()?;
        let relay: Option<relay::RelaySection> = raw.relay.map(TryInto::try_into).transpose()?;
        let disk = DiskConfig::try_from(raw.disk)?;
        let network = NetworkConfig::try_from(raw.network)?;
        let failover = FailoverConfig::try_from(raw.failover)?;
        let vm = raw.vm.map(VmConfig::try_from).transpose()?;
        let tls = raw.tls.map(TlsConfig::try_from).transpose()?;

        let (migration, mut relay) = migration_and_relay(migration, relay)?;
        match (&tls, &mut relay) {
            (Some(_), None) => {
                return Err(Problem::OnlyWith(
                    "a [relay] section: the relay terminates the migration's TLS",
                ))
                .at("tls");
            }
            (Some(tls), Some(relay)) => {
                relay.tls = Some(RelayTls {
                    dir: tls.secondary.dir.clone(),
                    peer: tls.primary.name.clone(),
                });
            }
            (None, _) => {}
        }
        if let Some(vm) = &vm {
            overlays_match_the_disk_backend(vm, disk.backend)?;
        }
        Ok(PairConfig {
            name,
            primary,
            secondary,
            migration,
            relay,
            disk,
            network,
            failover,
            vm,
            tls,
        })
    }

    /// The host section of `side`.
    pub fn host(&self, side: Role) -> &HostConfig {
        match side {
            Role::Primary => &self.primary,
            Role::Secondary => &self.secondary,
        }
    }
}

/// `[migration]` and `[relay]` together: with a relay the primary migrates to it (never past
/// it to the secondary), and the relay forwards to `secondary_incoming` unless told otherwise
/// (never to itself).
fn migration_and_relay(
    migration: migration::MigrationSection,
    relay: Option<relay::RelaySection>,
) -> Result<(MigrationConfig, Option<RelaySettings>), FieldError> {
    let secondary_incoming = migration.secondary_incoming;
    let primary_target = match (migration.primary_target, &relay) {
        (Some(target), _) => target,
        (None, None) => secondary_incoming.clone(),
        (None, Some(_)) => {
            return Err(Problem::Missing(
                "with a [relay], give the address at which the primary reaches the relay's \
                 `listen` socket, e.g. \"tcp:192.168.77.2:9998\"",
            ))
            .at("migration.primary_target");
        }
    };
    let relay = match relay {
        None => None,
        Some(r) => {
            if primary_target == secondary_incoming {
                return Err(Problem::BypassesRelay {
                    target: primary_target,
                    listen: r.listen,
                })
                .at("migration.primary_target");
            }
            let target = r.target.unwrap_or_else(|| secondary_incoming.clone());
            if target == r.listen {
                return Err(Problem::SameAs {
                    value: target.to_string(),
                    other: "relay.listen".into(),
                })
                .at("relay.target");
            }
            Some(RelaySettings {
                listen: r.listen,
                target,
                control: r.control,
                control_tcp: r.control_tcp,
                ack_timeout_ms: r.ack_timeout_ms,
                control_group: r.control_group,
                operator_uids: r.operator_uids,
                operator_gid: r.operator_gid,
                control_tcp_peers: r.control_tcp_peers,
                migration_peers: r.migration_peers,
                tls: None,
            })
        }
    };
    let migration = MigrationConfig {
        secondary_incoming,
        primary_target,
        checkpoint_delay_ms: migration.checkpoint_delay_ms,
    };
    Ok((migration, relay))
}

/// `[vm]`'s two overlays are the replication driver's: required with it, refused with
/// colo-blockd (which keeps the secondary's overlay itself).
fn overlays_match_the_disk_backend(vm: &VmConfig, backend: DiskBackend) -> Result<(), FieldError> {
    for (key, overlay, what) in [
        (
            "vm.secondary_active",
            &vm.secondary_active,
            "the secondary's active qcow2 overlay (disk.backend = \"replication\" needs it)",
        ),
        (
            "vm.secondary_hidden",
            &vm.secondary_hidden,
            "the secondary's hidden qcow2 overlay (disk.backend = \"replication\" needs it)",
        ),
    ] {
        match (backend, overlay) {
            (DiskBackend::Replication, None) => return Err(Problem::Missing(what)).at(key),
            (DiskBackend::ColoBlockd, Some(_)) => {
                return Err(Problem::OnlyWith(
                    "disk.backend = \"replication\" (colo-blockd keeps the secondary's overlay \
                     itself)",
                ))
                .at(key);
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::testing::{MINIMAL, error_key, parse};
    use super::*;
    use colo_types::Address;

    #[test]
    fn the_shipped_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../qemu-configs/pair.example.toml");
        let cfg = PairConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.name, "vm1");
        let relay = cfg
            .relay
            .as_ref()
            .expect("the example configures the relay");
        assert_ne!(
            cfg.migration.primary_target,
            cfg.migration.secondary_incoming
        );
        assert_eq!(relay.target, cfg.migration.secondary_incoming);
        assert!(cfg.vm.is_some());
        assert!(cfg.failover.secondary_takeover_hook.is_some());
    }

    #[test]
    fn defaults_are_the_documented_stock_ids_and_ports() {
        let cfg = parse(MINIMAL).unwrap();
        assert_eq!(cfg.migration.checkpoint_delay_ms, 2000);
        assert_eq!(
            cfg.migration.primary_target,
            cfg.migration.secondary_incoming
        );
        assert_eq!(
            cfg.disk,
            DiskConfig {
                backend: DiskBackend::Replication,
                blockd_socket: None,
                blockd_primary_qmp: None,
                device: "colo-disk0".into(),
                export: "parent0".into(),
                nbd_port: 9999,
                replication_node: "replication0".into(),
            }
        );
        assert_eq!(
            cfg.network,
            NetworkConfig {
                backend: NetworkBackend::ColoCompare,
                link_port: 9006,
                net_output_port: 9007,
                net_input_port: 9008,
                proxyd_qmp: None,
                proxyd_secondary_qmp: None,
                qemu_uids: vec![],
                netdev: "hn0".into(),
                mirror_port: 9003,
                compare_port: 9004,
                compare_primary_in_port: 9001,
                compare_out_port: 9005,
            }
        );
        assert_eq!(cfg.failover, FailoverConfig::default());
        assert!(cfg.relay.is_none() && cfg.vm.is_none());
        assert_eq!(
            cfg.primary.qmp,
            Address::Unix("/run/colo/vm1/primary.qmp".into())
        );
    }

    #[test]
    fn every_missing_required_key_is_named() {
        // (line removed from MINIMAL, key expected in the error)
        let cases = [
            ("name = \"vm1\"", "name"),
            ("qmp = \"unix:/run/colo/vm1/primary.qmp\"", "primary.qmp"),
            ("host = \"192.168.77.2\"", "secondary.host"),
            (
                "secondary_incoming = \"tcp:192.168.77.2:9998\"",
                "migration.secondary_incoming",
            ),
        ];
        for (line, key) in cases {
            let text = MINIMAL.replacen(line, "", 1);
            assert_eq!(error_key(&text), key, "removing {line:?}");
        }
        for section in ["primary", "secondary", "migration"] {
            let text: String = MINIMAL
                .split('[')
                .filter(|part| !part.starts_with(&format!("{section}]")))
                .collect::<Vec<_>>()
                .join("[");
            assert_eq!(error_key(&text), section, "without [{section}]");
        }
    }

    #[test]
    fn every_invalid_value_is_named() {
        let with = |extra: &str| format!("{MINIMAL}\n{extra}");
        let cases: &[(&str, &str)] = &[
            ("[disk]\ndevice = \"9bad\"", "disk.device"),
            ("[disk]\nexport = \"colo-disk0\"", "disk.export"),
            ("[disk]\nnbd_port = 0", "disk.nbd_port"),
            (
                "[disk]\nreplication_node = \"a b\"",
                "disk.replication_node",
            ),
            ("[network]\nnetdev = \"\"", "network.netdev"),
            ("[network]\ncompare_port = 9003", "network.compare_port"),
            (
                "[network]\ncompare_out_port = 9001",
                "network.compare_out_port",
            ),
            ("[network]\nmirror_port = 0", "network.mirror_port"),
            (
                "[failover]\nsecondary_takeover_hook = \"  \"",
                "failover.secondary_takeover_hook",
            ),
            (
                "[failover]\nprimary_continue_hook = \"\"",
                "failover.primary_continue_hook",
            ),
            (
                "[relay]\nlisten = \"tcp:0.0.0.0:9998\"\ncontrol = \"/run/r.sock\"",
                "migration.primary_target",
            ),
        ];
        for (extra, key) in cases {
            assert_eq!(error_key(&with(extra)), *key, "{extra}");
        }
        let text = MINIMAL.replace("192.168.77.1", "a,b");
        assert_eq!(error_key(&text), "primary.host");
        let text = MINIMAL.replace("unix:/run/colo/vm1/secondary.qmp", "localhost:4444");
        assert_eq!(error_key(&text), "secondary.qmp");
        let text = MINIMAL.replace("tcp:192.168.77.2:9998", "tcp:192.168.77.2");
        assert_eq!(error_key(&text), "migration.secondary_incoming");
        let text = MINIMAL.replace("name = \"vm1\"", "name = \"vm/1\"");
        assert_eq!(error_key(&text), "name");
        let text = format!("{MINIMAL}\ncheckpoint_delay_ms = 0");
        assert_eq!(error_key(&text), "migration.checkpoint_delay_ms");
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused_with_the_key_shown() {
        let err = parse(&format!("{MINIMAL}\ncheckpoint_dealy_ms = 5")).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ConfigError::Syntax { .. }), "{msg}");
        assert!(msg.contains("checkpoint_dealy_ms"), "{msg}");
        let err = parse(&format!("{MINIMAL}\n[network]\nmirror_port = \"x\"")).unwrap_err();
        assert!(err.to_string().contains("mirror_port"), "{err}");
        let err = parse(&format!("{MINIMAL}\n[network]\nmirror_port = 70000")).unwrap_err();
        assert!(err.to_string().contains("mirror_port"), "{err}");
        let err = parse(&format!("{MINIMAL}\n[colo]\nx = 1")).unwrap_err();
        assert!(err.to_string().contains("colo"), "{err}");
        let err = parse("name = ").unwrap_err();
        assert!(err.to_string().starts_with("test.toml: "), "{err}");
    }

    #[test]
    fn each_message_names_file_and_key_and_says_the_cause_once() {
        let message = |text: &str| parse(text).unwrap_err().to_string();
        assert_eq!(
            message(&MINIMAL.replace("tcp:192.168.77.2:9998", "x")),
            "test.toml: migration.secondary_incoming: invalid address \"x\": expected \
             unix:PATH, tcp:HOST:PORT or an absolute path (a relative path needs the unix: prefix)"
        );
        assert_eq!(
            message(&MINIMAL.replace("tcp:192.168.77.2:9998", "tcp:h:0")),
            "test.toml: migration.secondary_incoming: tcp:h:0 has port 0, which nothing can \
             connect to"
        );
        assert_eq!(
            message(&MINIMAL.replacen("name = \"vm1\"", "", 1)),
            "test.toml: name: missing: the pair's name, e.g. \"vm1\""
        );
        assert_eq!(
            message(&format!("{MINIMAL}\n[network]\ncompare_port = 9003")),
            "test.toml: network.compare_port: 9003 is also network.mirror_port: every filter \
             socket needs its own port"
        );
        assert_eq!(
            message(&format!("{MINIMAL}\n[disk]\nblockd_socket = \"/b.sock\"")),
            "test.toml: disk.blockd_socket: only used with disk.backend = \"colo-blockd\""
        );
        let err = PairConfig::load(Path::new("/nonexistent/colo.toml")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot read config file /nonexistent/colo.toml: No such file or directory (os \
             error 2)"
        );
    }

    #[test]
    fn load_names_the_file() {
        let err = PairConfig::load(Path::new("/nonexistent/colo.toml")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/colo.toml"), "{err}");
    }
}
