//! Failover in either direction, and the planned end of protection.
//!
//! The QMP sequences are the ones QEMU's COLO documentation gives, proven on
//! the test bed (`integration/src/stock/mod.rs` runs them), preceded by an
//! out-of-band `yank` of the migration stream: a peer that died can leave
//! QEMU's migration thread stuck on its socket, and yank (which QEMU runs
//! even while in-band commands hang) unsticks it.

use super::steps::{self, Journal, hmp};
use super::{Hook, Outcome, PairError, ProgressFn, Step, relay_link};
use crate::config::{DiskBackend, NetworkBackend, PairConfig};
use colo_qmp::QmpClient;
use colo_types::Role;
use colo_types::qemu_ids as ids;
use serde::Serialize;
use serde_json::json;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// How a failover runs.
#[derive(Debug)]
pub struct FailoverOptions<'a> {
    /// The hook run after the survivor left COLO (default: the config's).
    pub hook: Hook<'a>,
    /// Tell the relay (when configured and reachable) about the decision.
    pub notify_relay: bool,
    /// How long the survivor may take to run after the sequence.
    pub running_timeout: Duration,
    /// Bound of the hook's run time.
    pub hook_timeout: Duration,
    /// The caller already yanked the migration stream and the NBD child out of band (the
    /// watch agent does, to unstick a hung monitor at once): not again.
    pub links_yanked: bool,
}

impl Default for FailoverOptions<'_> {
    fn default() -> Self {
        FailoverOptions {
            hook: Hook::FromConfig,
            notify_relay: true,
            running_timeout: Duration::from_secs(10),
            hook_timeout: Duration::from_secs(60),
            links_yanked: false,
        }
    }
}

/// What a failover did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FailoverReport {
    /// The side that runs on.
    pub survivor: Role,
    /// The failover had already been done (the steps only tidied up what
    /// was left, if anything).
    pub already_done: bool,
    /// The steps, in order, each timed.
    pub steps: Vec<Step>,
    /// From the first QMP command to the survivor running, in ms.
    pub total_ms: f64,
    /// The survivor's run state at the end (`running`).
    pub runstate: String,
}

/// Options of [`stop_protection`].
pub type StopOptions<'a> = FailoverOptions<'a>;

/// What [`stop_protection`] did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StopReport {
    /// COLO had already ended on the primary.
    pub already_stopped: bool,
    /// The steps on both sides, in order.
    pub steps: Vec<Step>,
    /// What happened to the secondary QEMU: `quit`, `unreachable` (not
    /// quit) or why it was left alone.
    pub secondary: String,
    /// Total time in ms.
    pub total_ms: f64,
}

/// Checks that `side` is in COLO; `Ok(true)` when its failover was already
/// done (COLO mode `none`, last mode `side`).
async fn check_in_colo(
    qmp: &QmpClient,
    side: Role,
    journal: &mut Journal<'_, '_>,
    yanked: &mut bool,
) -> Result<bool, PairError> {
    let colo = steps::colo_status_unsticking(qmp, side, journal, yanked).await?;
    let last = colo.last_mode.as_deref().unwrap_or("none");
    if colo.mode == side.name() {
        return Ok(false);
    }
    if colo.mode == "none" && last == side.name() {
        return Ok(true);
    }
    let what = format!(
        "the {side} QEMU is not in COLO (COLO mode {}, last mode {last}, reason {})",
        colo.mode, colo.reason
    );
    let hint = if colo.mode == side.other().name() {
        format!(
            "It reports mode {}: are `primary.qmp` and `secondary.qmp` swapped in the config?",
            colo.mode
        )
    } else if side == Role::Secondary {
        "It never entered COLO, so it has no complete copy of the VM: do not let it take over. \
         If the primary still runs, use `failover --survivor primary`"
            .to_string()
    } else {
        "Nothing to fail over: COLO never ran on it".to_string()
    };
    Err(PairError::precondition(side, what, hint))
}

/// The secondary takes over after the primary died: yank the migration
/// stream (out of band, best effort), `nbd-server-stop`,
/// `x-colo-lost-heartbeat`, `object-del f2, f1`, `chardev-remove red1,
/// red0`, the hook (put the tap on the bridge), `announce-self`; then waits
/// until the VM runs and tells the relay.
///
/// Refuses a secondary that is not in COLO; one whose failover was already
/// done succeeds with [`FailoverReport::already_done`] (leftover filters and
/// chardevs are removed; the hook and announce run again only if something
/// was left).
pub async fn failover_to_secondary(
    secondary: &QmpClient,
    cfg: &PairConfig,
    opts: FailoverOptions<'_>,
    mut progress: ProgressFn<'_>,
) -> Result<FailoverReport, PairError> {
    let side = Role::Secondary;
    let started = Instant::now();
    let mut journal = Journal::new(&mut progress);
    let mut yanked = false;
    let already = check_in_colo(secondary, side, &mut journal, &mut yanked).await?;
    let mut end = Ending::new(&opts, already, started);
    if !already && !yanked {
        steps::yank_migration(secondary, side, &mut journal).await;
    }
    let mut changed = !already;
    match cfg.disk.backend {
        DiskBackend::Replication => {
            changed |= journal
                .idempotent(
                    side,
                    "nbd-server-stop",
                    &["not running"],
                    secondary.nbd_server_stop(),
                )
                .await?;
        }
        // The relay's failover event (sent in `finish`) tells colo-blockd to
        // keep the SVM's side.
        DiskBackend::ColoBlockd => journal.skipped(
            side,
            "nbd-server-stop",
            "disk.backend is colo-blockd: the relay's failover event switches it",
        ),
    }
    lost_heartbeat(secondary, side, already, &mut journal).await?;
    changed |= match cfg.network.backend {
        NetworkBackend::ColoCompare => {
            remove_secondary_filters(secondary, false, &mut journal).await?
        }
        NetworkBackend::ColoProxyd => {
            bridge_through_proxyd(secondary, cfg, already, &mut end, &mut journal).await?
        }
    };
    let mut hook_error = None;
    if changed {
        hook_error = run_hook(cfg, side, opts.hook, opts.hook_timeout, &mut journal).await;
        journal
            .run(side, "announce-self", secondary.announce_self())
            .await?;
    } else {
        journal.skipped(
            side,
            "hook and announce-self",
            "the failover was already complete",
        );
    }
    finish(secondary, cfg, side, end, hook_error, journal).await
}

/// The secondary's redirectors and their chardevs go: the SVM talks to its
/// tap directly. Returns whether anything was removed.
async fn remove_secondary_filters(
    secondary: &QmpClient,
    with_bridge: bool,
    journal: &mut Journal<'_, '_>,
) -> Result<bool, PairError> {
    let side = Role::Secondary;
    let mut changed = false;
    let bridge_filters = [
        ids::SECONDARY_NET_IN_REDIRECTOR,
        ids::SECONDARY_NET_OUT_REDIRECTOR,
    ];
    let bridge_chardevs = [ids::SECONDARY_NET_IN, ids::SECONDARY_NET_OUT];
    let bridge = |ids: [&'static str; 2]| {
        if with_bridge {
            ids.to_vec()
        } else {
            Vec::new()
        }
    };
    for id in bridge(bridge_filters)
        .into_iter()
        .chain([ids::SECONDARY_OUT_REDIRECTOR, ids::SECONDARY_IN_REDIRECTOR])
    {
        changed |= journal
            .idempotent(
                side,
                &format!("object-del {id}"),
                &["not found"],
                secondary.object_del(id),
            )
            .await?;
    }
    for id in bridge(bridge_chardevs)
        .into_iter()
        .chain([ids::SECONDARY_OUT, ids::SECONDARY_MIRROR_IN])
    {
        changed |= journal
            .idempotent(
                side,
                &format!("chardev-remove {id}"),
                &["not found"],
                secondary.chardev_remove(id),
            )
            .await?;
    }
    Ok(changed)
}

/// How long the bridge's chardevs may take to connect to colo-proxyd
/// secondary before the failover falls back to the direct path.
const BRIDGE_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// colo-proxyd: the SVM keeps its redirectors and gets two more, so that its
/// traffic goes on through colo-proxyd secondary, which rewrites the
/// sequence numbers of connections the SVM opened with another ISN than the
/// PVM (the clients know the PVM's). `red2`/`f3` carry its rewritten output
/// to the tap (queue=rx, before `f2`), `red3`/`f4` divert the tap's packets
/// to it (queue=tx, before `f1`), and `f1`/`f2`, which QEMU switched off at
/// its failover, are switched on again. The relay is told before the hook bridges
/// the tap, so the daemon bridges before the first packet from the network.
/// If the chardevs do not connect in time (no daemon, or one without the
/// bridge ports) the SVM is put on the direct path instead, and the steps
/// say that connections opened in the last epoch may break.
async fn bridge_through_proxyd(
    secondary: &QmpClient,
    cfg: &PairConfig,
    already: bool,
    end: &mut Ending,
    journal: &mut Journal<'_, '_>,
) -> Result<bool, PairError> {
    let side = Role::Secondary;
    let net = &cfg.network;
    let mut changed = false;
    for (id, port) in [
        (ids::SECONDARY_NET_OUT, net.net_output_port),
        (ids::SECONDARY_NET_IN, net.net_input_port),
    ] {
        let backend = json!({
            "type": "socket",
            "data": {
                "addr": { "type": "inet", "data": { "host": "127.0.0.1", "port": port.to_string() } },
                "server": false,
                "reconnect-ms": crate::qemu_args::RECONNECT_MS,
                "nodelay": true,
            }
        });
        changed |= journal
            .idempotent(
                side,
                &format!("chardev-add {id} (colo-proxyd 127.0.0.1:{port})"),
                &["already exists"],
                secondary.chardev_add(id, backend),
            )
            .await?;
    }
    let filters = [
        (
            ids::SECONDARY_NET_OUT_REDIRECTOR,
            json!({
                "qom-type": "filter-redirector", "id": ids::SECONDARY_NET_OUT_REDIRECTOR,
                "netdev": net.netdev, "queue": "rx", "indev": ids::SECONDARY_NET_OUT,
                "position": format!("id={}", ids::SECONDARY_OUT_REDIRECTOR), "insert": "before",
            }),
        ),
        (
            ids::SECONDARY_NET_IN_REDIRECTOR,
            json!({
                "qom-type": "filter-redirector", "id": ids::SECONDARY_NET_IN_REDIRECTOR,
                "netdev": net.netdev, "queue": "tx", "outdev": ids::SECONDARY_NET_IN,
                "position": format!("id={}", ids::SECONDARY_IN_REDIRECTOR), "insert": "before",
            }),
        ),
    ];
    for (id, props) in filters {
        changed |= journal
            .idempotent(
                side,
                &format!("object-add {id}"),
                &["duplicate"],
                secondary.object_add(props),
            )
            .await?;
    }
    // QEMU turns every net filter off at failover (COLO_EVENT_FAILOVER): the bridge needs
    // f1 and f2 again.
    for id in [ids::SECONDARY_IN_REDIRECTOR, ids::SECONDARY_OUT_REDIRECTOR] {
        let args = json!({ "path": format!("/objects/{id}"), "property": "status", "value": "on" });
        journal
            .run(
                side,
                &format!("qom-set {id} status=on"),
                secondary.execute_raw("qom-set", Some(args)),
            )
            .await?;
    }
    let wanted = [ids::SECONDARY_NET_OUT, ids::SECONDARY_NET_IN];
    let start = Instant::now();
    loop {
        let missing = steps::unconnected_chardevs(secondary, side, &wanted).await?;
        if missing.is_empty() {
            journal.record(Step {
                side,
                what: format!(
                    "colo-proxyd bridges the SVM ({} connected)",
                    wanted.join(", ")
                ),
                outcome: Outcome::Done,
                ms: start.elapsed().as_secs_f64() * 1000.0,
                detail: None,
            });
            break;
        }
        if start.elapsed() > BRIDGE_CONNECT_TIMEOUT {
            journal.record(Step {
                side,
                what: "colo-proxyd bridges the SVM".into(),
                outcome: Outcome::Failed,
                ms: start.elapsed().as_secs_f64() * 1000.0,
                detail: Some(format!(
                    "{} did not connect to colo-proxyd secondary on 127.0.0.1:{}/{} within \
                     {BRIDGE_CONNECT_TIMEOUT:?}: the SVM goes on the direct path, and \
                     connections it opened in the last epoch may break",
                    wanted.join(", "),
                    net.net_output_port,
                    net.net_input_port
                )),
            });
            return Ok(remove_secondary_filters(secondary, true, journal).await? || changed);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if end.notify_relay && !already {
        notify_relay(cfg, side, journal).await;
    }
    // Told already: `finish` must not announce it a second time.
    end.notify_relay = false;
    Ok(changed)
}

/// The primary carries on alone after the secondary died: yank the
/// migration stream and the NBD replication child (out of band, best
/// effort), remove the replication
/// child from the quorum (`x-blockdev-change ... children.1`, `drive_del`),
/// `object-del comp0, iothread1, m0, redire0, redire1`,
/// `x-colo-lost-heartbeat`, the hook; then waits until the VM runs and
/// tells the relay.
///
/// Refuses a primary that is not in COLO; one whose failover was already
/// done succeeds with [`FailoverReport::already_done`].
pub async fn failover_to_primary(
    primary: &QmpClient,
    cfg: &PairConfig,
    opts: FailoverOptions<'_>,
    mut progress: ProgressFn<'_>,
) -> Result<FailoverReport, PairError> {
    let side = Role::Primary;
    let started = Instant::now();
    let mut journal = Journal::new(&mut progress);
    let mut yanked = false;
    let already = check_in_colo(primary, side, &mut journal, &mut yanked).await?;
    let end = Ending::new(&opts, already, started);
    if !already && !yanked && !opts.links_yanked {
        steps::yank_migration(primary, side, &mut journal).await;
        // Before x-blockdev-change, which drains the child's requests: a
        // hung secondary would otherwise hang it.
        steps::yank_replication_child(primary, &mut journal).await;
    }
    let changed = primary_sequence(primary, cfg, already, &mut journal).await?;
    let hook_error = if changed {
        run_hook(cfg, side, opts.hook, opts.hook_timeout, &mut journal).await
    } else {
        journal.skipped(side, "hook", "the failover was already complete");
        None
    };
    finish(primary, cfg, side, end, hook_error, journal).await
}

/// What [`finish`] needs besides the journal (the hook is consumed before).
struct Ending {
    already: bool,
    started: Instant,
    notify_relay: bool,
    running_timeout: Duration,
}

impl Ending {
    fn new(opts: &FailoverOptions<'_>, already: bool, started: Instant) -> Self {
        Ending {
            already,
            started,
            notify_relay: opts.notify_relay,
            running_timeout: opts.running_timeout,
        }
    }
}

/// The primary's part, shared by failover and stop. Returns whether any
/// step changed something.
async fn primary_sequence(
    primary: &QmpClient,
    cfg: &PairConfig,
    already: bool,
    journal: &mut Journal<'_, '_>,
) -> Result<bool, PairError> {
    let side = Role::Primary;
    let mut changed = !already;
    let device = &cfg.disk.device;
    changed |= journal
        .idempotent(
            side,
            &format!("x-blockdev-change {device} -children.1"),
            &["does not have child"],
            primary.x_blockdev_change_remove(device, "children.1"),
        )
        .await?;
    let node = &cfg.disk.replication_node;
    changed |= match cfg.disk.backend {
        DiskBackend::Replication => {
            let drive_del = format!("drive_del {node}");
            journal
                .idempotent(side, &drive_del, &["not found"], hmp(primary, &drive_del))
                .await?
        }
        DiskBackend::ColoBlockd => {
            journal
                .idempotent(
                    side,
                    &format!("blockdev-del {node}"),
                    &["Failed to find node"],
                    primary.blockdev_del(node),
                )
                .await?
        }
    };
    for id in [
        ids::COMPARE,
        ids::COMPARE_IOTHREAD,
        ids::MIRROR_FILTER,
        ids::COMPARE_OUT_REDIRECTOR,
        ids::COMPARE_IN_REDIRECTOR,
    ] {
        changed |= journal
            .idempotent(
                side,
                &format!("object-del {id}"),
                &["not found"],
                primary.object_del(id),
            )
            .await?;
    }
    lost_heartbeat(primary, side, already, journal).await?;
    Ok(changed)
}

async fn lost_heartbeat(
    qmp: &QmpClient,
    side: Role,
    already: bool,
    journal: &mut Journal<'_, '_>,
) -> Result<(), PairError> {
    if already {
        journal.skipped(side, "x-colo-lost-heartbeat", "COLO already ended here");
        return Ok(());
    }
    journal
        .idempotent(
            side,
            "x-colo-lost-heartbeat",
            &["already activated"],
            qmp.x_colo_lost_heartbeat(),
        )
        .await
        .map(drop)
}

/// Waits for the survivor to run, tells the relay, builds the report.
async fn finish(
    qmp: &QmpClient,
    cfg: &PairConfig,
    side: Role,
    end: Ending,
    hook_error: Option<PairError>,
    mut journal: Journal<'_, '_>,
) -> Result<FailoverReport, PairError> {
    let runstate = wait_running(qmp, side, end.running_timeout, &mut journal).await?;
    if end.notify_relay && !end.already {
        notify_relay(cfg, side, &mut journal).await;
    }
    if let Some(e) = hook_error {
        return Err(e);
    }
    Ok(FailoverReport {
        survivor: side,
        already_done: end.already,
        steps: journal.steps,
        total_ms: end.started.elapsed().as_secs_f64() * 1000.0,
        runstate,
    })
}

async fn notify_relay(cfg: &PairConfig, survivor: Role, journal: &mut Journal<'_, '_>) {
    if let Some(relay) = &cfg.relay {
        journal
            .best_effort(
                Role::Secondary,
                &format!(
                    "notify relay {}: failover, survivor {survivor}",
                    relay.control.display()
                ),
                relay_link::notify_failover(&relay.control, survivor, relay_link::NOTIFY_TIMEOUT),
            )
            .await;
    }
}

async fn wait_running(
    qmp: &QmpClient,
    side: Role,
    within: Duration,
    journal: &mut Journal<'_, '_>,
) -> Result<String, PairError> {
    let start = Instant::now();
    let deadline = start + within;
    loop {
        let status = steps::runstate(qmp, side).await?;
        if status.running {
            journal.record(Step {
                side,
                what: "VM running".into(),
                outcome: Outcome::Done,
                ms: start.elapsed().as_secs_f64() * 1000.0,
                detail: None,
            });
            return Ok(status.status);
        }
        if Instant::now() > deadline {
            return Err(PairError::incomplete(
                side,
                format!(
                    "the VM does not run {within:?} after the failover (run state `{}`)",
                    status.status
                ),
                "QEMU may still be finishing the failover: check `qmp-driver status` and the \
                 QEMU's stderr",
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the hook. A failure is recorded as a failed step and returned so
/// that the caller still finishes the sequence (the VM must run whatever
/// the hook did) before reporting it.
async fn run_hook(
    cfg: &PairConfig,
    side: Role,
    hook: Hook<'_>,
    timeout: Duration,
    journal: &mut Journal<'_, '_>,
) -> Option<PairError> {
    let start = Instant::now();
    let (what, result) = match hook {
        Hook::Skip => {
            journal.skipped(side, "hook", "skipped on request");
            return None;
        }
        Hook::FromConfig => match cfg.failover.hook_for(side) {
            None => return None,
            Some(cmd) => (
                format!("hook `{cmd}`"),
                shell_hook(cfg, side, cmd, timeout).await,
            ),
        },
        Hook::Custom { what, run } => (what, run.await),
    };
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    match result {
        Ok(()) => {
            journal.record(Step {
                side,
                what,
                outcome: Outcome::Done,
                ms,
                detail: None,
            });
            None
        }
        Err(detail) => {
            journal.record(Step {
                side,
                what: what.clone(),
                outcome: Outcome::Failed,
                ms,
                detail: Some(detail.clone()),
            });
            Some(PairError::incomplete(
                side,
                format!("the {what} failed: {detail}"),
                "The VM runs, but the hook's work (e.g. putting its tap on the bridge) must be \
                 done by hand",
            ))
        }
    }
}

/// `sh -c CMD` with `COLO_PAIR` and `COLO_SURVIVOR` set; its output is
/// logged, never mixed into ours.
async fn shell_hook(
    cfg: &PairConfig,
    side: Role,
    cmd: &str,
    timeout: Duration,
) -> Result<(), String> {
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("COLO_PAIR", &cfg.name)
        .env("COLO_SURVIVOR", side.name())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run sh: {e}"))?;
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Err(_) => return Err(format!("still running after {timeout:?}; killed")),
        Ok(Err(e)) => return Err(format!("waiting for it: {e}")),
        Ok(Ok(out)) => out,
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for line in stdout.lines().chain(stderr.lines()) {
        tracing::info!(hook = cmd, "{line}");
    }
    if out.status.success() {
        Ok(())
    } else {
        let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Err(format!(
            "{}{}{}",
            out.status,
            if tail.is_empty() { "" } else { ": " },
            tail.join(" / ")
        ))
    }
}

/// Planned end of COLO, keeping the primary: the primary's failover
/// sequence without the yank (the secondary is alive, its stream is not
/// stuck), the primary's hook, then `quit` of the secondary QEMU if it is
/// reachable and still a COLO secondary.
///
/// Refuses when the secondary has taken over (it runs outside COLO): then
/// both VMs run and someone must decide which one is authoritative.
pub async fn stop_protection(
    primary: &QmpClient,
    secondary: Option<&QmpClient>,
    cfg: &PairConfig,
    opts: StopOptions<'_>,
    mut progress: ProgressFn<'_>,
) -> Result<StopReport, PairError> {
    let started = Instant::now();
    let mut journal = Journal::new(&mut progress);
    if let Some(sec) = secondary {
        let colo = steps::colo_status(sec, Role::Secondary).await?;
        let status = steps::runstate(sec, Role::Secondary).await?;
        if colo.mode == "none" && colo.last_mode.as_deref() == Some("secondary") && status.running {
            return Err(PairError::precondition(
                Role::Secondary,
                "the secondary has taken over (it runs outside COLO after a failover), so both \
                 VMs run",
                "Decide which VM is authoritative and quit the other one by hand; `stop` would \
                 keep the old primary",
            ));
        }
    }
    let mut yanked = false;
    let already = check_in_colo(primary, Role::Primary, &mut journal, &mut yanked).await?;
    let changed = primary_sequence(primary, cfg, already, &mut journal).await?;
    let hook_error = if changed {
        run_hook(
            cfg,
            Role::Primary,
            opts.hook,
            opts.hook_timeout,
            &mut journal,
        )
        .await
    } else {
        None
    };
    wait_running(primary, Role::Primary, opts.running_timeout, &mut journal).await?;
    let secondary_outcome = match secondary {
        None => "unreachable: not quit (quit it by hand if it still runs)".to_string(),
        Some(sec) => quit_secondary(sec, &mut journal).await?,
    };
    if opts.notify_relay && !already {
        notify_relay(cfg, Role::Primary, &mut journal).await;
    }
    if let Some(e) = hook_error {
        return Err(e);
    }
    Ok(StopReport {
        already_stopped: already,
        steps: journal.steps,
        secondary: secondary_outcome,
        total_ms: started.elapsed().as_secs_f64() * 1000.0,
    })
}

/// Quits the secondary QEMU unless it runs a VM of its own.
async fn quit_secondary(
    sec: &QmpClient,
    journal: &mut Journal<'_, '_>,
) -> Result<String, PairError> {
    let side = Role::Secondary;
    let colo = match sec.query_colo_status().await {
        Ok(c) => c,
        Err(e) if e.is_disconnected() => {
            journal.skipped(side, "quit", "the secondary QEMU is already gone");
            return Ok("gone".to_string());
        }
        Err(source) => {
            return Err(PairError::Qmp {
                side,
                step: "query-colo-status".into(),
                source,
            });
        }
    };
    let status = steps::runstate(sec, side).await?;
    if colo.mode == "none" && status.running {
        let why = format!(
            "it runs outside COLO (run state {}): left alone",
            status.status
        );
        journal.skipped(side, "quit", why.clone());
        return Ok(why);
    }
    journal.run(side, "quit", sec.quit()).await?;
    Ok("quit".to_string())
}
