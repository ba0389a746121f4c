//! `watch`: the primary's watch agent (`qmp_driver::pair::watch_primary`) as a long-running
//! command: structured logs, Prometheus metrics, exit codes.

use super::{Exit, Globals, fail};
use colo_daemon::metrics::{Gauge, MetricsRegistry};
use colo_qmp::QmpClient;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use qmp_driver::config::PairConfig;
use qmp_driver::pair::{Trigger, WatchEvent, WatchOptions, watch_primary};
use std::net::SocketAddr;
use std::process::ExitCode;

/// The agent's metrics.
#[derive(Clone, Default)]
struct WatchMetrics {
    protected: Gauge,
    failovers: Family<TriggerLabel, Counter>,
    failover_errors: Counter,
    last_failover_ms: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TriggerLabel {
    trigger: &'static str,
}

impl WatchMetrics {
    fn registry(&self) -> MetricsRegistry {
        let mut r = Registry::with_prefix("colo_watch");
        r.register(
            "protected",
            "1 while the primary is in COLO and watched, else 0",
            self.protected.clone(),
        );
        r.register(
            "failovers",
            "Failovers to the primary the agent ran, by what triggered them",
            self.failovers.clone(),
        );
        r.register(
            "failover_errors",
            "Failovers the agent started that did not finish",
            self.failover_errors.clone(),
        );
        r.register(
            "last_failover_milliseconds",
            "Duration of the last failover sequence, from the trigger to the VM running",
            self.last_failover_ms.clone(),
        );
        for t in Trigger::ALL {
            // Every trigger is listed from the start, at 0.
            let _ = self
                .failovers
                .get_or_create(&TriggerLabel { trigger: t.label() });
        }
        MetricsRegistry::new(r)
    }

    fn record(&self, event: &WatchEvent) {
        match event {
            WatchEvent::Protected => {
                self.protected.set(1);
                tracing::info!("the primary is in COLO: watching the secondary's part in it");
            }
            WatchEvent::Unprotected { last_mode } => {
                self.protected.set(0);
                tracing::info!(%last_mode, "the primary is not in COLO: waiting until it is");
            }
            WatchEvent::Triggered { trigger, detail } => {
                self.failovers
                    .get_or_create(&TriggerLabel {
                        trigger: trigger.label(),
                    })
                    .inc();
                tracing::error!(
                    trigger = trigger.label(),
                    %detail,
                    "the secondary no longer takes part in COLO: the primary carries on alone"
                );
            }
            WatchEvent::Step(p) => tracing::info!(step = %p, "failover"),
            WatchEvent::FailedOver(report) => {
                self.protected.set(0);
                self.last_failover_ms.set(report.total_ms as u64);
                tracing::warn!(
                    total_ms = report.total_ms,
                    runstate = %report.runstate,
                    "failover to the primary done: the VM runs UNPROTECTED until a new secondary is started"
                );
            }
            WatchEvent::FailoverFailed(e) => {
                self.failover_errors.inc();
                tracing::error!(error = %e, "the failover to the primary did not finish; still watching");
            }
        }
    }
}

/// Runs the agent until SIGINT/SIGTERM (exit 0) or until the primary's monitor is gone
/// (exit 4).
pub async fn run(
    cfg: &PairConfig,
    g: &Globals,
    opts: WatchOptions,
    metrics_listen: Option<SocketAddr>,
) -> ExitCode {
    let Some(address) = cfg.primary.watch_qmp.clone() else {
        return fail(
            &"the config has no primary.watch_qmp: the agent needs a QMP socket of its own \
              (QEMU serves one client per monitor; `qmp-driver qemu-args` adds it)",
            Exit::Usage,
        );
    };
    let cancel = colo_daemon::run::shutdown_on_signal();
    let metrics = WatchMetrics::default();
    if let Some(listen) = metrics_listen
        && let Err(code) = super::serve_metrics_on(listen, metrics.registry(), &cancel).await
    {
        return code;
    }
    let qmp = match QmpClient::connect_to(&address, g.connect_options()).await {
        Ok(q) => q,
        Err(e) => {
            return fail(
                &format!("cannot reach the primary's watch monitor {address}: {e}"),
                Exit::Unreachable,
            );
        }
    };
    tracing::info!(%address, stall = ?opts.stall, probe = ?opts.probe, "watching the primary");
    let mut report = |event: WatchEvent| metrics.record(&event);
    match watch_primary(&qmp, cfg, &opts, &mut report, &cancel).await {
        Ok(()) => Exit::Success.into(),
        Err(e) => fail(&e, super::exit::for_pair_error(&e)),
    }
}
