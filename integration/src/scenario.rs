//! The scenarios the tests and the demo run on the stock pair, each returning a report.
//!
//! - [`soak`]: COLO under memory load for N checkpoints while a client keeps asking;
//! - [`failover`]: one VM is SIGKILLed during a throttled 1 MiB download; the other takes
//!   over; the download must complete intact, new requests must succeed and the survivor's
//!   disk must hold every record its heartbeat promises.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::client::{EchoReport, EchoSession, Fetch, HttpClient, Response, md5_hex};
use crate::cluster::ClusterOptions;
use crate::guest::DiskCheck;
use crate::ha::HaBed;
use crate::relay_watch::{AckPolicy, EventRecorder};
use crate::stats::{median, quantile};
use crate::stock::driver::relay_control_path;
use crate::stock::{Daemon, DriverProcess, PairConfig, Role, Step, StockPair};
use colo_control::protocol::EventKind;
use qmp_driver::agent::status::AgentStatus;

/// The page the guest serves at `/`.
pub const INDEX_BODY: &[u8] = b"colo guest ok\n";
/// Size of the guest's `/blob`.
pub const BLOB_BYTES: usize = 1 << 20;

/// The guest's echo server's port (integration/guest/init).
pub const ECHO_PORT: u16 = 7;

/// What a scenario measured. Times in ms.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Where sockets, logs, events and images of the run are.
    pub run_dir: PathBuf,
    /// Pair settings.
    pub config: PairConfig,
    /// Completed checkpoints on the primary since COLO began.
    pub checkpoints_primary: usize,
    /// Completed checkpoints on the secondary since COLO began.
    pub checkpoints_secondary: usize,
    /// Primary pause (STOP→RESUME) median.
    pub pause_median_ms: Option<f64>,
    /// Primary pause p90.
    pub pause_p90_ms: Option<f64>,
    /// Primary pause maximum.
    pub pause_max_ms: Option<f64>,
    /// Every primary pause since COLO began, in order (for comparisons across runs, e.g. the
    /// cost of TLS, which pool the pauses of several runs).
    pub pauses_primary_ms: Vec<f64>,
    /// HTTP requests made (small page).
    pub http_requests: usize,
    /// HTTP requests that failed or returned the wrong body.
    pub http_failures: Vec<String>,
    /// HTTP latency median.
    pub http_median_ms: Option<f64>,
    /// HTTP latency p90.
    pub http_p90_ms: Option<f64>,
    /// Heartbeats (first, last) seen on each guest's console during the run.
    pub heartbeats: Vec<(String, Option<u64>, Option<u64>)>,
    /// Lines the guests flagged as errors.
    pub guest_errors: Vec<String>,
    /// The side that failed, for failover runs.
    pub killed: Option<Role>,
    /// How it failed (`SIGKILL`, `uplink down`).
    pub failure: Option<&'static str>,
    /// The survivor's daemon restarted after the failover, if any.
    pub restarted_after_failover: Option<String>,
    /// The barrier event the checkpoint was held at when the VM was killed, if any.
    pub killed_at_event: Option<String>,
    /// Failover steps on the survivor.
    pub failover_steps: Vec<Step>,
    /// From the SIGKILL to the first successful new request.
    pub kill_to_first_success_ms: Option<f64>,
    /// From the restart of the survivor's daemon to the first successful new request.
    pub restart_to_first_success_ms: Option<f64>,
    /// The in-flight download across the failover.
    pub download: Option<DownloadReport>,
    /// Requests after the failover.
    pub after_failover_ok: usize,
    /// The survivor's disk against its heartbeats.
    pub disk: Option<DiskCheck>,
    /// SVM output delivered to the primary's comparison (bytes), sampled before any kill:
    /// the proof that the secondary really ran in lock-step and was compared.
    pub svm_output_bytes: Option<u64>,
    /// With `qmp-driver` on the command line: what its `--json` commands printed.
    pub cli: Vec<(String, serde_json::Value)>,
    /// What the HA agents decided, when they ran the pair.
    pub ha: Option<HaReport>,
    /// The connection that carried data both ways across the failure, when the plan kept one.
    pub echo: Option<EchoReport>,
}

/// The HA agents' view after a failover.
#[derive(Debug, Clone, Serialize)]
pub struct HaReport {
    /// The survivor agent's state (its last decision, with detection and failover times).
    pub survivor: AgentStatus,
    /// The failed side's agent's state as it last wrote it (a frozen host's is stale).
    pub failed: Option<AgentStatus>,
    /// The survivor's agent log lines with a decision.
    pub decisions: Vec<String>,
    /// The cluster's timeouts.
    pub corosync: String,
}

impl HaReport {
    fn of(ha: &HaBed, survivor: Role, failed: Role) -> Result<HaReport> {
        Ok(HaReport {
            survivor: ha.state(survivor)?,
            failed: ha.state(failed).ok(),
            decisions: ha
                .agent_log(survivor)
                .lines()
                .filter(|l| l.contains("decision"))
                .map(str::to_string)
                .collect(),
            corosync: ha.cluster.options().describe(),
        })
    }
}

/// The 1 MiB download that was in flight when a VM died.
#[derive(Debug, Clone, Serialize)]
pub struct DownloadReport {
    /// Bytes received.
    pub bytes: usize,
    /// MD5 the guest published before the failure.
    pub expected_md5: String,
    /// MD5 of what arrived.
    pub md5: String,
    /// Duration in ms.
    pub ms: f64,
    /// The error, when the download broke.
    pub error: Option<String>,
}

impl DownloadReport {
    /// What a download that ended (or broke) `started` ago delivered, against the MD5 the
    /// guest published.
    pub fn of(result: Result<Response>, expected_md5: String, started: Instant) -> Self {
        match result {
            Ok(response) => DownloadReport {
                bytes: response.body.len(),
                md5: md5_hex(&response.body),
                expected_md5,
                ms: response.elapsed.as_secs_f64() * 1000.0,
                error: (response.status != 200).then(|| format!("status {}", response.status)),
            },
            Err(e) => DownloadReport {
                bytes: 0,
                md5: String::new(),
                expected_md5,
                ms: started.elapsed().as_secs_f64() * 1000.0,
                error: Some(format!("{e:#}")),
            },
        }
    }

    /// Complete and intact.
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.bytes == BLOB_BYTES && self.md5 == self.expected_md5
    }
}

/// Sends requests until one is answered, within 30 s, and returns the ms from `since` to its
/// answer: requests during a takeover (or a restart) are expected to fail and are not counted;
/// only the last one, past the deadline, is.
async fn first_answer(
    client: &HttpClient,
    timeout: Duration,
    (report, latencies): (&mut Report, &mut Vec<Duration>),
    (since, after): (Instant, &str),
) -> Option<f64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        report.http_requests += 1;
        match probe(client, timeout).await {
            Ok(latency) => {
                latencies.push(latency);
                return to_ms(Some(since.elapsed()));
            }
            Err(e) if Instant::now() > deadline => {
                report.http_failures.push(format!("after {after}: {e:#}"));
                return None;
            }
            Err(_) => report.http_requests -= 1,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn to_ms(d: Option<Duration>) -> Option<f64> {
    d.map(|d| (d.as_secs_f64() * 1e6).round() / 1e3)
}

pub fn guest_server() -> SocketAddr {
    SocketAddr::from(([10, 0, 2, 15], 80))
}

impl Report {
    fn new(scenario: &str, pair: &StockPair) -> Self {
        Report {
            scenario: scenario.into(),
            run_dir: pair.dir.clone(),
            config: pair.config.clone(),
            checkpoints_primary: 0,
            checkpoints_secondary: 0,
            pause_median_ms: None,
            pause_p90_ms: None,
            pause_max_ms: None,
            pauses_primary_ms: Vec::new(),
            http_requests: 0,
            http_failures: Vec::new(),
            http_median_ms: None,
            http_p90_ms: None,
            heartbeats: Vec::new(),
            guest_errors: Vec::new(),
            killed: None,
            failure: None,
            restarted_after_failover: None,
            killed_at_event: None,
            failover_steps: Vec::new(),
            cli: Vec::new(),
            ha: None,
            echo: None,
            svm_output_bytes: None,
            kill_to_first_success_ms: None,
            restart_to_first_success_ms: None,
            download: None,
            after_failover_ok: 0,
            disk: None,
        }
    }

    fn record_checkpoints(&mut self, pair: &StockPair) {
        let pauses = pair.checkpoint_pauses(Role::Primary);
        self.checkpoints_primary = pauses.len();
        self.pause_median_ms = to_ms(median(&pauses));
        self.pause_p90_ms = to_ms(quantile(&pauses, 0.9));
        self.pause_max_ms = to_ms(quantile(&pauses, 1.0));
        self.pauses_primary_ms = pauses.iter().filter_map(|&d| to_ms(Some(d))).collect();
        self.checkpoints_secondary = pair.checkpoint_pauses(Role::Secondary).len();
    }

    fn record_http(&mut self, latencies: &[Duration]) {
        self.http_median_ms = to_ms(median(latencies));
        self.http_p90_ms = to_ms(quantile(latencies, 0.9));
    }

    /// A short human-readable summary.
    pub fn render(&self) -> String {
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
        let mut out = format!(
            "scenario {}\n  run dir            {}\n  checkpoints        {} primary / {} secondary \
             (x-checkpoint-delay {} ms, guest dirtying {} MiB/s)\n  pause (primary)    \
             median {} ms, p90 {} ms, max {} ms\n  HTTP               {} requests, {} failed, \
             median {} ms, p90 {} ms\n",
            self.scenario,
            self.run_dir.display(),
            self.checkpoints_primary,
            self.checkpoints_secondary,
            self.config.checkpoint_delay_ms,
            self.config.guest_load_mib_s,
            opt(self.pause_median_ms),
            opt(self.pause_p90_ms),
            opt(self.pause_max_ms),
            self.http_requests,
            self.http_failures.len(),
            opt(self.http_median_ms),
            opt(self.http_p90_ms),
        );
        for (command, json) in &self.cli {
            out += &format!(
                "  qmp-driver {command:<11} {}\n",
                cli_summary(command, json)
            );
        }
        if let Some(bytes) = self.svm_output_bytes {
            out += &format!("  SVM output         {bytes} bytes compared (before any kill)\n");
        }
        for (vm, first, last) in &self.heartbeats {
            out += &format!("  heartbeat {vm:<10}{first:?} -> {last:?}\n");
        }
        if let Some(killed) = self.killed {
            out += &format!(
                "  failed             {} ({}){}\n  first new request  {} ms after the failure\n",
                killed.name(),
                self.failure.unwrap_or("SIGKILL"),
                self.killed_at_event
                    .as_deref()
                    .map(|e| format!(" while the relay held the checkpoint at {e}"))
                    .unwrap_or_default(),
                opt(self.kill_to_first_success_ms)
            );
            for step in &self.failover_steps {
                let detail = step
                    .detail
                    .as_deref()
                    .map(|e| format!(" ({:?}: {e})", step.outcome))
                    .unwrap_or_default();
                out += &format!("    {:<40} {:.1} ms{detail}\n", step.what, step.ms);
            }
            if let Some(d) = &self.download {
                out += &format!(
                    "  in-flight download {} bytes in {:.0} ms, md5 {} ({}){}\n",
                    d.bytes,
                    d.ms,
                    d.md5,
                    if d.ok() { "matches" } else { "WRONG" },
                    d.error
                        .as_deref()
                        .map(|e| format!(", error: {e}"))
                        .unwrap_or_default()
                );
            }
            out += &format!(
                "  after failover     {} requests OK{}\n",
                self.after_failover_ok,
                self.restarted_after_failover
                    .as_deref()
                    .map(|d| format!(
                        " (the survivor's {d} restarted first; first answer {} ms after)",
                        opt(self.restart_to_first_success_ms)
                    ))
                    .unwrap_or_default()
            );
        }
        if let Some(disk) = &self.disk {
            out += &format!(
                "  survivor disk      records 1..{} for heartbeat {}, {} missing, {} torn: {}\n",
                disk.highest_record,
                disk.last_heartbeat,
                disk.missing.len(),
                disk.torn.len(),
                if disk.is_consistent() {
                    "consistent"
                } else {
                    "INCONSISTENT"
                }
            );
        }
        for e in &self.guest_errors {
            out += &format!("  guest error        {e}\n");
        }
        out
    }

    /// Writes the report as JSON into the run directory.
    pub fn save(&self) -> Result<PathBuf> {
        let path = self.run_dir.join("report.json");
        std::fs::write(&path, serde_json::to_vec_pretty(self)?)?;
        Ok(path)
    }
}

/// GET `/` once; `Ok(latency)` only for the right page.
pub async fn probe(client: &HttpClient, read_timeout: Duration) -> Result<Duration> {
    let fetch = Fetch {
        rate: None,
        read_timeout,
    };
    let response = client.get("/", fetch).await?;
    if response.status != 200 || response.body != INDEX_BODY {
        bail!(
            "GET / answered {} with {:?}",
            response.status,
            String::from_utf8_lossy(&response.body)
        );
    }
    Ok(response.elapsed)
}

fn heartbeat_range(
    pair: &StockPair,
    before: &[(Role, Option<u64>)],
) -> Vec<(String, Option<u64>, Option<u64>)> {
    before
        .iter()
        .map(|(role, first)| {
            let last = pair
                .vm(*role)
                .ok()
                .and_then(|vm| vm.serial_summary().last_heartbeat);
            (role.name().to_string(), *first, last)
        })
        .collect()
}

fn heartbeats_now(pair: &StockPair, roles: &[Role]) -> Vec<(Role, Option<u64>)> {
    roles
        .iter()
        .map(|&r| {
            (
                r,
                pair.vm(r)
                    .ok()
                    .and_then(|vm| vm.serial_summary().last_heartbeat),
            )
        })
        .collect()
}

fn guest_errors(pair: &StockPair) -> Vec<String> {
    [Role::Primary, Role::Secondary]
        .iter()
        .filter_map(|&r| pair.vm(r).ok().map(|vm| (r, vm.serial_summary().errors)))
        .flat_map(|(r, errs)| errs.into_iter().map(move |e| format!("{}: {e}", r.name())))
        .collect()
}

/// [`guest_errors`], of the `failed` side only its first `failed_errors` (those it reported
/// before it failed).
fn guest_errors_until(pair: &StockPair, failed: Role, failed_errors: usize) -> Vec<String> {
    let prefix = format!("{}: ", failed.name());
    let mut seen = 0;
    guest_errors(pair)
        .into_iter()
        .filter(|e| {
            if !e.starts_with(&prefix) {
                return true;
            }
            seen += 1;
            seen <= failed_errors
        })
        .collect()
}

/// COLO for at least `checkpoints` checkpoints while the guest dirties memory and a client
/// requests the page every `probe_every`; the 1 MiB blob is fetched once and verified.
pub async fn soak(
    tag: &str,
    cfg: PairConfig,
    checkpoints: usize,
    probe_every: Duration,
) -> Result<Report> {
    let dir = crate::artifacts::run_dir("soak")?;
    let pair = StockPair::start(tag, dir, cfg).await?;
    let mut report = Report::new("soak", &pair);
    let client = HttpClient::new(&pair.topology.client, guest_server());
    let before = heartbeats_now(&pair, &[Role::Primary, Role::Secondary]);

    let blob_md5 = fetch_text(&client, "/blob.md5").await?;
    let blob = client.get("/blob", Fetch::default()).await?;
    if md5_hex(&blob.body) != blob_md5 || blob.body.len() != BLOB_BYTES {
        report.http_failures.push(format!(
            "/blob: {} bytes, md5 {} expected {blob_md5}",
            blob.body.len(),
            md5_hex(&blob.body)
        ));
    }

    let period = Duration::from_millis(u64::from(pair.config.checkpoint_delay_ms));
    let deadline = Instant::now() + period * (checkpoints as u32) * 3 + Duration::from_secs(60);
    let mut latencies = Vec::new();
    loop {
        let checkpoints_now = pair
            .checkpoint_pauses(Role::Primary)
            .len()
            .min(pair.checkpoint_pauses(Role::Secondary).len());
        if checkpoints_now >= checkpoints {
            break;
        }
        if Instant::now() > deadline {
            report.record_checkpoints(&pair);
            bail!(
                "only {checkpoints_now} checkpoints before the deadline: {}",
                report.render()
            );
        }
        let next = Instant::now() + probe_every;
        report.http_requests += 1;
        match probe(&client, Duration::from_secs(10)).await {
            Ok(latency) => latencies.push(latency),
            Err(e) => report.http_failures.push(format!("{e:#}")),
        }
        tokio::time::sleep_until(next.into()).await;
    }
    report.record_checkpoints(&pair);
    report.record_http(&latencies);
    report.heartbeats = heartbeat_range(&pair, &before);
    report.guest_errors = guest_errors(&pair);
    report.svm_output_bytes = Some(pair.secondary_output_bytes()?);
    if !report.http_failures.is_empty() {
        pair.write_diagnostics().await;
    }
    report.save()?;
    Ok(report)
}

/// One line about what a `qmp-driver --json` command printed.
fn cli_summary(command: &str, json: &serde_json::Value) -> String {
    let num = |v: &serde_json::Value| v.as_f64().map_or("-".to_string(), |v| format!("{v:.1}"));
    match command {
        "start" => format!(
            "entered COLO {} ms after migrate",
            num(&json["entered_colo_ms"])
        ),
        "status" => format!(
            "primary {} / secondary {}, relay epoch {}, {} checkpoints",
            json["primary"]["colo_mode"].as_str().unwrap_or("?"),
            json["secondary"]["colo_mode"].as_str().unwrap_or("?"),
            json["relay"]["status"]["epoch"],
            json["relay"]["status"]["checkpoints"]
        ),
        "checkpoint" => format!(
            "forced: pause {} ms, relay epoch now {}",
            num(&json["pause_ms"]),
            json["relay"]["epoch"]
        ),
        "failover" => format!("{} ms in all (steps below)", num(&json["total_ms"])),
        _ => json.to_string(),
    }
}

/// Runs `qmp-driver --config <run dir>/pair.toml ARGS` (off the async threads: it blocks)
/// and returns the JSON it printed; a failing command is an error with its stderr.
async fn cli_json(pair: &StockPair, args: &[&str]) -> Result<serde_json::Value> {
    let dir = pair.dir.clone();
    let owned: Vec<String> = args.iter().map(ToString::to_string).collect();
    let out = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = owned.iter().map(String::as_str).collect();
        crate::stock::driver::run_cli_ok(&dir, &args)
    })
    .await
    .context("qmp-driver task")??;
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "qmp-driver {} printed no JSON: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

async fn fetch_text(client: &HttpClient, path: &str) -> Result<String> {
    let response = client.get(path, Fetch::default()).await?;
    if response.status != 200 {
        bail!("GET {path} answered {}", response.status);
    }
    Ok(String::from_utf8_lossy(&response.body).trim().to_string())
}

/// How long after a stalled link heals the abandoned secondary's daemons get to find their
/// peers again (their reconnect back-off is about a second) before the primary is asked again.
const STALE_PEER_GRACE: Duration = Duration::from_secs(5);

/// How long [`wait_for_barrier`]'s subscriber holds each barrier: long enough to kill a VM
/// inside it, shorter than the bed relay's ack bound (a barrier timeout would end COLO first).
const BARRIER_HOLD: Duration = Duration::from_millis(800);

/// Joins the relay as a slow synchronous subscriber and returns as soon as it received a
/// barrier event of `kind`: the checkpoint is then held at that point for [`BARRIER_HOLD`].
async fn wait_for_barrier(pair: &StockPair, kind: EventKind) -> Result<EventRecorder> {
    if pair.relay.is_none() {
        bail!("killing at a barrier event needs the relay");
    }
    let control = relay_control_path(&pair.dir);
    let holder =
        EventRecorder::connect(&control, "mid-checkpoint", AckPolicy::After(BARRIER_HOLD)).await?;
    let period = Duration::from_millis(u64::from(pair.config.checkpoint_delay_ms));
    let deadline = Instant::now() + period * 3 + Duration::from_secs(10);
    while holder.of_kind(kind).is_empty() {
        if Instant::now() > deadline {
            bail!("no {kind} event within {:?}", period * 3);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(holder)
}

/// How the failing side fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Its QEMU (and colo's daemons on its host) are SIGKILLed.
    Kill,
    /// Its host's uplink goes down: everything on it keeps running, silent ([`StockPair::cut_uplink`]).
    CutUplink,
    /// One of colo's daemons is SIGKILLed mid-epoch and started again at once, as its
    /// supervisor would ([`StockPair::restart_daemon`]); the VMs keep running. COLO cannot go
    /// on (the relay fails the next barrier), so the side named by `kill` stops being used.
    RestartDaemon(Daemon),
    /// The file system under the secondary's image (a tmpfs: [`PairConfig::secondary_fs_mib`])
    /// is filled up while COLO runs; everything keeps running.
    FillSecondaryDisk,
    /// Only the failing side's QEMU is frozen (SIGSTOP): its host, its daemons and every
    /// link stay up, so nothing breaks a connection; it just stops answering.
    FreezeQemu,
    /// The host dies silently ([`HaBed::die_silently`]): uplink down, its corosync killed,
    /// every other process of it frozen. Needs the HA agents.
    HostDeath,
    /// The path between the two hosts stalls at the switch (every packet dropped, no FIN, no
    /// link down; both hosts stay reachable by the client), and heals after the requests that
    /// follow the failover. No HA agents: the primary's watch agent must notice the stall and
    /// fail over to the primary (`kill` is the secondary); after the heal, the secondary's
    /// stale daemons reconnecting must not disturb the primary serving alone.
    StallLink,
    /// Only the path between the two hosts is cut, at the switch; both stay reachable by the
    /// client and the witness. The side named by `kill` is the one expected to lose (the
    /// cluster's tie-breaker gives the lowest node id, the primary's host, the vote). Needs
    /// the HA agents.
    Partition,
}

/// Options of a failover run.
#[derive(Debug, Clone)]
pub struct FailoverPlan {
    /// Which side fails.
    pub kill: Role,
    /// How it fails.
    pub failure: Failure,
    /// No one runs a failover: the primary's watch agent (`qmp-driver watch`, started with
    /// the pair) must notice and fail over by itself. Only for a failing secondary.
    pub watch_agent: bool,
    /// No one runs a failover: the HA agents (`qmp-driver agent` on both hosts, on a real
    /// corosync cluster with the witness's vote, [`HaBed`]) decide and fail over by themselves.
    pub ha_agents: bool,
    /// Checkpoints to complete before the failure.
    pub checkpoints_before: usize,
    /// Read rate of the in-flight download (bytes/s); 1 MiB at 128 KiB/s takes 8 s.
    pub download_rate: u64,
    /// How long the download runs before the kill.
    pub kill_after: Duration,
    /// New requests that must succeed after the failover.
    pub requests_after: usize,
    /// Drive the pair as an operator does: the relay, then `qmp-driver start`, `status`,
    /// `checkpoint` and `failover` run as commands against the run's `pair.toml`, instead of
    /// the same sequences called as a library.
    pub via_cli: bool,
    /// After the failover and the download: SIGKILL this daemon of the survivor's and start it
    /// again (a crash after COLO ended); the requests after the failover then test it.
    pub restart_after_failover: Option<Daemon>,
    /// Kill in the middle of a checkpoint: after `kill_after`, a test subscriber joins the
    /// relay and holds the next barrier event of this kind for a while; the VM dies while
    /// the barrier holds the checkpoint there. Needs the relay.
    pub kill_at_event: Option<EventKind>,
    /// How long each new request after the failure may take before the next is tried: a
    /// request sent into the outage waits for TCP's retransmission, so a long bound measures
    /// that, not when the survivor began to serve.
    pub first_request_timeout: Duration,
    /// Keep a connection to the guest's echo server exchanging data both ways from before
    /// the failure until the end ([`EchoSession`]).
    pub echo: bool,
}

impl Default for FailoverPlan {
    fn default() -> Self {
        FailoverPlan {
            kill: Role::Primary,
            failure: Failure::Kill,
            watch_agent: false,
            ha_agents: false,
            restart_after_failover: None,
            checkpoints_before: 3,
            download_rate: 128 * 1024,
            kill_after: Duration::from_millis(2500),
            requests_after: 10,
            via_cli: false,
            kill_at_event: None,
            first_request_timeout: Duration::from_secs(2),
            echo: false,
        }
    }
}

/// Waits until the watch agent's log says its failover is done (60 s); returns the steps it
/// logged, each as a step of the report.
async fn wait_watch_failover(watch: &DriverProcess, since: Instant) -> Result<Vec<Step>> {
    let deadline = since + Duration::from_secs(60);
    loop {
        let log = std::fs::read_to_string(&watch.log).unwrap_or_default();
        if log.contains("failover to the primary done") {
            return Ok(log
                .lines()
                .filter(|l| l.contains("failover") && l.contains("step="))
                .map(|l| Step {
                    side: Role::Primary,
                    what: l.split("step=").nth(1).unwrap_or(l).to_string(),
                    outcome: qmp_driver::pair::Outcome::Done,
                    ms: 0.0,
                    detail: None,
                })
                .collect());
        }
        if Instant::now() > deadline {
            bail!(
                "the watch agent did not fail over within 60 s: {}",
                watch.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One VM is SIGKILLed during a throttled download; the other takes over.
pub async fn failover(tag: &str, cfg: PairConfig, plan: FailoverPlan) -> Result<Report> {
    let name = format!(
        "failover-{}-{}{}{}{}",
        match plan.failure {
            Failure::Kill => "kill",
            Failure::CutUplink => "uplink",
            Failure::RestartDaemon(Daemon::Proxyd(Role::Primary)) => "rst-pxp",
            Failure::RestartDaemon(Daemon::Proxyd(Role::Secondary)) => "rst-pxs",
            Failure::RestartDaemon(Daemon::Blockd) => "rst-bd",
            Failure::FillSecondaryDisk => "full",
            Failure::HostDeath => "death",
            Failure::FreezeQemu => "freeze",
            Failure::Partition => "split",
            Failure::StallLink => "stall",
        },
        plan.kill.name(),
        if plan.via_cli { "-cli" } else { "" },
        if plan.watch_agent { "-watch" } else { "" },
        if plan.ha_agents { "-ha" } else { "" }
    );
    let needs_agents = matches!(plan.failure, Failure::HostDeath | Failure::Partition);
    if needs_agents && !plan.ha_agents {
        bail!("{:?} needs the HA agents (ha_agents)", plan.failure);
    }
    let cfg = PairConfig {
        witness: cfg.witness || plan.ha_agents,
        ..cfg
    };
    if plan.watch_agent && plan.kill != Role::Secondary {
        bail!("the watch agent only fails over to the primary");
    }
    let dir = crate::artifacts::run_dir(&name)?;
    let mut cli = Vec::new();
    let mut pair = if plan.via_cli {
        let mut pair = StockPair::launch(tag, dir, PairConfig { relay: true, ..cfg }).await?;
        cli.push((
            "start".to_string(),
            cli_json(&pair, &["start", "--json"]).await?,
        ));
        pair.wait_guest_in_colo().await?;
        pair
    } else {
        StockPair::start(tag, dir, cfg).await?
    };
    let mut report = Report::new(&name, &pair);
    report.cli = cli;
    // Stall bound 2 s: well above the bed's checkpoint pauses (tens of ms), well below the
    // client's patience.
    let watch = if plan.watch_agent {
        Some(DriverProcess::watch(
            &pair.dir,
            &["--stall-ms", "2000", "--probe-ms", "100"],
        )?)
    } else {
        None
    };
    // Declared after the pair: dropped first (its cluster runs on the pair's namespaces).
    let mut ha = if plan.ha_agents {
        Some(HaBed::start(&pair, &ClusterOptions::from_env()).await?)
    } else {
        None
    };
    let survivor = plan.kill.other();
    let client = HttpClient::new(&pair.topology.client, guest_server());
    let period = Duration::from_millis(u64::from(pair.config.checkpoint_delay_ms));
    pair.wait_checkpoints(
        plan.checkpoints_before,
        period * 10 + Duration::from_secs(30),
    )
    .await?;
    let before = heartbeats_now(&pair, &[survivor]);
    if plan.via_cli {
        for args in [
            &["status", "--json"][..],
            &["checkpoint", "--json"],
            &["status", "--json"],
        ] {
            let out = cli_json(&pair, args).await?;
            report.cli.push((args[0].to_string(), out));
        }
    }

    let mut latencies = Vec::new();
    for _ in 0..3 {
        report.http_requests += 1;
        match probe(&client, Duration::from_secs(10)).await {
            Ok(l) => latencies.push(l),
            Err(e) => report
                .http_failures
                .push(format!("before the failure: {e:#}")),
        }
    }
    let expected_md5 = fetch_text(&client, "/blob.md5").await?;

    let echo = if plan.echo {
        let server = SocketAddr::new(guest_server().ip(), ECHO_PORT);
        Some(EchoSession::start(
            &pair.topology.client,
            server,
            Duration::from_millis(50),
        )?)
    } else {
        None
    };
    let download = {
        let client = client.clone();
        let fetch = Fetch {
            rate: Some(plan.download_rate),
            read_timeout: Duration::from_secs(20),
        };
        tokio::spawn(async move { client.get("/blob", fetch).await })
    };
    tokio::time::sleep(plan.kill_after).await;

    report.svm_output_bytes = Some(pair.secondary_output_bytes()?);
    // Held so that its barrier is still open when the VM dies.
    let _holder = match plan.kill_at_event {
        Some(kind) => Some(wait_for_barrier(&pair, kind).await?),
        None => None,
    };
    // The failed side's VM may live on, abandoned (a cut uplink, a full disk): what its guest
    // reports after the failure is not the survivor's business.
    let failed_side_errors = pair
        .vm(plan.kill)
        .map(|vm| vm.serial_summary().errors.len())
        .unwrap_or(0);
    let killed_at = Instant::now();
    match plan.failure {
        Failure::Kill => pair.kill(plan.kill)?,
        Failure::CutUplink => pair.cut_uplink(plan.kill)?,
        Failure::RestartDaemon(daemon) => pair.restart_daemon(daemon)?,
        Failure::FreezeQemu => crate::process::freeze(
            pair.vm(plan.kill)?
                .process
                .pid()
                .context("the QEMU to freeze has no pid")?,
        )?,
        Failure::FillSecondaryDisk => {
            pair.small_fs
                .as_ref()
                .context("the pair has no small file system under the secondary's image")?
                .fill()?;
        }
        Failure::HostDeath => ha
            .as_mut()
            .context("a host death needs the HA agents")?
            .die_silently(&pair, plan.kill)?,
        Failure::Partition | Failure::StallLink => pair.topology.isolate_hosts(true)?,
    }
    report.killed = Some(plan.kill);
    report.failure = Some(match plan.failure {
        Failure::Kill => "SIGKILL",
        Failure::CutUplink => "uplink down, no FIN",
        Failure::RestartDaemon(Daemon::Proxyd(Role::Primary)) => "colo-proxyd primary restarted",
        Failure::RestartDaemon(Daemon::Proxyd(Role::Secondary)) => {
            "colo-proxyd secondary restarted"
        }
        Failure::RestartDaemon(Daemon::Blockd) => "colo-blockd restarted",
        Failure::FillSecondaryDisk => "the secondary's disk full",
        Failure::HostDeath => "host dies silently (uplink down, processes frozen)",
        Failure::FreezeQemu => "QEMU frozen (SIGSTOP), its host and links up",
        Failure::Partition => "the path between the hosts cut at the switch",
        Failure::StallLink => "the path between the hosts stalled (packets dropped, no FIN)",
    });
    report.killed_at_event = plan.kill_at_event.map(|k| k.to_string());
    if ha.is_some() {
        // The agents decide by themselves: the client's requests below measure when the
        // survivor serves; the agent's steps are collected afterwards (its log says "done"
        // only after its best-effort relay notification, which a dead relay delays).
    } else if let Some(watch) = &watch {
        report.failover_steps = wait_watch_failover(watch, killed_at).await?;
    } else if plan.via_cli {
        let out = cli_json(
            &pair,
            &["failover", "--survivor", survivor.name(), "--json"],
        )
        .await?;
        report.failover_steps = serde_json::from_value(out["steps"].clone())
            .context("reading the steps of `qmp-driver failover --json`")?;
        report.cli.push(("failover".to_string(), out));
    } else {
        report.failover_steps = match survivor {
            Role::Secondary => pair.failover_to_secondary().await?,
            Role::Primary => pair.failover_to_primary().await?,
        };
    }

    // The first new request that succeeds after the kill.
    report.kill_to_first_success_ms = first_answer(
        &client,
        plan.first_request_timeout,
        (&mut report, &mut latencies),
        (killed_at, "the failover"),
    )
    .await;

    if let Some(ha) = &ha {
        report.failover_steps = ha.wait_takeover(survivor, Duration::from_secs(60)).await?;
    }
    let started = Instant::now();
    let result = download.await.context("download task")?;
    report.download = Some(DownloadReport::of(result, expected_md5.clone(), started));

    if let Some(daemon) = plan.restart_after_failover {
        pair.restart_daemon(daemon)?;
        report.restarted_after_failover = Some(format!("{daemon:?}"));
        // The restarted daemon's path is back once QEMU has reconnected its chardevs, each on
        // its own `reconnect-ms` timer, and a chardev QEMU only writes to (the SVM's output,
        // the network's input) only after a write into it has failed: the first requests may
        // lose their SYN and its retransmissions to that gap (docs/operations.md, Restarts).
        // It is measured, as the takeover is; every request after it must be answered.
        report.restart_to_first_success_ms = first_answer(
            &client,
            plan.first_request_timeout,
            (&mut report, &mut latencies),
            (Instant::now(), "the restart"),
        )
        .await;
    }
    for _ in 0..plan.requests_after {
        report.http_requests += 1;
        match probe(&client, Duration::from_secs(5)).await {
            Ok(l) => {
                latencies.push(l);
                report.after_failover_ok += 1;
            }
            Err(e) => report
                .http_failures
                .push(format!("after the failover: {e:#}")),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !report.http_failures.is_empty() || !report.download.as_ref().is_some_and(DownloadReport::ok)
    {
        pair.write_diagnostics().await;
    }
    if plan.failure == Failure::StallLink {
        // The link heals. The secondary's daemons (abandoned, still running) find their peers
        // again; the primary, now serving alone, must not be disturbed by them.
        pair.topology.isolate_hosts(false)?;
        tokio::time::sleep(STALE_PEER_GRACE).await;
        for _ in 0..5 {
            report.http_requests += 1;
            match probe(&client, Duration::from_secs(5)).await {
                Ok(l) => latencies.push(l),
                Err(e) => report
                    .http_failures
                    .push(format!("after the stalled link healed: {e:#}")),
            }
        }
    }
    report.echo = echo.map(EchoSession::finish);
    if let Some(ha) = &ha {
        if plan.failure == Failure::Partition {
            // The minority side fences its VM once its quorum grace ends.
            ha.wait_state(plan.kill, Duration::from_secs(30), "fenced", |s| {
                s.vm == "fenced"
            })
            .await?;
            // The partition heals: the cluster is whole again, the loser stays fenced (an
            // operator re-protects the pair from the survivor), the survivor serves on.
            pair.topology.isolate_hosts(false)?;
            ha.wait_whole(Duration::from_secs(30))?;
            ha.wait_state(
                survivor,
                Duration::from_secs(30),
                "quorate again, its peer known as fenced",
                |s| s.quorate && s.peer.as_ref().is_some_and(|p| p.vm == "fenced"),
            )
            .await?;
            for _ in 0..3 {
                report.http_requests += 1;
                match probe(&client, Duration::from_secs(5)).await {
                    Ok(l) => latencies.push(l),
                    Err(e) => report
                        .http_failures
                        .push(format!("after the partition healed: {e:#}")),
                }
            }
        }
        report.ha = Some(HaReport::of(ha, survivor, plan.kill)?);
    }
    // The survivor keeps its heartbeat going on its own.
    let last_before = before.first().and_then(|(_, hb)| *hb).unwrap_or(0);
    pair.wait_serial(survivor, Duration::from_secs(10), |s| {
        s.last_heartbeat.unwrap_or(0) >= last_before + 2
    })
    .await
    .context("the survivor's heartbeat stopped")?;

    report.record_checkpoints(&pair);
    report.record_http(&latencies);
    report.heartbeats = heartbeat_range(&pair, &before);
    report.guest_errors = guest_errors_until(&pair, plan.kill, failed_side_errors);
    report.disk = Some(pair.stop_and_check_disk(survivor).await?);
    report.save()?;
    Ok(report)
}
