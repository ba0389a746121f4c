//! The checkpoint-barrier relay (`qmp-driver relay`).
//!
//! The primary QEMU migrates to the relay instead of to the secondary. For
//! every connection the primary opens, the relay opens one to the secondary
//! QEMU's incoming address and forwards bytes both ways, in order and
//! without delay. On the main migration channel (the one that starts with
//! `QEVM`) it reads the COLO messages the secondary sends back
//! ([`colo_message`]) and turns them into control events for colo-blockd and
//! colo-proxyd ([`colo_control`]):
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
//! `barrier-timeout` and closes both sides of the main channel and of its
//! pass-through channels, so both QEMUs leave COLO with `COLO_EXIT
//! reason=error` instead of waiting forever. The relay keeps running.
//! `docs/control-protocol.md` has the whole story.
//!
//! The control protocol is served on a Unix socket (`control`: daemons and
//! tools on the relay's host) and, with `control_tcp`, also on TCP for the
//! daemons on the other host (colo-proxyd primary when the relay runs on the
//! secondary host). TCP has no authentication: bind it to the replication
//! link only.
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
//! };
//! run(config, CancellationToken::new()).await
//! # }
//! ```

mod channel;
pub mod colo_message;
mod stream;

pub use colo_message::{ColoMessage, ColoParser, MULTIFD_MAGIC, ParseError, QEVM_MAGIC};
pub use stream::RelayListener;

use colo_control::hub::{ControlHub, ControlListener};
use colo_daemon::socket::remove_stale_socket;
use colo_types::{Address, AddressError};
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Default [`RelayConfig::ack_timeout`].
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_millis(2000);
/// Largest accepted `--ack-timeout-ms` (10 minutes).
pub const MAX_ACK_TIMEOUT_MS: u64 = 600_000;

/// What the relay needs to run.
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
        }
        Ok(RelayConfig {
            listen: a.listen,
            target: a.target,
            control: a.control,
            control_tcp: a.control_tcp,
            ack_timeout: Duration::from_millis(a.ack_timeout_ms),
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
    remove_stale_socket(&config.control)
        .await
        .map_err(control_err)?;
    let control = tokio::net::UnixListener::bind(&config.control).map_err(control_err)?;
    let hub = ControlHub::new(control);
    let control_tcp = match &config.control_tcp {
        None => None,
        Some(address) => match bind_control_tcp(address).await {
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
        ack_timeout_ms = config.ack_timeout.as_millis() as u64,
        "relay started"
    );
    serve(
        listener,
        config.target.clone(),
        hub.clone(),
        config.ack_timeout,
        shutdown,
    )
    .await;
    hub.shutdown().await;
    let _ = std::fs::remove_file(&config.control);
    if let Address::Unix(p) = &config.listen {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

/// Binds the control protocol's TCP listener. A wildcard address is allowed
/// (a host may have only the replication link) but warned about: nothing
/// authenticates a control client.
async fn bind_control_tcp(address: &Address) -> Result<ControlListener, RelayError> {
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
    ack_timeout: Duration,
    shutdown: CancellationToken,
) {
    let relay = channel::Relay::new(hub, target, ack_timeout, shutdown);
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
        };
        let e = RelayConfig::try_from(args("unix:/a", "unix:/b", "/c", 0)).unwrap_err();
        assert!(e.to_string().contains("--ack-timeout-ms"), "{e}");
        let e = RelayConfig::try_from(args("unix:/a", "unix:/a", "/c", 5)).unwrap_err();
        assert!(e.to_string().contains("connect to itself"), "{e}");
        let e = RelayConfig::try_from(args("unix:/a", "unix:/b", "/a", 5)).unwrap_err();
        assert!(e.to_string().contains("also a migration endpoint"), "{e}");
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
