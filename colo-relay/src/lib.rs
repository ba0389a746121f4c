//! The checkpoint-barrier relay (`qmp-driver relay`).
//!
//! The primary QEMU migrates to the relay instead of to the secondary. The
//! relay serves one migration session at a time: for the main migration
//! channel (the connection that starts with `QEVM`) it opens one connection
//! to the secondary QEMU's incoming address and forwards bytes both ways,
//! in order and without delay; any other connection while it runs, and any
//! connection that does not start with `QEVM`, is closed unread and counted
//! (`refused_migration_channels`). It reads the COLO messages the secondary
//! sends back ([`colo_message`]) and turns them into control events for
//! colo-blockd and colo-proxyd ([`colo_control`]):
//!
//! | secondary sends | the relay |
//! |---|---|
//! | `checkpoint-ready` | forwards it, publishes `colo-started` (epoch 1, or the next one after a re-protect) |
//! | `checkpoint-reply` | barrier `svm-epoch-closed`, **then** forwards it |
//! | `vmstate-received` | barrier `checkpoint-adopted`, **then** forwards it |
//! | `vmstate-loaded` | forwards it, publishes `checkpoint-complete`, next epoch |
//!
//! A failed barrier (a sync subscriber did not ack within the ack timeout,
//! or disconnected) ends COLO: the relay publishes `colo-exit` with reason
//! `barrier-timeout` and closes both sides of the main channel, so both
//! QEMUs leave COLO with `COLO_EXIT reason=error` instead of waiting
//! forever. The relay keeps running.
//! `docs/control-protocol.md` has the whole story.
//!
//! The control protocol is served on a Unix socket (`control`: daemons and
//! tools on the relay's host; mode 0600, or 0660 with `control_group`; a
//! `failover` only from root, the relay's user or the configured operator
//! uids/gid) and, with `control_tcp`, also on TCP for the daemons on the
//! other host (colo-proxyd primary when the relay runs on the secondary
//! host). Without `control_tls` TCP has no authentication: bind it to the
//! replication link only, and list the other host in `control_tcp_peers`; a
//! TCP client may subscribe and ack its own events, never announce a
//! failover.
//!
//! With `migration_tls` the migration listener is a TLS server: the primary
//! QEMU migrates with `tls-creds`/`tls-hostname`, only the primary host's
//! client certificate is accepted (a failed handshake is refused and counted
//! like any stranger, before the secondary is connected), and the relay
//! forwards the decrypted stream to the secondary, parsing it as before; the
//! return path goes back through the same TLS session.
//!
//! ```no_run
//! use colo_relay::{RelayConfig, run};
//! use std::time::Duration;
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn demo() -> Result<(), colo_relay::RelayError> {
//! let config = RelayConfig {
//!     listen: "unix:/run/colo/relay-in.sock".parse()?,
//!     target: "unix:/run/colo/secondary-incoming.sock".parse()?,
//!     control: "/run/colo/relay.sock".into(),
//!     control_tcp: Some("tcp:192.168.77.2:9990".parse().unwrap()),
//!     ack_timeout: Duration::from_millis(2000),
//!     ..RelayConfig::default()
//! };
//! run(config, CancellationToken::new()).await
//! # }
//! ```

mod channel;
pub mod colo_message;
mod stream;

pub use channel::MAX_PENDING_HANDSHAKES;
pub use colo_message::{ColoMessage, ColoParser, MULTIFD_MAGIC, ParseError, QEVM_MAGIC};
pub use stream::RelayListener;

use colo_control::hub::{ControlHub, ControlListener, HubOptions, OperatorPolicy};
use colo_daemon::socket::remove_stale_socket;
use colo_types::{Address, AddressError};
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Default [`RelayConfig::ack_timeout`].
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_millis(2000);
/// Default [`RelayConfig::reply_timeout`]: longer than a secondary takes to stop its VM for
/// a checkpoint, even while its disk drains slowly.
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest accepted `--ack-timeout-ms` and `--reply-timeout-ms` (10 minutes).
pub const MAX_ACK_TIMEOUT_MS: u64 = 600_000;

/// What the relay needs to run. `Default` gives placeholder endpoints, for
/// `..RelayConfig::default()` after the required fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayConfig {
    /// Where the primary QEMU migrates to.
    pub listen: Address,
    /// The secondary QEMU's incoming migration address.
    pub target: Address,
    /// The control socket (Unix) daemons and operators connect to.
    pub control: PathBuf,
    /// Also serve the control protocol on this TCP address, for the daemons
    /// on the other host (a [`Address::Tcp`]; port 0 picks one).
    pub control_tcp: Option<Address>,
    /// How long a barrier waits for every sync subscriber's ack.
    pub ack_timeout: Duration,
    /// How long the secondary QEMU may take to answer a checkpoint request
    /// (`checkpoint-reply`) before the relay ends COLO.
    pub reply_timeout: Duration,
    /// The control socket's group: mode 0660 with this gid instead of 0600.
    pub control_group: Option<u32>,
    /// Who may announce a failover, besides root and the relay's own uid.
    pub operator_uids: Vec<u32>,
    /// A primary gid that may announce a failover.
    pub operator_gid: Option<u32>,
    /// When not empty, TCP control clients only from these addresses.
    pub control_tcp_peers: Vec<IpAddr>,
    /// When not empty, migration connections (over TCP) only from these
    /// addresses.
    pub migration_peers: Vec<IpAddr>,
    /// Mutual TLS on the TCP control listener: this host's identity
    /// directory and the other host's name (its certificate must carry it).
    pub control_tls: Option<ControlTls>,
    /// Mutual TLS on the migration listener (`--migration-tls`): the relay
    /// is the TLS server of the primary QEMU's migration (`tls-creds`,
    /// `tls-hostname`), accepts only the primary host's client certificate,
    /// and forwards the decrypted stream to the secondary.
    pub migration_tls: Option<ControlTls>,
}

/// `--tls-dir` and `--tls-peer`: this host's identity and the one peer host
/// it accepts, for the TCP control listener and (`--migration-tls`) the
/// migration listener. Both are the primary host when the relay runs on the
/// secondary host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlTls {
    /// This host's identity directory (QEMU's tls-creds-x509 layout,
    /// `qmp-driver pki`).
    pub dir: PathBuf,
    /// The host name the other host's certificate must carry.
    pub peer: String,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            listen: Address::unix("relay-in.sock"),
            target: Address::unix("secondary-incoming.sock"),
            control: "relay.sock".into(),
            control_tcp: None,
            ack_timeout: DEFAULT_ACK_TIMEOUT,
            reply_timeout: DEFAULT_REPLY_TIMEOUT,
            control_group: None,
            operator_uids: Vec::new(),
            operator_gid: None,
            control_tcp_peers: Vec::new(),
            migration_peers: Vec::new(),
            control_tls: None,
            migration_tls: None,
        }
    }
}

/// Command-line arguments of `qmp-driver relay`.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct RelayArgs {
    /// Address the primary QEMU migrates to, instead of the secondary's:
    /// `tcp:HOST:PORT` or `unix:PATH` (QEMU's URI syntax; give the same
    /// string to the primary's `migrate`). Prefer a Unix socket on one host:
    /// it avoids TCP's per-checkpoint latency.
    #[arg(long, env = "COLO_RELAY_LISTEN", value_name = "ENDPOINT")]
    pub listen: Address,

    /// The secondary QEMU's incoming migration address (what it was given
    /// in `-incoming` or `migrate-incoming`): `tcp:HOST:PORT` or
    /// `unix:PATH`. The relay connects there once per channel the primary
    /// opens (main channel and every multifd channel).
    #[arg(long, env = "COLO_RELAY_TARGET", value_name = "ENDPOINT")]
    pub target: Address,

    /// Unix socket of the control protocol, where colo-blockd, colo-proxyd
    /// and operator tools connect (see docs/control-protocol.md). A stale
    /// socket file is replaced; a live one is an error.
    #[arg(long, env = "COLO_RELAY_CONTROL", value_name = "PATH")]
    pub control: PathBuf,

    /// Also serve the control protocol on TCP at HOST:PORT, for the daemons
    /// on the other host (colo-proxyd primary when the relay runs on the
    /// secondary host): they connect with `--control tcp:HOST:PORT`. No
    /// authentication: give the relay host's replication-link address, never
    /// a public interface or 0.0.0.0 on a host with one.
    #[arg(
        long,
        env = "COLO_RELAY_CONTROL_TCP",
        value_name = "HOST:PORT",
        value_parser = Address::parse_host_port
    )]
    pub control_tcp: Option<Address>,

    /// How long each checkpoint barrier waits for the ack of every sync
    /// subscriber, in milliseconds. When it expires (or a sync subscriber
    /// disconnects) the relay ends COLO: it closes the migration channel so
    /// both QEMUs report COLO_EXIT instead of hanging.
    #[arg(
        long,
        env = "COLO_RELAY_ACK_TIMEOUT_MS",
        value_name = "MS",
        default_value_t = 2000
    )]
    pub ack_timeout_ms: u64,

    /// How long the secondary QEMU may take to answer the primary's
    /// checkpoint request, in milliseconds. A secondary that does not (its
    /// QEMU frozen, or stuck stopping its VM) would keep the primary waiting
    /// for ever with its output held; when it expires the relay ends COLO
    /// (colo-exit reason `reply-timeout`) and the primary serves alone.
    #[arg(
        long,
        env = "COLO_RELAY_REPLY_TIMEOUT_MS",
        value_name = "MS",
        default_value_t = 10_000
    )]
    pub reply_timeout_ms: u64,

    /// Give the control socket to this group (numeric gid, e.g. from
    /// `getent group colo`): mode 0660 instead of the default 0600 (only the
    /// relay's user and root may connect). For daemons or tools that do not
    /// run as root or as the relay's user.
    #[arg(long, env = "COLO_RELAY_CONTROL_GROUP", value_name = "GID")]
    pub control_group: Option<u32>,

    /// A uid that may announce a failover on the control socket, besides
    /// root and the relay's own user (repeatable, or comma-separated in the
    /// variable). Checked against the kernel's credentials of the client.
    #[arg(
        long = "operator-uid",
        env = "COLO_RELAY_OPERATOR_UIDS",
        value_name = "UID",
        value_delimiter = ','
    )]
    pub operator_uids: Vec<u32>,

    /// A group (numeric gid) whose members may announce a failover: the
    /// client's primary group must be it (supplementary groups are not
    /// visible to the relay).
    #[arg(long, env = "COLO_RELAY_OPERATOR_GID", value_name = "GID")]
    pub operator_gid: Option<u32>,

    /// Serve the TCP control listener only to this address (the other
    /// host's replication-link address; repeatable, or comma-separated in
    /// the variable). Others are closed before a byte is read. Without it,
    /// anyone who reaches `--control-tcp` may subscribe.
    #[arg(
        long = "control-tcp-peer",
        env = "COLO_RELAY_CONTROL_TCP_PEERS",
        value_name = "IP",
        value_delimiter = ','
    )]
    pub control_tcp_peers: Vec<IpAddr>,

    /// Accept migration connections over TCP only from this address (the
    /// primary host's; repeatable, or comma-separated in the variable).
    /// Others are closed before a byte is read.
    #[arg(
        long = "migration-peer",
        env = "COLO_RELAY_MIGRATION_PEERS",
        value_name = "IP",
        value_delimiter = ','
    )]
    pub migration_peers: Vec<IpAddr>,

    /// Require mutual TLS on `--control-tcp` (and, with `--migration-tls`, on
    /// `--listen`): this host's identity directory (`ca-cert.pem`,
    /// `server-cert.pem`, `server-key.pem`, `client-cert.pem`,
    /// `client-key.pem`; `qmp-driver pki`). A client must present a
    /// certificate of the pair's CA for `--tls-peer`, or it is closed before a
    /// byte of the protocol is read. Needs `--tls-peer`, and `--control-tcp`
    /// or `--migration-tls`.
    #[arg(long, env = "COLO_RELAY_TLS_DIR", value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,

    /// With `--tls-dir`: the other host's name, as its certificate carries it
    /// (the primary host: both the control clients and the migration come
    /// from it).
    #[arg(long, env = "COLO_RELAY_TLS_PEER", value_name = "HOST")]
    pub tls_peer: Option<String>,

    /// Terminate the primary QEMU's migration TLS: `--listen` becomes a TLS
    /// server with `--tls-dir`'s `server-cert.pem` and accepts only a client
    /// certificate of the pair's CA for `--tls-peer` (the primary host); the
    /// decrypted stream goes to `--target` as before. A connection that
    /// fails the handshake (plaintext, another host, another CA) is closed
    /// before the secondary is contacted and counted in
    /// `refused_migration_channels`. The primary migrates with
    /// `tls-creds` (a `tls-creds-x509` object, `endpoint=client`, on its
    /// identity directory) and `tls-hostname` = this host's name.
    // Not clap's `requires`: `qmp-driver relay` may take --tls-dir from the pair config
    // after clap has parsed; `RelayConfig::try_from` checks the pair.
    #[arg(long, env = "COLO_RELAY_MIGRATION_TLS")]
    pub migration_tls: bool,
}

impl TryFrom<RelayArgs> for RelayConfig {
    type Error = RelayError;

    fn try_from(a: RelayArgs) -> Result<Self, Self::Error> {
        if a.ack_timeout_ms == 0 || a.ack_timeout_ms > MAX_ACK_TIMEOUT_MS {
            return Err(RelayError::Config(format!(
                "--ack-timeout-ms must be from 1 to {MAX_ACK_TIMEOUT_MS}, got {}",
                a.ack_timeout_ms
            )));
        }
        if a.reply_timeout_ms == 0 || a.reply_timeout_ms > MAX_ACK_TIMEOUT_MS {
            return Err(RelayError::Config(format!(
                "--reply-timeout-ms must be from 1 to {MAX_ACK_TIMEOUT_MS}, got {}",
                a.reply_timeout_ms
            )));
        }
        if a.listen == a.target {
            return Err(RelayError::Config(format!(
                "--listen and --target are both {}: the relay would connect to itself",
                a.listen
            )));
        }
        if a.control.as_os_str().is_empty() {
            return Err(RelayError::Config("--control must not be empty".into()));
        }
        for ep in [&a.listen, &a.target] {
            if *ep == Address::Unix(a.control.clone()) {
                return Err(RelayError::Config(format!(
                    "--control {} is also a migration endpoint",
                    a.control.display()
                )));
            }
        }
        if let Some(tcp) = &a.control_tcp {
            if !tcp.is_tcp() {
                return Err(RelayError::Config(format!(
                    "--control-tcp must be a TCP address (HOST:PORT), got {tcp}"
                )));
            }
            if a.listen.to_string() == tcp.to_string() {
                return Err(RelayError::Config(format!(
                    "--control-tcp {tcp} is also the migration --listen address"
                )));
            }
        } else if !a.control_tcp_peers.is_empty() {
            return Err(RelayError::Config(
                "--control-tcp-peer needs --control-tcp".into(),
            ));
        }
        let tls = match (a.tls_dir, a.tls_peer) {
            (None, None) => None,
            (Some(dir), Some(peer)) => {
                if a.control_tcp.is_none() && !a.migration_tls {
                    return Err(RelayError::Config(
                        "--tls-dir protects --control-tcp or, with --migration-tls, the migration listener; neither is given".into(),
                    ));
                }
                Some(ControlTls { dir, peer })
            }
            (Some(_), None) => {
                return Err(RelayError::Config(
                    "--tls-dir needs --tls-peer (the other host's name)".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(RelayError::Config(
                    "--tls-peer needs --tls-dir (this host's identity)".into(),
                ));
            }
        };
        if a.migration_tls && tls.is_none() {
            return Err(RelayError::Config(
                "--migration-tls needs --tls-dir (this host's identity) and --tls-peer (the primary host's name)".into(),
            ));
        }
        let control_tls = tls.clone().filter(|_| a.control_tcp.is_some());
        let migration_tls = tls.filter(|_| a.migration_tls);
        if !a.migration_peers.is_empty() && !a.listen.is_tcp() {
            return Err(RelayError::Config(format!(
                "--migration-peer needs a TCP --listen address, got {}",
                a.listen
            )));
        }
        Ok(RelayConfig {
            listen: a.listen,
            target: a.target,
            control: a.control,
            control_tcp: a.control_tcp,
            ack_timeout: Duration::from_millis(a.ack_timeout_ms),
            reply_timeout: Duration::from_millis(a.reply_timeout_ms),
            control_group: a.control_group,
            operator_uids: a.operator_uids,
            operator_gid: a.operator_gid,
            control_tcp_peers: a.control_tcp_peers,
            migration_peers: a.migration_peers,
            control_tls,
            migration_tls,
        })
    }
}

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Invalid arguments.
    #[error("invalid relay configuration: {0}")]
    Config(String),
    /// An address string could not be parsed.
    #[error(transparent)]
    Address(#[from] AddressError),
    /// The migration listener could not be bound.
    #[error("cannot listen on {endpoint}: {source}")]
    Bind {
        /// The endpoint.
        endpoint: Address,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The control socket could not be bound.
    #[error("cannot create the control socket {}: {source}", path.display())]
    Control {
        /// Its path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The identity of `--tls-dir` could not be loaded.
    #[error("cannot set up TLS for the control listener or the migration listener: {0}")]
    Tls(#[from] colo_tls::TlsError),
    /// The control protocol's TCP listener could not be bound.
    #[error("cannot listen for control connections on {address}: {source}")]
    ControlTcp {
        /// The `--control-tcp` address.
        address: Address,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Binds the control socket (and its TCP listener, if any) and the migration
/// listener, then serves until `shutdown` is cancelled. Removes the socket
/// files it created on the way out.
pub async fn run(config: RelayConfig, shutdown: CancellationToken) -> Result<(), RelayError> {
    let control_err = |source| RelayError::Control {
        path: config.control.clone(),
        source,
    };
    // Loaded first: a bad identity is a configuration error before anything
    // is bound.
    let tls = config.control_tls.as_ref().map(acceptor).transpose()?;
    let migration_tls = config.migration_tls.as_ref().map(acceptor).transpose()?;
    remove_stale_socket(&config.control)
        .await
        .map_err(control_err)?;
    // Owner-only (or owner and group) from its creation: no window in which
    // anyone else could connect.
    let (control, own_uid) = colo_control::bind_private_unix(&config.control, config.control_group)
        .map_err(control_err)?;
    let mut uids = BTreeSet::from([0, own_uid]);
    uids.extend(&config.operator_uids);
    let hub = ControlHub::with_options(
        control,
        HubOptions {
            operators: OperatorPolicy {
                uids,
                gid: config.operator_gid,
            },
            tcp_peers: (!config.control_tcp_peers.is_empty())
                .then(|| config.control_tcp_peers.clone()),
            tls,
            ..HubOptions::default()
        },
    );
    let control_tcp = match &config.control_tcp {
        None => None,
        Some(address) => match bind_control_tcp(
            address,
            &config.control_tcp_peers,
            config.control_tls.as_ref(),
        )
        .await
        {
            Ok(listener) => {
                let bound = listener.local_address().ok();
                hub.listen(listener);
                bound
            }
            Err(e) => {
                hub.shutdown().await;
                let _ = std::fs::remove_file(&config.control);
                return Err(e);
            }
        },
    };
    let listener = match RelayListener::bind(&config.listen).await {
        Ok(l) => l,
        Err(source) => {
            hub.shutdown().await;
            let _ = std::fs::remove_file(&config.control);
            return Err(RelayError::Bind {
                endpoint: config.listen.clone(),
                source,
            });
        }
    };
    tracing::info!(
        listen = %config.listen,
        target = %config.target,
        control = %config.control.display(),
        control_tcp = %control_tcp.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
        migration_tls = %config.migration_tls.as_ref().map_or("off".into(), |t| format!("only {}", t.peer)),
        ack_timeout_ms = config.ack_timeout.as_millis() as u64,
        reply_timeout_ms = config.reply_timeout.as_millis() as u64,
        "relay started"
    );
    let migration_peers =
        (!config.migration_peers.is_empty()).then(|| config.migration_peers.clone());
    channel::Relay::new(
        hub.clone(),
        config.target.clone(),
        (config.ack_timeout, config.reply_timeout),
        migration_peers,
        migration_tls,
        shutdown,
    )
    .accept_loop(listener)
    .await;
    hub.shutdown().await;
    let _ = std::fs::remove_file(&config.control);
    if let Address::Unix(p) = &config.listen {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

/// The TLS server of `tls`'s identity that accepts only its peer, loaded and
/// checked at start (a bad identity is a configuration error).
fn acceptor(tls: &ControlTls) -> Result<colo_tls::PeerAcceptor, RelayError> {
    let identity = colo_tls::HostIdentity::load(&tls.dir)?;
    Ok(colo_tls::PeerAcceptor::new(
        &identity,
        std::slice::from_ref(&tls.peer),
        colo_tls::DEFAULT_HANDSHAKE_TIMEOUT,
    )?)
}

/// Binds the control protocol's TCP listener, warning that nothing
/// authenticates its clients (more loudly on a wildcard address, which is
/// allowed: a host may have only the replication link).
async fn bind_control_tcp(
    address: &Address,
    peers: &[IpAddr],
    tls: Option<&ControlTls>,
) -> Result<ControlListener, RelayError> {
    if let Some(tls) = tls {
        tracing::info!(
            %address,
            peer = %tls.peer,
            identity = %tls.dir.display(),
            "the control protocol's TCP listener requires mutual TLS: only the peer's certificate is accepted"
        );
        return ControlListener::bind(address)
            .await
            .map_err(|source| RelayError::ControlTcp {
                address: address.clone(),
                source,
            });
    }
    let peers_note = if peers.is_empty() {
        "any address may connect (give --control-tcp-peer)".to_string()
    } else {
        format!(
            "only {} may connect",
            peers
                .iter()
                .map(IpAddr::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    tracing::warn!(
        %address,
        "the control protocol's TCP listener is unauthenticated: a client there may subscribe \
         (a sync subscriber takes part in every checkpoint barrier) but never announce a \
         failover; {peers_note}"
    );
    if let Address::Tcp { host, .. } = address
        && host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_unspecified())
    {
        tracing::warn!(
            %address,
            "the control protocol listens on every interface; it has no authentication: \
             bind it to the replication link's address instead"
        );
    }
    ControlListener::bind(address)
        .await
        .map_err(|source| RelayError::ControlTcp {
            address: address.clone(),
            source,
        })
}

/// Serves migration channels accepted on `listener`, forwarding each to
/// `target`, with events and barriers on `hub`. Returns once `shutdown` is
/// cancelled and every channel is closed. The hub is left running (the
/// caller owns it).
pub async fn serve(
    listener: RelayListener,
    target: Address,
    hub: ControlHub,
    (ack_timeout, reply_timeout): (Duration, Duration),
    shutdown: CancellationToken,
) {
    let relay = channel::Relay::new(
        hub,
        target,
        (ack_timeout, reply_timeout),
        None,
        None,
        shutdown,
    );
    relay.accept_loop(listener).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        relay: RelayArgs,
    }

    #[test]
    fn args_parse_and_convert() {
        let cli = Cli::try_parse_from([
            "relay",
            "--listen",
            "tcp:0.0.0.0:4444",
            "--target",
            "unix:/run/sec.sock",
            "--control",
            "/run/relay.sock",
        ])
        .unwrap();
        assert_eq!(cli.relay.ack_timeout_ms, 2000);
        let cfg = RelayConfig::try_from(cli.relay).unwrap();
        assert_eq!(cfg.listen, Address::tcp("0.0.0.0", 4444));
        assert_eq!(cfg.target, Address::Unix("/run/sec.sock".into()));
        assert_eq!(cfg.ack_timeout, DEFAULT_ACK_TIMEOUT);
    }

    #[test]
    fn bad_args_have_clear_errors() {
        let e = Cli::try_parse_from([
            "relay",
            "--listen",
            "4444",
            "--target",
            "unix:/s",
            "--control",
            "/c",
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("unix:PATH, tcp:HOST:PORT"), "{e}");
        let args = |listen: &str, target: &str, control: &str, ms: u64| RelayArgs {
            listen: listen.parse().unwrap(),
            target: target.parse().unwrap(),
            control: control.into(),
            control_tcp: None,
            ack_timeout_ms: ms,
            reply_timeout_ms: 10_000,
            control_group: None,
            operator_uids: Vec::new(),
            operator_gid: None,
            control_tcp_peers: Vec::new(),
            migration_peers: Vec::new(),
            tls_dir: None,
            tls_peer: None,
            migration_tls: false,
        };
        let e = RelayConfig::try_from(args("unix:/a", "unix:/b", "/c", 0)).unwrap_err();
        assert!(e.to_string().contains("--ack-timeout-ms"), "{e}");
        let mut a = args("unix:/a", "unix:/b", "/c", 5);
        a.reply_timeout_ms = 0;
        let e = RelayConfig::try_from(a).unwrap_err();
        assert!(e.to_string().contains("--reply-timeout-ms"), "{e}");
        let e = RelayConfig::try_from(args("unix:/a", "unix:/a", "/c", 5)).unwrap_err();
        assert!(e.to_string().contains("connect to itself"), "{e}");
        let e = RelayConfig::try_from(args("unix:/a", "unix:/b", "/a", 5)).unwrap_err();
        assert!(e.to_string().contains("also a migration endpoint"), "{e}");
        // The access options are checked together.
        let mut a = args("unix:/a", "unix:/b", "/c", 5);
        a.tls_dir = Some("/etc/colo/pki/hostb".into());
        let e = RelayConfig::try_from(a.clone()).unwrap_err();
        assert!(e.to_string().contains("--tls-peer"), "{e}");
        a.tls_peer = Some("hosta".into());
        let e = RelayConfig::try_from(a.clone()).unwrap_err();
        assert!(e.to_string().contains("--control-tcp"), "{e}");
        a.control_tcp = Some(Address::tcp("192.168.77.2", 9990));
        let cfg = RelayConfig::try_from(a).unwrap();
        assert_eq!(cfg.control_tls.unwrap().peer, "hosta");
        // --migration-tls uses the same identity and peer, with or without --control-tcp.
        let mut a = args("unix:/a", "unix:/b", "/c", 5);
        a.migration_tls = true;
        let e = RelayConfig::try_from(a.clone()).unwrap_err();
        assert!(
            e.to_string().contains("--migration-tls needs --tls-dir"),
            "{e}"
        );
        a.tls_dir = Some("/etc/colo/pki/hostb".into());
        a.tls_peer = Some("hosta".into());
        let cfg = RelayConfig::try_from(a.clone()).unwrap();
        assert_eq!(cfg.control_tls, None);
        assert_eq!(cfg.migration_tls.unwrap().peer, "hosta");
        a.control_tcp = Some(Address::tcp("192.168.77.2", 9990));
        let cfg = RelayConfig::try_from(a).unwrap();
        assert_eq!(cfg.control_tls, cfg.migration_tls);
        assert!(cfg.control_tls.is_some());
        let cli = Cli::try_parse_from([
            "relay",
            "--listen",
            "unix:/a",
            "--target",
            "unix:/b",
            "--control",
            "/c",
            "--migration-tls",
        ])
        .unwrap();
        assert!(cli.relay.migration_tls);
        let e = RelayConfig::try_from(cli.relay).unwrap_err().to_string();
        assert!(e.contains("--migration-tls needs --tls-dir"), "{e}");
        let mut a = args("unix:/a", "unix:/b", "/c", 5);
        a.control_tcp_peers = vec!["192.168.77.1".parse().unwrap()];
        let e = RelayConfig::try_from(a).unwrap_err();
        assert!(e.to_string().contains("--control-tcp-peer needs"), "{e}");
        let mut a = args("unix:/a", "unix:/b", "/c", 5);
        a.migration_peers = vec!["192.168.77.1".parse().unwrap()];
        let e = RelayConfig::try_from(a).unwrap_err();
        assert!(
            e.to_string().contains("--migration-peer needs a TCP"),
            "{e}"
        );
    }

    #[test]
    fn control_tcp_is_optional_and_checked() {
        let base = [
            "relay",
            "--listen",
            "tcp:192.168.77.2:9998",
            "--target",
            "unix:/run/sec.sock",
            "--control",
            "/run/relay.sock",
        ];
        let parse = |extra: &[&str]| {
            let mut argv = base.to_vec();
            argv.extend(extra);
            Cli::try_parse_from(argv)
        };
        let cfg = RelayConfig::try_from(parse(&[]).unwrap().relay).unwrap();
        assert_eq!(cfg.control_tcp, None);
        for given in ["192.168.77.2:9990", "tcp:192.168.77.2:9990"] {
            let cfg =
                RelayConfig::try_from(parse(&["--control-tcp", given]).unwrap().relay).unwrap();
            assert_eq!(
                cfg.control_tcp,
                Some(Address::tcp("192.168.77.2", 9990)),
                "{given}"
            );
        }
        let e = parse(&["--control-tcp", "9990"]).unwrap_err().to_string();
        assert!(e.contains("expected HOST:PORT"), "{e}");
        let e = parse(&["--control-tcp", "/run/relay.sock"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid address"), "{e}");
        let same = parse(&["--control-tcp", "192.168.77.2:9998"]).unwrap();
        let e = RelayConfig::try_from(same.relay).unwrap_err().to_string();
        assert!(e.contains("also the migration --listen address"), "{e}");
        let mut unix = parse(&[]).unwrap().relay;
        unix.control_tcp = Some(Address::unix("/run/other.sock"));
        let e = RelayConfig::try_from(unix).unwrap_err().to_string();
        assert!(e.contains("must be a TCP address"), "{e}");
    }
}
