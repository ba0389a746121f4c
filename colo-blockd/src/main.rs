//! colo-blockd: NBD server for colo's secondary disk replica.
//!
//! Today it serves raw image files (`colo-blockd serve`); the buffered
//! secondary replica of issue 5 (PVM log, SVM overlay) plugs in as another
//! backend.

use std::path::PathBuf;
use std::str::FromStr;

use anyhow::Context;
use clap::{Parser, Subcommand};
use colo_blockd::backend::FileBackend;
use colo_blockd::export::{Export, ExportSet};
use colo_blockd::server::{DEFAULT_MAX_IN_FLIGHT, NbdServer, ServerConfig};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Export raw image files over NBD until SIGINT/SIGTERM.
    Serve(ServeArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// An export as NAME=PATH (a raw image file); repeatable or comma-separated. The first is
    /// the default export (the one a client gets for the empty name).
    #[arg(
        long = "export",
        required = true,
        env = "COLO_BLOCKD_EXPORTS",
        value_delimiter = ','
    )]
    exports: Vec<ExportSpec>,
    /// Serve every export read-only.
    #[arg(long)]
    read_only: bool,
    /// Listen on this Unix socket path (removed first if it exists).
    #[arg(long, conflicts_with = "tcp", required_unless_present = "tcp")]
    unix: Option<PathBuf>,
    /// Listen on this TCP address, e.g. 0.0.0.0:10809.
    #[arg(long)]
    tcp: Option<std::net::SocketAddr>,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = DEFAULT_MAX_IN_FLIGHT as u16, value_parser = clap::value_parser!(u16).range(1..))]
    max_in_flight: u16,
}

/// `NAME=PATH` from the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ExportSpec {
    name: String,
    path: PathBuf,
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

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let Cmd::Serve(args) = Args::parse().command;
    tokio::runtime::Runtime::new()?.block_on(serve(args))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut exports = Vec::new();
    for spec in &args.exports {
        let backend = FileBackend::open(&spec.path, args.read_only)
            .with_context(|| format!("cannot open {}", spec.path.display()))?;
        exports.push(Export::new(spec.name.clone(), backend));
    }
    let config = ServerConfig {
        max_in_flight: usize::from(args.max_in_flight),
        ..ServerConfig::default()
    };
    let server = NbdServer::new(ExportSet::new(exports)?, config);
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        stop.cancel();
    });
    if let Some(path) = &args.unix {
        // A stale socket from a previous run would make bind fail.
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path)
            .with_context(|| format!("cannot listen on {}", path.display()))?;
        tracing::info!(socket = %path.display(), "serving NBD");
        server.serve_unix(listener, shutdown).await;
    } else if let Some(addr) = args.tcp {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        tracing::info!(address = %listener.local_addr()?, "serving NBD");
        server.serve_tcp(listener, shutdown).await;
    }
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
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
    fn serve_requires_exactly_one_socket() {
        assert!(Args::try_parse_from(["colo-blockd", "serve", "--export", "a=/x"]).is_err());
        assert!(
            Args::try_parse_from([
                "colo-blockd",
                "serve",
                "--export",
                "a=/x",
                "--unix",
                "/s",
                "--tcp",
                "127.0.0.1:1"
            ])
            .is_err()
        );
        assert!(
            Args::try_parse_from(["colo-blockd", "serve", "--export", "a=/x", "--unix", "/s"])
                .is_ok()
        );
    }
}
