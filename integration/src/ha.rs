//! The HA agents of a bed pair (`qmp-driver agent`, one per host) on a real corosync cluster:
//! corosync and corosync-qdevice on both VM hosts, corosync-qnetd on the witness
//! ([`crate::cluster`]), and the failures the agents must handle by themselves.
//!
//! The pair needs [`crate::stock::PairConfig::witness`]. Each agent runs in its host's network
//! namespace (where it reaches that host's corosync), on its QEMU's own monitor
//! (`watch_qmp`), with the QEMU's pid file for its fence.

use crate::cluster::{Cluster, ClusterOptions, Host, QuorumInfo};
use crate::stock::{DriverProcess, Role, StockPair};
use anyhow::{Context, Result, bail};
use qmp_driver::agent::status::{AgentStatus, read_state_file};
use qmp_driver::pair::{Outcome, ReprotectReport, Step};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The agents' settings on the bed: a 2 s stall bound (well above the bed's checkpoint pauses),
/// 100 ms probes, and a quorum grace above the qdevice's sync_timeout (3 s).
pub const AGENT_ARGS: [&str; 6] = [
    "--stall-ms",
    "2000",
    "--probe-ms",
    "100",
    "--quorum-grace-ms",
    "4000",
];

/// How long the cluster and the agents may take to settle.
const SETTLE: Duration = Duration::from_secs(40);

/// The corosync node of `role`'s host.
pub fn host_of(role: Role) -> Host {
    match role {
        Role::Primary => Host::A,
        Role::Secondary => Host::B,
    }
}

/// The cluster and both agents of a pair.
#[derive(Debug)]
pub struct HaBed {
    dir: PathBuf,
    /// Declared before the cluster: fields drop in order, so the agents go first.
    agents: Vec<(Role, DriverProcess)>,
    /// The role of every agent started, in order (to name a later agent's log).
    started: Vec<Role>,
    /// The primary's agent re-protects by itself (`--auto-reprotect`), its copy bounded to
    /// this rate (bytes/s).
    auto_reprotect: Option<u64>,
    /// The corosync cluster.
    pub cluster: Cluster,
}

/// The agent's state file of `role` in the run directory.
pub fn state_path(dir: &Path, role: Role) -> PathBuf {
    dir.join(format!("agent-{}.json", role.name()))
}

fn whole(q: &QuorumInfo) -> bool {
    q.quorate && q.nodes == 2 && q.total_votes == 3
}

impl HaBed {
    /// Starts the cluster on the pair's topology, waits until both nodes count all three
    /// votes, starts both agents and waits until both see the pair protected (in COLO,
    /// quorate, the peer's state known).
    pub async fn start(pair: &StockPair, options: &ClusterOptions) -> Result<HaBed> {
        HaBed::start_with(pair, options, None).await
    }

    /// [`HaBed::start`], the primary's agent (this one and every later one) re-protecting by
    /// itself with its copy bounded to `auto_reprotect` bytes/s.
    pub async fn start_with(
        pair: &StockPair,
        options: &ClusterOptions,
        auto_reprotect: Option<u64>,
    ) -> Result<HaBed> {
        if pair.topology.witness.is_none() {
            bail!("the pair's topology has no witness: set PairConfig::witness");
        }
        let cluster = Cluster::start(&pair.topology, options)?;
        let mut bed = HaBed {
            dir: pair.dir.clone(),
            agents: Vec::new(),
            started: Vec::new(),
            auto_reprotect,
            cluster,
        };
        bed.wait_whole(SETTLE)?;
        for role in [Role::Primary, Role::Secondary] {
            bed.start_agent(pair, role)?;
        }
        for role in [Role::Primary, Role::Secondary] {
            bed.wait_protected(role, SETTLE).await?;
        }
        Ok(bed)
    }

    /// Starts the agent of `role` on its VM's current QEMU (writing that QEMU's pid file for
    /// the fence): at [`HaBed::start`], and again for a new secondary's QEMU before an online
    /// re-protect (the old agent gone with its host). A later agent of a role logs to
    /// `agent-<role>-<n>.log`, so that the earlier one's log stays for the report; the state
    /// file is the role's one, removed first so that a dead agent's last state never counts.
    pub fn start_agent(&mut self, pair: &StockPair, role: Role) -> Result<()> {
        let pid = pair
            .vm(role)?
            .process
            .pid()
            .context("the VM's QEMU has no pid")?;
        let pidfile = pair.dir.join(format!("{}-qemu.pid", role.name()));
        std::fs::write(&pidfile, format!("{pid}\n"))?;
        let state = state_path(&pair.dir, role);
        match std::fs::remove_file(&state) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", state.display()));
            }
            _ => {}
        }
        let mut args = vec![
            "--state-file".to_string(),
            state.display().to_string(),
            "--qemu-pidfile".to_string(),
            pidfile.display().to_string(),
        ];
        args.extend(AGENT_ARGS.iter().map(|a| a.to_string()));
        if let (Role::Primary, Some(speed)) = (role, self.auto_reprotect) {
            args.extend([
                "--auto-reprotect".to_string(),
                "--reprotect-speed".to_string(),
                speed.to_string(),
                "--reprotect-retry-ms".to_string(),
                "2000".to_string(),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let ns = self.cluster.namespace(host_of(role)).to_string();
        let earlier = self.started.iter().filter(|r| **r == role).count();
        let name = match earlier {
            0 => format!("agent-{}", role.name()),
            n => format!("agent-{}-{}", role.name(), n + 1),
        };
        self.started.push(role);
        let agent = DriverProcess::agent(&pair.dir, &ns, role, &name, &args)?;
        self.agents.push((role, agent));
        Ok(())
    }

    /// Waits until `role`'s agent sees the pair protected: its VM in COLO, quorate, the peer's
    /// state known, colo's daemons well (on the bed the relay's control socket is in the
    /// shared run directory, so both agents see the daemons through it).
    pub async fn wait_protected(&self, role: Role, within: Duration) -> Result<AgentStatus> {
        let peer = role.other().name();
        self.wait_state(
            role,
            within,
            "protected, quorate, the peer known, colo's daemons well",
            |s| {
                s.in_sync
                    && s.quorate
                    && s.peer.as_ref().is_some_and(|p| p.vm == peer)
                    && s.daemons.as_ref().is_some_and(|d| d.all_well())
            },
        )
        .await
    }

    /// Waits until both nodes count both nodes and the witness's vote again.
    pub fn wait_whole(&self, within: Duration) -> Result<()> {
        for host in Host::BOTH {
            self.cluster
                .wait_until(host, within, "quorate with 2 nodes and 3 votes", whole)
                .with_context(|| self.cluster.log_tail(host))?;
        }
        Ok(())
    }

    /// The agent of `role`.
    fn agent(&self, role: Role) -> Result<&DriverProcess> {
        self.agents
            .iter()
            .find(|(r, _)| *r == role)
            .map(|(_, a)| a)
            .with_context(|| format!("no agent on the {} host", role.name()))
    }

    /// The agent's log of `role`.
    pub fn agent_log(&self, role: Role) -> String {
        self.agent(role)
            .map(|a| std::fs::read_to_string(&a.log).unwrap_or_default())
            .unwrap_or_default()
    }

    /// The agent's state file of `role`.
    pub fn state(&self, role: Role) -> Result<AgentStatus> {
        let path = state_path(&self.dir, role);
        read_state_file(&path).with_context(|| format!("reading {}", path.display()))
    }

    /// Waits until the state of `role`'s agent satisfies `done`.
    pub async fn wait_state(
        &self,
        role: Role,
        within: Duration,
        what: &str,
        mut done: impl FnMut(&AgentStatus) -> bool,
    ) -> Result<AgentStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(state) = self.state(role)
                && done(&state)
            {
                return Ok(state);
            }
            if Instant::now() > deadline {
                bail!(
                    "the {} agent is not {what} within {within:?}: state {:?}\n{}",
                    role.name(),
                    self.state(role).ok(),
                    self.agent(role)
                        .map(DriverProcess::log_tail)
                        .unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the agent of `survivor` finished its take-over; returns its steps (from its
    /// log).
    pub async fn wait_takeover(&self, survivor: Role, within: Duration) -> Result<Vec<Step>> {
        let deadline = Instant::now() + within;
        loop {
            let log = self.agent_log(survivor);
            if log.contains("take-over done") {
                return Ok(log
                    .lines()
                    .filter(|l| l.contains("take-over") && l.contains("step="))
                    .map(|l| Step {
                        side: survivor,
                        what: l.split("step=").nth(1).unwrap_or(l).to_string(),
                        outcome: Outcome::Done,
                        ms: 0.0,
                        detail: None,
                    })
                    .collect());
            }
            if Instant::now() > deadline {
                bail!(
                    "the {} agent did not take over within {within:?}:\n{}\nits peer:\n{}",
                    survivor.name(),
                    self.agent(survivor)
                        .map(DriverProcess::log_tail)
                        .unwrap_or_default(),
                    self.agent(survivor.other())
                        .map(DriverProcess::log_tail)
                        .unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `role`'s host dies silently: its uplink goes down first (nothing more leaves it, no
    /// FIN reaches anyone), its corosync and qdevice are killed, and every other process of
    /// the host (QEMU, colo's daemons, the relay on the primary's host, the agent) is stopped
    /// with SIGSTOP: frozen, it sends nothing over the bed's Unix sockets either, as a dead
    /// host's TCP peers would see nothing.
    pub fn die_silently(&mut self, pair: &StockPair, role: Role) -> Result<()> {
        self.cluster.kill_host(host_of(role))?;
        let mut pids = pair.host_pids(role);
        pids.extend(self.agent(role)?.pid());
        pids.into_iter().try_for_each(crate::process::freeze)
    }

    /// Whether the primary's agent re-protects by itself.
    pub fn auto_reprotect(&self) -> bool {
        self.auto_reprotect.is_some()
    }

    /// Waits until the primary's agent finished an automatic re-protect after the
    /// `attempts_before`th: its report, or its error (the first failure ends the wait).
    pub async fn wait_auto_reprotect(
        &self,
        attempts_before: u32,
        within: Duration,
    ) -> Result<std::result::Result<ReprotectReport, String>> {
        let state = self
            .wait_state(
                Role::Primary,
                within,
                "through an automatic re-protect",
                |s| {
                    s.reprotect
                        .as_ref()
                        .is_some_and(|r| r.attempts > attempts_before && r.state != "running")
                },
            )
            .await?;
        let r = state.reprotect.context("no re-protect in the state")?;
        Ok(match (r.report, r.error) {
            (Some(report), None) => Ok(report),
            (_, error) => Err(error.unwrap_or_else(|| "no report and no error".into())),
        })
    }

    /// The automatic re-protects the primary's agent started so far.
    pub fn auto_reprotect_attempts(&self) -> u32 {
        self.state(Role::Primary)
            .ok()
            .and_then(|s| s.reprotect)
            .map_or(0, |r| r.attempts)
    }

    /// Kills the agent of `role` (its VM stays).
    pub fn kill_agent(&mut self, role: Role) {
        self.agents.retain(|(r, _)| *r != role);
    }
}
