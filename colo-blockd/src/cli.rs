//! colo-blockd's command line (clap), in the library so that tools and tests parse exactly what
//! the daemon parses (qmp-driver's `daemon-args` output is checked against it), and its
//! validation into [`Config`].
//!
//! Each option is taken from the first of
//!
//! 1. its flag (`--log-budget 1048576`),
//! 2. its environment variable, `COLO_BLOCKD_` and the option in capitals
//!    (`COLO_BLOCKD_LOG_BUDGET=1048576`; clap reads both, a flag over its variable),
//! 3. the `--config` file (or `COLO_BLOCKD_CONFIG`): TOML with the options' long names as keys
//!    (`log-budget = 1048576`), unknown keys refused,
//! 4. its default (`[default: ...]` in `--help`),
//!
//! as colo-proxyd and `qmp-driver relay` do (the layers and their errors:
//! [`colo_daemon::options`]). An invalid value from the file is reported with the file's name
//! and the key.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Parser, Subcommand};
use colo_daemon::DAEMON_EXIT_CODES;
use colo_daemon::logging::LogOptions;
use colo_daemon::options::{OptionError, OptionLayers};
use colo_types::Address;
use serde::Deserialize;

use crate::daemon::epochs::DEFAULT_NAME;
use crate::replica::DEFAULT_MEMORY_BUDGET;
use crate::server::{
    DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_WRITE_TIMEOUT, ServerConfig,
};

#[derive(Debug, Parser)]
#[command(
    version,
    about,
    long_about = None,
    after_help = DAEMON_EXIT_CODES
)]
pub struct Args {
    /// `--log-format` (`COLO_LOG_FORMAT`), before or after the subcommand.
    #[command(flatten)]
    pub logging: LogOptions,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Export raw image files over NBD until SIGINT/SIGTERM.
    ///
    /// Every option can also be set in its COLO_BLOCKD_* environment variable or in the
    /// --config file (TOML, the options' long names as keys); a flag beats its variable,
    /// which beats the file, which beats the default.
    Serve(ServeArgs),
    /// Run the secondary's disk replica: exports `replica` and `svm`, driven by the relay.
    #[command(long_about = SECONDARY_ABOUT, after_help = DAEMON_EXIT_CODES)]
    Secondary(SecondaryArgs),
}

const SECONDARY_ABOUT: &str = "\
Run the secondary's disk replica over the raw image S (the last adopted checkpoint) and serve
two NBD exports from it until SIGINT/SIGTERM:

  replica  written by the primary QEMU's quorum NBD child; its writes of the running epoch
           are kept in the PVM log and reach S only when the secondary adopts the checkpoint
  svm      the secondary VM's disk: its own writes (the SVM overlay) over S; it never sees
           the PVM log

colo-blockd subscribes to the checkpoint-barrier relay's control socket as a synchronous
subscriber and acknowledges each barrier event only after doing its step: svm-epoch-closed
holds new SVM requests, checkpoint-adopted commits the PVM log into S (journaled) and drops
the SVM overlay, failover with survivor secondary merges the SVM overlay into S. colo-exit is
logged and both exports keep serving: the operator decides. If the relay is unreachable,
colo-blockd keeps retrying; until it is back, COLO cannot checkpoint (the relay fails the
barrier). When the PVM log passes --log-budget and --primary-qmp is given, colo-blockd asks
the primary for a checkpoint (re-sets its x-checkpoint-delay), at most once per second.

--control is the relay's Unix socket (unix:PATH, or the bare absolute path) when the relay
runs on this host, else tcp:HOST:PORT: the relay's --control-tcp, on the replication link.

Sockets: --unix and --tcp may be given together and then serve the same exports: the SVM's
QEMU connects over the Unix socket on this host, the primary's quorum child over TCP.
--metrics serves Prometheus metrics (log and overlay fill, commit times, checkpoints,
epoch, NBD connections and requests, failovers) on GET /metrics.

Every option can also be set in its COLO_BLOCKD_* environment variable or in the --config
file (TOML, the options' long names as keys); a flag beats its variable, which beats the file,
which beats the default.

Logs go to stderr; level: RUST_LOG (default info); format: --log-format text|json (or
COLO_LOG_FORMAT), json for one JSON object per line.";

/// `colo-blockd secondary` options. Each is taken from its flag, else its environment
/// variable, else the `--config` file, else its default (see the module).
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct SecondaryArgs {
    /// TOML file with any of these options as keys (`image = "/var/lib/colo/s.raw"`); an
    /// option given on the command line or in its COLO_BLOCKD_* variable wins over the file.
    #[arg(long, env = CONFIG_ENV, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// The base image S, a raw file (the journal and spill files go next to it).
    #[arg(long, value_name = "S.raw", env = "COLO_BLOCKD_IMAGE")]
    pub image: Option<PathBuf>,
    /// Listen on this Unix socket path, e.g. for the SVM's QEMU (a stale socket there is
    /// replaced; a live one or another file is an error). Mode 0600: only this user (and
    /// root) may connect; no TLS on it. --unix, --tcp or both: both serve the same exports.
    #[arg(long, value_name = "PATH", env = "COLO_BLOCKD_UNIX")]
    pub unix: Option<PathBuf>,
    /// Listen on this TCP address, e.g. 0.0.0.0:10809 (the primary's quorum child connects
    /// here). --unix, --tcp or both: both serve the same exports.
    #[arg(long, value_name = "ADDR", env = "COLO_BLOCKD_TCP")]
    pub tcp: Option<SocketAddr>,
    /// Mutual TLS on the TCP socket (NBD STARTTLS): this host's identity directory, in QEMU's
    /// tls-creds-x509 layout (ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem,
    /// client-key.pem; `qmp-driver pki create`; docs/security.md). A TCP client must
    /// NBD_OPT_STARTTLS and present a certificate of the pair's CA for a --tls-peer name;
    /// before that every option is answered NBD_REP_ERR_TLS_REQD. The Unix socket needs no
    /// TLS (its permissions say who connects). Without it the TCP exports are unauthenticated
    /// (a warning at start, the metric colo_blockd_nbd_unauthenticated).
    #[arg(long, env = "COLO_BLOCKD_TLS_DIR", value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// With --tls-dir: the host names (in their certificates) allowed to connect over TCP,
    /// repeatable or comma-separated; for `secondary`, the primary host.
    #[arg(
        long,
        env = "COLO_BLOCKD_TLS_PEER",
        value_name = "NAME",
        value_delimiter = ','
    )]
    pub tls_peer: Vec<String>,
    /// Serve Prometheus metrics on this TCP address (GET /metrics), e.g. 127.0.0.1:9109.
    #[arg(long, value_name = "ADDR", env = "COLO_BLOCKD_METRICS")]
    pub metrics: Option<SocketAddr>,
    /// The relay's control socket: unix:PATH or an absolute path on the relay's host
    /// (`qmp-driver relay --control PATH`), or tcp:HOST:PORT from the other host (the relay's
    /// --control-tcp, on the replication link).
    #[arg(long, value_name = "ADDRESS", env = "COLO_BLOCKD_CONTROL")]
    pub control: Option<Address>,
    /// The primary QEMU's QMP monitor, as unix:PATH or tcp:HOST:PORT. Without it a full PVM log
    /// only spills to its file and waits for the next periodic checkpoint.
    #[arg(long, value_name = "ADDR", env = "COLO_BLOCKD_PRIMARY_QMP")]
    pub primary_qmp: Option<Address>,
    /// Bytes of PVM log kept in memory; past them writes spill to a file and a checkpoint is
    /// requested [default: 10485760].
    #[arg(long, value_name = "BYTES", env = "COLO_BLOCKD_LOG_BUDGET")]
    pub log_budget: Option<u64>,
    /// Bytes of SVM overlay kept in memory; past them writes spill to a file
    /// [default: 10485760].
    #[arg(long, value_name = "BYTES", env = "COLO_BLOCKD_OVERLAY_BUDGET")]
    pub overlay_budget: Option<u64>,
    /// Our name on the control socket (the relay's status and barrier errors show it)
    /// [default: colo-blockd].
    #[arg(long, env = "COLO_BLOCKD_NAME")]
    pub name: Option<String>,
    /// Requests in flight per connection [default: 32].
    #[arg(long, env = "COLO_BLOCKD_MAX_IN_FLIGHT", value_parser = clap::value_parser!(u16).range(1..))]
    pub max_in_flight: Option<u16>,
    /// NBD connections served at once, both sockets together (handshaking ones included); one
    /// more is closed before the NBD greeting, logged and counted
    /// (colo_blockd_nbd_connections_refused_total{reason="limit"}) [default: 16].
    #[arg(long, value_name = "N", env = "COLO_BLOCKD_MAX_CONNECTIONS", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: Option<u32>,
    /// Milliseconds a client has from connecting to choosing an export before it is dropped
    /// [default: 10000].
    #[arg(long, value_name = "MS", env = "COLO_BLOCKD_HANDSHAKE_TIMEOUT_MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub handshake_timeout_ms: Option<u64>,
    /// Milliseconds the socket may take no byte of a reply (the client stopped reading) before
    /// the connection is dropped; an idle client is never dropped, a dead TCP peer is noticed
    /// within about 6 s by keepalive [default: 30000].
    #[arg(long, value_name = "MS", env = "COLO_BLOCKD_WRITE_TIMEOUT_MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub write_timeout_ms: Option<u64>,
}

/// `colo-blockd serve` options. Each is taken from its flag, else its environment variable,
/// else the `--config` file, else its default (see the module).
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServeArgs {
    /// TOML file with any of these options as keys (`export = ["base=/var/lib/colo/s.raw"]`);
    /// an option given on the command line or in its COLO_BLOCKD_* variable wins over the
    /// file.
    #[arg(long, env = CONFIG_ENV, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// An export as NAME=PATH (a raw image file); repeatable or comma-separated. The first is
    /// the default export (the one a client gets for the empty name).
    #[arg(
        long = "export",
        env = "COLO_BLOCKD_EXPORT",
        value_name = "NAME=PATH",
        value_delimiter = ','
    )]
    #[serde(rename = "export")]
    pub exports: Vec<ExportSpec>,
    /// Serve every export read-only (`--read-only` alone means true) [default: false].
    #[arg(
        long,
        env = "COLO_BLOCKD_READ_ONLY",
        value_name = "BOOL",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub read_only: Option<bool>,
    /// Exit (status 0) once the first client that opened an export has disconnected: the one
    /// disk copy of an online re-protect or failback (`qmp-driver reprotect`, the HA agent's
    /// --auto-reprotect), so that nothing serves the image after it. Connections that never
    /// reach an export (a port probe, a stranger refused by TLS) do not count
    /// (`--exit-after-client` alone means true) [default: false].
    #[arg(
        long,
        env = "COLO_BLOCKD_EXIT_AFTER_CLIENT",
        value_name = "BOOL",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub exit_after_client: Option<bool>,
    /// Listen on this Unix socket path (a stale socket there is replaced; a live one or another
    /// file is an error). Mode 0600: only this user (and root) may connect; no TLS on it.
    /// --unix, --tcp or both: both serve the same exports.
    #[arg(long, value_name = "PATH", env = "COLO_BLOCKD_UNIX")]
    pub unix: Option<PathBuf>,
    /// Listen on this TCP address, e.g. 0.0.0.0:10809. --unix, --tcp or both: both serve the
    /// same exports.
    #[arg(long, value_name = "ADDR", env = "COLO_BLOCKD_TCP")]
    pub tcp: Option<SocketAddr>,
    /// Requests in flight per connection [default: 32].
    #[arg(long, env = "COLO_BLOCKD_MAX_IN_FLIGHT", value_parser = clap::value_parser!(u16).range(1..))]
    pub max_in_flight: Option<u16>,
    /// NBD connections served at once, both sockets together (handshaking ones included); one
    /// more is closed before the NBD greeting, logged and counted
    /// (colo_blockd_nbd_connections_refused_total{reason="limit"}) [default: 16].
    #[arg(long, value_name = "N", env = "COLO_BLOCKD_MAX_CONNECTIONS", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: Option<u32>,
    /// Milliseconds a client has from connecting to choosing an export before it is dropped
    /// [default: 10000].
    #[arg(long, value_name = "MS", env = "COLO_BLOCKD_HANDSHAKE_TIMEOUT_MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub handshake_timeout_ms: Option<u64>,
    /// Milliseconds the socket may take no byte of a reply (the client stopped reading) before
    /// the connection is dropped; an idle client is never dropped, a dead TCP peer is noticed
    /// within about 6 s by keepalive [default: 30000].
    #[arg(long, value_name = "MS", env = "COLO_BLOCKD_WRITE_TIMEOUT_MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub write_timeout_ms: Option<u64>,
    /// Mutual TLS on the TCP socket (NBD STARTTLS): this host's identity directory, in QEMU's
    /// tls-creds-x509 layout (ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem,
    /// client-key.pem; `qmp-driver pki create`; docs/security.md). A TCP client must
    /// NBD_OPT_STARTTLS and present a certificate of the pair's CA for a --tls-peer name;
    /// before that every option is answered NBD_REP_ERR_TLS_REQD. The Unix socket needs no
    /// TLS (its permissions say who connects). Without it the TCP exports are unauthenticated
    /// (a warning at start, the metric colo_blockd_nbd_unauthenticated).
    #[arg(long, env = "COLO_BLOCKD_TLS_DIR", value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// With --tls-dir: the host names (in their certificates) allowed to connect over TCP,
    /// repeatable or comma-separated; for `secondary`, the primary host.
    #[arg(
        long,
        env = "COLO_BLOCKD_TLS_PEER",
        value_name = "NAME",
        value_delimiter = ','
    )]
    pub tls_peer: Vec<String>,
}

/// `NAME=PATH` from the command line or the config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct ExportSpec {
    /// The export's name.
    pub name: String,
    /// The raw image file.
    pub path: PathBuf,
}

impl FromStr for ExportSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<ExportSpec, String> {
        match s.split_once('=') {
            Some((name, path)) if !name.is_empty() && !path.is_empty() => Ok(ExportSpec {
                name: name.to_owned(),
                path: PathBuf::from(path),
            }),
            _ => Err(format!("expected NAME=PATH, got {s:?}")),
        }
    }
}

impl TryFrom<String> for ExportSpec {
    type Error = String;

    fn try_from(s: String) -> Result<ExportSpec, String> {
        s.parse()
    }
}

/// The environment variable naming the config file.
pub const CONFIG_ENV: &str = "COLO_BLOCKD_CONFIG";
/// The prefix of the options' environment variables.
pub const ENV_PREFIX: &str = "COLO_BLOCKD_";

/// A bad setting. Each message is complete on one line and says its cause once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// An option is missing or invalid (named as its flag and variable, or as the config
    /// file's key), or the config file is bad.
    #[error(transparent)]
    Option(#[from] OptionError),
    /// Neither socket is configured.
    #[error(
        "no socket to serve on: give --unix, --tcp or both (or COLO_BLOCKD_UNIX, \
         COLO_BLOCKD_TCP, or `unix`, `tcp` in the config file)"
    )]
    NoSocket,
}

/// The daemon's validated settings, one kind per subcommand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Config {
    /// `colo-blockd serve`.
    Serve(ServeConfig),
    /// `colo-blockd secondary`.
    Secondary(SecondaryConfig),
}

impl TryFrom<Cmd> for Config {
    type Error = ConfigError;

    fn try_from(cmd: Cmd) -> Result<Config, ConfigError> {
        match cmd {
            Cmd::Serve(args) => ServeConfig::try_from(args).map(Config::Serve),
            Cmd::Secondary(args) => SecondaryConfig::try_from(args).map(Config::Secondary),
        }
    }
}

/// `colo-blockd serve`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeConfig {
    /// The exports, the default one first (at least one).
    pub exports: Vec<ExportSpec>,
    /// Serve every export read-only.
    pub read_only: bool,
    /// Exit once the first client that opened an export disconnected.
    pub exit_after_client: bool,
    /// The Unix socket, if any.
    pub unix: Option<PathBuf>,
    /// The TCP address, if any (at least one of the two is set).
    pub tcp: Option<SocketAddr>,
    /// Requests in flight per connection (at least 1).
    pub max_in_flight: u16,
    /// The NBD server's connection bounds.
    pub limits: ConnectionLimits,
    /// TLS required on the TCP socket (`None`: unauthenticated).
    pub tls: Option<NbdTls>,
}

/// `colo-blockd secondary`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecondaryConfig {
    /// The base image S.
    pub image: PathBuf,
    /// The Unix socket, if any.
    pub unix: Option<PathBuf>,
    /// The TCP address, if any (at least one of the two is set).
    pub tcp: Option<SocketAddr>,
    /// Where to serve metrics, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// The relay's control socket.
    pub control: Address,
    /// The primary QEMU's QMP monitor, for checkpoint requests.
    pub primary_qmp: Option<Address>,
    /// Bytes of PVM log kept in memory.
    pub log_budget: u64,
    /// Bytes of SVM overlay kept in memory.
    pub overlay_budget: u64,
    /// Our name on the control socket.
    pub name: String,
    /// Requests in flight per connection (at least 1).
    pub max_in_flight: u16,
    /// The NBD server's connection bounds.
    pub limits: ConnectionLimits,
    /// TLS required on the TCP socket (`None`: unauthenticated).
    pub tls: Option<NbdTls>,
}

/// `--tls-dir` and `--tls-peer`, validated: the identity loaded and checked.
#[derive(Debug, Clone)]
pub struct NbdTls {
    /// This host's identity directory.
    pub dir: PathBuf,
    /// This host's name (its certificates').
    pub local: String,
    /// The names allowed to connect over TCP.
    pub peers: Vec<String>,
    /// The server side of the TLS handshake.
    pub acceptor: colo_tls::PeerAcceptor,
}

/// Two settings are equal when they name the same directory and peers.
impl PartialEq for NbdTls {
    fn eq(&self, other: &NbdTls) -> bool {
        (&self.dir, &self.local, &self.peers) == (&other.dir, &other.local, &other.peers)
    }
}

impl Eq for NbdTls {}

impl NbdTls {
    /// Both options or neither; the identity loaded now, so that a bad file is a
    /// configuration error naming it. The handshake is bounded by `handshake_timeout`.
    fn from_options(
        layers: &OptionLayers,
        dir: Option<PathBuf>,
        peers: Vec<String>,
        handshake_timeout: Duration,
    ) -> Result<Option<NbdTls>, ConfigError> {
        let dir = match (dir, peers.is_empty()) {
            (None, true) => return Ok(None),
            (Some(dir), false) => dir,
            (Some(_), true) => return Err(layers.missing("tls-peer").into()),
            (None, false) => return Err(layers.missing("tls-dir").into()),
        };
        let identity = colo_tls::HostIdentity::load(&dir)
            .map_err(|e| layers.invalid("tls-dir", e.to_string()))?;
        let acceptor = colo_tls::PeerAcceptor::new(&identity, &peers, handshake_timeout)
            .map_err(|e| layers.invalid("tls-peer", e.to_string()))?;
        Ok(Some(NbdTls {
            dir,
            local: identity.name().to_owned(),
            peers,
            acceptor,
        }))
    }
}

/// `--max-connections`, `--handshake-timeout-ms`, `--write-timeout-ms`, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections served at once (at least 1).
    pub max_connections: u32,
    /// From connecting to choosing an export.
    pub handshake_timeout: Duration,
    /// Without the socket taking a byte of a reply.
    pub write_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> ConnectionLimits {
        ConnectionLimits {
            max_connections: DEFAULT_MAX_CONNECTIONS as u32,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
        }
    }
}

impl ConnectionLimits {
    /// The three options from their layers (clap refuses 0 on the command line and in the
    /// variables; the file needs the same check).
    fn pick(
        layers: &mut OptionLayers,
        given: (Option<u32>, Option<u64>, Option<u64>),
        file: (Option<u32>, Option<u64>, Option<u64>),
    ) -> Result<ConnectionLimits, ConfigError> {
        let max_connections = layers.pick("max-connections", given.0, file.0);
        let handshake = layers.pick("handshake-timeout-ms", given.1, file.1);
        let write = layers.pick("write-timeout-ms", given.2, file.2);
        let defaults = ConnectionLimits::default();
        let ms = |d: Duration| d.as_millis() as u64;
        Ok(ConnectionLimits {
            max_connections: at_least_one(
                layers,
                "max-connections",
                max_connections.unwrap_or(defaults.max_connections),
            )?,
            handshake_timeout: Duration::from_millis(at_least_one(
                layers,
                "handshake-timeout-ms",
                handshake.unwrap_or(ms(defaults.handshake_timeout)),
            )?),
            write_timeout: Duration::from_millis(at_least_one(
                layers,
                "write-timeout-ms",
                write.unwrap_or(ms(defaults.write_timeout)),
            )?),
        })
    }

    /// The server's tunables: these bounds and `max_in_flight`.
    pub fn server_config(&self, max_in_flight: u16) -> ServerConfig {
        ServerConfig {
            max_in_flight: usize::from(max_in_flight),
            max_connections: self.max_connections as usize,
            handshake_timeout: self.handshake_timeout,
            write_timeout: self.write_timeout,
            ..ServerConfig::default()
        }
    }
}

/// A count or duration that must not be 0.
fn at_least_one<T: Default + PartialEq>(
    layers: &OptionLayers,
    option: &'static str,
    value: T,
) -> Result<T, ConfigError> {
    if value == T::default() {
        return Err(layers.invalid(option, "must be at least 1").into());
    }
    Ok(value)
}

/// `--max-in-flight`: clap refuses 0 on the command line; the file needs the same check.
fn max_in_flight(layers: &OptionLayers, value: Option<u16>) -> Result<u16, ConfigError> {
    match value.unwrap_or(DEFAULT_MAX_IN_FLIGHT as u16) {
        0 => Err(layers.invalid("max-in-flight", "must be at least 1").into()),
        n => Ok(n),
    }
}

/// At least one of `--unix` and `--tcp`.
fn sockets(
    unix: Option<PathBuf>,
    tcp: Option<SocketAddr>,
) -> Result<(Option<PathBuf>, Option<SocketAddr>), ConfigError> {
    if unix.is_none() && tcp.is_none() {
        return Err(ConfigError::NoSocket);
    }
    Ok((unix, tcp))
}

impl TryFrom<ServeArgs> for ServeConfig {
    type Error = ConfigError;

    fn try_from(args: ServeArgs) -> Result<ServeConfig, ConfigError> {
        let mut layers = OptionLayers::new(ENV_PREFIX, args.config);
        let file: ServeArgs = layers.read_file()?;
        let exports = layers.pick_list("export", args.exports, file.exports);
        let read_only = layers.pick("read-only", args.read_only, file.read_only);
        let exit_after_client = layers.pick(
            "exit-after-client",
            args.exit_after_client,
            file.exit_after_client,
        );
        let unix = layers.pick("unix", args.unix, file.unix);
        let tcp = layers.pick("tcp", args.tcp, file.tcp);
        let in_flight = layers.pick("max-in-flight", args.max_in_flight, file.max_in_flight);
        let tls_dir = layers.pick("tls-dir", args.tls_dir, file.tls_dir);
        let tls_peer = layers.pick_list("tls-peer", args.tls_peer, file.tls_peer);
        let limits = ConnectionLimits::pick(
            &mut layers,
            (
                args.max_connections,
                args.handshake_timeout_ms,
                args.write_timeout_ms,
            ),
            (
                file.max_connections,
                file.handshake_timeout_ms,
                file.write_timeout_ms,
            ),
        );
        if exports.is_empty() {
            return Err(layers.missing("export").into());
        }
        let (unix, tcp) = sockets(unix, tcp)?;
        let limits = limits?;
        let tls = NbdTls::from_options(&layers, tls_dir, tls_peer, limits.handshake_timeout)?;
        Ok(ServeConfig {
            exports,
            read_only: read_only.unwrap_or(false),
            exit_after_client: exit_after_client.unwrap_or(false),
            unix,
            tcp,
            max_in_flight: max_in_flight(&layers, in_flight)?,
            limits,
            tls,
        })
    }
}

impl TryFrom<SecondaryArgs> for SecondaryConfig {
    type Error = ConfigError;

    fn try_from(args: SecondaryArgs) -> Result<SecondaryConfig, ConfigError> {
        let mut layers = OptionLayers::new(ENV_PREFIX, args.config);
        let file: SecondaryArgs = layers.read_file()?;
        let image = layers.pick("image", args.image, file.image);
        let unix = layers.pick("unix", args.unix, file.unix);
        let tcp = layers.pick("tcp", args.tcp, file.tcp);
        let metrics = layers.pick("metrics", args.metrics, file.metrics);
        let control = layers.pick("control", args.control, file.control);
        let primary_qmp = layers.pick("primary-qmp", args.primary_qmp, file.primary_qmp);
        let log_budget = layers.pick("log-budget", args.log_budget, file.log_budget);
        let overlay_budget =
            layers.pick("overlay-budget", args.overlay_budget, file.overlay_budget);
        let name = layers.pick("name", args.name, file.name);
        let in_flight = layers.pick("max-in-flight", args.max_in_flight, file.max_in_flight);
        let tls_dir = layers.pick("tls-dir", args.tls_dir, file.tls_dir);
        let tls_peer = layers.pick_list("tls-peer", args.tls_peer, file.tls_peer);
        let limits = ConnectionLimits::pick(
            &mut layers,
            (
                args.max_connections,
                args.handshake_timeout_ms,
                args.write_timeout_ms,
            ),
            (
                file.max_connections,
                file.handshake_timeout_ms,
                file.write_timeout_ms,
            ),
        );
        let image = layers.required("image", image)?;
        let (unix, tcp) = sockets(unix, tcp)?;
        let limits = limits?;
        let tls = NbdTls::from_options(&layers, tls_dir, tls_peer, limits.handshake_timeout)?;
        Ok(SecondaryConfig {
            image,
            unix,
            tcp,
            metrics,
            control: layers.required("control", control)?,
            primary_qmp,
            log_budget: log_budget.unwrap_or(DEFAULT_MEMORY_BUDGET),
            overlay_budget: overlay_budget.unwrap_or(DEFAULT_MEMORY_BUDGET),
            name: name.unwrap_or_else(|| DEFAULT_NAME.to_string()),
            max_in_flight: max_in_flight(&layers, in_flight)?,
            limits,
            tls,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use colo_testkit::cli::assert_every_option_reads_its_env_var;
    use colo_testkit::rerun::{Case, child_case, rerun_with_env};

    #[test]
    fn export_spec_needs_name_and_path() {
        assert_eq!(
            "svm=/var/lib/colo/s.raw".parse(),
            Ok(ExportSpec {
                name: "svm".into(),
                path: "/var/lib/colo/s.raw".into()
            })
        );
        assert!("nopath".parse::<ExportSpec>().is_err());
        assert!("=/x".parse::<ExportSpec>().is_err());
        assert!("x=".parse::<ExportSpec>().is_err());
    }

    /// `argv` through clap and validation, as `main` does (clap reads this process's
    /// environment).
    fn configure(argv: &[&str]) -> Result<Config, String> {
        let args = Args::try_parse_from(argv).map_err(|e| e.to_string())?;
        Config::try_from(args.command).map_err(|e| e.to_string())
    }

    #[test]
    fn tls_options_need_each_other_load_the_identity_and_take_a_peer_list() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = ["secondary", "primary"].map(String::from);
        colo_tls::pki::create_pair(dir.path(), &hosts, colo_tls::pki::Validity::days(1)).unwrap();
        let identity = dir.path().join("secondary");
        let identity = identity.to_str().unwrap();
        let secondary = |extra: &[&str]| {
            let mut argv = vec![
                "colo-blockd",
                "secondary",
                "--image",
                "/s.raw",
                "--tcp",
                "127.0.0.1:1",
                "--control",
                "/r",
            ];
            argv.extend(extra);
            configure(&argv)
        };
        let Config::Secondary(c) = secondary(&[
            "--tls-dir",
            identity,
            "--tls-peer",
            "primary,other",
            "--tls-peer",
            "third",
        ])
        .unwrap() else {
            panic!("not secondary");
        };
        let tls = c.tls.expect("TLS configured");
        assert_eq!(tls.local, "secondary");
        assert_eq!(tls.peers, ["primary", "other", "third"]);
        let missing_peer = secondary(&["--tls-dir", identity]).unwrap_err();
        assert!(missing_peer.contains("--tls-peer"), "{missing_peer}");
        let missing_dir = secondary(&["--tls-peer", "primary"]).unwrap_err();
        assert!(missing_dir.contains("--tls-dir"), "{missing_dir}");
        let empty = tempfile::tempdir().unwrap();
        let bad = secondary(&[
            "--tls-dir",
            empty.path().to_str().unwrap(),
            "--tls-peer",
            "primary",
        ])
        .unwrap_err();
        assert!(
            bad.contains("--tls-dir") && bad.contains("ca-cert.pem"),
            "{bad}"
        );
        let Config::Serve(c) = configure(&[
            "colo-blockd",
            "serve",
            "--export",
            "a=/x",
            "--tcp",
            "127.0.0.1:1",
            "--tls-dir",
            identity,
            "--tls-peer",
            "primary",
        ])
        .unwrap() else {
            panic!("not serve");
        };
        assert_eq!(c.tls.map(|t| t.peers), Some(vec!["primary".to_string()]));
    }

    #[test]
    fn serve_needs_a_socket_and_takes_both() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["colo-blockd", "serve", "--export", "a=/x"];
            argv.extend(extra);
            configure(&argv)
        };
        assert!(parse(&[]).is_err());
        assert!(parse(&["--unix", "/s"]).is_ok());
        assert!(parse(&["--tcp", "127.0.0.1:1"]).is_ok());
        let Config::Serve(both) = parse(&["--unix", "/s", "--tcp", "127.0.0.1:1"]).unwrap() else {
            panic!("not serve");
        };
        assert_eq!(both.unix, Some(PathBuf::from("/s")));
        assert_eq!(both.tcp, Some("127.0.0.1:1".parse().unwrap()));
    }

    #[test]
    fn connection_limits_are_flags_of_both_subcommands_and_refuse_zero() {
        let serve = |extra: &[&str]| {
            let mut argv = vec!["colo-blockd", "serve", "--export", "a=/x", "--unix", "/s"];
            argv.extend(extra);
            configure(&argv)
        };
        let Config::Serve(c) = serve(&[
            "--max-connections",
            "3",
            "--handshake-timeout-ms",
            "1000",
            "--write-timeout-ms",
            "2000",
        ])
        .unwrap() else {
            panic!("not serve");
        };
        let server = c.limits.server_config(c.max_in_flight);
        assert_eq!(
            (
                server.max_connections,
                server.handshake_timeout,
                server.write_timeout
            ),
            (3, Duration::from_secs(1), Duration::from_secs(2))
        );
        for flag in [
            "--max-connections",
            "--handshake-timeout-ms",
            "--write-timeout-ms",
        ] {
            assert!(serve(&[flag, "0"]).is_err(), "{flag} 0");
            assert!(serve(&[flag, "-1"]).is_err(), "{flag} -1");
        }
        let Config::Secondary(c) = configure(&[
            "colo-blockd",
            "secondary",
            "--image",
            "/s.raw",
            "--tcp",
            "127.0.0.1:1",
            "--control",
            "/r",
            "--max-connections",
            "2",
        ])
        .unwrap() else {
            panic!("not secondary");
        };
        assert_eq!(c.limits.max_connections, 2);
    }

    #[test]
    fn secondary_takes_both_sockets_and_a_metrics_address() {
        let base = [
            "colo-blockd",
            "secondary",
            "--image",
            "s.raw",
            "--control",
            "unix:relay.sock",
        ];
        let parse = |extra: &[&str]| {
            let mut argv = base.to_vec();
            argv.extend(extra);
            configure(&argv)
        };
        assert!(parse(&[]).is_err());
        let Config::Secondary(args) = parse(&[
            "--unix",
            "/run/svm.sock",
            "--tcp",
            "0.0.0.0:10809",
            "--metrics",
            "127.0.0.1:9109",
        ])
        .unwrap() else {
            panic!("not secondary");
        };
        assert!(args.unix.is_some() && args.tcp.is_some());
        assert_eq!(args.metrics, Some("127.0.0.1:9109".parse().unwrap()));
        assert!(parse(&["--unix", "/s", "--metrics", "nonsense"]).is_err());
    }

    #[test]
    fn secondary_control_is_unix_tcp_or_a_path() {
        let parse = |control: &str| {
            configure(&[
                "colo-blockd",
                "secondary",
                "--image",
                "s.raw",
                "--unix",
                "/s",
                "--control",
                control,
            ])
            .map(|c| match c {
                Config::Secondary(s) => s.control,
                Config::Serve(_) => panic!("not secondary"),
            })
        };
        for (given, want) in [
            (
                "/run/colo/relay.sock",
                Address::unix("/run/colo/relay.sock"),
            ),
            (
                "unix:/run/colo/relay.sock",
                Address::unix("/run/colo/relay.sock"),
            ),
            ("tcp:192.168.77.2:9990", Address::tcp("192.168.77.2", 9990)),
        ] {
            assert_eq!(parse(given).unwrap(), want, "{given}");
        }
        let e = parse("192.168.77.2:9990").unwrap_err();
        assert!(e.contains("tcp:192.168.77.2:9990"), "{e}");
    }

    #[test]
    fn every_option_has_its_colo_blockd_env_var_and_its_default_in_the_help() {
        use clap::CommandFactory;
        let cli = Args::command();
        // --config's too: COLO_BLOCKD_CONFIG.
        assert_every_option_reads_its_env_var(&cli, ENV_PREFIX);
        // The defaults are applied after the file, so clap does not show them: the help
        // texts say them, and must say the ones the code applies.
        let help = |role: &str, option: &str| {
            let sub = cli.find_subcommand(role).unwrap();
            let arg = sub.get_arguments().find(|a| a.get_long() == Some(option));
            arg.unwrap().get_help().unwrap().to_string()
        };
        for (role, option, default) in [
            ("secondary", "log-budget", DEFAULT_MEMORY_BUDGET.to_string()),
            (
                "secondary",
                "overlay-budget",
                DEFAULT_MEMORY_BUDGET.to_string(),
            ),
            ("secondary", "name", DEFAULT_NAME.to_string()),
            (
                "secondary",
                "max-in-flight",
                DEFAULT_MAX_IN_FLIGHT.to_string(),
            ),
            ("serve", "max-in-flight", DEFAULT_MAX_IN_FLIGHT.to_string()),
        ]
        .into_iter()
        .chain(["secondary", "serve"].into_iter().flat_map(|role| {
            [
                (role, "max-connections", DEFAULT_MAX_CONNECTIONS.to_string()),
                (
                    role,
                    "handshake-timeout-ms",
                    DEFAULT_HANDSHAKE_TIMEOUT.as_millis().to_string(),
                ),
                (
                    role,
                    "write-timeout-ms",
                    DEFAULT_WRITE_TIMEOUT.as_millis().to_string(),
                ),
            ]
        })) {
            let text = help(role, option);
            assert!(
                text.contains(&format!("[default: {default}]")),
                "{role} --{option}: {text}"
            );
        }
        let Config::Secondary(c) = configure(&[
            "colo-blockd",
            "secondary",
            "--image",
            "/s.raw",
            "--unix",
            "/s",
            "--control",
            "/r",
        ])
        .unwrap() else {
            panic!("not secondary");
        };
        assert_eq!(
            (
                c.log_budget,
                c.overlay_budget,
                c.name.as_str(),
                c.max_in_flight
            ),
            (
                DEFAULT_MEMORY_BUDGET,
                DEFAULT_MEMORY_BUDGET,
                DEFAULT_NAME,
                DEFAULT_MAX_IN_FLIGHT as u16
            )
        );
        assert_eq!(
            c.limits.server_config(c.max_in_flight),
            ServerConfig::default()
        );
    }

    /// flag > env > file > default for `secondary --log-budget` (`COLO_BLOCKD_LOG_BUDGET`,
    /// `log-budget`, 10 MiB) and `serve --max-in-flight` (`COLO_BLOCKD_MAX_IN_FLIGHT`,
    /// `max-in-flight`, 32). The environment is process-wide and tests run beside each
    /// other, so each case runs this test again in a child process with its own variables,
    /// where clap reads them as it does in the daemon.
    #[test]
    fn a_flag_beats_its_env_var_which_beats_the_file_which_beats_the_default() {
        if let Some(case) = child_case() {
            let mut full = vec!["colo-blockd"];
            full.extend(case.args.iter().map(String::as_str));
            let got = match configure(&full).unwrap_or_else(|e| panic!("{e}")) {
                Config::Secondary(c) => c.log_budget.to_string(),
                Config::Serve(c) => c.max_in_flight.to_string(),
            };
            assert_eq!(got, case.want, "{case}");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        // One file per subcommand: each refuses the other's keys.
        let secondary_file = dir.path().join("secondary.toml");
        std::fs::write(&secondary_file, "log-budget = 3000\n").unwrap();
        let serve_file = dir.path().join("serve.toml");
        std::fs::write(&serve_file, "max-in-flight = 3\n").unwrap();
        let (sfile, vfile) = (
            secondary_file.to_str().unwrap(),
            serve_file.to_str().unwrap(),
        );
        let secondary = "secondary --image /s.raw --unix /s.sock --control /relay.sock";
        let serve = "serve --export a=/a.raw --unix /s.sock";
        let env: &[(&str, &str)] = &[
            ("COLO_BLOCKD_LOG_BUDGET", "2000"),
            ("COLO_BLOCKD_MAX_IN_FLIGHT", "2"),
        ];
        let serve_config: &[(&str, &str)] = &[(CONFIG_ENV, vfile)];
        let with_config = [env, serve_config].concat();
        let budget = DEFAULT_MEMORY_BUDGET.to_string();
        let in_flight = DEFAULT_MAX_IN_FLIGHT.to_string();
        let cases: &[Case] = &[
            // The flag wins over the variable and the file.
            (
                format!("{secondary} --config {sfile} --log-budget 1000"),
                env,
                "1000",
            ),
            (
                format!("{serve} --config {vfile} --max-in-flight 1"),
                env,
                "1",
            ),
            // The variable wins over the file (named by --config or COLO_BLOCKD_CONFIG).
            (format!("{secondary} --config {sfile}"), env, "2000"),
            (serve.to_string(), &with_config, "2"),
            // The file wins over the default.
            (format!("{secondary} --config {sfile}"), &[], "3000"),
            (serve.to_string(), serve_config, "3"),
            // The default.
            (secondary.to_string(), &[], &budget),
            (serve.to_string(), &[], &in_flight),
        ];
        rerun_with_env(
            "cli::tests::a_flag_beats_its_env_var_which_beats_the_file_which_beats_the_default",
            &[ENV_PREFIX],
            cases,
        );
    }

    #[test]
    fn the_file_takes_the_long_options_and_names_itself_and_the_key_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blockd.toml");
        let with_file = |text: &str| {
            std::fs::write(&path, text).unwrap();
            let mut argv = vec!["colo-blockd", "secondary", "--config"];
            argv.push(path.to_str().unwrap());
            configure(&argv)
        };
        let Config::Secondary(c) = with_file(
            "image = \"/var/lib/colo/s.raw\"\nunix = \"/run/b.sock\"\ntcp = \"0.0.0.0:10809\"\n\
             metrics = \"127.0.0.1:9109\"\ncontrol = \"tcp:192.168.77.2:9990\"\n\
             primary-qmp = \"unix:/run/p.qmp\"\nlog-budget = 1\noverlay-budget = 2\n\
             name = \"b\"\nmax-in-flight = 4\nmax-connections = 5\n\
             handshake-timeout-ms = 1500\nwrite-timeout-ms = 2500\n",
        )
        .unwrap() else {
            panic!("not secondary");
        };
        assert_eq!(
            c,
            SecondaryConfig {
                image: "/var/lib/colo/s.raw".into(),
                unix: Some("/run/b.sock".into()),
                tcp: Some("0.0.0.0:10809".parse().unwrap()),
                metrics: Some("127.0.0.1:9109".parse().unwrap()),
                control: Address::tcp("192.168.77.2", 9990),
                primary_qmp: Some(Address::unix("/run/p.qmp")),
                log_budget: 1,
                overlay_budget: 2,
                name: "b".into(),
                max_in_flight: 4,
                limits: ConnectionLimits {
                    max_connections: 5,
                    handshake_timeout: Duration::from_millis(1500),
                    write_timeout: Duration::from_millis(2500),
                },
                tls: None,
            }
        );
        let file = path.display().to_string();
        // An unknown key, a wrong type, a bad address: the parser's message, with the key.
        for (text, key) in [
            ("imgae = \"/s.raw\"\n", "imgae"),
            ("log-budget = \"big\"\n", "log-budget"),
            ("control = \"relay.sock\"\n", "control"),
        ] {
            let e = with_file(text).unwrap_err();
            assert!(
                e.starts_with(&format!("config file {file}: ")) && e.contains(key),
                "{text}: {e}"
            );
        }
        // A value the parser takes but the daemon refuses.
        let e =
            with_file("image = \"/s.raw\"\nunix = \"/s\"\ncontrol = \"/r\"\nmax-in-flight = 0\n")
                .unwrap_err();
        assert_eq!(
            e,
            format!("config file {file}: `max-in-flight`: must be at least 1")
        );
        for key in [
            "max-connections",
            "handshake-timeout-ms",
            "write-timeout-ms",
        ] {
            let e = with_file(&format!(
                "image = \"/s.raw\"\nunix = \"/s\"\ncontrol = \"/r\"\n{key} = 0\n"
            ))
            .unwrap_err();
            assert_eq!(
                e,
                format!("config file {file}: `{key}`: must be at least 1")
            );
        }
        // What nothing gives, named with its flag, variable and key.
        let e = with_file("unix = \"/s\"\ncontrol = \"/r\"\n").unwrap_err();
        assert_eq!(
            e,
            "missing --image (or COLO_BLOCKD_IMAGE, or `image` in the config file)"
        );
        let e = with_file("image = \"/s.raw\"\ncontrol = \"/r\"\n").unwrap_err();
        assert!(e.contains("--unix, --tcp or both"), "{e}");
        // serve's exports, as a list under the option's name.
        std::fs::write(
            &path,
            "export = [\"a=/a.raw\", \"b=/b.raw\"]\nread-only = true\ntcp = \"127.0.0.1:1\"\n",
        )
        .unwrap();
        let Config::Serve(c) =
            configure(&["colo-blockd", "serve", "--config", path.to_str().unwrap()]).unwrap()
        else {
            panic!("not serve");
        };
        assert_eq!(c.exports.len(), 2);
        assert!(c.read_only);
        let Config::Serve(c) = configure(&[
            "colo-blockd",
            "serve",
            "--config",
            path.to_str().unwrap(),
            "--read-only",
            "false",
        ])
        .unwrap() else {
            panic!("not serve");
        };
        assert!(!c.read_only, "the flag beats the file");
    }
}
