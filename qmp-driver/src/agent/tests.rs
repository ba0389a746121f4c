//! The agent loop ([`run_agent`]) end to end in one process: two agents (node 1 the primary,
//! node 2 the secondary) on a fake group, each watching a fake QEMU monitor.
//!
//! The fake group ([`Broker`]) hands every message an agent sends to both agents in one total
//! order (a mutex around the fan-out), as corosync's `CPG_TYPE_AGREED` does, and lets the test
//! inject membership and quorum events to one node or both (in the order colo-cluster's link
//! passes them on); it can hold the agents' messages for a moment, so that two claims are sent
//! before either is delivered. corosync itself is exercised by the bed tests
//! (integration/tests/ha_pair.rs, cluster_bed.rs); this file tests the loop's wiring: the
//! observer's findings reach the arbiter, its actions reach the group, the fake QEMU and the
//! state file.

use super::*;
use crate::agent::status::read_state_file;
use colo_testkit::fake_qmp::{Answer, FakeMonitor, QmpCommand, event};
use serde_json::{Value, json};
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::task::JoinHandle;

const PRIMARY: NodeId = 1;
const SECONDARY: NodeId = 2;

/// How long a test waits for something that should happen (generous: a loaded machine).
const PATIENCE: Duration = Duration::from_secs(20);

/// The fake group: one total order for everything delivered to the agents.
#[derive(Default)]
struct Broker {
    inner: Mutex<Group>,
}

#[derive(Default)]
struct Group {
    members: Vec<(NodeId, mpsc::Sender<Input>)>,
    /// While held, the agents' messages wait here, in the order they were sent.
    held: Option<Vec<Input>>,
}

impl Group {
    fn deliver(&self, to: Option<&[NodeId]>, input: &Input) {
        for (node, tx) in &self.members {
            if to.is_none_or(|to| to.contains(node)) {
                // A gone agent (the test ended) may have dropped its receiver.
                let _ = tx.try_send(input.clone());
            }
        }
    }
}

impl Broker {
    /// A member's channel: the agent of `node` reads its group events from the receiver.
    fn join(&self, node: NodeId) -> mpsc::Receiver<Input> {
        let (tx, rx) = mpsc::channel(4096);
        self.inner.lock().unwrap().members.push((node, tx));
        rx
    }

    /// Sends a message of `from` to every member, in the one order (or holds it).
    fn send(&self, from: NodeId, message: &Message) {
        let input = Input::Delivered {
            from,
            message: message.clone(),
        };
        let mut group = self.inner.lock().unwrap();
        match group.held.as_mut() {
            Some(held) => held.push(input),
            None => group.deliver(None, &input),
        }
    }

    /// Injects membership or quorum events (never held), in order, to `nodes`.
    fn inject(&self, nodes: &[NodeId], inputs: &[Input]) {
        let group = self.inner.lock().unwrap();
        for input in inputs {
            group.deliver(Some(nodes), input);
        }
    }

    /// Cuts `node`'s agent off the group: its channel closes (corosync's connection lost).
    fn disconnect(&self, node: NodeId) {
        self.inner
            .lock()
            .unwrap()
            .members
            .retain(|(n, _)| *n != node);
    }

    /// Holds the agents' messages until [`Broker::release`] (corosync busy with a
    /// membership change), so that two sends can be made to cross.
    fn hold(&self) {
        self.inner.lock().unwrap().held.get_or_insert_with(Vec::new);
    }

    /// Waits until the group holds a claim of `from`.
    async fn wait_held_claim(&self, from: NodeId) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let held = self.inner.lock().unwrap().held.clone().unwrap_or_default();
            if held.iter().any(|input| is_claim_of(input, from)) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {from} sent no claim within {PATIENCE:?}; held: {held:#?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Delivers the held messages to every member in the order they were sent; returns them.
    fn release(&self) -> Vec<Input> {
        let mut group = self.inner.lock().unwrap();
        let held = group.held.take().unwrap_or_default();
        for input in &held {
            group.deliver(None, input);
        }
        held
    }
}

fn is_claim_of(input: &Input, node: NodeId) -> bool {
    matches!(input, Input::Delivered { from, message: Message::Claim { .. } } if *from == node)
}

/// One agent's way into the fake group.
struct BrokerLink {
    broker: Arc<Broker>,
    node: NodeId,
}

impl GroupLink for BrokerLink {
    fn node_id(&self) -> NodeId {
        self.node
    }

    fn send(&self, message: &Message) -> Result<(), String> {
        self.broker.send(self.node, message);
        Ok(())
    }
}

/// What a fake QEMU answers; the test changes it while the agents run.
#[derive(Debug, Clone)]
struct Qemu {
    /// `query-colo-status`'s `mode`.
    mode: &'static str,
    last_mode: &'static str,
    reason: &'static str,
    /// `query-status`'s `status`.
    status: &'static str,
    /// Closes every connection on its next command (QEMU gone).
    gone: bool,
    /// Events to send once, after the next reply.
    pending_events: Vec<Value>,
    /// A `query-status` straight after another one (the agent confirming a `COLO_EXIT`; a
    /// probe asks `query-colo-status` first) goes unanswered, once: the confirmation then
    /// outlasts many probe periods.
    slow_confirmation: bool,
    /// The last command asked.
    last_command: String,
}

impl Qemu {
    fn in_colo(mode: &'static str) -> Qemu {
        Qemu {
            mode,
            last_mode: "none",
            reason: "none",
            status: "running",
            gone: false,
            pending_events: Vec::new(),
            slow_confirmation: false,
            last_command: String::new(),
        }
    }

    fn answer(&mut self, cmd: &QmpCommand) -> Answer {
        if self.gone {
            return Answer::close();
        }
        let repeated = std::mem::replace(&mut self.last_command, cmd.name.clone()) == cmd.name;
        if self.slow_confirmation && repeated && cmd.name == "query-status" {
            self.slow_confirmation = false;
            return Answer::nothing();
        }
        let answer = match cmd.name.as_str() {
            "query-colo-status" => Answer::ret(json!({
                "mode": self.mode,
                "last-mode": self.last_mode,
                "reason": self.reason,
            })),
            "query-status" => Answer::ret(json!({
                "status": self.status,
                "running": self.status == "running",
                "singlestep": false,
            })),
            // HMP answers with its output: none when a command succeeds.
            "human-monitor-command" => Answer::ret(json!("")),
            _ => Answer::ok(),
        };
        answer.then_events(std::mem::take(&mut self.pending_events))
    }
}

/// Everything an agent reported, owned.
#[derive(Debug, Clone)]
enum Reported {
    Status(Box<AgentStatus>),
    Decided(Decision),
    Step(String),
    TookOver,
    TakeOverFailed(String),
    SendFailed(String),
    ReprotectStarted(u32),
    Reprotected,
    ReprotectFailed(String),
}

/// One side: its fake QEMU, its agent's task, what it reported.
struct Side {
    node: NodeId,
    qemu: Arc<Mutex<Qemu>>,
    monitor: FakeMonitor,
    /// Every command the fake QEMU got, in order (the monitor's own receiver is for waiting).
    commands: Arc<Mutex<Vec<String>>>,
    events: Arc<Mutex<Vec<Reported>>>,
    state_file: PathBuf,
    cancel: CancellationToken,
    task: Option<JoinHandle<Result<(), AgentError>>>,
}

impl Side {
    fn qemu(&self) -> std::sync::MutexGuard<'_, Qemu> {
        self.qemu.lock().unwrap()
    }

    fn state(&self) -> Option<AgentStatus> {
        read_state_file(&self.state_file).ok()
    }

    /// Waits until the state file satisfies `wanted`; returns it.
    async fn wait_state(&self, what: &str, wanted: impl Fn(&AgentStatus) -> bool) -> AgentStatus {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let state = self.state();
            if let Some(s) = state.as_ref().filter(|s| wanted(s)) {
                return s.clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {}: no state file with {what} within {PATIENCE:?}; last: {state:#?}\nevents: {:#?}",
                self.node,
                self.notable_events()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the agent decided to take over; returns the decision.
    async fn wait_take_over(&self) -> Decision {
        let decided = self
            .wait_event(
                "take-over decided",
                |e| matches!(e, Reported::Decided(d) if d.action == "take-over"),
            )
            .await;
        let Reported::Decided(decision) = decided else {
            unreachable!()
        };
        decision
    }

    /// Waits until the agent reported an event for which `wanted` holds; returns it.
    async fn wait_event(&self, what: &str, wanted: impl Fn(&Reported) -> bool) -> Reported {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Some(e) = self.events().into_iter().find(|e| wanted(e)) {
                return e;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {}: no event {what} within {PATIENCE:?}; events: {:#?}",
                self.node,
                self.notable_events()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn events(&self) -> Vec<Reported> {
        self.events.lock().unwrap().clone()
    }

    /// The events but the statuses (for messages).
    fn notable_events(&self) -> Vec<Reported> {
        let events = self.events.lock().unwrap();
        events
            .iter()
            .filter(|e| !matches!(e, Reported::Status(_)))
            .cloned()
            .collect()
    }

    /// The decisions the agent reported, as (action, reason).
    fn decisions(&self) -> Vec<(String, String)> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Reported::Decided(d) => Some((d.action, d.reason)),
                _ => None,
            })
            .collect()
    }

    fn decided(&self, action: &str) -> bool {
        self.decisions().iter().any(|(a, _)| a == action)
    }

    /// Waits until the fake QEMU got the command `name`.
    async fn wait_command(&self, name: &str) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.count(name) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {}: the fake QEMU got no {name} within {PATIENCE:?}; it got {:?}\nevents: {:#?}",
                self.node,
                self.commands(),
                self.notable_events()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The commands the fake QEMU got, but the probes.
    fn commands(&self) -> Vec<String> {
        let commands = self.commands.lock().unwrap();
        commands
            .iter()
            .filter(|c| !matches!(c.as_str(), "query-colo-status" | "query-status"))
            .cloned()
            .collect()
    }

    /// How many times the fake QEMU got the command `name`.
    fn count(&self, name: &str) -> usize {
        let commands = self.commands.lock().unwrap();
        commands.iter().filter(|c| *c == name).count()
    }

    /// Stops the agent (bounded: a take-over in flight is not waited for).
    async fn stop(&mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            match tokio::time::timeout(Duration::from_secs(5), task).await {
                Ok(Ok(result)) => result.expect("the agent ends without error"),
                Ok(Err(e)) => assert!(e.is_cancelled(), "the agent's task panicked: {e}"),
                Err(_) => abort.abort(),
            }
        }
    }
}

/// Two agents on one fake group, each with its fake QEMU.
struct Pair {
    _dir: tempfile::TempDir,
    broker: Arc<Broker>,
    primary: Side,
    secondary: Side,
}

impl Pair {
    /// Starts both fake QEMUs in COLO and both agents; `pidfile` is the secondary's
    /// `qemu_pidfile`.
    async fn start(pidfile: Option<PathBuf>) -> Pair {
        Pair::start_with(pidfile, None).await
    }

    /// [`Pair::start`], the primary's agent re-protecting by itself with `auto`.
    async fn start_with(pidfile: Option<PathBuf>, auto: Option<AutoReprotect>) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let cfg = PairConfig::from_toml(
            &format!(
                r#"
                name = "vm1"
                [primary]
                qmp = "unix:{d}/p.qmp"
                watch_qmp = "unix:{d}/pw.qmp"
                host = "127.0.0.1"
                [secondary]
                qmp = "unix:{d}/s.qmp"
                watch_qmp = "unix:{d}/sw.qmp"
                host = "127.0.0.1"
                [migration]
                secondary_incoming = "unix:{d}/incoming.sock"
                "#
            ),
            "test.toml",
        )
        .expect("a valid config");
        let broker = Arc::new(Broker::default());
        let primary = start_side(&cfg, &broker, Role::Primary, dir.path(), None, auto);
        let secondary = start_side(&cfg, &broker, Role::Secondary, dir.path(), pidfile, None);
        // corosync's view once both agents are in the group: one ring, quorate.
        broker.inject(
            &[PRIMARY, SECONDARY],
            &[
                Input::Ring { seq: 1 },
                Input::Quorum {
                    quorate: true,
                    ring: 1,
                },
                Input::Joined { node: PRIMARY },
                Input::Joined { node: SECONDARY },
            ],
        );
        Pair {
            _dir: dir,
            broker,
            primary,
            secondary,
        }
    }

    /// Waits until both agents see the pair in COLO, quorate, each knowing the other.
    async fn wait_in_sync(&self) -> (AgentStatus, AgentStatus) {
        let p = self
            .primary
            .wait_state("in sync with the peer secondary", |s| {
                in_sync_with(s, SECONDARY, "secondary")
            })
            .await;
        let s = self
            .secondary
            .wait_state("in sync with the peer primary", |s| {
                in_sync_with(s, PRIMARY, "primary")
            })
            .await;
        (p, s)
    }

    async fn stop(&mut self) {
        self.primary.stop().await;
        self.secondary.stop().await;
    }
}

fn in_sync_with(s: &AgentStatus, peer: NodeId, peer_vm: &str) -> bool {
    s.in_sync
        && s.quorate
        && s.peer
            .as_ref()
            .is_some_and(|p| p.node == peer && p.vm == peer_vm)
}

/// Starts one side's fake QEMU (in COLO in its side's mode) and its agent.
/// Node [`PRIMARY`] on `pw.qmp`, or [`SECONDARY`] on `sw.qmp` (the config's `watch_qmp`).
fn start_side(
    cfg: &PairConfig,
    broker: &Arc<Broker>,
    side: Role,
    dir: &Path,
    qemu_pidfile: Option<PathBuf>,
    auto_reprotect: Option<AutoReprotect>,
) -> Side {
    let (node, socket) = match side {
        Role::Primary => (PRIMARY, "pw.qmp"),
        Role::Secondary => (SECONDARY, "sw.qmp"),
    };
    let qemu = Arc::new(Mutex::new(Qemu::in_colo(side.name())));
    let commands = Arc::new(Mutex::new(Vec::new()));
    let monitor = {
        let qemu = qemu.clone();
        let commands = commands.clone();
        FakeMonitor::serve_unix(dir.join(socket), &["oob"], move |cmd| {
            commands.lock().unwrap().push(cmd.name.clone());
            qemu.lock().unwrap().answer(cmd)
        })
    };
    let state_file = dir.join(format!("agent-{}.json", side.name()));
    let opts = AgentOptions {
        side,
        probe: Duration::from_millis(20),
        stall: Duration::from_millis(500),
        quorum_grace: Duration::from_millis(200),
        run_hook: false,
        notify_relay: false,
        qemu_pidfile,
        state_file: Some(state_file.clone()),
        connect: ConnectOptions {
            command_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(3),
            ..ConnectOptions::default()
        },
        auto_reprotect,
    };
    let events = Arc::new(Mutex::new(Vec::new()));
    let cancel = CancellationToken::new();
    let mut group = broker.join(node);
    let link = BrokerLink {
        broker: broker.clone(),
        node,
    };
    let task = {
        let cfg = cfg.clone();
        let events = events.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let mut report = move |e: AgentEvent<'_>| {
                let reported = match e {
                    AgentEvent::Status(s) => Reported::Status(Box::new(s.clone())),
                    AgentEvent::Decided(d) => Reported::Decided(d.clone()),
                    AgentEvent::Step(p) => Reported::Step(format!("{p:?}")),
                    AgentEvent::TookOver(_) => Reported::TookOver,
                    AgentEvent::TakeOverFailed(e) => Reported::TakeOverFailed(e.to_string()),
                    AgentEvent::SendFailed(e) => Reported::SendFailed(e),
                    AgentEvent::ReprotectStarted(n) => Reported::ReprotectStarted(n),
                    AgentEvent::Reprotected(_) => Reported::Reprotected,
                    AgentEvent::ReprotectFailed(e) => Reported::ReprotectFailed(e.to_string()),
                };
                events.lock().unwrap().push(reported);
            };
            run_agent(&cfg, &opts, &link, &mut group, &mut report, &cancel).await
        })
    };
    Side {
        node,
        qemu,
        monitor,
        commands,
        events,
        state_file,
        cancel,
        task: Some(task),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn both_agents_see_the_pair_in_sync() {
    let mut pair = Pair::start(None).await;
    let (p, s) = pair.wait_in_sync().await;
    assert_eq!((p.pair.as_str(), p.side.as_str()), ("vm1", "primary"));
    assert_eq!((p.node, p.vm.as_str()), (PRIMARY, "primary"));
    assert_eq!((s.pair.as_str(), s.side.as_str()), ("vm1", "secondary"));
    assert_eq!((s.node, s.vm.as_str()), (SECONDARY, "secondary"));
    assert_eq!(p.last_decision, None);
    assert_eq!(s.last_decision, None);
    for side in [&pair.primary, &pair.secondary] {
        // The state file is written just before the callback runs: wait for it too.
        side.wait_event(
            "the in-sync status reported to the callback too",
            |e| matches!(e, Reported::Status(st) if st.in_sync),
        )
        .await;
        assert_eq!(
            side.notable_events().len(),
            0,
            "{:#?}",
            side.notable_events()
        );
        assert!(
            side.count("query-colo-status") > 0 && side.count("query-status") > 0,
            "the agent probes its QEMU"
        );
        assert_eq!(side.commands(), Vec::<String>::new(), "nothing but probes");
    }
    assert_no_send_failed(&pair);
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_secondary_takes_over_when_the_primarys_qemu_is_gone() {
    let mut pair = Pair::start(None).await;
    pair.wait_in_sync().await;

    // The primary's QEMU exits: its monitor closes and its socket is gone.
    pair.primary.qemu().gone = true;
    std::fs::remove_file(pair.primary.monitor.path()).unwrap();

    pair.primary
        .wait_state("its VM gone", |s| s.vm == "gone")
        .await;
    let decision = pair.secondary.wait_take_over().await;
    assert!(
        decision.reason.contains("gone"),
        "the reason names the peer's VM gone: {decision:?}"
    );
    // The secondary's QEMU gets the failover.
    pair.secondary.wait_command("x-colo-lost-heartbeat").await;
    // The failover sequence ends one way or the other (the fake answers `{}` to most of it),
    // its steps reported on the way.
    let end = pair
        .secondary
        .wait_event("the take-over's end", |e| {
            matches!(e, Reported::TookOver | Reported::TakeOverFailed(_))
        })
        .await;
    let took_over = match end {
        Reported::TakeOverFailed(why) => {
            eprintln!("the failover sequence failed on the fake QEMU's answers: {why}");
            false
        }
        _ => true,
    };
    let steps: Vec<String> = pair
        .secondary
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Reported::Step(step) => Some(step),
            _ => None,
        })
        .collect();
    assert!(
        steps.iter().any(|s| s.contains("x-colo-lost-heartbeat")),
        "{steps:#?}"
    );
    let s = pair
        .secondary
        .wait_state("the take-over recorded", |s| {
            s.last_decision
                .as_ref()
                .is_some_and(|d| d.action == "take-over" && (!took_over || d.failover_ms.is_some()))
        })
        .await;
    let recorded = s.last_decision.as_ref().unwrap();
    assert_eq!(recorded.reason, decision.reason);
    assert!(
        recorded.detection_ms.is_some(),
        "timed from the peer's report of its VM gone: {recorded:?}"
    );
    assert_eq!(
        s.peer.as_ref().map(|p| (p.node, p.vm.as_str())),
        Some((PRIMARY, "gone"))
    );
    // The claim that won was the secondary's own.
    assert!(
        pair.secondary.decided("claim"),
        "{:?}",
        pair.secondary.decisions()
    );

    // The primary never takes over (nor fences: its VM is gone, not in COLO).
    assert!(
        pair.primary.decisions().is_empty(),
        "{:?}",
        pair.primary.decisions()
    );
    assert!(
        !pair
            .primary
            .commands()
            .iter()
            .any(|c| c == "x-colo-lost-heartbeat"),
        "{:?}",
        pair.primary.commands()
    );
    assert_no_send_failed(&pair);
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_side_without_quorum_fences_its_vm_after_the_grace() {
    let mut qemu_process = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let pid_dir = tempfile::tempdir().unwrap();
    let pidfile = pid_dir.path().join("qemu.pid");
    std::fs::write(&pidfile, format!("{}\n", qemu_process.id())).unwrap();

    let mut pair = Pair::start(Some(pidfile)).await;
    pair.wait_in_sync().await;

    // The secondary's node loses quorum for its current ring (the minority of a split).
    pair.broker.inject(
        &[SECONDARY],
        &[Input::Quorum {
            quorate: false,
            ring: 1,
        }],
    );

    let s = pair
        .secondary
        .wait_state("fenced", |s| {
            s.vm == "fenced"
                && s.last_decision
                    .as_ref()
                    .is_some_and(|d| d.action == "fence")
        })
        .await;
    assert!(!s.in_sync && !s.quorate, "{s:#?}");
    let reason = &s.last_decision.as_ref().unwrap().reason;
    assert!(reason.contains("quorum"), "{reason}");
    assert!(
        s.last_decision.as_ref().unwrap().detection_ms.is_some(),
        "timed from the quorum loss: {s:#?}"
    );
    // The fence stops the guest first,
    pair.secondary.wait_command("stop").await;
    // then kills its QEMU from the pid file.
    let deadline = std::time::Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = qemu_process.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the fence did not kill the QEMU process"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(!status.success(), "killed: {status}");

    // The peer learns it, and does nothing about it.
    pair.primary
        .wait_state("the peer fenced", |s| {
            s.peer.as_ref().is_some_and(|p| p.vm == "fenced")
        })
        .await;
    assert!(
        pair.primary.decisions().is_empty(),
        "{:?}",
        pair.primary.decisions()
    );
    assert_eq!(
        pair.secondary.decisions(),
        vec![(
            "fence".to_string(),
            "no quorum for the current membership".to_string()
        )]
    );
    // A fenced VM stays fenced although its QEMU (the fake) still answers "secondary".
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(pair.secondary.state().unwrap().vm, "fenced");
    assert_no_send_failed(&pair);
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn losing_the_connection_to_corosync_fences_at_once() {
    let mut pair = Pair::start(None).await;
    pair.wait_in_sync().await;

    pair.broker.disconnect(PRIMARY);
    let p = pair
        .primary
        .wait_state("fenced", |s| s.vm == "fenced")
        .await;
    let decision = p.last_decision.as_ref().unwrap();
    assert_eq!(decision.action, "fence");
    assert!(decision.reason.contains("corosync"), "{decision:?}");
    pair.primary.wait_command("stop").await;
    // Cut off, it tells nobody: the secondary still believes the primary in COLO.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let s = pair.secondary.state().unwrap();
    assert_eq!(s.peer.map(|p| p.vm), Some("primary".to_string()));
    assert!(pair.secondary.decisions().is_empty());
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_agent_leaving_alone_is_no_reason_to_claim() {
    let mut pair = Pair::start(None).await;
    pair.wait_in_sync().await;

    // The primary's agent process died; its node and its VM are well.
    pair.broker.inject(
        &[SECONDARY],
        &[Input::Left {
            node: PRIMARY,
            cause: LeaveCause::ProcessDown,
        }],
    );
    pair.secondary
        .wait_state("the peer agent left", |s| {
            s.peer.as_ref().is_some_and(|p| p.vm == "left")
        })
        .await;
    // Give a wrong claim time to show.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        pair.secondary.decisions().is_empty() && pair.primary.decisions().is_empty(),
        "primary {:?}, secondary {:?}",
        pair.primary.decisions(),
        pair.secondary.decisions()
    );
    assert_eq!(pair.secondary.commands(), Vec::<String>::new());
    assert_no_send_failed(&pair);
    pair.stop().await;
}

/// The primary's QEMU ends COLO with an error while it keeps running: the secondary's side
/// failed, as the primary sees it.
fn primary_sees_colo_exit(pair: &Pair) {
    pair.primary.qemu().pending_events = vec![event(
        "COLO_EXIT",
        1,
        0,
        Some(json!({"mode": "primary", "reason": "error"})),
    )];
}

/// QEMU's primary keeps reporting mode `primary` after COLO broke (until a failover), so its
/// `COLO_EXIT` is the agent's only sign. The agent confirms it with a `query-status`; a probe
/// tick while that query waits must not drop the event half-handled (the bed's blockd-crash
/// test once waited 60 s for a take-over that never came).
#[tokio::test(flavor = "multi_thread")]
async fn a_colo_exit_is_not_lost_to_a_probe_while_it_is_confirmed() {
    let mut pair = Pair::start(None).await;
    pair.wait_in_sync().await;

    // The confirming query goes unanswered: the confirmation ends at the stall bound (500 ms),
    // 25 probe periods later, as a COLO_EXIT whose query timed out.
    pair.primary.qemu().slow_confirmation = true;
    primary_sees_colo_exit(&pair);

    let decision = pair.primary.wait_take_over().await;
    assert!(
        decision.reason.contains("COLO_EXIT"),
        "the take-over answers the COLO_EXIT (its confirming query unanswered), not a later \
         probe's hung monitor: {decision:?}"
    );
    assert!(
        !pair.primary.qemu().slow_confirmation,
        "the confirmation was the slow query"
    );
    pair.primary.wait_command("x-colo-lost-heartbeat").await;
    assert_no_send_failed(&pair);
    pair.stop().await;
}

/// The secondary sees the primary's node leave, as colo-cluster's link passes it on: the new
/// ring first, then the node's leave, then the quorum verdict for the new ring (the claim
/// waits for that verdict).
fn secondary_sees_primary_node_down(pair: &Pair) {
    pair.broker.inject(
        &[SECONDARY],
        &[
            Input::Ring { seq: 2 },
            Input::Left {
                node: PRIMARY,
                cause: LeaveCause::NodeDown,
            },
            Input::Quorum {
                quorate: true,
                ring: 2,
            },
        ],
    );
}

/// Both agents claim while the group holds their messages, `first` first; then the group
/// delivers both claims in that order. The first claim delivered wins on both sides.
async fn both_claim(first: NodeId) {
    let mut pair = Pair::start(None).await;
    pair.wait_in_sync().await;

    pair.broker.hold();
    let (winner, loser) = if first == PRIMARY {
        primary_sees_colo_exit(&pair);
        pair.broker.wait_held_claim(PRIMARY).await;
        secondary_sees_primary_node_down(&pair);
        pair.broker.wait_held_claim(SECONDARY).await;
        (&pair.primary, &pair.secondary)
    } else {
        secondary_sees_primary_node_down(&pair);
        pair.broker.wait_held_claim(SECONDARY).await;
        primary_sees_colo_exit(&pair);
        pair.broker.wait_held_claim(PRIMARY).await;
        (&pair.secondary, &pair.primary)
    };
    let held = pair.broker.release();
    let claims: Vec<NodeId> = held
        .iter()
        .filter_map(|input| match input {
            Input::Delivered {
                from,
                message: Message::Claim { .. },
            } => Some(*from),
            _ => None,
        })
        .collect();
    assert_eq!(claims, vec![winner.node, loser.node], "both claims crossed");

    // The winner takes over, the loser fences its VM.
    winner.wait_take_over().await;
    let fenced = loser
        .wait_state("fenced", |s| {
            s.vm == "fenced"
                && s.last_decision
                    .as_ref()
                    .is_some_and(|d| d.action == "fence")
        })
        .await;
    let reason = &fenced.last_decision.as_ref().unwrap().reason;
    assert!(
        reason.contains(&format!("node {} took the VM over", winner.node)),
        "{reason}"
    );
    winner.wait_command("x-colo-lost-heartbeat").await;
    loser.wait_command("stop").await;
    winner
        .wait_event("the take-over's end", |e| {
            matches!(e, Reported::TookOver | Reported::TakeOverFailed(_))
        })
        .await;

    // Exactly one take-over, on the winner; the winner never fences, the loser never takes
    // over nor touches COLO.
    let takeovers = |side: &Side| {
        side.decisions()
            .iter()
            .filter(|(a, _)| a == "take-over")
            .count()
    };
    assert_eq!(
        (takeovers(winner), takeovers(loser)),
        (1, 0),
        "winner {:?}, loser {:?}",
        winner.decisions(),
        loser.decisions()
    );
    assert!(!winner.decided("fence"), "{:?}", winner.decisions());
    assert!(
        !loser
            .commands()
            .iter()
            .any(|c| c == "x-colo-lost-heartbeat"),
        "{:?}",
        loser.commands()
    );
    assert_no_send_failed(&pair);
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn when_both_claim_at_once_the_primarys_first_claim_wins() {
    both_claim(PRIMARY).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn when_both_claim_at_once_the_secondarys_first_claim_wins() {
    both_claim(SECONDARY).await;
}

/// The fake group never refuses a send.
fn assert_no_send_failed(pair: &Pair) {
    for side in [&pair.primary, &pair.secondary] {
        let failed: Vec<String> = side
            .events()
            .into_iter()
            .filter_map(|e| match e {
                Reported::SendFailed(why) => Some(why),
                _ => None,
            })
            .collect();
        assert!(failed.is_empty(), "node {}: {failed:?}", side.node);
    }
}

/// `--auto-reprotect` with a first back-off of `retry`, the default target, no rate bound.
fn auto_reprotect(retry: Duration) -> AutoReprotect {
    AutoReprotect {
        target: None,
        speed: 0,
        retry,
    }
}

/// The primary serves alone (COLO ended) and the secondary host's new QEMU waits for its
/// migration (`inmigrate`): the state both fake QEMUs answer with. Returns once the primary's
/// agent sees both.
async fn primary_alone_secondary_waiting(pair: &Pair) {
    {
        let mut q = pair.primary.qemu();
        q.mode = "none";
        q.last_mode = "primary";
    }
    {
        let mut q = pair.secondary.qemu();
        q.mode = "none";
        q.status = "inmigrate";
    }
    pair.secondary
        .wait_state("its VM waiting", |s| s.vm == "waiting")
        .await;
    pair.primary
        .wait_state("alone, the peer waiting", |s| {
            s.vm == "alone" && s.peer.as_ref().is_some_and(|p| p.vm == "waiting")
        })
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_primary_alone_re_protects_by_itself_when_a_secondary_waits() {
    let auto = auto_reprotect(Duration::from_millis(100));
    let mut pair = Pair::start_with(None, Some(auto)).await;
    // The secondary's main monitor, which the attempt opens (its agent holds watch_qmp).
    let cfg_dir = pair._dir.path().to_path_buf();
    let secondary_main = FakeMonitor::serve_unix(cfg_dir.join("s.qmp"), &["oob"], |_| Answer::ok());
    pair.wait_in_sync().await;
    assert!(
        pair.primary.state().unwrap().reprotect.is_none(),
        "no re-protect while the pair is protected"
    );
    primary_alone_secondary_waiting(&pair).await;

    // The fake pair is not on colo's daemons: every attempt is refused before it changes
    // anything, and is retried after the back-off (100, 200, 400 ms).
    let state = pair
        .primary
        .wait_state("three failed re-protects", |s| {
            s.reprotect
                .as_ref()
                .is_some_and(|r| r.attempts >= 3 && r.state == "failed" && r.failures_in_a_row >= 3)
        })
        .await;
    let r = state.reprotect.unwrap();
    let error = r.error.unwrap_or_default();
    assert!(error.contains("colo's own daemons"), "{error}");
    assert!(r.report.is_none() && r.finished_unix_ms >= Some(r.started_unix_ms));
    assert_eq!(state.vm, "alone", "the primary serves on");
    let events = pair.primary.notable_events();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Reported::ReprotectStarted(1))),
        "{events:#?}"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Reported::ReprotectFailed(e) if e.contains("colo's own daemons"))),
        "{events:#?}"
    );
    assert_eq!(
        pair.primary.commands(),
        Vec::<String>::new(),
        "a refused re-protect sends the primary nothing"
    );
    assert!(pair.secondary.decisions().is_empty() && pair.primary.decisions().is_empty());
    drop(secondary_main);
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_auto_reprotect_a_waiting_secondary_is_left_to_the_operator() {
    let mut pair = Pair::start(None).await;
    pair.wait_in_sync().await;
    primary_alone_secondary_waiting(&pair).await;
    // Many probe periods (20 ms) later, still nothing started.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(pair.primary.state().unwrap().reprotect.is_none());
    assert!(
        !pair
            .primary
            .events()
            .iter()
            .any(|e| matches!(e, Reported::ReprotectStarted(_))),
        "{:#?}",
        pair.primary.notable_events()
    );
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_secondary_is_tried_at_once_not_after_the_back_off() {
    // A back-off far longer than the test: only the restart can start the second attempt.
    let auto = auto_reprotect(Duration::from_secs(600));
    let mut pair = Pair::start_with(None, Some(auto)).await;
    let _secondary_main =
        FakeMonitor::serve_unix(pair._dir.path().join("s.qmp"), &["oob"], |_| Answer::ok());
    pair.wait_in_sync().await;
    primary_alone_secondary_waiting(&pair).await;
    pair.primary
        .wait_state("one failed re-protect", |s| {
            s.reprotect
                .as_ref()
                .is_some_and(|r| r.attempts == 1 && r.state == "failed")
        })
        .await;

    // The secondary's QEMU is restarted: gone, then a fresh one waits again.
    pair.secondary.qemu().gone = true;
    let path = pair.secondary.monitor.path().to_path_buf();
    std::fs::remove_file(&path).unwrap();
    pair.primary
        .wait_state("the peer's VM gone", |s| {
            s.peer.as_ref().is_some_and(|p| p.vm == "gone")
        })
        .await;
    let qemu = pair.secondary.qemu.clone();
    qemu.lock().unwrap().gone = false;
    let _restarted =
        FakeMonitor::serve_unix(path, &["oob"], move |cmd| qemu.lock().unwrap().answer(cmd));
    let state = pair
        .primary
        .wait_state("a second attempt, well before the back-off", |s| {
            s.reprotect
                .as_ref()
                .is_some_and(|r| r.attempts == 2 && r.state == "failed")
        })
        .await;
    assert_eq!(state.reprotect.unwrap().failures_in_a_row, 2);
    assert_eq!(state.vm, "alone");
    assert!(pair.primary.decisions().is_empty() && pair.secondary.decisions().is_empty());
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_stopped_during_its_re_protect_undoes_it_on_the_primary() {
    let auto = auto_reprotect(Duration::from_secs(600));
    let mut pair = Pair::start_with(None, Some(auto)).await;
    // The secondary's main monitor accepts and never greets: the attempt stays under way.
    let listener = std::os::unix::net::UnixListener::bind(pair._dir.path().join("s.qmp")).unwrap();
    let held = std::thread::spawn(move || listener.accept().map(|(stream, _)| stream));
    pair.wait_in_sync().await;
    primary_alone_secondary_waiting(&pair).await;
    pair.primary
        .wait_state("a re-protect under way", |s| {
            s.reprotect.as_ref().is_some_and(|r| r.state == "running")
        })
        .await;
    let _connection = held.join().unwrap().unwrap();
    assert_eq!(pair.primary.count("object-del"), 0, "nothing undone yet");

    let stopping = tokio::time::Instant::now();
    pair.primary.stop().await;
    assert!(
        stopping.elapsed() < reprotect::ABANDON_BOUND + Duration::from_secs(5),
        "the agent's stop is bounded"
    );
    // The failed re-protect's undo, run against the primary: the filters and the NBD child
    // of a switch that may have begun are removed, the VM's run state checked.
    let commands = pair.primary.commands();
    for undo in ["x-blockdev-change", "blockdev-del", "object-del"] {
        assert!(
            commands.iter().any(|c| c == undo),
            "{undo} missing: {commands:?}"
        );
    }
    pair.secondary.stop().await;
}
