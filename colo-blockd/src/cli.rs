//! colo-blockd's command line (clap), in the library so that tools and tests parse exactly what
//! the daemon parses (qmp-driver's `daemon-args` output is checked against it).

use std::path::PathBuf;
use std::str::FromStr;

use clap::{Parser, Subcommand};
use colo_daemon::DAEMON_EXIT_CODES;
use colo_types::Address;

use crate::daemon::epochs::DEFAULT_NAME;
use crate::replica::DEFAULT_MEMORY_BUDGET;
use crate::server::DEFAULT_MAX_IN_FLIGHT;

#[derive(Debug, Parser)]
#[command(
    version,
    about,
    long_about = None,
    after_help = DAEMON_EXIT_CODES
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Export raw image files over NBD until SIGINT/SIGTERM.
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

Logs go to stderr; level: RUST_LOG (default info).";

#[derive(Debug, clap::Args)]
pub struct SecondaryArgs {
    /// The base image S, a raw file (the journal and spill files go next to it).
    #[arg(long, value_name = "S.raw")]
    pub image: PathBuf,
    /// Listen on this Unix socket path, e.g. for the SVM's QEMU (a stale socket there is
    /// replaced; a live one or another file is an error). May be given with --tcp: both serve
    /// the same exports.
    #[arg(long, value_name = "PATH", required_unless_present = "tcp")]
    pub unix: Option<PathBuf>,
    /// Listen on this TCP address, e.g. 0.0.0.0:10809 (the primary's quorum child connects
    /// here). May be given with --unix: both serve the same exports.
    #[arg(long, value_name = "ADDR")]
    pub tcp: Option<std::net::SocketAddr>,
    /// Serve Prometheus metrics on this TCP address (GET /metrics), e.g. 127.0.0.1:9109.
    #[arg(long, value_name = "ADDR", env = "COLO_BLOCKD_METRICS")]
    pub metrics: Option<std::net::SocketAddr>,
    /// The relay's control socket: unix:PATH or an absolute path on the relay's host
    /// (`qmp-driver relay --control PATH`), or tcp:HOST:PORT from the other host (the relay's
    /// --control-tcp, on the replication link).
    #[arg(long, value_name = "ADDRESS", env = "COLO_RELAY_CONTROL")]
    pub control: Address,
    /// The primary QEMU's QMP monitor, as unix:PATH or tcp:HOST:PORT. Without it a full PVM log
    /// only spills to its file and waits for the next periodic checkpoint.
    #[arg(long, value_name = "ADDR")]
    pub primary_qmp: Option<Address>,
    /// Bytes of PVM log kept in memory; past them writes spill to a file and a checkpoint is
    /// requested.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MEMORY_BUDGET)]
    pub log_budget: u64,
    /// Bytes of SVM overlay kept in memory; past them writes spill to a file.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MEMORY_BUDGET)]
    pub overlay_budget: u64,
    /// Our name on the control socket (the relay's status and barrier errors show it).
    #[arg(long, default_value = DEFAULT_NAME)]
    pub name: String,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = DEFAULT_MAX_IN_FLIGHT as u16, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_in_flight: u16,
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// An export as NAME=PATH (a raw image file); repeatable or comma-separated. The first is
    /// the default export (the one a client gets for the empty name).
    #[arg(
        long = "export",
        required = true,
        env = "COLO_BLOCKD_EXPORTS",
        value_delimiter = ','
    )]
    pub exports: Vec<ExportSpec>,
    /// Serve every export read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Listen on this Unix socket path (a stale socket there is replaced; a live one or another
    /// file is an error). May be given with --tcp: both serve the same exports.
    #[arg(long, value_name = "PATH", required_unless_present = "tcp")]
    pub unix: Option<PathBuf>,
    /// Listen on this TCP address, e.g. 0.0.0.0:10809. May be given with --unix: both serve
    /// the same exports.
    #[arg(long, value_name = "ADDR")]
    pub tcp: Option<std::net::SocketAddr>,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = DEFAULT_MAX_IN_FLIGHT as u16, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_in_flight: u16,
}

/// `NAME=PATH` from the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn serve_needs_a_socket_and_takes_both() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["colo-blockd", "serve", "--export", "a=/x"];
            argv.extend(extra);
            Args::try_parse_from(argv)
        };
        assert!(parse(&[]).is_err());
        assert!(parse(&["--unix", "/s"]).is_ok());
        assert!(parse(&["--tcp", "127.0.0.1:1"]).is_ok());
        let Cmd::Serve(both) = parse(&["--unix", "/s", "--tcp", "127.0.0.1:1"])
            .unwrap()
            .command
        else {
            panic!("not serve");
        };
        assert_eq!(both.unix, Some(PathBuf::from("/s")));
        assert_eq!(both.tcp, Some("127.0.0.1:1".parse().unwrap()));
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
            Args::try_parse_from(argv)
        };
        assert!(parse(&[]).is_err());
        let Cmd::Secondary(args) = parse(&[
            "--unix",
            "/run/svm.sock",
            "--tcp",
            "0.0.0.0:10809",
            "--metrics",
            "127.0.0.1:9109",
        ])
        .unwrap()
        .command
        else {
            panic!("not secondary");
        };
        assert!(args.unix.is_some() && args.tcp.is_some());
        assert_eq!(args.metrics, Some("127.0.0.1:9109".parse().unwrap()));
        assert!(parse(&["--unix", "/s", "--metrics", "nonsense"]).is_err());
    }

    #[test]
    fn secondary_control_is_unix_tcp_or_a_path() {
        let parse = |control: &str| {
            Args::try_parse_from([
                "colo-blockd",
                "secondary",
                "--image",
                "s.raw",
                "--unix",
                "/s",
                "--control",
                control,
            ])
            .map(|a| match a.command {
                Cmd::Secondary(s) => s.control,
                Cmd::Serve(_) => panic!("not secondary"),
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
        let e = parse("192.168.77.2:9990").unwrap_err().to_string();
        assert!(e.contains("tcp:192.168.77.2:9990"), "{e}");
    }
}
