//! colo-proxyd: compares the primary's and the secondary's network output on the reassembled
//! TCP stream and releases only what both produced (COLO), in place of QEMU's colo-compare,
//! filter-mirror's consumer and filter-rewriter.
//!
//! Exit codes: 0 stopped by SIGINT/SIGTERM, 1 could not start (a port is busy, ...), 2 bad
//! command line or configuration.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use colo_proxyd::daemon::config::{PrimaryArgs, PrimaryConfig, SecondaryArgs, SecondaryConfig};
use colo_proxyd::daemon::{primary, secondary};
use tokio_util::sync::CancellationToken;

/// Compares the PVM's and the SVM's network output per TCP connection (COLO).
///
/// Filter mode: QEMU's filter-mirror and filter-redirector objects hand frames to colo-proxyd
/// over socket chardevs (be32 length + frame, vnet_hdr_support off). Run `colo-proxyd primary`
/// on the primary host and `colo-proxyd secondary` on the secondary host; both follow the
/// checkpoint-barrier relay's epochs (`qmp-driver relay --control`).
///
/// Exit codes: 0 stopped by SIGINT or SIGTERM; 1 could not start; 2 bad command line or
/// configuration. Logs go to stderr; set RUST_LOG (e.g. `info`, `colo_proxyd=debug`).
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run on the primary host: compare the PVM's output with the SVM's, release what
    /// matches, ask for checkpoints, mirror inbound packets to the secondary.
    ///
    /// Connects to the primary QEMU's chardev servers compare0 (PVM output), mirror0 (packets
    /// into the PVM) and compare_out (to the network), listens for the secondary's
    /// colo-proxyd, subscribes to the relay and uses its own QMP monitor of the primary QEMU:
    /// checkpoint requests, the chardev check, re-creating the redirector that reads
    /// compare_out at each connection (QEMU never reads an indev again after it closed), and
    /// setting the netdev's link down while compare0 has no connection during COLO.
    Primary(PrimaryArgs),
    /// Run on the secondary host: inject the mirrored packets into the SVM and send the SVM's
    /// output to the primary's colo-proxyd, rewriting TCP sequence numbers.
    ///
    /// Listens for the secondary QEMU's chardev clients red0 (into the SVM) and red1 (the
    /// SVM's output), connects to the primary's colo-proxyd and subscribes to the relay. With
    /// --qmp it re-creates the redirector that reads red0 at each connection of red0.
    Secondary(SecondaryArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: logs in files and journals stay greppable.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Primary(args) => match PrimaryConfig::try_from(args) {
            Ok(config) => serve(async move |shutdown| {
                let listeners = primary::PrimaryListeners::bind(&config).await?;
                primary::run(config, listeners, shutdown).await
            }),
            Err(err) => bad_config(&err),
        },
        Command::Secondary(args) => match SecondaryConfig::try_from(args) {
            Ok(config) => serve(async move |shutdown| {
                let listeners = secondary::SecondaryListeners::bind(&config).await?;
                secondary::run(config, listeners, shutdown).await
            }),
            Err(err) => bad_config(&err),
        },
    }
}

fn bad_config(err: &dyn std::error::Error) -> ExitCode {
    eprintln!("colo-proxyd: {err}");
    ExitCode::from(2)
}

/// Runs a daemon on a multi-threaded runtime until SIGINT or SIGTERM.
fn serve<F>(daemon: impl FnOnce(CancellationToken) -> F) -> ExitCode
where
    F: Future<Output = Result<(), colo_proxyd::daemon::DaemonError>>,
{
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("colo-proxyd: cannot start the runtime: {err}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("signal received: stopping");
            signals.cancel();
        });
        match daemon(shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                tracing::error!(%err, "could not start");
                ExitCode::from(1)
            }
        }
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
