//! The config file of one protected VM pair (TOML), and its validation.
//!
//! The file is read into loosely typed `Raw*` structs (every key optional,
//! unknown keys refused) and then validated into [`PairConfig`], so that
//! every error can name the full dotted key (`migration.checkpoint_delay_ms`)
//! and say what is expected. The fully commented example is
//! `qemu-configs/pair.example.toml`.
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

use colo_types::{Address, Role};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Environment variable naming the config file when `--config` is not given.
pub const CONFIG_ENV: &str = "COLO_CONFIG";
/// Default `migration.checkpoint_delay_ms` (QEMU's own default is 20000).
pub const DEFAULT_CHECKPOINT_DELAY_MS: u32 = 2000;
/// Default `relay.ack_timeout_ms` (the relay's own default).
pub const DEFAULT_ACK_TIMEOUT_MS: u64 = 2000;

/// Why a config could not be loaded. Every variant names the file (or the
/// origin given to [`PairConfig::from_toml`]); [`ConfigError::Invalid`] also
/// names the dotted key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Neither `--config` nor `COLO_CONFIG` was given.
    #[error("no config file: pass --config PATH or set {CONFIG_ENV}")]
    Missing,
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
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
    #[error("{origin}: `{key}` {message}")]
    Invalid {
        /// File name or other origin.
        origin: String,
        /// Full dotted key, e.g. `network.mirror_port`.
        key: String,
        /// What is wrong and what is expected.
        message: String,
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
}

/// One host of the pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    /// Its QEMU's QMP socket.
    pub qmp: Address,
    /// The host's address on the replication link: the primary's filter
    /// sockets listen there; the secondary's NBD server listens there.
    pub host: String,
}

/// Where the migration stream goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationConfig {
    /// Where the secondary QEMU listens (`migrate-incoming`).
    pub secondary_incoming: Address,
    /// Where the primary migrates to (`migrate`): the relay's address, or
    /// `secondary_incoming` without a relay.
    pub primary_target: Address,
    /// `x-checkpoint-delay`: the periodic checkpoint interval in ms.
    pub checkpoint_delay_ms: u32,
}

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
    pub control_tcp: Option<colo_types::Address>,
    /// How long a checkpoint barrier waits for a subscriber's ack, in ms.
    pub ack_timeout_ms: u64,
}

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

/// Hooks run at failover, on the survivor's host, through `sh -c`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FailoverConfig {
    /// After the secondary took over, before `announce-self` (e.g. put its
    /// tap on the bridge).
    pub secondary_takeover_hook: Option<String>,
    /// After the primary left COLO.
    pub primary_continue_hook: Option<String>,
}

impl FailoverConfig {
    /// The hook for the side that survives.
    pub fn hook_for(&self, survivor: Role) -> Option<&str> {
        match survivor {
            Role::Primary => self.primary_continue_hook.as_deref(),
            Role::Secondary => self.secondary_takeover_hook.as_deref(),
        }
    }
}

/// Format of the primary's disk and the secondary's base image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// Raw image (default).
    #[default]
    Raw,
    /// qcow2 image.
    Qcow2,
}

impl ImageFormat {
    /// QEMU's driver name.
    pub fn driver(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

/// The `[vm]` section, for the command-line generator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// The primary host's tap device for the guest NIC.
    pub tap: String,
    /// The secondary host's tap (default: the same name as `tap`).
    pub secondary_tap: String,
    /// The guest NIC's MAC address (the same on both VMs).
    pub mac: String,
    /// Guest RAM in MiB (the secondary QEMU needs about twice this).
    pub memory_mib: u32,
    /// Format of `primary_image` and `secondary_image`.
    pub image_format: ImageFormat,
    /// The primary's disk image.
    pub primary_image: PathBuf,
    /// The secondary's copy of the disk (exported over NBD).
    pub secondary_image: PathBuf,
    /// The secondary's active overlay (qcow2, same virtual size); required
    /// with the replication backend, absent with colo-blockd.
    pub secondary_active: Option<PathBuf>,
    /// The secondary's hidden overlay (qcow2, same virtual size); required
    /// with the replication backend, absent with colo-blockd.
    pub secondary_hidden: Option<PathBuf>,
}

impl VmConfig {
    /// The tap of `side`.
    pub fn tap_for(&self, side: Role) -> &str {
        match side {
            Role::Primary => &self.tap,
            Role::Secondary => &self.secondary_tap,
        }
    }
}

// ---------------------------------------------------------------------------
// Raw (as written) form.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    name: Option<String>,
    primary: Option<RawHost>,
    secondary: Option<RawHost>,
    migration: Option<RawMigration>,
    relay: Option<RawRelay>,
    #[serde(default)]
    disk: RawDisk,
    #[serde(default)]
    network: RawNetwork,
    #[serde(default)]
    failover: RawFailover,
    vm: Option<RawVm>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    qmp: Option<String>,
    host: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMigration {
    secondary_incoming: Option<String>,
    primary_target: Option<String>,
    checkpoint_delay_ms: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelay {
    listen: Option<String>,
    target: Option<String>,
    control: Option<PathBuf>,
    control_tcp: Option<String>,
    ack_timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDisk {
    backend: Option<DiskBackend>,
    blockd_socket: Option<PathBuf>,
    blockd_primary_qmp: Option<String>,
    device: Option<String>,
    export: Option<String>,
    nbd_port: Option<u16>,
    replication_node: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFailover {
    secondary_takeover_hook: Option<String>,
    primary_continue_hook: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVm {
    tap: Option<String>,
    secondary_tap: Option<String>,
    mac: Option<String>,
    memory_mib: Option<u32>,
    image_format: Option<ImageFormat>,
    primary_image: Option<PathBuf>,
    secondary_image: Option<PathBuf>,
    secondary_active: Option<PathBuf>,
    secondary_hidden: Option<PathBuf>,
}

// ---------------------------------------------------------------------------
// Validation.

/// Collects the origin for error messages.
struct Check<'a> {
    origin: &'a str,
}

impl Check<'_> {
    fn err(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.to_string(),
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn required<T>(&self, key: &str, value: Option<T>, what: &str) -> Result<T, ConfigError> {
        value.ok_or_else(|| self.err(key, format!("is missing: {what}")))
    }

    fn endpoint(
        &self,
        key: &str,
        value: Option<String>,
        what: &str,
    ) -> Result<Address, ConfigError> {
        let s = self.required(key, value, what)?;
        let ep: Address = s
            .parse()
            .map_err(|e| self.err(key, format!("is invalid: {e}")))?;
        // Port 0 only makes sense for a listener the relay binds.
        if key != "relay.listen" && matches!(&ep, Address::Tcp { port: 0, .. }) {
            return Err(self.err(key, format!("is {s:?}: port 0 cannot be connected to")));
        }
        Ok(ep)
    }

    /// A QEMU id (`-drive id=`, `-netdev id=`, node names): a letter, then
    /// letters, digits, `-`, `.`, `_`.
    fn qemu_id(
        &self,
        key: &str,
        value: Option<String>,
        default: &str,
    ) -> Result<String, ConfigError> {
        let id = value.unwrap_or_else(|| default.to_string());
        let mut chars = id.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
        if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || "-._".contains(c)) {
            return Err(self.err(
                key,
                format!(
                    "is {id:?}: a QEMU id starts with a letter and has only letters, digits, \
                     '-', '.' and '_'"
                ),
            ));
        }
        Ok(id)
    }

    fn port(&self, key: &str, value: Option<u16>, default: u16) -> Result<u16, ConfigError> {
        match value.unwrap_or(default) {
            0 => Err(self.err(key, "is 0: give a TCP port from 1 to 65535")),
            p => Ok(p),
        }
    }

    fn host(&self, key: &str, value: Option<String>) -> Result<String, ConfigError> {
        let host = self.required(
            key,
            value,
            "the host's address on the replication link, e.g. \"192.168.77.1\"",
        )?;
        if host.is_empty()
            || host
                .chars()
                .any(|c| c.is_whitespace() || c == ',' || c == '=' || c == '/')
        {
            return Err(self.err(
                key,
                format!("is {host:?}: give a host name or IP address (no spaces, ',', '=' or '/')"),
            ));
        }
        Ok(host)
    }

    fn abs_path(
        &self,
        key: &str,
        value: Option<PathBuf>,
        what: &str,
    ) -> Result<PathBuf, ConfigError> {
        let path = self.required(key, value, what)?;
        if !path.is_absolute() {
            return Err(self.err(
                key,
                format!(
                    "is {:?}: give an absolute path (QEMU and libvirt do not run in this \
                     directory)",
                    path.display()
                ),
            ));
        }
        Ok(path)
    }

    fn hook(&self, key: &str, value: Option<String>) -> Result<Option<String>, ConfigError> {
        match value {
            Some(cmd) if cmd.trim().is_empty() => {
                Err(self.err(key, "is empty: remove the key, or give a shell command"))
            }
            other => Ok(other),
        }
    }

    fn tap(&self, key: &str, value: Option<String>) -> Result<String, ConfigError> {
        let tap = self.required(
            key,
            value,
            "the tap device of the guest NIC, e.g. \"tap-vm1\"",
        )?;
        let ok = !tap.is_empty()
            && tap.len() <= 15
            && tap
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
        if !ok {
            return Err(self.err(
                key,
                format!(
                    "is {tap:?}: an interface name has 1 to 15 letters, digits, '-', '.' or '_'"
                ),
            ));
        }
        Ok(tap)
    }
}

fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

impl PairConfig {
    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<PairConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
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
        PairConfig::validate(raw, &Check { origin })
    }

    fn validate(raw: RawConfig, c: &Check<'_>) -> Result<PairConfig, ConfigError> {
        let name = c.required("name", raw.name, "the pair's name, e.g. \"vm1\"")?;
        if name.is_empty()
            || !name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "-._".contains(ch))
        {
            return Err(c.err(
                "name",
                format!("is {name:?}: use letters, digits, '-', '.' and '_' only (it names files)"),
            ));
        }

        let host = |side: &str, raw: Option<RawHost>| -> Result<HostConfig, ConfigError> {
            let raw = c.required(side, raw, "the section with `qmp` and `host`")?;
            Ok(HostConfig {
                qmp: c.endpoint(
                    &format!("{side}.qmp"),
                    raw.qmp,
                    "the QEMU's QMP socket, unix:PATH or tcp:HOST:PORT",
                )?,
                host: c.host(&format!("{side}.host"), raw.host)?,
            })
        };
        let primary = host("primary", raw.primary)?;
        let secondary = host("secondary", raw.secondary)?;

        let relay_raw = raw.relay;
        let mig = c.required(
            "migration",
            raw.migration,
            "the section with `secondary_incoming`",
        )?;
        let secondary_incoming = c.endpoint(
            "migration.secondary_incoming",
            mig.secondary_incoming,
            "where the secondary QEMU listens for the migration, e.g. \
             \"unix:/run/colo/vm1/incoming.sock\"",
        )?;
        let primary_target = match (mig.primary_target, &relay_raw) {
            (Some(s), _) => c.endpoint("migration.primary_target", Some(s), "")?,
            (None, None) => secondary_incoming.clone(),
            (None, Some(_)) => {
                return Err(c.err(
                    "migration.primary_target",
                    "is missing: with a [relay], give the address at which the primary \
                     reaches the relay's `listen` socket, e.g. \"tcp:192.168.77.2:9998\"",
                ));
            }
        };
        let checkpoint_delay_ms = match mig
            .checkpoint_delay_ms
            .unwrap_or(DEFAULT_CHECKPOINT_DELAY_MS)
        {
            0 => {
                return Err(c.err(
                    "migration.checkpoint_delay_ms",
                    "is 0: give the periodic checkpoint interval in ms (at least 1; \
                     QEMU's default is 20000, colo's 2000)",
                ));
            }
            d => d,
        };
        let migration = MigrationConfig {
            secondary_incoming,
            primary_target,
            checkpoint_delay_ms,
        };

        let relay = match relay_raw {
            None => None,
            Some(r) => {
                let listen = c.endpoint(
                    "relay.listen",
                    r.listen,
                    "where the relay accepts the primary's migration, e.g. \
                     \"tcp:0.0.0.0:9998\"",
                )?;
                let target = match r.target {
                    Some(s) => c.endpoint("relay.target", Some(s), "")?,
                    None => migration.secondary_incoming.clone(),
                };
                let control = c.abs_path(
                    "relay.control",
                    r.control,
                    "the relay's control socket path, e.g. \"/run/colo/vm1/relay.sock\"",
                )?;
                let control_tcp = match r.control_tcp {
                    None => None,
                    Some(s) => {
                        let key = "relay.control_tcp";
                        let a = colo_types::Address::parse_host_port(&s)
                            .map_err(|e| c.err(key, format!("is invalid: {e}")))?;
                        if matches!(a, colo_types::Address::Tcp { port: 0, .. }) {
                            return Err(c.err(
                                key,
                                format!("is {s:?}: give a fixed port, the daemons connect to it"),
                            ));
                        }
                        if listen.to_string() == a.to_string() {
                            return Err(c.err(key, format!("is {a}, the relay's listen address")));
                        }
                        Some(a)
                    }
                };
                let ack_timeout_ms = match r.ack_timeout_ms.unwrap_or(DEFAULT_ACK_TIMEOUT_MS) {
                    0 => return Err(c.err("relay.ack_timeout_ms", "is 0: give at least 1 ms")),
                    t => t,
                };
                if migration.primary_target == migration.secondary_incoming {
                    return Err(c.err(
                        "migration.primary_target",
                        format!(
                            "is {} like migration.secondary_incoming although a [relay] is \
                             configured: the primary would bypass the relay. Point it at the \
                             relay's listen address ({listen})",
                            migration.primary_target
                        ),
                    ));
                }
                if listen == target {
                    return Err(c.err(
                        "relay.target",
                        format!("is {target}, the relay's own listen address"),
                    ));
                }
                Some(RelaySettings {
                    listen,
                    target,
                    control,
                    control_tcp,
                    ack_timeout_ms,
                })
            }
        };

        let d = raw.disk;
        let backend = d.backend.unwrap_or_default();
        let blockd_socket = match (backend, d.blockd_socket) {
            (_, None) => None,
            (DiskBackend::ColoBlockd, Some(p)) => {
                Some(c.abs_path("disk.blockd_socket", Some(p), "colo-blockd's Unix socket")?)
            }
            (DiskBackend::Replication, Some(_)) => {
                return Err(c.err(
                    "disk.blockd_socket",
                    "is only used with backend = \"colo-blockd\"",
                ));
            }
        };
        let blockd_primary_qmp = match (backend, d.blockd_primary_qmp) {
            (_, None) => None,
            (DiskBackend::ColoBlockd, Some(q)) => Some(c.endpoint(
                "disk.blockd_primary_qmp",
                Some(q),
                "the primary's QMP monitor for colo-blockd",
            )?),
            (DiskBackend::Replication, Some(_)) => {
                return Err(c.err(
                    "disk.blockd_primary_qmp",
                    "is only used with backend = \"colo-blockd\"",
                ));
            }
        };
        let disk = DiskConfig {
            backend,
            blockd_socket,
            blockd_primary_qmp,
            device: c.qemu_id("disk.device", d.device, "colo-disk0")?,
            export: c.qemu_id("disk.export", d.export, "parent0")?,
            nbd_port: c.port("disk.nbd_port", d.nbd_port, 9999)?,
            replication_node: c.qemu_id(
                "disk.replication_node",
                d.replication_node,
                "replication0",
            )?,
        };
        for (key, id) in [
            ("disk.export", &disk.export),
            ("disk.replication_node", &disk.replication_node),
        ] {
            if *id == disk.device {
                return Err(c.err(key, format!("is {id:?}, the same as disk.device")));
            }
        }

        let n = raw.network;
        let net_backend = n.backend.unwrap_or_default();
        let proxyd_qmp = match (net_backend, n.proxyd_qmp) {
            (_, None) => None,
            (NetworkBackend::ColoProxyd, Some(q)) => {
                Some(c.endpoint("network.proxyd_qmp", Some(q), "colo-proxyd's QMP monitor")?)
            }
            (NetworkBackend::ColoCompare, Some(_)) => {
                return Err(c.err(
                    "network.proxyd_qmp",
                    "is only used with network.backend = \"colo-proxyd\"",
                ));
            }
        };
        let proxyd_secondary_qmp = match (net_backend, n.proxyd_secondary_qmp) {
            (_, None) => None,
            (NetworkBackend::ColoProxyd, Some(q)) => Some(c.endpoint(
                "network.proxyd_secondary_qmp",
                Some(q),
                "colo-proxyd secondary's QMP monitor",
            )?),
            (NetworkBackend::ColoCompare, Some(_)) => {
                return Err(c.err(
                    "network.proxyd_secondary_qmp",
                    "is only used with network.backend = \"colo-proxyd\"",
                ));
            }
        };
        let network = NetworkConfig {
            backend: net_backend,
            proxyd_secondary_qmp,
            link_port: c.port("network.link_port", n.link_port, 9006)?,
            net_output_port: c.port("network.net_output_port", n.net_output_port, 9007)?,
            net_input_port: c.port("network.net_input_port", n.net_input_port, 9008)?,
            proxyd_qmp,
            netdev: c.qemu_id("network.netdev", n.netdev, "hn0")?,
            mirror_port: c.port("network.mirror_port", n.mirror_port, 9003)?,
            compare_port: c.port("network.compare_port", n.compare_port, 9004)?,
            compare_primary_in_port: c.port(
                "network.compare_primary_in_port",
                n.compare_primary_in_port,
                9001,
            )?,
            compare_out_port: c.port("network.compare_out_port", n.compare_out_port, 9005)?,
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
                return Err(c.err(
                    key,
                    format!(
                        "is {port}, the same as {other}: every filter socket needs its own port"
                    ),
                ));
            }
        }

        let f = raw.failover;
        let failover = FailoverConfig {
            secondary_takeover_hook: c.hook(
                "failover.secondary_takeover_hook",
                f.secondary_takeover_hook,
            )?,
            primary_continue_hook: c
                .hook("failover.primary_continue_hook", f.primary_continue_hook)?,
        };

        let vm = match raw.vm {
            None => None,
            Some(v) => {
                let tap = c.tap("vm.tap", v.tap)?;
                let secondary_tap = match v.secondary_tap {
                    Some(t) => c.tap("vm.secondary_tap", Some(t))?,
                    None => tap.clone(),
                };
                let mac = c.required(
                    "vm.mac",
                    v.mac,
                    "the guest NIC's MAC, e.g. \"52:54:00:12:34:56\"",
                )?;
                if !valid_mac(&mac) {
                    return Err(c.err(
                        "vm.mac",
                        format!("is {mac:?}: give six hex pairs separated by ':', e.g. 52:54:00:12:34:56"),
                    ));
                }
                let memory_mib =
                    match c.required("vm.memory_mib", v.memory_mib, "guest RAM in MiB")? {
                        0 => return Err(c.err("vm.memory_mib", "is 0: give the guest RAM in MiB")),
                        m => m,
                    };
                // The replication driver's two overlays; colo-blockd keeps its
                // overlay itself.
                let overlay = |key: &str, value: Option<PathBuf>, what: &str| match disk.backend {
                    DiskBackend::Replication => c.abs_path(key, value, what).map(Some),
                    DiskBackend::ColoBlockd if value.is_some() => Err(c.err(
                        key,
                        "is only used with disk.backend = \"replication\" (colo-blockd keeps \
                         the secondary's overlay itself)",
                    )),
                    DiskBackend::ColoBlockd => Ok(None),
                };
                Some(VmConfig {
                    tap,
                    secondary_tap,
                    mac,
                    memory_mib,
                    image_format: v.image_format.unwrap_or_default(),
                    primary_image: c.abs_path(
                        "vm.primary_image",
                        v.primary_image,
                        "the primary's disk image",
                    )?,
                    secondary_image: c.abs_path(
                        "vm.secondary_image",
                        v.secondary_image,
                        "the secondary's copy of the disk image",
                    )?,
                    secondary_active: overlay(
                        "vm.secondary_active",
                        v.secondary_active,
                        "the secondary's active qcow2 overlay",
                    )?,
                    secondary_hidden: overlay(
                        "vm.secondary_hidden",
                        v.secondary_hidden,
                        "the secondary's hidden qcow2 overlay",
                    )?,
                })
            }
        };
        if let Some(vm) = &vm {
            let mut images = vec![
                ("vm.primary_image", &vm.primary_image),
                ("vm.secondary_image", &vm.secondary_image),
            ];
            images.extend(
                vm.secondary_active
                    .as_ref()
                    .map(|p| ("vm.secondary_active", p)),
            );
            images.extend(
                vm.secondary_hidden
                    .as_ref()
                    .map(|p| ("vm.secondary_hidden", p)),
            );
            // The primary's image lives on another host, so only the three
            // secondary files must differ from each other.
            for (i, (key, path)) in images.iter().enumerate().skip(1) {
                if let Some((other, _)) = images[1..i].iter().find(|(_, p)| p == path) {
                    return Err(c.err(key, format!("is the same file as {other}")));
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        name = "vm1"
        [primary]
        qmp = "unix:/run/colo/vm1/primary.qmp"
        host = "192.168.77.1"
        [secondary]
        qmp = "unix:/run/colo/vm1/secondary.qmp"
        host = "192.168.77.2"
        [migration]
        secondary_incoming = "tcp:192.168.77.2:9998"
    "#;

    fn parse(text: &str) -> Result<PairConfig, ConfigError> {
        PairConfig::from_toml(text, "test.toml")
    }

    /// The key a refused config is refused for (the whole message when the
    /// error has no key, e.g. a TOML syntax error).
    fn error_key(text: &str) -> String {
        let err = parse(text).expect_err("config should be refused");
        let msg = err.to_string();
        assert!(msg.starts_with("test.toml: "), "{msg}");
        err.key().map(str::to_string).unwrap_or(msg)
    }

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
    fn endpoints_parse_and_print_in_qemu_syntax() {
        for ok in [
            "unix:/a/b.sock",
            "tcp:10.0.0.2:9998",
            "tcp:[fd00::2]:1",
            "tcp:host.example:65535",
        ] {
            let text = MINIMAL.replace("tcp:192.168.77.2:9998", ok);
            let cfg = parse(&text).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(cfg.migration.secondary_incoming.to_string(), ok);
        }
        for bad in [
            "",
            "unix:",
            "tcp:",
            "tcp:host",
            "tcp:h:0",
            "tcp:h:70000",
            "tcp:fd00::2:1",
            "udp:h:1",
            "relative/path",
            "tcp:h:1,nodelay=on",
        ] {
            let text = MINIMAL.replace("tcp:192.168.77.2:9998", bad);
            assert_eq!(
                error_key(&text),
                "migration.secondary_incoming",
                "{bad} accepted"
            );
        }
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

    const VM: &str = r#"
        [vm]
        tap = "tap-vm1"
        mac = "52:54:00:12:34:56"
        memory_mib = 1024
        primary_image = "/var/lib/colo/vm1/primary.raw"
        secondary_image = "/var/lib/colo/vm1/secondary.raw"
        secondary_active = "/var/lib/colo/vm1/active.qcow2"
        secondary_hidden = "/var/lib/colo/vm1/hidden.qcow2"
    "#;

    #[test]
    fn vm_section_defaults_and_errors() {
        let cfg = parse(&format!("{MINIMAL}{VM}")).unwrap();
        let vm = cfg.vm.unwrap();
        assert_eq!(vm.secondary_tap, "tap-vm1");
        assert_eq!(vm.image_format, ImageFormat::Raw);
        let cases: &[(&str, &str, &str)] = &[
            (
                "tap = \"tap-vm1\"",
                "tap = \"a-name-that-is-too-long\"",
                "vm.tap",
            ),
            (
                "tap = \"tap-vm1\"",
                "tap = \"tap-vm1\"\nsecondary_tap = \"x y\"",
                "vm.secondary_tap",
            ),
            (
                "mac = \"52:54:00:12:34:56\"",
                "mac = \"52:54:00:12:34\"",
                "vm.mac",
            ),
            ("mac = \"52:54:00:12:34:56\"", "", "vm.mac"),
            ("memory_mib = 1024", "memory_mib = 0", "vm.memory_mib"),
            (
                "/var/lib/colo/vm1/primary.raw",
                "primary.raw",
                "vm.primary_image",
            ),
            (
                "/var/lib/colo/vm1/hidden.qcow2",
                "/var/lib/colo/vm1/active.qcow2",
                "vm.secondary_hidden",
            ),
            (
                "secondary_image = \"/var/lib/colo/vm1/secondary.raw\"",
                "",
                "vm.secondary_image",
            ),
        ];
        for (from, to, key) in cases {
            let text = format!("{MINIMAL}{}", VM.replace(from, to));
            assert_eq!(error_key(&text), *key, "{from} -> {to}");
        }
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

    #[test]
    fn load_names_the_file() {
        let err = PairConfig::load(Path::new("/nonexistent/colo.toml")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/colo.toml"), "{err}");
    }
}
