//! `agent`: the HA agent (`qmp_driver::agent`) as a long-running command on one host of the
//! pair: the corosync link, structured logs, Prometheus metrics, the state file, exit codes.

use super::{Exit, Globals, fail};
use colo_cluster::link::Link;
use colo_daemon::metrics::{Gauge, MetricsRegistry};
use colo_types::Role;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use qmp_driver::agent::{AgentEvent, AgentOptions, run_agent};
use qmp_driver::config::PairConfig;
use std::net::SocketAddr;
use std::process::ExitCode;

/// Events from corosync waiting for the agent; the link's dispatch thread blocks when full.
const GROUP_QUEUE: usize = 256;

/// The agent's metrics.
#[derive(Clone, Default)]
struct AgentMetrics {
    quorate: Gauge,
    in_colo: Gauge,
    vm: Family<StateLabel, Gauge>,
    peer: Family<StateLabel, Gauge>,
    decisions: Family<ActionLabel, Counter>,
    takeover_errors: Counter,
    send_errors: Counter,
    last_detection_ms: Gauge,
    last_failover_ms: Gauge,
    daemon_up: Family<StateLabel, Gauge>,
    reprotects: Family<OutcomeLabel, Counter>,
    last_reprotect_ms: Gauge,
    last_reprotect_pause_ms: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabel {
    action: String,
}

const VM_STATES: [&str; 6] = ["waiting", "primary", "secondary", "alone", "gone", "fenced"];

impl AgentMetrics {
    fn registry(&self) -> MetricsRegistry {
        let mut r = Registry::with_prefix("colo_agent");
        r.register(
            "quorate",
            "1 while this node is quorate for the current corosync membership",
            self.quorate.clone(),
        );
        r.register(
            "in_colo",
            "1 while this side's VM is in COLO",
            self.in_colo.clone(),
        );
        r.register(
            "vm_state",
            "1 for the state this side's VM is in",
            self.vm.clone(),
        );
        r.register(
            "peer_state",
            "1 for the state the peer agent reported last (or left)",
            self.peer.clone(),
        );
        r.register(
            "decisions",
            "Decisions the agent took: claim, take-over, fence",
            self.decisions.clone(),
        );
        r.register(
            "takeover_errors",
            "Take-overs that did not finish",
            self.takeover_errors.clone(),
        );
        r.register(
            "send_errors",
            "Messages that could not be sent to the group",
            self.send_errors.clone(),
        );
        r.register(
            "last_detection_milliseconds",
            "From the first sign of the last failure the agent saw to its decision",
            self.last_detection_ms.clone(),
        );
        r.register(
            "last_failover_milliseconds",
            "Duration of the last take-over's failover sequence",
            self.last_failover_ms.clone(),
        );
        r.register(
            "daemon_up",
            "1 while the relay (state=relay) or a relay subscriber (state=its name) is up and healthy, as the relay on this host reports them",
            self.daemon_up.clone(),
        );
        r.register(
            "reprotects",
            "Automatic re-protects (--auto-reprotect) by outcome: started, done, failed",
            self.reprotects.clone(),
        );
        r.register(
            "last_reprotect_milliseconds",
            "Duration of the last automatic re-protect that succeeded",
            self.last_reprotect_ms.clone(),
        );
        r.register(
            "last_reprotect_switch_pause_milliseconds",
            "The guest's pause at the switch into COLO of the last automatic re-protect",
            self.last_reprotect_pause_ms.clone(),
        );
        for outcome in ["started", "done", "failed"] {
            let _ = self.reprotects.get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            });
        }
        for state in VM_STATES {
            let _ = self.vm.get_or_create(&StateLabel {
                state: state.into(),
            });
        }
        for action in ["claim", "take-over", "fence"] {
            let _ = self.decisions.get_or_create(&ActionLabel {
                action: action.into(),
            });
        }
        MetricsRegistry::new(r)
    }

    fn record(&self, event: &AgentEvent<'_>) {
        match event {
            AgentEvent::Status(s) => {
                self.quorate.set(u64::from(s.quorate));
                self.in_colo.set(u64::from(s.in_sync));
                for state in VM_STATES {
                    self.vm
                        .get_or_create(&StateLabel {
                            state: state.into(),
                        })
                        .set(u64::from(s.vm == state));
                }
                if let Some(d) = &s.daemons {
                    self.daemon_up.clear();
                    let up = |state: &str, up: bool| {
                        self.daemon_up
                            .get_or_create(&StateLabel {
                                state: state.into(),
                            })
                            .set(u64::from(up));
                    };
                    up("relay", d.relay_up);
                    for sub in &d.subscribers {
                        up(&sub.name, sub.connected && sub.healthy);
                    }
                }
                self.peer.clear();
                if let Some(peer) = &s.peer {
                    self.peer
                        .get_or_create(&StateLabel {
                            state: peer.vm.clone(),
                        })
                        .set(1);
                }
            }
            AgentEvent::Decided(d) => {
                self.decisions
                    .get_or_create(&ActionLabel {
                        action: d.action.clone(),
                    })
                    .inc();
                if let Some(ms) = d.detection_ms {
                    self.last_detection_ms.set(ms as u64);
                }
                tracing::warn!(
                    action = %d.action,
                    reason = %d.reason,
                    detection_ms = ?d.detection_ms,
                    "decision"
                );
            }
            AgentEvent::Step(p) => tracing::info!(step = %p, "take-over"),
            AgentEvent::TookOver(report) => {
                self.last_failover_ms.set(report.total_ms as u64);
                tracing::warn!(
                    total_ms = report.total_ms,
                    runstate = %report.runstate,
                    "take-over done: this side's VM serves alone, UNPROTECTED until a new peer is started"
                );
            }
            AgentEvent::TakeOverFailed(e) => {
                self.takeover_errors.inc();
                tracing::error!(error = %e, "the take-over did not finish");
            }
            AgentEvent::SendFailed(e) => {
                self.send_errors.inc();
                tracing::error!(error = %e, "cannot send to the group");
            }
            AgentEvent::ReprotectStarted(attempt) => {
                self.reprotect_outcome("started");
                tracing::warn!(attempt, "automatic re-protect started");
            }
            AgentEvent::Reprotected(r) => {
                self.reprotect_outcome("done");
                self.last_reprotect_ms.set(r.total_ms as u64);
                self.last_reprotect_pause_ms.set(r.switch_pause_ms as u64);
                tracing::warn!(
                    total_ms = r.total_ms,
                    switch_pause_ms = r.switch_pause_ms,
                    bytes_copied = r.bytes_copied,
                    "re-protect done: the pair is in COLO again"
                );
            }
            AgentEvent::ReprotectFailed(e) => {
                self.reprotect_outcome("failed");
                tracing::error!(error = %e, "the automatic re-protect failed: this VM serves on alone");
            }
        }
    }
}

impl AgentMetrics {
    fn reprotect_outcome(&self, outcome: &str) {
        self.reprotects
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc();
    }
}

/// Runs the agent until SIGINT/SIGTERM (exit 0); exit 4 when corosync cannot be reached.
pub async fn run(
    cfg: &PairConfig,
    g: &Globals,
    mut opts: AgentOptions,
    group_name: Option<String>,
    metrics_listen: Option<SocketAddr>,
) -> ExitCode {
    if cfg.host(opts.side).watch_qmp.is_none() {
        return fail(
            &format!(
                "the config has no {}.watch_qmp: the agent needs a QMP socket of its own \
                 (QEMU serves one client per monitor; `qmp-driver qemu-args` adds it)",
                opts.side.name()
            ),
            Exit::Usage,
        );
    }
    opts.connect = g.connect_options();
    if opts.side == Role::Secondary && opts.auto_reprotect.is_some() {
        tracing::info!(
            "--auto-reprotect acts on the primary's side only: ignored on the secondary's"
        );
    }
    let cancel = colo_daemon::run::shutdown_on_signal();
    let metrics = AgentMetrics::default();
    if let Some(listen) = metrics_listen
        && let Err(code) = super::serve_metrics_on(listen, metrics.registry(), &cancel).await
    {
        return code;
    }
    let group_name = group_name.unwrap_or_else(|| format!("colo-{}", cfg.name));
    let (tx, mut rx) = tokio::sync::mpsc::channel(GROUP_QUEUE);
    let link = match Link::join(&group_name, tx) {
        Ok(link) => link,
        Err(e) => {
            return fail(
                &format!(
                    "cannot join the corosync group {group_name}: {e} (is corosync running on this host?)"
                ),
                Exit::Unreachable,
            );
        }
    };
    tracing::info!(
        group = %group_name,
        node = link.node_id(),
        side = opts.side.name(),
        stall = ?opts.stall,
        quorum_grace = ?opts.quorum_grace,
        state_file = ?opts.state_file,
        auto_reprotect = opts.auto_reprotect.is_some(),
        "HA agent running"
    );
    let mut report = |event: AgentEvent<'_>| metrics.record(&event);
    let result = run_agent(cfg, &opts, &link, &mut rx, &mut report, &cancel).await;
    link.leave();
    match result {
        Ok(()) => Exit::Success.into(),
        Err(e) => fail(&e, Exit::Usage),
    }
}
