//! Running a daemon: a multi-threaded runtime, SIGINT/SIGTERM as a graceful shutdown, an exit
//! code that says how it ended.

use std::future::Future;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use crate::Exit;

/// Runs `daemon` on a new multi-threaded runtime until it returns. The token it gets is
/// cancelled at the first SIGINT or SIGTERM; the daemon then stops accepting, finishes what it
/// owes its peers and returns. `name` prefixes the error printed when the runtime cannot start.
///
/// `Ok` exits 0; an error is logged ("stopped on an error") and exits 1.
pub fn until_signal<F, E>(name: &str, daemon: impl FnOnce(CancellationToken) -> F) -> ExitCode
where
    F: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("{name}: cannot start the runtime: {err}");
            return Exit::Failed.into();
        }
    };
    runtime.block_on(async {
        let shutdown = shutdown_on_signal();
        // On a worker, not on this thread: the daemon's tasks then hand packets to each other
        // on the worker that runs them, rather than waking this thread through a futex at
        // every packet (half the latency of a probe through both colo-proxyd daemons under a
        // flood, docs/memory-bounds.md).
        match tokio::spawn(daemon(shutdown)).await {
            Ok(Ok(())) => Exit::Success.into(),
            Ok(Err(err)) => {
                tracing::error!(%err, "stopped on an error");
                Exit::Failed.into()
            }
            // A panic ends the process as it would have on this thread.
            Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
            Err(err) => {
                tracing::error!(%err, "the daemon's task was cancelled");
                Exit::Failed.into()
            }
        }
    })
}

/// A token cancelled at the first SIGINT or SIGTERM (call inside a runtime).
pub fn shutdown_on_signal() -> CancellationToken {
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        let signal = wait_for_signal().await;
        tracing::info!(signal, "signal received: stopping");
        on_signal.cancel();
    });
    shutdown
}

/// Waits for SIGINT or SIGTERM; returns its name.
pub async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = tokio::signal::ctrl_c() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        Err(err) => {
            tracing::warn!(%err, "cannot watch SIGTERM; only SIGINT stops this daemon");
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}
