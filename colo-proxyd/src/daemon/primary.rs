//! `colo-proxyd primary`: the role loop on the primary host.
//!
//! ```text
//!  QEMU compare0 (PVM output) ──► ReleaseGate ──► QEMU compare_out (to the network)
//!  link (SVM output, by epoch) ──►     │
//!  relay events ─────────────────►     └──► checkpoint requests (QMP)
//!  QEMU mirror0 (into the PVM) ──► link (to the secondary's daemon)
//! ```
//!
//! | relay event | done here before the ack |
//! |---|---|
//! | `svm-epoch-closed` | nothing (the SVM side is the secondary's) |
//! | `checkpoint-adopted{E}` | drain the PVM's socket, release every held packet, drop SVM output of epoch ≤ E, restart comparison with epoch E+1 |
//! | `colo-started{E}` (async) | compare from epoch E on |
//! | `colo-exit` (async) | hold output, no more checkpoint requests |
//! | `failover` (async) | survivor primary: release what is held, pass output uncompared; survivor secondary: drop what is held and everything the PVM still sends (fenced) |

use std::time::Duration;
use tracing::Instrument;

use bytes::Bytes;

use colo_control::protocol::{Event, EventKind, RelayState};
use colo_types::Role;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::attachment::{
    FrameSink, FrameSource, Inbound, PortAccess, PortEndpoint, spawn_sink_prepared, spawn_source,
    spawn_source_watched,
};
use super::checkpoint::{RELAY_PREFIX, reason_label};
use super::colo_state::{self, QemuColo};
use super::config::{PrimaryConfig, QemuPort};
use super::epochs::{self, Completion, EpochNotice};
use super::gate::{GateOutput, Protection, ReleaseGate, SvmFrameFate};
use super::link::LinkMessage;
use super::metrics::Metrics;
use super::peer::{self, LinkSender};
use super::qemu_filters::{self, IndevRedirector};
use super::{DaemonError, bind, failopen};
use colo_daemon::checkpoint::{CheckpointRequester, RequestOptions};
use colo_daemon::qmp_session::QmpSession;

/// The primary's listening sockets, bound before [`run`] so that a test (or a supervisor)
/// knows the addresses and a busy port fails at start.
#[derive(Debug)]
pub struct PrimaryListeners {
    /// The inter-host link.
    pub link: TcpListener,
    /// The metrics endpoint.
    pub metrics: Option<TcpListener>,
    /// QEMU's `compare0`: a bound listener ([`QemuPort::Listen`]) or the address to connect to.
    pub pvm_output: PortEndpoint,
    /// QEMU's `mirror0`.
    pub mirror: PortEndpoint,
    /// QEMU's `compare_out`.
    pub release: PortEndpoint,
}

impl PrimaryListeners {
    /// Binds the addresses of `config`.
    pub async fn bind(config: &PrimaryConfig) -> Result<Self, DaemonError> {
        let access = PortAccess::new(&config.qemu_uids);
        Ok(PrimaryListeners {
            link: bind("the secondary's colo-proxyd", &config.link_listen).await?,
            metrics: match &config.metrics {
                Some(address) => Some(bind("metrics", address).await?),
                None => None,
            },
            pvm_output: endpoint("QEMU's compare0", &config.pvm_output, &access).await?,
            mirror: endpoint("QEMU's mirror0", &config.mirror, &access).await?,
            release: endpoint("QEMU's compare_out", &config.release, &access).await?,
        })
    }
}

/// A QEMU port's endpoint: its listener bound for the uids of `access`, or the address of
/// QEMU's server.
async fn endpoint(
    what: &'static str,
    port: &QemuPort,
    access: &PortAccess,
) -> Result<PortEndpoint, DaemonError> {
    Ok(match port {
        QemuPort::Listen(address) => {
            PortEndpoint::Listen(bind(what, address).await?, access.clone())
        }
        QemuPort::Connect(address) => PortEndpoint::Connect(address.clone()),
    })
}

/// Runs the primary daemon until `shutdown` is cancelled.
pub async fn run(
    config: PrimaryConfig,
    listeners: PrimaryListeners,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let metrics = Metrics::new("primary");
    // Tasks stop with the role loop, also when it ends for another reason than shutdown.
    let tasks = shutdown.child_token();
    let _stop_tasks = tasks.clone().drop_guard();
    if let Some(listener) = listeners.metrics {
        tokio::spawn(colo_daemon::metrics::serve_metrics(
            listener,
            metrics.metrics_registry(),
            tasks.clone(),
        ));
    }
    let qmp = QmpSession::new(config.qmp.clone());
    let (pvm_connected_tx, pvm_connected) = watch::channel(false);
    let pvm = spawn_source_watched(
        "compare0",
        listeners.pvm_output,
        metrics.clone(),
        tasks.clone(),
        Some(pvm_connected_tx),
    );
    let mirror = spawn_source("mirror0", listeners.mirror, metrics.clone(), tasks.clone());
    // QEMU reads no reconnected indev: the redirector is re-created before each connection
    // is written to.
    let release_filter = IndevRedirector::release(
        &config.netdev,
        &config.release_redirector,
        &config.release_chardev,
        &config.pvm_output_redirector,
    );
    let release = spawn_sink_prepared(
        "compare_out",
        listeners.release,
        metrics.clone(),
        tasks.clone(),
        Some(qemu_filters::recreate_on_connect(
            Some(qmp.clone()),
            release_filter,
            metrics.clone(),
            tasks.clone(),
        )),
    );
    // Nothing is released uncompared until QEMU or the relay said the pair is not in COLO
    // (`colo_state`): a daemon restarted while QEMU is still a COLO primary must hold.
    let (protection_tx, protection) = watch::channel(Protection::Exited);
    if config.link_down_without_pvm_output {
        tokio::spawn(qemu_filters::guard_guest_link(
            qmp.clone(),
            config.netdev.clone(),
            "compare0".to_owned(),
            pvm_connected,
            protection,
            metrics.clone(),
            tasks.clone(),
        ));
    }
    let qemu_colo = colo_state::spawn(qmp.clone(), Role::Primary, tasks.clone());
    let link = peer::spawn_primary(
        listeners.link,
        config.link_tls.clone(),
        metrics.clone(),
        tasks.clone(),
    );
    let requester = CheckpointRequester::spawn(
        qmp.clone(),
        RequestOptions {
            min_interval: config.checkpoint_interval,
            retry_after: config.checkpoint_retry,
            control: Some(config.control.clone()),
            relay_prefix: RELAY_PREFIX,
        },
        std::sync::Arc::new(metrics.clone()),
        tasks.clone(),
    );
    if !config.chardevs.is_empty() {
        tokio::spawn(failopen::watch(
            qmp,
            config.chardevs.clone(),
            config.chardev_check,
            metrics.clone(),
            tasks.clone(),
        ));
    }
    let relay_options = config.relay_options();
    if let Some(tls) = &relay_options.tls {
        tracing::info!(control = %config.control, relay = %tls.peer(), "following the relay over mutual TLS");
    }
    let relay = epochs::spawn(relay_options, tasks.clone());
    tracing::info!(
        pvm_output = %config.pvm_output,
        mirror = %config.mirror,
        release = %config.release,
        qemu_uids = ?config.qemu_uids,
        link = %config.link_listen,
        control = %config.control,
        qmp = %config.qmp,
        netdev = %config.netdev,
        release_redirector = %config.release_redirector,
        link_down_without_pvm_output = config.link_down_without_pvm_output,
        max_hold = ?config.engine.max_hold,
        "colo-proxyd primary started"
    );
    let tick = (config.engine.max_hold / 4).max(Duration::from_millis(5));
    let equivalent_rules = config
        .engine
        .equivalent
        .iter()
        .map(|rule| rule.text().to_owned())
        .collect();
    let mut role = PrimaryRole {
        equivalent_rules,
        gate: ReleaseGate::new(config.engine, Protection::Exited, 0),
        release,
        link: link.outgoing,
        requester,
        metrics,
        out: Vec::new(),
        clock: Instant::now(),
        protection: protection_tx,
        published: Protection::Exited,
    };
    let inputs = RoleInputs {
        pvm,
        mirror,
        from_link: link.incoming,
        relay,
        qemu_colo,
    };
    role.run(inputs, tick, &shutdown).await;
    tracing::info!("colo-proxyd primary stopped");
    Ok(())
}

/// What the role loop reads from.
struct RoleInputs {
    /// The PVM's output (QEMU's `compare0`).
    pvm: FrameSource,
    /// The client's packets into the PVM (QEMU's `mirror0`), for the secondary.
    mirror: FrameSource,
    /// The secondary daemon's messages (the SVM's output).
    from_link: tokio::sync::mpsc::Receiver<LinkMessage>,
    /// The relay's epoch events.
    relay: tokio::sync::mpsc::Receiver<EpochNotice>,
    /// QEMU's own COLO state.
    qemu_colo: tokio::sync::mpsc::Receiver<QemuColo>,
}

struct PrimaryRole {
    /// The equivalence rules' texts, the metrics' labels.
    equivalent_rules: Vec<String>,
    gate: ReleaseGate,
    release: FrameSink,
    link: LinkSender,
    requester: CheckpointRequester,
    metrics: Metrics,
    out: Vec<GateOutput>,
    clock: Instant,
    /// The gate's protection, for the guest-link guard (sent when it changes).
    protection: watch::Sender<Protection>,
    published: Protection,
}

impl PrimaryRole {
    fn now(&self) -> Duration {
        self.clock.elapsed()
    }

    async fn run(&mut self, inputs: RoleInputs, tick: Duration, shutdown: &CancellationToken) {
        let RoleInputs {
            mut pvm,
            mut mirror,
            mut from_link,
            mut relay,
            mut qemu_colo,
        } = inputs;
        let mut timer = tokio::time::interval(tick);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Registered once: a fresh `cancelled()` per packet costs a lock to register and one
        // to deregister.
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        loop {
            tokio::select! {
                _ = &mut cancelled => return,
                m = pvm.recv() => match m {
                    Some(Inbound::Frame(frame)) => self.pvm_frame(frame),
                    // A drain's marker outside a barrier: nothing waits for it.
                    Some(Inbound::Drained) => {}
                    None => return,
                },
                m = mirror.recv() => match m {
                    Some(Inbound::Frame(frame)) => self.link.send(LinkMessage::Inbound(frame)),
                    Some(Inbound::Drained) => {}
                    None => return,
                },
                m = from_link.recv() => match m {
                    Some(LinkMessage::SvmOutput { epoch, frame }) => self.svm_frame(epoch, frame),
                    Some(_) => {}
                    None => return,
                },
                n = relay.recv() => match n {
                    Some(notice) => self.notice(notice, &mut pvm).await,
                    None => return,
                },
                // A closed channel (its task ended) disables the branch.
                Some(state) = qemu_colo.recv() => self.qemu_colo(state),
                _ = timer.tick() => {
                    let now = self.now();
                    self.gate.tick(now, &mut self.out);
                    self.metrics.set_primary_bounds(&self.gate);
                }
            }
            self.flush().await;
        }
    }

    fn pvm_frame(&mut self, frame: Bytes) {
        match self.gate.protection() {
            Protection::Protected | Protection::Exited => self.metrics.add_compared(frame.len()),
            Protection::Fenced => self.metrics.dropped_frame(),
            Protection::Unprotected => {}
        }
        let now = self.now();
        self.gate.pvm_frame(frame, now, &mut self.out);
    }

    fn svm_frame(&mut self, epoch: u64, frame: Bytes) {
        self.metrics.svm_frame();
        let now = self.now();
        if self.gate.svm_frame(epoch, frame, now, &mut self.out) == SvmFrameFate::Stale {
            self.metrics.stale_svm_frame();
        }
    }

    /// QEMU's own COLO state changed (see [`colo_state`]).
    fn qemu_colo(&mut self, state: QemuColo) {
        let now = self.now();
        let protection = self.gate.protection();
        match (state, protection) {
            // The relay's failover to the secondary is final for this side.
            (_, Protection::Fenced) => {}
            (QemuColo::InColo, Protection::Unprotected) => tracing::warn!(
                "QEMU is a COLO primary but the relay has not said COLO started: output \
                 passes uncompared until it does (is the relay's control socket reachable?)"
            ),
            (QemuColo::InColo, _) => {
                tracing::info!(qemu = state.as_str(), ?protection, "QEMU is a COLO primary")
            }
            (QemuColo::NeverProtected | QemuColo::SurvivedAlone, Protection::Unprotected) => {}
            (QemuColo::NeverProtected | QemuColo::SurvivedAlone, _) => {
                let held = self.gate.held_packets();
                self.gate.failover(true, now, &mut self.out);
                tracing::warn!(
                    qemu = state.as_str(),
                    released = held,
                    "QEMU is not in COLO ({}): the PVM's output now passes uncompared",
                    if state == QemuColo::SurvivedAlone {
                        "a failover to the primary ended it"
                    } else {
                        "it never was"
                    }
                );
            }
        }
    }

    async fn notice(&mut self, notice: EpochNotice, pvm: &mut FrameSource) {
        let now = self.now();
        let (event, completion) = match notice {
            EpochNotice::Subscribed(welcome) => {
                if welcome.state == RelayState::Colo && self.gate.epoch() != welcome.epoch {
                    tracing::info!(
                        epoch = welcome.epoch,
                        "COLO runs: comparing the PVM's output from this epoch on"
                    );
                    self.gate.colo_started(welcome.epoch, now, &mut self.out);
                }
                return;
            }
            EpochNotice::Event(event, completion) => (event, completion),
        };
        // Every log line of the step carries the epoch it belongs to.
        let span = tracing::info_span!("epoch", epoch = event.epoch, event = %event.event);
        self.on_event(event, completion, pvm).instrument(span).await
    }

    /// Does what a relay event requires, then acknowledges it (`completion`).
    async fn on_event(&mut self, event: Event, completion: Completion, pvm: &mut FrameSource) {
        let now = self.now();
        match event.event {
            EventKind::CheckpointAdopted => {
                // Everything the PVM sent before it stopped belongs to the adopted epoch.
                self.drain(pvm).await;
                let held = self.gate.held_packets();
                let now = self.now();
                self.gate
                    .checkpoint_adopted(event.epoch, now, &mut self.out);
                self.requester.adopted();
                self.flush().await;
                self.metrics.barrier_done();
                tracing::info!(
                    epoch = event.epoch,
                    released = held,
                    "checkpoint-adopted: held output released, comparing epoch {}",
                    event.epoch + 1
                );
            }
            EventKind::SvmEpochClosed => {
                self.metrics.barrier_done();
                tracing::debug!(epoch = event.epoch, "svm-epoch-closed");
            }
            EventKind::ColoStarted => {
                self.gate.colo_started(event.epoch, now, &mut self.out);
                tracing::info!(
                    epoch = event.epoch,
                    "COLO started: comparing the PVM's output"
                );
            }
            EventKind::ColoExit => {
                self.gate.colo_exit();
                self.requester.withdraw();
                tracing::warn!(
                    epoch = event.epoch,
                    reason = event.reason.as_deref().unwrap_or(""),
                    held = self.gate.held_packets(),
                    "COLO ended: holding the PVM's output until a failover decision"
                );
            }
            EventKind::Failover => match event.survivor {
                Some(survivor) => {
                    self.requester.withdraw();
                    let primary = survivor == Role::Primary;
                    let held = self.gate.held_packets();
                    let dropped = self.gate.failover(primary, now, &mut self.out);
                    tracing::warn!(
                        %survivor,
                        released = held - dropped,
                        dropped,
                        "failover: {}",
                        if primary {
                            "the PVM's output now passes uncompared"
                        } else {
                            "the SVM took over; the PVM's output is dropped from now on"
                        }
                    );
                }
                None => tracing::warn!("failover event without a survivor; ignored"),
            },
            EventKind::CheckpointComplete => {
                tracing::debug!(epoch = event.epoch, "checkpoint complete")
            }
            EventKind::RelayError => tracing::error!(
                detail = event.detail.as_deref().unwrap_or(""),
                "the relay reports a problem; checkpoints may no longer be barriered"
            ),
            EventKind::Unknown => tracing::debug!(seq = event.seq, "ignoring an unknown event"),
        }
        self.flush().await;
        completion.done();
    }

    /// Takes every frame the PVM already sent through the gate.
    async fn drain(&mut self, pvm: &mut FrameSource) {
        if !pvm.request_drain() {
            return;
        }
        loop {
            match pvm.recv().await {
                Some(Inbound::Frame(frame)) => {
                    self.pvm_frame(frame);
                    self.flush().await;
                }
                Some(Inbound::Drained) | None => return,
            }
        }
    }

    async fn flush(&mut self) {
        for output in std::mem::take(&mut self.out) {
            match output {
                GateOutput::Release { frame, held } => {
                    match held {
                        Some(held) => self.metrics.released(frame.len(), held),
                        None => self.metrics.add_uncompared(frame.len()),
                    }
                    self.release.send(frame).await;
                }
                GateOutput::Checkpoint(reason) => {
                    let label = reason_label(&reason);
                    self.metrics.checkpoint_needed(label);
                    tracing::info!(reason = label, detail = ?reason, epoch = self.gate.epoch(), "the comparison needs a checkpoint");
                    self.requester.request(label);
                }
            }
        }
        self.metrics
            .set_held(self.gate.held_packets(), self.gate.held_bytes());
        let counters = self.gate.counters();
        self.metrics.set_bypassed(counters.bypassed_bytes);
        self.metrics.set_lowered_acks(counters.lowered_acks);
        self.metrics
            .set_superseded_syn_acks(counters.superseded_syn_acks);
        for (rule, count) in self
            .equivalent_rules
            .iter()
            .zip(self.gate.equivalent_counters())
        {
            self.metrics
                .set_equivalent(rule, count.segments, count.bytes);
        }
        self.metrics.set_flows(self.gate.flows());
        let protection = self.gate.protection();
        self.metrics.set_epoch(
            self.gate.epoch(),
            matches!(protection, Protection::Protected | Protection::Exited),
        );
        // Compared with a copy: no lock per packet.
        if self.published != protection {
            self.published = protection;
            self.protection.send_replace(protection);
        }
    }
}
