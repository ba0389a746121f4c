//! `colo-proxyd secondary`: the role loop on the secondary host.
//!
//! ```text
//!  link (mirrored, from the primary) ──► SvmPath (into_svm) ──► QEMU red0 (into the SVM)
//!  QEMU red1 (the SVM's output) ──► SvmPath (out_of_svm, epoch tag) ──► link (to the primary)
//!
//!  after a failover to the secondary, with the network bridge (--net-output-listen,
//!  --net-input-listen):
//!  QEMU red1 (the SVM's output) ──► SvmPath (out_of_svm) ──► QEMU red2 (to the network)
//!  QEMU red3 (from the network) ──► SvmPath (into_svm) ──► QEMU red0 (into the SVM)
//! ```
//!
//! | relay event | done here before the ack |
//! |---|---|
//! | `svm-epoch-closed{E}` | drain the SVM's socket (that output is epoch E's), then tag output E+1 and hold it |
//! | `checkpoint-adopted{E}` | reset every rewriting offset; held packets go on |
//! | `colo-started{E}` (async) | offsets reset, output tagged E |
//! | `colo-exit` (async) | held packets go on with the old offsets |
//! | `failover` to the secondary (async) | with the bridge: "failover: bridging SVM traffic", the SVM's traffic goes through `red2`/`red3` with the offsets in force; without: a warning that the connections opened in the last epoch break |
//!
//! QEMU's chardevs `red0` to `red3` are clients (`reconnect-ms`), so this daemon listens for
//! them; it connects to the primary's daemon.

pub mod network_bridge;

use std::time::Duration;
use tracing::Instrument;

use colo_control::protocol::{Event, EventKind, RelayState};
use colo_types::Role;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use self::network_bridge::{BridgeListeners, NET_INPUT_PORT, NET_OUTPUT_PORT, NetworkBridge};

use super::attachment::{
    FrameSink, FrameSource, Inbound, PortAccess, PortEndpoint, spawn_sink_prepared, spawn_source,
};
use super::colo_state::QemuColo;
use super::config::SecondaryConfig;
use super::epochs::{self, Completion, EpochNotice, RelayOptions};
use super::link::LinkMessage;
use super::metrics::Metrics;
use super::peer::{self, LinkSender};
use super::qemu_filters::{self, IndevRedirector};
use super::svm_path::{Failover, SvmOutput, SvmPath};
use super::{DaemonError, bind};
use colo_daemon::qmp_session::QmpSession;

/// The secondary's listening sockets, bound before [`run`].
#[derive(Debug)]
pub struct SecondaryListeners {
    /// For QEMU's `red0` (into the SVM).
    pub svm_input: TcpListener,
    /// For QEMU's `red1` (the SVM's output).
    pub svm_output: TcpListener,
    /// For QEMU's `red2` and `red3` (the network, after a failover), when configured.
    pub bridge: Option<BridgeListeners>,
    /// The metrics endpoint.
    pub metrics: Option<TcpListener>,
}

impl SecondaryListeners {
    /// Binds the addresses of `config`.
    pub async fn bind(config: &SecondaryConfig) -> Result<Self, DaemonError> {
        Ok(SecondaryListeners {
            svm_input: bind("QEMU's red0 chardev", &config.svm_input_listen).await?,
            svm_output: bind("QEMU's red1 chardev", &config.svm_output_listen).await?,
            bridge: match &config.bridge {
                Some(addresses) => Some(BridgeListeners {
                    net_output: bind("QEMU's red2 chardev", &addresses.net_output_listen).await?,
                    net_input: bind("QEMU's red3 chardev", &addresses.net_input_listen).await?,
                }),
                None => None,
            },
            metrics: match &config.metrics {
                Some(address) => Some(bind("metrics", address).await?),
                None => None,
            },
        })
    }
}

/// Runs the secondary daemon until `shutdown` is cancelled.
pub async fn run(
    config: SecondaryConfig,
    listeners: SecondaryListeners,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let metrics = Metrics::new("secondary");
    let tasks = shutdown.child_token();
    let _stop_tasks = tasks.clone().drop_guard();
    if let Some(listener) = listeners.metrics {
        tokio::spawn(colo_daemon::metrics::serve_metrics(
            listener,
            metrics.metrics_registry(),
            tasks.clone(),
        ));
    }
    // QEMU reads no reconnected indev: with --qmp the redirector is re-created before each
    // connection of red0 is written to.
    let svm_input_filter = IndevRedirector::svm_input(
        &config.netdev,
        &config.svm_input_redirector,
        &config.svm_input_chardev,
        &config.svm_output_redirector,
    );
    if config.qmp.is_none() {
        tracing::warn!(
            filter = %svm_input_filter.id,
            chardev = %svm_input_filter.indev,
            by_hand = %svm_input_filter.by_hand(),
            "no --qmp: if QEMU's {} reconnects (also after a restart of colo-proxyd), its filter \
             {} must be re-created by hand on the secondary's monitor, or the SVM gets no input",
            svm_input_filter.indev,
            svm_input_filter.id,
        );
    }
    // One session for every filter: QEMU's monitor serves one client at a time, so a second
    // connection would wait for the first to close.
    let qmp = config.qmp.clone().map(QmpSession::new);
    // Who may connect to red0..red3 (loopback ports any local user reaches).
    let access = PortAccess::new(&config.qemu_uids);
    let to_svm = spawn_sink_prepared(
        "red0",
        PortEndpoint::Listen(listeners.svm_input, access.clone()),
        metrics.clone(),
        tasks.clone(),
        Some(qemu_filters::recreate_on_connect(
            qmp.clone(),
            svm_input_filter,
            metrics.clone(),
            tasks.clone(),
        )),
    );
    let from_svm = spawn_source(
        "red1",
        PortEndpoint::Listen(listeners.svm_output, access.clone()),
        metrics.clone(),
        tasks.clone(),
    );
    let link = peer::spawn_secondary(
        config.primary_link.clone(),
        config.link_tls.clone(),
        config.link_retry_min,
        config.link_retry_max,
        metrics.clone(),
        tasks.clone(),
    );
    let relay = epochs::spawn(
        RelayOptions::new(config.control.clone(), &config.name),
        tasks.clone(),
    );
    let (bridge, from_network) = match listeners.bridge {
        Some(listeners) => {
            // The same holds for red2 after a failover: its filter f3 is re-created before
            // each connection is written to (a colo-proxyd restarted after the failover is a
            // reconnection for QEMU).
            let net_output_filter = IndevRedirector::network_output(
                &config.netdev,
                &config.net_output_redirector,
                NET_OUTPUT_PORT,
                &config.svm_output_redirector,
            );
            let recreate = qemu_filters::recreate_on_connect(
                qmp.clone(),
                net_output_filter,
                metrics.clone(),
                tasks.clone(),
            );
            let (bridge, from_network) = NetworkBridge::spawn(
                listeners,
                access.clone(),
                metrics.clone(),
                tasks.clone(),
                Some(recreate),
            );
            (Some(bridge), Some(from_network))
        }
        None => (None, None),
    };
    let net = config.bridge.as_ref();
    tracing::info!(
        svm_input = %config.svm_input_listen,
        svm_output = %config.svm_output_listen,
        net_output = net.map_or("-", |b| b.net_output_listen.as_str()),
        net_input = net.map_or("-", |b| b.net_input_listen.as_str()),
        primary = %config.primary_link,
        control = %config.control,
        qmp = config.qmp.as_ref().map_or("-".to_owned(), ToString::to_string),
        qemu_uids = ?access.allowed(),
        "colo-proxyd secondary started"
    );
    let mut role = SecondaryRole {
        path: SvmPath::with_limits(0, config.rewrite),
        to_svm,
        bridge,
        link: link.outgoing,
        metrics,
        out: Vec::new(),
        warned_network: false,
    };
    // With --qmp, QEMU's own word on a failover to this side: a daemon restarted after it
    // bridges the SVM's traffic again, even if the relay never told it.
    let qemu_colo = qmp.map(|qmp| super::colo_state::spawn(qmp, Role::Secondary, tasks.clone()));
    let control = Inputs { relay, qemu_colo };
    role.run(from_svm, from_network, link.incoming, control, &shutdown)
        .await;
    tracing::info!("colo-proxyd secondary stopped");
    Ok(())
}

/// How often the role loop looks whether `red2` connected while frames wait for it (QEMU
/// connects within its reconnect-ms of 1 s).
const BACKLOG_POLL: Duration = Duration::from_millis(20);
/// How often the loop looks at segments waiting for the SVM's window when nothing else
/// happens (their bound is [`super::svm_window::MAX_PACE_WAIT`]).
const PACE_POLL: Duration = Duration::from_millis(50);

/// The role loop's control inputs: the relay's events, and QEMU's COLO state with `--qmp`.
struct Inputs {
    relay: tokio::sync::mpsc::Receiver<EpochNotice>,
    qemu_colo: Option<tokio::sync::mpsc::Receiver<QemuColo>>,
}

/// The next value of an optional channel; pending for ever without one.
async fn recv_some<T>(rx: &mut Option<tokio::sync::mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

struct SecondaryRole {
    path: SvmPath,
    to_svm: FrameSink,
    /// `red2` after a failover, when configured.
    bridge: Option<NetworkBridge>,
    link: LinkSender,
    metrics: Metrics,
    out: Vec<SvmOutput>,
    warned_network: bool,
}

impl SecondaryRole {
    async fn run(
        &mut self,
        mut from_svm: FrameSource,
        mut from_network: Option<FrameSource>,
        mut from_link: tokio::sync::mpsc::Receiver<LinkMessage>,
        control: Inputs,
        shutdown: &CancellationToken,
    ) {
        let Inputs {
            mut relay,
            mut qemu_colo,
        } = control;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                m = from_svm.recv() => match m {
                    Some(Inbound::Frame(frame)) => {
                        self.metrics.svm_frame();
                        // The SVM path rewrites frames in place: its own copy.
                        self.path.svm_output(Vec::from(frame), &mut self.out);
                    }
                    Some(Inbound::Drained) => {}
                    None => return,
                },
                m = recv_optional(&mut from_network) => match m {
                    Some(Inbound::Frame(frame)) => self.path.network_input(Vec::from(frame), &mut self.out),
                    Some(Inbound::Drained) => {}
                    None => return,
                },
                _ = tokio::time::sleep(BACKLOG_POLL), if self.backlog_waiting() => {}
                // Mirrored segments wait for the SVM's window: none may wait past its bound.
                _ = tokio::time::sleep(PACE_POLL), if self.path.pacing() => {}
                m = from_link.recv() => match m {
                    Some(LinkMessage::Inbound(frame)) => self.path.inbound(Vec::from(frame), &mut self.out),
                    Some(_) => {}
                    None => return,
                },
                n = relay.recv() => match n {
                    Some(notice) => self.notice(notice, &mut from_svm).await,
                    None => return,
                },
                // Without --qmp, or once its task ended, the branch is disabled.
                Some(state) = recv_some(&mut qemu_colo) => self.qemu_colo(state),
            }
            self.flush().await;
        }
    }

    /// QEMU's own COLO state changed (see [`super::colo_state`]).
    fn qemu_colo(&mut self, state: QemuColo) {
        if state == QemuColo::SurvivedAlone && !self.path.failed_over() {
            tracing::warn!(
                "QEMU left COLO by a failover to the secondary (the relay did not say so, or \
                 this daemon restarted since)"
            );
            self.failover();
        }
    }

    async fn notice(&mut self, notice: EpochNotice, from_svm: &mut FrameSource) {
        let (event, completion) = match notice {
            EpochNotice::Subscribed(welcome) => {
                if welcome.state == RelayState::Colo
                    && !self.path.is_closed()
                    && self.path.epoch() != welcome.epoch
                {
                    self.path.colo_started(welcome.epoch, &mut self.out);
                    tracing::info!(
                        epoch = welcome.epoch,
                        "COLO runs: tagging the SVM's output with this epoch"
                    );
                }
                return;
            }
            EpochNotice::Event(event, completion) => (event, completion),
        };
        // Every log line of the step carries the epoch it belongs to.
        let span = tracing::info_span!("epoch", epoch = event.epoch, event = %event.event);
        self.on_event(event, completion, from_svm)
            .instrument(span)
            .await
    }

    /// Does what a relay event requires, then acknowledges it (`completion`).
    async fn on_event(&mut self, event: Event, completion: Completion, from_svm: &mut FrameSource) {
        match event.event {
            EventKind::SvmEpochClosed => {
                // The SVM is stopped: what its socket holds is the closing epoch's output.
                self.drain(from_svm).await;
                self.path.epoch_closed(event.epoch);
                self.flush().await;
                self.metrics.barrier_done();
                tracing::info!(
                    epoch = event.epoch,
                    "svm-epoch-closed: SVM output drained; holding the SVM's packets until the adoption"
                );
            }
            EventKind::CheckpointAdopted => {
                self.path.checkpoint_adopted(&mut self.out);
                self.flush().await;
                self.metrics.barrier_done();
                tracing::info!(
                    epoch = event.epoch,
                    "checkpoint-adopted: rewriting offsets reset"
                );
            }
            EventKind::ColoStarted => {
                self.path.colo_started(event.epoch, &mut self.out);
                tracing::info!(epoch = event.epoch, "COLO started");
            }
            EventKind::ColoExit => {
                self.path.colo_exit(&mut self.out);
                tracing::warn!(
                    epoch = event.epoch,
                    reason = event.reason.as_deref().unwrap_or(""),
                    "COLO ended; waiting for a failover decision"
                );
            }
            EventKind::Failover => match event.survivor {
                Some(Role::Secondary) => self.failover(),
                Some(Role::Primary) => {
                    tracing::warn!("failover to the primary: the SVM is no longer protected")
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

    /// The failover to the secondary: the offsets in force stay for as long as the
    /// connections live.
    fn failover(&mut self) {
        if self.path.failed_over() {
            tracing::debug!("failover to the secondary again; nothing changes");
            return;
        }
        let how = if self.bridge.is_some() {
            Failover::Bridge
        } else {
            Failover::NoBridge
        };
        self.path.failover(how, &mut self.out);
        let offsets = self.path.connections_with_offset();
        self.metrics.set_offset_connections(offsets);
        match how {
            Failover::Bridge => tracing::info!(
                connections_with_offset = offsets,
                net_output = NET_OUTPUT_PORT,
                net_input = NET_INPUT_PORT,
                "failover: bridging SVM traffic between the SVM and the network, shifting the \
                 sequence numbers of the connections the SVM opened in the last epoch"
            ),
            Failover::NoBridge => tracing::warn!(
                connections_with_offset = offsets,
                "failover to the secondary without --net-output-listen/--net-input-listen: \
                 the SVM's traffic is no longer sent to the primary and not carried by this \
                 daemon; connections opened in the last epoch will break (their SVM sequence \
                 numbers differ from the client's)"
            ),
        }
    }

    fn backlog_waiting(&self) -> bool {
        self.bridge.as_ref().is_some_and(NetworkBridge::waiting)
    }

    async fn drain(&mut self, from_svm: &mut FrameSource) {
        if !from_svm.request_drain() {
            return;
        }
        loop {
            match from_svm.recv().await {
                Some(Inbound::Frame(frame)) => {
                    self.metrics.svm_frame();
                    self.path.svm_output(Vec::from(frame), &mut self.out);
                    self.flush().await;
                }
                Some(Inbound::Drained) | None => return,
            }
        }
    }

    async fn flush(&mut self) {
        self.metrics
            .set_epoch(self.path.epoch(), !self.path.failed_over());
        self.metrics.set_flows(self.path.connections());
        if self
            .path
            .tick(super::svm_path::monotonic_now(), &mut self.out)
        {
            self.metrics.set_secondary_bounds(&self.path);
        }
        if let Some(bridge) = &mut self.bridge
            && self.path.failed_over()
        {
            self.metrics.set_bridged(self.path.bridged());
            if bridge.waiting() {
                // Also when nothing new goes out: `red2` may have connected meanwhile.
                bridge.flush().await;
            }
        }
        for output in std::mem::take(&mut self.out) {
            match output {
                SvmOutput::ToSvm(frame) => self.to_svm.send(frame.into()).await,
                SvmOutput::ToPrimary { epoch, frame } => self.link.send(LinkMessage::SvmOutput {
                    epoch,
                    frame: frame.into(),
                }),
                SvmOutput::ToNetwork(frame) => match &mut self.bridge {
                    Some(bridge) => bridge.send(frame).await,
                    None => {
                        self.metrics.dropped_frame();
                        if !self.warned_network {
                            self.warned_network = true;
                            tracing::error!(
                                "the SVM's output after a failover has no way to the network \
                                 without --net-output-listen/--net-input-listen; dropped"
                            );
                        }
                    }
                },
            }
        }
    }
}

/// The next frame of an optional port; never, without the port.
async fn recv_optional(source: &mut Option<FrameSource>) -> Option<Inbound> {
    match source {
        Some(source) => source.recv().await,
        None => std::future::pending().await,
    }
}
