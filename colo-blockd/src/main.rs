//! colo-blockd: NBD server for colo's secondary disk replica.
//!
//! `colo-blockd serve` exports raw image files; `colo-blockd secondary` runs
//! the secondary's buffered replica (PVM log, SVM overlay) driven by the
//! checkpoint-barrier relay's epoch events.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use colo_blockd::backend::FileBackend;
use colo_blockd::cli::{Args, Config, NbdTls, SecondaryConfig, ServeConfig};
use colo_blockd::daemon::checkpoint::{RequestOptions, request_checkpoints};
use colo_blockd::daemon::epochs::{DEFAULT_NAME, EpochOptions, follow_epochs};
use colo_blockd::export::{Export, ExportSet};
use colo_blockd::metrics::Metrics;
use colo_blockd::replica::{Replica, ReplicaConfig};
use colo_blockd::server::NbdServer;
use colo_daemon::Exit;
use colo_daemon::metrics::serve_metrics;
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let args = Args::parse();
    colo_daemon::logging::init("info", args.logging.log_format);
    // Flags and environment variables (clap), then the --config file, then the defaults.
    let config = match Config::try_from(args.command) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("colo-blockd: {err}");
            return Exit::Usage.into();
        }
    };
    colo_daemon::run::until_signal("colo-blockd", async move |shutdown| {
        // `{:#}`: the error with its causes, on one line.
        let done = match config {
            Config::Serve(args) => serve(args, shutdown).await,
            Config::Secondary(args) => secondary(args, shutdown).await,
        };
        done.map_err(|e| format!("{e:#}"))
    })
}

async fn serve(args: ServeConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut exports = Vec::new();
    for spec in &args.exports {
        refuse_failed_over(&spec.path, args.read_only)?;
        let backend = FileBackend::open(&spec.path, args.read_only)
            .with_context(|| format!("cannot open {}", spec.path.display()))?;
        exports.push(Export::new(spec.name.clone(), backend));
    }
    let config = args.limits.server_config(args.max_in_flight);
    let metrics = Metrics::new();
    let server = NbdServer::new(ExportSet::new(exports)?, config).with_metrics(metrics.clone());
    let server = secure(server, args.tls.as_ref(), args.tcp.is_some(), &metrics);
    // With --exit-after-client the first client's departure stops the sockets as a signal
    // would.
    let stop = shutdown.child_token();
    let server = if args.exit_after_client {
        server.stop_after_client(stop.clone())
    } else {
        server
    };
    let listeners = NbdListeners::bind(args.unix.as_deref(), args.tcp).await?;
    listeners.serve(server, stop).await;
    Ok(())
}

/// `serve` writes an image as a copy's target (a re-protect, a failback): an image a
/// failover made the VM's disk holds the pair's newest data, and a copy into it would destroy
/// that. Read-only serving is allowed (reading it back is how it is checked).
fn refuse_failed_over(image: &std::path::Path, read_only: bool) -> anyhow::Result<()> {
    let marker = colo_blockd::replica::failover_marker(image);
    if !read_only && marker.exists() {
        anyhow::bail!(
            "{} was failed over to (its marker {} exists): it is the VM's disk since a \
             failover and may hold the pair's newest data, so it is not served for writing. \
             If it is to become a replica again (the VM runs from the other host's image), \
             delete the marker first; to read it, serve it with --read-only",
            image.display(),
            marker.display()
        );
    }
    Ok(())
}

async fn secondary(args: SecondaryConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = ReplicaConfig {
        pvm_memory_budget: args.log_budget,
        svm_memory_budget: args.overlay_budget,
    };
    let metrics = Metrics::new();
    let replica = Replica::open_with_metrics(&args.image, config, metrics.clone())
        .with_context(|| format!("cannot open the replica over {}", args.image.display()))?;
    tracing::info!(
        image = %args.image.display(),
        size = replica.size(),
        recovery = ?replica.recovery(),
        "replica opened"
    );
    let exports = vec![
        Export::new("replica", replica.replica_view())
            .with_description("the primary's writes (PVM log, committed per checkpoint)"),
        Export::new("svm", replica.svm_view())
            .with_description("the secondary VM's disk (SVM overlay over the checkpoint)"),
    ];
    let config = args.limits.server_config(args.max_in_flight);
    let server = NbdServer::new(ExportSet::new(exports)?, config).with_metrics(metrics.clone());
    let server = secure(server, args.tls.as_ref(), args.tcp.is_some(), &metrics);
    // Every socket is bound before anything runs: a bad address fails the
    // start (exit code 1) instead of leaving half a daemon.
    let listeners = NbdListeners::bind(args.unix.as_deref(), args.tcp).await?;
    let metrics_listener = match args.metrics {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for metrics on {addr}"))?;
            tracing::info!(address = %listener.local_addr()?, "serving metrics on /metrics");
            Some(listener)
        }
        None => None,
    };
    let mut epochs = EpochOptions::new(args.control.clone(), DEFAULT_NAME);
    epochs.name = args.name;
    let mut tasks = vec![tokio::spawn(follow_epochs(
        replica.clone(),
        epochs,
        shutdown.clone(),
    ))];
    if let Some(primary) = args.primary_qmp {
        let opts = RequestOptions::new(primary, Some(args.control.clone()));
        tasks.push(tokio::spawn(request_checkpoints(
            replica.clone(),
            opts,
            shutdown.clone(),
        )));
    } else {
        tracing::info!("no --primary-qmp: a full PVM log waits for the next periodic checkpoint");
    }
    if let Some(listener) = metrics_listener {
        tasks.push(tokio::spawn(serve_metrics(
            listener,
            metrics.metrics_registry(),
            shutdown.clone(),
        )));
    }
    listeners.serve(server, shutdown.clone()).await;
    for task in tasks {
        let _ = task.await;
    }
    // Leave S holding the last adopted checkpoint itself, so the next start
    // has nothing to replay from the journal.
    if let Err(err) = replica.settle().await {
        tracing::error!(
            %err,
            "could not finish writing the last checkpoint into the image; the next start \
             replays it from the journal"
        );
    }
    tracing::info!("stopped");
    Ok(())
}

/// TLS on the TCP socket when configured; says at start how the exports are protected and
/// exports it (`colo_blockd_nbd_unauthenticated`).
fn secure<B: colo_blockd::backend::BlockBackend>(
    server: NbdServer<B>,
    tls: Option<&NbdTls>,
    tcp: bool,
    metrics: &Metrics,
) -> NbdServer<B> {
    metrics.set_nbd_unauthenticated(tcp && tls.is_none());
    match tls {
        Some(tls) => {
            tracing::info!(
                local = %tls.local,
                peers = %tls.peers.join(","),
                dir = %tls.dir.display(),
                "NBD over TCP: STARTTLS required, only the --tls-peer hosts' certificates are \
                 accepted; the Unix socket, if any, relies on its permissions"
            );
            server.with_tls(tls.acceptor.clone())
        }
        None => {
            if tcp {
                tracing::warn!(
                    "NBD over TCP: plaintext and unauthenticated (no --tls-dir): anyone who \
                     reaches the TCP port can read every export and write into it; see \
                     docs/security.md"
                );
            }
            server
        }
    }
}

/// The NBD sockets of one daemon: a Unix socket, a TCP socket or both,
/// serving the same exports.
struct NbdListeners {
    unix: Option<UnixListener>,
    tcp: Option<TcpListener>,
}

impl NbdListeners {
    async fn bind(
        unix: Option<&std::path::Path>,
        tcp: Option<std::net::SocketAddr>,
    ) -> anyhow::Result<NbdListeners> {
        let unix = match unix {
            Some(path) => {
                // A stale socket from a crashed run is replaced; a live one, or
                // any other file, is an error (never deleted).
                colo_daemon::socket::remove_stale_socket(path)
                    .await
                    .with_context(|| format!("cannot listen on {}", path.display()))?;
                // Owner-only (0600) from the first instant: the Unix socket serves without
                // TLS, so its permissions are what keeps others out (docs/security.md).
                let bound = colo_control::bind_private_unix(path, None)
                    .with_context(|| format!("cannot listen on {}", path.display()))?;
                let listener = match bound.0 {
                    colo_control::ControlListener::UnixAt { listener, .. }
                    | colo_control::ControlListener::Unix(listener) => listener,
                    colo_control::ControlListener::Tcp(_) => {
                        anyhow::bail!("{}: bound a TCP socket for a path", path.display())
                    }
                };
                tracing::info!(socket = %path.display(), mode = "0600", "serving NBD");
                Some(listener)
            }
            None => None,
        };
        let tcp = match tcp {
            Some(addr) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr}"))?;
                tracing::info!(address = %listener.local_addr()?, "serving NBD");
                Some(listener)
            }
            None => None,
        };
        Ok(NbdListeners { unix, tcp })
    }

    /// Serves every socket until `shutdown`, then waits for their clients.
    async fn serve<B>(self, server: NbdServer<B>, shutdown: CancellationToken)
    where
        B: colo_blockd::backend::BlockBackend,
    {
        let unix = async {
            if let Some(listener) = self.unix {
                server.serve_unix(listener, shutdown.clone()).await;
            }
        };
        let tcp = async {
            if let Some(listener) = self.tcp {
                server.serve_tcp(listener, shutdown.clone()).await;
            }
        };
        tokio::join!(unix, tcp);
    }
}
