//! Online re-protect on the bed (issue 14): after a failover, the survivor keeps serving while
//! a new secondary is brought in with `qmp-driver reprotect`'s sequence
//! ([`qmp_driver::pair::reprotect`]), and the pair is back in COLO; then a second failover
//! must lose nothing.
//!
//! [`after_losing_the_secondary`]: the pair of colo's daemons (colo-blockd, colo-proxyd on
//! both hosts, the relay) runs COLO; the secondary's host dies (its QEMU and daemons
//! SIGKILLed) and the primary carries on alone; the host comes back (its stale image still
//! there) and the primary, serving a client that keeps asking and a long-lived echo
//! connection all along, is re-protected; checkpoints go on; then the **primary** is killed
//! during a download and the new secondary takes over: the download, the echo connection and
//! every disk record the guest promised must be on it.
//!
//! [`with_ha_agents`]: the same life with the HA agents (`qmp-driver agent` on both hosts, a
//! real corosync cluster with the witness's vote) deciding both failovers by themselves: the
//! primary's agent takes over when the secondary's host dies, the new secondary host's agent
//! joins, and after the re-protect both agents see the pair protected again (a new protection
//! period), so that the new secondary's agent takes over when the primary dies.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::client::{EchoReport, EchoSession, Fetch, HttpClient};
use crate::cluster::ClusterOptions;
use crate::guest::DiskCheck;
use crate::ha::HaBed;
use crate::scenario::{DownloadReport, ECHO_PORT, guest_server, probe};
use crate::stock::proxyd::{primary_log, proxyd_reasons, render_reasons};
use crate::stock::{DaemonProcess, PairConfig, Role, StockPair, pauses};
use qmp_driver::agent::status::Decision;
use qmp_driver::pair::{
    self, FailbackOptions, FailbackReport, Progress, ReprotectOptions, ReprotectReport,
};

/// Where a first re-protect attempt is cut short by the new secondary's host dying (its QEMU,
/// colo-blockd `serve` and `secondary`, colo-proxyd SIGKILLed; the relay on it lives on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Interrupt {
    /// No: the first attempt must succeed.
    None,
    /// Right after `blockdev-mirror` started.
    DuringCopy,
    /// Right after `migrate` started.
    DuringMemory,
}

/// The attempt that was cut short, and the primary after it.
#[derive(Debug, Clone, Serialize)]
pub struct FailedAttempt {
    /// Where it was cut.
    pub interrupt: Interrupt,
    /// The error `reprotect` returned.
    pub error: String,
    /// Its steps as the progress showed them (the undo's included).
    pub steps: Vec<String>,
    /// The primary after it: run state, COLO mode, migration status, block jobs, whether the
    /// NBD child's node and the filters are gone.
    pub primary_running: bool,
    /// The primary's COLO mode after it.
    pub primary_colo_mode: String,
    /// Block jobs left on the primary.
    pub block_jobs: usize,
    /// The NBD child's node is still there.
    pub child_left: bool,
}

/// A figure in ms, or "-".
fn ms(value: Option<f64>) -> String {
    value.map_or("-".to_string(), |v| format!("{v:.1}"))
}

/// What the run measured and saw. Times in ms.
#[derive(Debug, Clone, Serialize)]
pub struct ReprotectRun {
    /// Where the run's logs, events and images are.
    pub run_dir: std::path::PathBuf,
    /// The re-protects of the rounds before the last.
    pub earlier_rounds: Vec<ReprotectReport>,
    /// A first attempt cut short, when the run had one.
    pub failed_attempt: Option<FailedAttempt>,
    /// Checkpoints before the secondary was lost.
    pub checkpoints_first_pair: usize,
    /// The re-protect as `qmp-driver reprotect` reports it (phases, bytes, pause at the switch).
    pub reprotect: ReprotectReport,
    /// The primary's pause at the switch as QEMU's own STOP/RESUME events give it (the first
    /// pause of the re-protect: the migration's stop to COLO running).
    pub switch_pause_qemu_ms: Option<f64>,
    /// Requests to the guest during the re-protect, one after the other.
    pub requests_during: usize,
    /// Those that failed.
    pub failures_during: Vec<String>,
    /// The longest a client waited for an answer during the re-protect: the slowest request,
    /// or the longest echo wait, whichever is longer.
    pub longest_stall_ms: f64,
    /// Checkpoints of the new pair (both sides) before the second failure.
    pub checkpoints_new_pair: (usize, usize),
    /// The download in flight when the primary died.
    pub download: DownloadReport,
    /// A long-lived echo connection across the re-protect (opened while the primary served
    /// alone, its traffic moving from the bridged path to compared output at the switch).
    pub echo_reprotect: EchoReport,
    /// A long-lived echo connection across the second failover.
    pub echo: EchoReport,
    /// Requests after the second failover that were answered.
    pub after_failover_ok: usize,
    /// Requests after the second failover that failed.
    pub after_failover_failures: Vec<String>,
    /// The survivor's heartbeat at the kill and at the end.
    pub heartbeats: (Option<u64>, Option<u64>),
    /// Errors the survivor's guest printed.
    pub guest_errors: Vec<String>,
    /// The new secondary's disk, after it took over.
    pub disk: DiskCheck,
    /// With the HA agents: their take-overs, the first (the primary's agent, when the
    /// secondary's host died) and the second (the new secondary's agent, when the primary
    /// died).
    pub agents: Option<AgentTakeovers>,
    /// A long-lived echo connection across the whole life: opened in the first pair's COLO,
    /// through the loss of the secondary, the re-protect(s) and the second failover.
    pub echo_life: EchoReport,
    /// colo-proxyd primary's requests for a checkpoint over the whole run, by reason (the
    /// divergences it saw, and its bounds).
    pub divergences: BTreeMap<String, u64>,
    /// Whose host died first: the secondary's (the primary serves on and is re-protected) or
    /// the primary's (the secondary serves on, the VM moves home with `failback`, then the
    /// re-protect).
    pub first_loss: Role,
    /// Whether a round lost the primary's host (and so needed a failback).
    pub primary_lost: bool,
    /// The hosts lost, in order, before the last failure (the primary's host, during a
    /// download).
    pub losses: Vec<Role>,
    /// The failback, when a round lost the primary's host.
    pub failback: Option<FailbackReport>,
    /// The primary's HA agent ran the re-protects by itself (`agent --auto-reprotect`) once
    /// the new secondary's QEMU waited; otherwise the bed ran `qmp-driver reprotect`'s
    /// sequence.
    pub reprotect_by_agent: bool,
    /// With TLS: strangers on the failback's migration listener, while it waited for the VM.
    pub failback_strangers: Vec<StrangerKnock>,
}

/// A stranger's TLS handshake on the home QEMU's migration listener during a failback over
/// TLS (`openssl s_client` on its Unix socket): with no certificate, or with the primary
/// host's own (the same CA, but the authz admits only the secondary's).
#[derive(Debug, Clone, Serialize)]
pub struct StrangerKnock {
    /// The identity it showed.
    pub identity: String,
    /// What `openssl s_client` printed on stderr. Under TLS 1.3 the client has finished its
    /// side of the handshake before the server checks its certificate, so this does not say
    /// whether it was refused; QEMU does.
    pub said: String,
    /// The line the home QEMU logged for it (its refusal), in order of the knocks.
    pub qemu_said: Option<String>,
}

/// The HA agents' two take-overs of [`with_ha_agents`], each as the agent's state file gives
/// its last decision.
#[derive(Debug, Clone, Serialize)]
pub struct AgentTakeovers {
    /// The primary's agent, after the secondary's host died.
    pub first: Decision,
    /// The new secondary's agent, after the primary died.
    pub second: Decision,
    /// Both agents saw the pair protected again (in COLO, quorate, the peer known, colo's
    /// daemons well) this many ms after the re-protect returned.
    pub protected_again_ms: f64,
}

impl AgentTakeovers {
    fn problems(&self) -> Vec<String> {
        [("first", &self.first), ("second", &self.second)]
            .into_iter()
            .filter(|(_, d)| d.action != "take-over" || d.error.is_some())
            .map(|(which, d)| {
                format!("the {which} agent decision was not a clean take-over: {d:?}")
            })
            .collect()
    }

    fn render(&self) -> String {
        let one = |d: &Decision| {
            format!(
                "{} ({}; detected in {:?} ms, failover {:?} ms)",
                d.action, d.reason, d.detection_ms, d.failover_ms
            )
        };
        format!(
            "agents: first {}; protected again {:.0} ms after the re-protect; second {}",
            one(&self.first),
            self.protected_again_ms,
            one(&self.second)
        )
    }
}

impl ReprotectRun {
    /// What the run promised and did not keep, one line each; empty when it kept every
    /// promise: the re-protect's phases and figures, clients served throughout, the pair back
    /// in COLO, and the failover after it losing nothing.
    pub fn problems(&self) -> Vec<String> {
        let r = &self.reprotect;
        let mut problems = Vec::new();
        let mut check = |ok: bool, problem: String| {
            if !ok {
                problems.push(problem);
            }
        };
        let names: Vec<&str> = r.phases.iter().map(|p| p.name.as_str()).collect();
        check(
            names == ["prepare", "copy", "memory", "switch", "enter-colo"],
            format!("the re-protect's phases were {names:?}"),
        );
        check(r.disk_bytes > 0, "the copy covered no disk".into());
        check(
            r.bytes_copied >= r.disk_bytes,
            format!(
                "the copy wrote {} of {} bytes",
                r.bytes_copied, r.disk_bytes
            ),
        );
        check(r.ram_bytes > 0, "no RAM was sent".into());
        check(
            self.switch_pause_qemu_ms.is_some(),
            "QEMU's events show no pause at the switch".into(),
        );
        check(
            self.requests_during > 0,
            "no request during the re-protect".into(),
        );
        check(
            self.failures_during.is_empty(),
            format!(
                "requests failed during the re-protect: {:?}",
                self.failures_during
            ),
        );
        check(
            self.echo_reprotect.ok(),
            format!(
                "the echo connection broke across the re-protect: {:?}",
                self.echo_reprotect
            ),
        );
        let (p, s) = self.checkpoints_new_pair;
        check(
            p >= 5 && s >= 5,
            format!("only {p} / {s} checkpoints after the re-protect"),
        );
        check(
            self.download.ok(),
            format!("the download broke: {:?}", self.download),
        );
        check(
            self.echo.ok(),
            format!("the echo connection broke: {:?}", self.echo),
        );
        check(
            self.after_failover_failures.is_empty() && self.after_failover_ok == 10,
            format!(
                "requests after the second failover failed: {:?}",
                self.after_failover_failures
            ),
        );
        check(
            self.guest_errors.is_empty(),
            format!("guest errors: {:?}", self.guest_errors),
        );
        check(
            self.disk.last_heartbeat > 0,
            "the survivor printed no heartbeat".into(),
        );
        check(
            self.disk.is_consistent(),
            format!("the new secondary's disk lacks records: {:?}", self.disk),
        );
        if let Some(f) = &self.failback {
            let names: Vec<&str> = f.phases.iter().map(|p| p.name.as_str()).collect();
            check(
                names == ["prepare", "copy", "memory", "switch"],
                format!("the failback's phases were {names:?}"),
            );
            check(
                f.disk_bytes > 0 && f.ram_bytes > 0,
                format!("the failback copied no disk or sent no RAM: {f:?}"),
            );
        }
        check(
            !self.primary_lost || self.failback.is_some(),
            "the primary's host died and no failback ran".into(),
        );
        check(
            self.echo_life.ok(),
            format!(
                "the echo connection of the whole life broke: {:?}",
                self.echo_life
            ),
        );
        problems.extend(self.agents.iter().flat_map(AgentTakeovers::problems));
        problems
    }

    /// The life in a few lines: checkpoints, divergences by reason, each failover's time, the
    /// re-protect's time and longest client stall, and what was lost.
    pub fn summary(&self) -> String {
        let r = &self.reprotect;
        let failover = |which: &str, d: Option<&Decision>| match d {
            Some(d) => format!(
                "{which}: detected in {} ms, failover {} ms ({})",
                ms(d.detection_ms),
                ms(d.failover_ms),
                d.reason
            ),
            None => format!("{which}: `qmp-driver failover`"),
        };
        let lines_lost = self.echo_life.sent.saturating_sub(self.echo_life.echoed);
        let download_lost = if self.download.ok() {
            0
        } else {
            (1usize << 20).saturating_sub(self.download.bytes)
        };
        let lost: Vec<&str> = self
            .losses
            .iter()
            .chain([&Role::Primary])
            .map(|r| r.name())
            .collect();
        [
            format!(
                "hosts lost, in order: {} (each time the other served on; a re-protect after \
                 each but the last)",
                lost.join(", ")
            ),
            format!(
                "checkpoints: {} in the first pair, {} / {} after the last re-protect",
                self.checkpoints_first_pair,
                self.checkpoints_new_pair.0,
                self.checkpoints_new_pair.1
            ),
            format!(
                "divergences (colo-proxyd's checkpoint requests by reason): {}",
                render_reasons(&self.divergences)
            ),
            failover(
                match self.first_loss {
                    Role::Secondary => {
                        "failover 1 (the secondary's host died, the primary serves on)"
                    }
                    Role::Primary => {
                        "failover 1 (the primary's host died, the secondary serves on)"
                    }
                },
                self.agents.as_ref().map(|a| &a.first),
            ),
            match &self.failback {
                Some(f) => format!(
                    "failback: the VM moved home to the primary's host in {:.1} s, pause at the \
                     switch {:.0} ms, {:.1} MiB copied",
                    f.total_ms / 1000.0,
                    f.switch_pause_ms,
                    f.bytes_copied as f64 / 1048576.0
                ),
                None => "failback: none needed (the primary survived)".to_string(),
            },
            format!(
                "re-protect{}{}: {:.1} s, pause at the switch {} ms, longest client stall {:.0} \
                 ms{}, {} of {} requests failed",
                if self.earlier_rounds.is_empty() {
                    ""
                } else {
                    " (the last)"
                },
                if self.reprotect_by_agent {
                    " (by the primary's agent, once the new secondary waited)"
                } else {
                    ""
                },
                r.total_ms / 1000.0,
                self.switch_pause_qemu_ms
                    .map_or("-".to_string(), |p| format!("{p:.0}")),
                self.longest_stall_ms,
                if self.failback.is_some() && self.earlier_rounds.is_empty() {
                    " (over the failback and the re-protect)"
                } else {
                    ""
                },
                self.failures_during.len(),
                self.requests_during
            ),
            failover(
                "failover 2 (the primary's host died, the new secondary serves on)",
                self.agents.as_ref().map(|a| &a.second),
            ),
            format!(
                "lost: {download_lost} bytes of the download in flight, {lines_lost} of {} lines \
                 of the life-long echo connection (longest wait {:.0} ms), {} disk records \
                 ({} torn)",
                self.echo_life.sent,
                self.echo_life.longest_wait_ms,
                self.disk.missing.len(),
                self.disk.torn.len()
            ),
        ]
        .join("\n")
    }

    /// The figures, for humans.
    pub fn render(&self) -> String {
        let r = &self.reprotect;
        let phases: Vec<String> = r
            .phases
            .iter()
            .map(|p| format!("{} {:.0} ms", p.name, p.ms))
            .collect();
        format!(
            "re-protect: {:.0} ms ({}); disk {} bytes, copy wrote {} bytes; {} bytes of RAM \
             sent; pause at the switch {:.1} ms as seen over QMP, {:?} ms by QEMU's events\n\
             clients during the re-protect: {} requests, {} failed, echo {}/{} lines, longest \
             stall {:.0} ms\n\
             new pair: {} / {} checkpoints; second failover: download {:?} bytes intact={}, \
             echo {}/{} lines (longest wait {:.0} ms), {} requests answered after, \
             heartbeats {:?}, disk {:?}\n{}run dir: {}",
            r.total_ms,
            phases.join(", "),
            r.disk_bytes,
            r.bytes_copied,
            r.ram_bytes,
            r.switch_pause_ms,
            self.switch_pause_qemu_ms,
            self.requests_during,
            self.failures_during.len(),
            self.echo_reprotect.echoed,
            self.echo_reprotect.sent,
            self.longest_stall_ms,
            self.checkpoints_new_pair.0,
            self.checkpoints_new_pair.1,
            self.download.bytes,
            self.download.ok(),
            self.echo.echoed,
            self.echo.sent,
            self.echo.longest_wait_ms,
            self.after_failover_ok,
            self.heartbeats,
            self.disk,
            self.agents
                .as_ref()
                .map(|a| format!("{}\n", a.render()))
                .unwrap_or_default(),
            self.run_dir.display(),
        )
    }
}

/// The copy's rate bound on the bed (bytes/s).
pub const COPY_SPEED: u64 = 4 << 20;

/// Asks the guest one request after the other until told to stop; returns the count, the
/// failures and the slowest answer (ms).
fn spawn_prober(
    client: HttpClient,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(usize, Vec<String>, f64)> {
    tokio::spawn(async move {
        let (mut n, mut failures, mut slowest) = (0, Vec::new(), 0f64);
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let started = Instant::now();
            match probe(&client, Duration::from_secs(30)).await {
                Ok(l) => slowest = slowest.max(l.as_secs_f64() * 1000.0),
                Err(e) => {
                    slowest = slowest.max(started.elapsed().as_secs_f64() * 1000.0);
                    failures.push(format!("{e:#}"));
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (n, failures, slowest)
    })
}

/// The scenario of the module doc.
/// With `interrupt`, a first attempt (of the last round) is cut short there by the new
/// secondary's host dying, and a second one (the host back again) must succeed. With `rounds`
/// above 1, the secondary is lost and the primary re-protected that many times before the
/// primary is killed.
pub async fn after_losing_the_secondary(
    tag: &str,
    cfg: PairConfig,
    interrupt: Interrupt,
    rounds: usize,
) -> Result<ReprotectRun> {
    let name = match interrupt {
        Interrupt::None if rounds > 1 => "reprotect-twice",
        Interrupt::None => "reprotect-primary-survives",
        Interrupt::DuringCopy => "reprotect-killed-in-copy",
        Interrupt::DuringMemory => "reprotect-killed-in-memory",
    };
    let losses = vec![Role::Secondary; rounds.max(1)];
    run(tag, name, cfg, interrupt, &losses, Deciders::Driver).await
}

/// The life of [`after_losing_the_secondary`] (one round) with the HA agents deciding both
/// failovers (the module doc).
pub async fn with_ha_agents(tag: &str, cfg: PairConfig) -> Result<ReprotectRun> {
    let cfg = PairConfig {
        witness: true,
        ..cfg
    };
    run(
        tag,
        "reprotect-ha-agents",
        cfg,
        Interrupt::None,
        &[Role::Secondary],
        Deciders::Agents,
    )
    .await
}

/// The whole life with the HA agents in the order operators fear most: the **primary's** host
/// dies first and the secondary's agent takes over; the host comes back, the VM moves home
/// (`failback`, the secondary's agent stepping aside, the primary's agent back with the VM),
/// the secondary host and its agent come back and the pair is re-protected; then the
/// primary's host dies again and the secondary's agent takes over once more.
pub async fn life_with_ha_agents(tag: &str, cfg: PairConfig) -> Result<ReprotectRun> {
    let cfg = PairConfig {
        witness: true,
        ..cfg
    };
    run(
        tag,
        "life",
        cfg,
        Interrupt::None,
        &[Role::Primary],
        Deciders::AgentsReprotecting,
    )
    .await
}

/// The primary's agent re-protects by itself (`--auto-reprotect`) after the secondary's host
/// died, and that host dies again during the agent's disk copy: the agent undoes its attempt
/// and the primary serves on alone; the host comes back, the agent tries again at once (the
/// new QEMU waiting anew) and succeeds; then the primary dies and nothing is lost.
pub async fn auto_reprotect_cut_short(tag: &str, cfg: PairConfig) -> Result<ReprotectRun> {
    let cfg = PairConfig {
        witness: true,
        ..cfg
    };
    run(
        tag,
        "auto-reprotect-killed-in-copy",
        cfg,
        Interrupt::DuringCopy,
        &[Role::Secondary],
        Deciders::AgentsReprotecting,
    )
    .await
}

/// The life in the other order: the **primary's** host dies first and the secondary serves
/// on; the host comes back and the VM moves home (`qmp-driver failback`'s sequence, clients
/// served all along), the secondary is re-protected online, and the primary's host dies again:
/// the secondary takes over once more and must have lost nothing. A → B → A → B, with
/// `qmp-driver failover`'s sequence deciding.
pub async fn after_losing_the_primary(tag: &str, cfg: PairConfig) -> Result<ReprotectRun> {
    run(
        tag,
        "failback-then-reprotect",
        cfg,
        Interrupt::None,
        &[Role::Primary],
        Deciders::Driver,
    )
    .await
}

/// Three failovers in a row, the serving host alternating, with online re-protects between
/// them: the primary's host dies (the secondary serves; the VM moves home; the secondary is
/// re-protected), then the secondary's host dies (the primary serves; re-protect), then the
/// primary's host dies during a download (the secondary serves), and nothing is lost.
pub async fn three_failovers_alternating(tag: &str, cfg: PairConfig) -> Result<ReprotectRun> {
    run(
        tag,
        "three-failovers",
        cfg,
        Interrupt::None,
        &[Role::Primary, Role::Secondary],
        Deciders::Driver,
    )
    .await
}

/// Who decides the failovers and starts the re-protects on the bed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Deciders {
    /// No agents: the bed runs `qmp-driver failover`'s and `reprotect`'s sequences.
    Driver,
    /// The HA agents take over; the bed runs the re-protect (and failback).
    Agents,
    /// The HA agents take over, and the primary's agent re-protects by itself
    /// (`--auto-reprotect`) once the new secondary host's QEMU waits; the bed runs the
    /// failback.
    AgentsReprotecting,
}

async fn run(
    tag: &str,
    name: &str,
    cfg: PairConfig,
    interrupt: Interrupt,
    losses: &[Role],
    deciders: Deciders,
) -> Result<ReprotectRun> {
    let (&last_loss, earlier_losses) = losses.split_last().context("no loss to play")?;
    let first_loss = losses[0];
    let dir = crate::artifacts::run_dir(name)?;
    let mut pair = StockPair::start(tag, dir, cfg).await?;
    // Declared after the pair: dropped first (its cluster runs on the pair's namespaces).
    let mut ha = match deciders {
        Deciders::Driver => None,
        Deciders::Agents => Some(HaBed::start(&pair, &ClusterOptions::from_env()).await?),
        Deciders::AgentsReprotecting => {
            Some(HaBed::start_with(&pair, &ClusterOptions::from_env(), Some(COPY_SPEED)).await?)
        }
    };
    let period = Duration::from_millis(u64::from(pair.config.checkpoint_delay_ms));
    pair.wait_checkpoints(3, period * 10 + Duration::from_secs(30))
        .await?;
    let client = HttpClient::new(&pair.topology.client, guest_server());

    let echo_server = SocketAddr::new(guest_server().ip(), ECHO_PORT);
    // One connection for the whole life, opened while the first pair is in COLO, two
    // checkpoints before the first failure: a connection the VM opened in the epoch before a
    // failover to the secondary lives on only through colo-proxyd secondary's sequence
    // shifts, which a failback cannot carry home (docs/operations.md, "Failback").
    let echo_life = EchoSession::start(
        &pair.topology.client,
        echo_server,
        Duration::from_millis(100),
    )?;
    pair.wait_checkpoints(5, period * 10 + Duration::from_secs(30))
        .await?;
    let checkpoints_first_pair = pair.checkpoint_pauses(Role::Primary).len();
    // Earlier rounds (lose a host, [fail back,] re-protect) must show the same as the last.
    let mut earlier_rounds = Vec::new();
    let mut earlier_failback = None;
    let mut failback_strangers = Vec::new();
    for &lost in earlier_losses {
        let mut round =
            lose_and_reprotect(&mut pair, ha.as_mut(), &client, Interrupt::None, lost).await?;
        earlier_failback = earlier_failback.or(round.failback.take());
        failback_strangers.append(&mut round.failback_strangers);
        earlier_rounds.push(round.check()?);
    }
    let Round {
        failed_attempt,
        reprotect,
        requests_during,
        failures_during,
        slowest,
        echo_reprotect,
        switch_pause_qemu_ms,
        checkpoints_new_pair,
        first_takeover,
        protected_again_ms,
        failback,
        failback_strangers: mut last_strangers,
    } = lose_and_reprotect(&mut pair, ha.as_mut(), &client, interrupt, last_loss).await?;
    failback_strangers.append(&mut last_strangers);
    let failback = failback.or(earlier_failback);
    let primary_lost = losses.contains(&Role::Primary);

    // The primary dies during a download; the new secondary takes over.
    let echo = EchoSession::start(
        &pair.topology.client,
        echo_server,
        Duration::from_millis(50),
    )?;
    let expected_md5 = {
        let r = client.get("/blob.md5", Fetch::default()).await?;
        if r.status != 200 {
            bail!("GET /blob.md5 answered {}", r.status);
        }
        String::from_utf8_lossy(&r.body).trim().to_string()
    };
    let download = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .get(
                    "/blob",
                    Fetch {
                        rate: Some(128 * 1024),
                        read_timeout: Duration::from_secs(20),
                    },
                )
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let hb_at_kill = pair.vm(Role::Secondary)?.serial_summary().last_heartbeat;
    let errors_before = pair.vm(Role::Secondary)?.serial_summary().errors.len();
    pair.kill(Role::Primary)?;
    let second_takeover = take_over(&mut pair, ha.as_ref(), Role::Secondary).await?;
    let started = Instant::now();
    let download = DownloadReport::of(
        download.await.context("download task")?,
        expected_md5,
        started,
    );
    let (mut after_failover_ok, mut after_failover_failures) = (0, Vec::new());
    for _ in 0..10 {
        match probe(&client, Duration::from_secs(5)).await {
            Ok(_) => after_failover_ok += 1,
            Err(e) => after_failover_failures.push(format!("{e:#}")),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let echo = echo.finish();
    let echo_life = echo_life.finish();
    let last = hb_at_kill.unwrap_or(0);
    pair.wait_serial(Role::Secondary, Duration::from_secs(20), |s| {
        s.last_heartbeat.unwrap_or(0) >= last + 2
    })
    .await
    .context("the new secondary's heartbeat stopped after it took over")?;
    let summary = pair.vm(Role::Secondary)?.serial_summary();
    let guest_errors = summary.errors[errors_before.min(summary.errors.len())..].to_vec();
    let heartbeats = (hb_at_kill, summary.last_heartbeat);
    let disk = pair.stop_and_check_disk(Role::Secondary).await?;
    let divergences = proxyd_reasons(&primary_log(&pair.dir), 0);
    let run = ReprotectRun {
        run_dir: pair.dir.clone(),
        earlier_rounds,
        failed_attempt,
        checkpoints_first_pair,
        switch_pause_qemu_ms,
        longest_stall_ms: slowest.max(echo_reprotect.longest_wait_ms),
        echo_reprotect,
        reprotect,
        requests_during,
        failures_during,
        checkpoints_new_pair,
        download,
        echo,
        after_failover_ok,
        after_failover_failures,
        heartbeats,
        guest_errors,
        disk,
        agents: match (first_takeover, second_takeover) {
            (Some(first), Some(second)) => Some(AgentTakeovers {
                first,
                second,
                protected_again_ms: protected_again_ms.unwrap_or_default(),
            }),
            (None, None) => None,
            (first, second) => bail!(
                "an agent's take-over left no decision in its state file: first {first:?}, \
                 second {second:?}"
            ),
        },
        echo_life,
        divergences,
        first_loss,
        primary_lost,
        losses: losses.to_vec(),
        failback,
        reprotect_by_agent: deciders == Deciders::AgentsReprotecting,
        failback_strangers,
    };
    std::fs::write(
        run.run_dir.join("reprotect-report.json"),
        serde_json::to_vec_pretty(&run)?,
    )?;
    Ok(run)
}

/// A re-protect whose new secondary host dies at `interrupt`: returns what it said and the
/// state of the primary after it; the secondary's processes are reaped.
async fn interrupted_attempt(
    pair: &mut StockPair,
    opts: &ReprotectOptions,
    interrupt: Interrupt,
) -> Result<FailedAttempt> {
    let mut serve = pair.restart_secondary_host().await?;
    let pids = new_secondary_host_pids(pair, &serve)?;
    let trigger = match interrupt {
        Interrupt::DuringCopy => "blockdev-mirror",
        Interrupt::DuringMemory => "migrate ",
        Interrupt::None => bail!("no interrupt"),
    };
    let pri = pair.vm(Role::Primary)?.qmp.clone();
    let sec = pair.vm(Role::Secondary)?.qmp.clone();
    let mut steps = Vec::new();
    let mut killed = false;
    let result = pair::reprotect(&pri, &sec, &pair.driver, opts, &mut |p| {
        println!("  reprotect (to be cut short): {p}");
        steps.push(p.to_string());
        if let Progress::Step(step) = &p
            && !killed
            && step.side == Role::Primary
            && step.what.starts_with(trigger)
        {
            killed = true;
            kill_hard(&pids);
        }
    })
    .await;
    let error = match result {
        Ok(r) => bail!(
            "the re-protect succeeded although the new secondary died (killed: {killed}): {r:?}"
        ),
        Err(e) => e.to_string(),
    };
    if !killed {
        bail!("the re-protect failed before the kill point: {error}");
    }
    pair.kill(Role::Secondary)?;
    serve.kill();
    after_failed_attempt(pair, interrupt, error, steps).await
}

/// The processes of the secondary's host that a re-protect talks to: its QEMU, colo-blockd
/// `secondary`, colo-proxyd and the copy's target `serve`; not the relay (which also runs on
/// that host on the bed, but is the old one and serves the next attempt).
fn new_secondary_host_pids(pair: &StockPair, serve: &DaemonProcess) -> Result<Vec<u32>> {
    let mut pids: Vec<u32> = serve.pid().into_iter().collect();
    pids.extend(pair.vm(Role::Secondary)?.process.pid());
    pids.extend(pair.blockd.as_ref().and_then(|b| b.pid()));
    pids.extend(
        pair.proxyd
            .iter()
            .filter(|(host, _)| *host == Role::Secondary)
            .filter_map(|(_, d)| d.pid()),
    );
    Ok(pids)
}

/// SIGKILLs `pids`: a host dying.
fn kill_hard(pids: &[u32]) {
    let _ = std::process::Command::new("kill")
        .arg("-9")
        .args(pids.iter().map(u32::to_string))
        .status();
    println!("  the new secondary's host dies (SIGKILL of {pids:?})");
}

/// The primary after an attempt that failed with `error`: what the checks of
/// [`FailedAttempt`] need.
async fn after_failed_attempt(
    pair: &StockPair,
    interrupt: Interrupt,
    error: String,
    steps: Vec<String>,
) -> Result<FailedAttempt> {
    let pri = pair.vm(Role::Primary)?.qmp.clone();
    let status = pri.query_status().await?;
    let colo = pri.query_colo_status().await?;
    let jobs = pri.execute_raw("query-block-jobs", None).await?;
    let nodes = pri
        .execute_raw(
            "query-named-block-nodes",
            Some(serde_json::json!({ "flat": true })),
        )
        .await?;
    let child = &pair.driver.disk.replication_node;
    Ok(FailedAttempt {
        interrupt,
        error,
        steps,
        primary_running: status.running,
        primary_colo_mode: colo.mode,
        block_jobs: jobs.as_array().map_or(0, Vec::len),
        child_left: nodes
            .as_array()
            .into_iter()
            .flatten()
            .any(|n| n["node-name"] == child.as_str()),
    })
}

/// [`interrupted_attempt`] with the primary's agent re-protecting by itself: the secondary's
/// host comes back with its agent, and dies (its agent too) once the primary's agent logs
/// that its copy started. The agent must report the attempt failed, having undone it.
async fn interrupted_auto_attempt(
    pair: &mut StockPair,
    ha: &mut HaBed,
    interrupt: Interrupt,
) -> Result<FailedAttempt> {
    // The agent's progress is read from its log, not called back: the memory phase is over
    // before a poll can be sure to catch it, the copy (bounded to COPY_SPEED) lasts seconds.
    if interrupt != Interrupt::DuringCopy {
        bail!("an automatic re-protect is cut short in its copy only");
    }
    const TRIGGER: &str = "re-protect step=primary: blockdev-mirror";
    let copies_before = ha.agent_log(Role::Primary).matches(TRIGGER).count();
    let attempts_before = ha.auto_reprotect_attempts();
    let mut serve = pair.restart_secondary_host().await?;
    ha.start_agent(pair, Role::Secondary)?;
    let pids = new_secondary_host_pids(pair, &serve)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while ha.agent_log(Role::Primary).matches(TRIGGER).count() == copies_before {
        if Instant::now() > deadline {
            bail!(
                "the primary's agent did not start its copy within 120 s: {:?}",
                ha.state(Role::Primary).ok().and_then(|s| s.reprotect)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    kill_hard(&pids);
    ha.kill_agent(Role::Secondary);
    let error = match ha
        .wait_auto_reprotect(attempts_before, Duration::from_secs(120))
        .await?
    {
        Ok(report) => {
            bail!("the agent's re-protect succeeded although the new secondary died: {report:?}")
        }
        Err(error) => error,
    };
    pair.kill(Role::Secondary)?;
    serve.kill();
    // The attempt's lines of the agent's log, its undo's included.
    let steps = ha
        .agent_log(Role::Primary)
        .lines()
        .filter(|l| l.contains("re-protect"))
        .skip_while(|l| !l.contains(&format!("attempt={}", attempts_before + 1)))
        .map(|l| l.split("  ").last().unwrap_or(l).to_string())
        .collect();
    after_failed_attempt(pair, interrupt, error, steps).await
}

/// `survivor` takes the VM over after the other side died: by its HA agent's own decision
/// (returned as the agent's state file records it), or without agents by `qmp-driver
/// failover`'s sequence.
async fn take_over(
    pair: &mut StockPair,
    ha: Option<&HaBed>,
    survivor: Role,
) -> Result<Option<Decision>> {
    match ha {
        Some(ha) => {
            ha.wait_takeover(survivor, Duration::from_secs(60)).await?;
            // The agent logs "take-over done" a moment before its state file holds the
            // failover's time: wait for it (or an error), at most 5 s.
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let decision = ha.state(survivor)?.last_decision;
                let complete = decision
                    .as_ref()
                    .is_some_and(|d| d.failover_ms.is_some() || d.error.is_some());
                if complete || Instant::now() > deadline {
                    return Ok(decision);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        None => {
            match survivor {
                Role::Primary => pair.failover_to_primary().await?,
                Role::Secondary => pair.failover_to_secondary().await?,
            };
            Ok(None)
        }
    }
}

/// One round of [`after_losing_the_secondary`]: what it saw.
struct Round {
    failed_attempt: Option<FailedAttempt>,
    reprotect: ReprotectReport,
    requests_during: usize,
    failures_during: Vec<String>,
    slowest: f64,
    echo_reprotect: EchoReport,
    switch_pause_qemu_ms: Option<f64>,
    checkpoints_new_pair: (usize, usize),
    /// With the agents: the primary's agent's take-over when the secondary was lost.
    first_takeover: Option<Decision>,
    /// With the agents: how long after the re-protect both saw the pair protected again.
    protected_again_ms: Option<f64>,
    /// The failback, when the primary was the one lost.
    failback: Option<FailbackReport>,
    /// Strangers knocking on that failback's migration listener (with TLS).
    failback_strangers: Vec<StrangerKnock>,
}

impl Round {
    /// An earlier round: no request failed, the echo connection held, COLO went on; returns
    /// its report.
    fn check(self) -> Result<ReprotectReport> {
        if !self.failures_during.is_empty() || !self.echo_reprotect.ok() {
            bail!(
                "an earlier re-protect disturbed the clients: {:?}, echo {:?}",
                self.failures_during,
                self.echo_reprotect
            );
        }
        let (p, s) = self.checkpoints_new_pair;
        if p < 5 || s < 5 {
            bail!("an earlier re-protect left only {p} / {s} checkpoints");
        }
        println!(
            "earlier round: re-protect {:.0} ms, pause at the switch {:?} ms (QEMU), longest \
             stall {:.0} ms",
            self.reprotect.total_ms,
            self.switch_pause_qemu_ms,
            self.slowest.max(self.echo_reprotect.longest_wait_ms)
        );
        Ok(self.reprotect)
    }
}

/// `lost`'s host dies (with its agent); the other side carries on alone, by its agent's
/// decision or by `qmp-driver failover`. When the primary was lost, the VM then moves home
/// with `failback`; the secondary's host comes back (after a first attempt cut short at
/// `interrupt`) and the primary is re-protected, a client asking and an echo connection open
/// all along; returns once checkpoints go on.
async fn lose_and_reprotect(
    pair: &mut StockPair,
    mut ha: Option<&mut HaBed>,
    client: &HttpClient,
    interrupt: Interrupt,
    lost: Role,
) -> Result<Round> {
    let period = Duration::from_millis(u64::from(pair.config.checkpoint_delay_ms));
    let echo_server = SocketAddr::new(guest_server().ip(), ECHO_PORT);
    if lost == Role::Primary && interrupt != Interrupt::None {
        bail!("the failback runs without an interrupted attempt");
    }
    pair.kill(lost)?;
    if let Some(ha) = ha.as_deref_mut() {
        ha.kill_agent(lost);
    }
    let survivor = match lost {
        Role::Primary => Role::Secondary,
        Role::Secondary => Role::Primary,
    };
    let first_takeover = take_over(pair, ha.as_deref(), survivor).await?;
    probe(client, Duration::from_secs(10))
        .await
        .context("the survivor serves alone")?;

    let echo = EchoSession::start(
        &pair.topology.client,
        echo_server,
        Duration::from_millis(50),
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    let prober = spawn_prober(client.clone(), stop.clone());

    // The host comes back; the re-protect, clients served all along.
    // The copy bounded to 4 MiB/s, so that it takes seconds and the guest's writes (a record
    // a second) meet it; unbounded it takes about 0.1 s on the bed's 16 MiB disk.
    let opts = ReprotectOptions {
        migrate_timeout: Duration::from_secs(300),
        speed: COPY_SPEED,
        ..ReprotectOptions::new(pair::default_reprotect_target(&pair.driver))
    };
    let (failback, failback_strangers) = match lost {
        Role::Primary => {
            // The agent of the host the VM leaves steps aside for the move (its QEMU quits at
            // the end), and the primary host's agent comes back with the VM.
            if let Some(ha) = ha.as_deref_mut() {
                ha.kill_agent(Role::Secondary);
            }
            let (report, strangers) = fail_back(pair).await?;
            if let Some(ha) = ha.as_deref_mut() {
                ha.start_agent(pair, Role::Primary)?;
            }
            (Some(report), strangers)
        }
        Role::Secondary => (None, Vec::new()),
    };
    let failed_attempt = match (
        interrupt,
        ha.as_deref_mut().filter(|ha| ha.auto_reprotect()),
    ) {
        (Interrupt::None, _) => None,
        (_, Some(ha)) => Some(interrupted_auto_attempt(pair, ha, interrupt).await?),
        (_, None) => Some(interrupted_attempt(pair, &opts, interrupt).await?),
    };
    let attempts_before = ha.as_deref().map_or(0, HaBed::auto_reprotect_attempts);
    let mut serve = pair.restart_secondary_host().await?;
    if let Some(ha) = ha.as_deref_mut() {
        // The host's agent comes back with it, on the new secondary QEMU.
        ha.start_agent(pair, Role::Secondary)?;
    }
    let pri = pair.vm(Role::Primary)?.qmp.clone();
    let sec = pair.vm(Role::Secondary)?.qmp.clone();
    let events_mark = pair.vm(Role::Primary)?.events.len();
    let result = match ha.as_deref().filter(|ha| ha.auto_reprotect()) {
        // The primary's agent sees the new secondary's agent report its QEMU waiting, and
        // re-protects by itself (its log has the steps).
        Some(ha) => {
            ha.wait_auto_reprotect(attempts_before, Duration::from_secs(300))
                .await?
        }
        None => pair::reprotect(&pri, &sec, &pair.driver, &opts, &mut |p| {
            println!("  reprotect: {p}")
        })
        .await
        .map_err(|e| e.to_string()),
    };
    let reprotect_done = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let (requests_during, failures_during, slowest) = prober.await.context("prober task")?;
    let echo_reprotect = echo.finish();
    let switch_pause_qemu_ms = pauses(&pair.vm(Role::Primary)?.events.since(events_mark))
        .first()
        .map(|d| d.as_secs_f64() * 1000.0);
    let reprotect = match result {
        Ok(r) => r,
        Err(e) => {
            pair.write_diagnostics().await;
            bail!(
                "reprotect failed: {e}; primary: {}; secondary: {}",
                pair.vm(Role::Primary)?.process.stderr_tail(),
                pair.vm(Role::Secondary)?.process.stderr_tail()
            );
        }
    };
    // `--exit-after-client`: the copy's node was deleted at the switch, so it left.
    serve.wait_exit(Duration::from_secs(10))?;

    // Back in COLO: checkpoints go on, on both sides.
    pair.wait_guest_in_colo().await?;
    // Both agents must see the pair protected again: a new protection period, in which the
    // next failure is theirs to decide.
    let protected_again_ms = match ha.as_deref() {
        Some(ha) => {
            for role in [Role::Primary, Role::Secondary] {
                ha.wait_protected(role, Duration::from_secs(60)).await?;
            }
            Some(reprotect_done.elapsed().as_secs_f64() * 1000.0)
        }
        None => None,
    };
    pair.wait_checkpoints(5, period * 10 + Duration::from_secs(60))
        .await?;
    // One secondary, one re-protect: the agent must not try again once the pair is in COLO.
    if let Some(ha) = ha.as_deref().filter(|ha| ha.auto_reprotect()) {
        let attempts = ha.auto_reprotect_attempts();
        if attempts != attempts_before + 1 {
            bail!(
                "the primary's agent made {} re-protect attempts for one new secondary: {:?}",
                attempts - attempts_before,
                ha.state(Role::Primary).ok().and_then(|s| s.reprotect)
            );
        }
    }
    let checkpoints_new_pair = (
        pair.vm(Role::Primary)?.checkpoint_pauses().len(),
        pair.vm(Role::Secondary)?.checkpoint_pauses().len(),
    );
    Ok(Round {
        failed_attempt,
        reprotect,
        requests_during,
        failures_during,
        slowest,
        echo_reprotect,
        switch_pause_qemu_ms,
        checkpoints_new_pair,
        first_takeover,
        protected_again_ms,
        failback,
        failback_strangers,
    })
}

/// The primary's host is back: the VM the secondary took over moves home with `qmp-driver
/// failback`'s sequence; the secondary host's processes are then stopped (its QEMU quit
/// already), as an operator stops them before the re-protect.
/// With TLS, strangers knock on the home QEMU's migration listener as soon as it listens
/// (returned); the failback must go on as if they had not.
async fn fail_back(pair: &mut StockPair) -> Result<(FailbackReport, Vec<StrangerKnock>)> {
    let mut serve = pair.restart_primary_host_for_failback().await?;
    let opts = FailbackOptions {
        copy: ReprotectOptions {
            migrate_timeout: Duration::from_secs(300),
            speed: COPY_SPEED,
            ..ReprotectOptions::new(pair::default_failback_target(&pair.driver))
        },
        incoming: Some(pair.failback_incoming()),
        offsets_metrics: None,
        offsets_timeout: Duration::from_secs(60),
    };
    let pri = pair.vm(Role::Primary)?.qmp.clone();
    let sec = pair.vm(Role::Secondary)?.qmp.clone();
    let listener = pair.dir.join("primary-incoming.sock");
    let pki = pair
        .config
        .tls
        .then(|| crate::stock::driver::pki_dir(&pair.dir));
    let mut strangers = Vec::new();
    let result = pair::failback(&sec, &pri, &pair.driver, &opts, &mut |p| {
        println!("  failback: {p}");
        if let (Some(pki), Progress::Step(step)) = (&pki, &p)
            && strangers.is_empty()
            && step.side == Role::Primary
            && step.what.starts_with("migrate-incoming")
        {
            strangers = knock_with_tls(&listener, pki);
        }
    })
    .await;
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            pair.write_diagnostics().await;
            bail!(
                "failback failed: {e}; primary: {}; secondary: {}",
                pair.vm(Role::Primary)?.process.stderr_tail(),
                pair.vm(Role::Secondary)?.process.stderr_tail()
            );
        }
    };
    serve.wait_exit(Duration::from_secs(10))?;
    // QEMU's refusals, one line per stranger ("Verify failed: ...", "TLS x509 authz check for
    // ... is denied"), in the order they knocked.
    let home_log =
        std::fs::read_to_string(&pair.vm(Role::Primary)?.process.stderr_log).unwrap_or_default();
    let mut refusals = home_log
        .lines()
        .filter(|l| l.contains("Verify failed") || l.contains("authz check"));
    for knock in &mut strangers {
        knock.qemu_said = refusals.next().map(str::to_string);
    }
    let image = pair.vm(Role::Secondary)?.image.clone();
    pair.kill(Role::Secondary)?;
    // The secondary's image was the VM's disk since the failover; the VM now runs from the
    // primary's, and the re-protect copies over this one: it is to be a replica again, so its
    // failed-over marker goes, as docs/operations.md ("Re-protect", step 2) tells operators.
    let marker = format!("{}.colo-failed-over", image.display());
    std::fs::remove_file(&marker).with_context(|| format!("removing {marker}"))?;
    Ok((report, strangers))
}

/// Strangers' TLS handshakes on the Unix socket `listener`: no certificate, then the primary
/// host's own identity from `pki` (trusted by the CA, refused by the authz). Each closes
/// after its handshake; one QEMU took for its migration source would fail the migration.
fn knock_with_tls(listener: &std::path::Path, pki: &std::path::Path) -> Vec<StrangerKnock> {
    use crate::stock::driver::PRIMARY_TLS_NAME;
    let own = pki.join(PRIMARY_TLS_NAME);
    [None, Some(&own)]
        .into_iter()
        .map(|identity| {
            let mut args: Vec<String> = vec![
                "10".into(),
                "openssl".into(),
                "s_client".into(),
                "-quiet".into(),
                "-unix".into(),
                listener.display().to_string(),
                "-CAfile".into(),
                own.join("ca-cert.pem").display().to_string(),
            ];
            if let Some(identity) = identity {
                for (flag, file) in [("-cert", "client-cert.pem"), ("-key", "client-key.pem")] {
                    args.extend([flag.into(), identity.join(file).display().to_string()]);
                }
            }
            let said = match std::process::Command::new("timeout")
                .args(&args)
                .stdin(std::process::Stdio::null())
                .output()
            {
                Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_string(),
                Err(e) => format!("openssl s_client did not run: {e}"),
            };
            let identity = match identity {
                Some(_) => format!("the primary host's own ({PRIMARY_TLS_NAME})"),
                None => "none".to_string(),
            };
            println!("  a stranger (certificate: {identity}) knocked: {said}");
            StrangerKnock {
                identity,
                said,
                qemu_said: None,
            }
        })
        .collect()
}
