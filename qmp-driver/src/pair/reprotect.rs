//! Online re-protect: a primary that serves alone after a failover gets a new secondary while
//! its guest keeps running, and the pair goes back into COLO.
//!
//! Only the layout of colo's own daemons (`disk.backend = "colo-blockd"`, `network.backend =
//! "colo-proxyd"`, the relay) with the **primary** as the survivor is implemented. The new
//! secondary host runs, before this starts: the relay (the old one, or a new one),
//! `colo-blockd serve --export base=S.raw` on a port of its own (the copy's target),
//! `colo-blockd secondary --image S.raw` (the same image: `serve` takes no lock, and nothing
//! reads the image through `secondary` before COLO begins, because the SVM waits for its
//! migration), colo-proxyd secondary and the secondary QEMU (`-incoming defer`).
//!
//! Why the copy goes through `serve` and not through colo-blockd's `replica` export:
//! `replica` keeps the primary's writes in the PVM log and the SVM reads the image without
//! them until the first `checkpoint-adopted`, so a copy written there would be invisible to
//! the SVM during its first epoch. `serve` writes the image itself.
//!
//! The sequence, with the guest running until the switch:
//!
//! 1. `prepare-secondary` (x-colo, `migrate-incoming`) and a wait for the secondary's
//!    redirectors to connect to colo-proxyd secondary;
//! 2. **copy**: an NBD node on the target (`blockdev-add`, with `[tls]` STARTTLS with the
//!    primary's credentials, as the replication child), then `blockdev-mirror` of
//!    `disk.device` (the quorum) into it, `sync=full` (which also writes the zeros: an NBD
//!    node is not known to read as zeros), `copy-mode=write-blocking` (once the bulk is copied, a guest write
//!    completes only when it is on both disks, so the job stays ready and the switch needs no
//!    catch-up); progress from `query-block-jobs` (bytes, rate, ETA) until it is ready;
//! 3. **memory**: x-colo and `pause-before-switchover` on, `x-checkpoint-delay`, `migrate`
//!    through the relay; the guest runs while RAM is sent; QEMU stops the VM and waits in
//!    `pre-switchover`;
//! 4. **switch** (VM stopped anyway): `block-job-cancel` of the ready mirror (which completes
//!    it without pivoting: the target holds the disk as it is now) and `blockdev-del` of
//!    its node (its NBD connection closes before the switch), the NBD child of
//!    colo-blockd's `replica` into the quorum (`blockdev-add`, `x-blockdev-change`), the
//!    primary's filters (`m0`, `redire0`, `redire1`, which the failover removed) with
//!    `object-add`, then `migrate-continue`: the device state goes over and COLO begins. The
//!    relay's `colo-started` turns colo-proxyd primary back to comparing;
//! 5. a wait until both VMs run in COLO.
//!
//! A failure before the switch leaves the primary as it was (the mirror job and a migration
//! are cancelled, the NBD child and the filters removed); the guest runs on.

use super::steps::{self, Journal};
use super::{Outcome, PairError, Progress, ProgressFn, Step};
use crate::config::{DiskBackend, NetworkBackend, PairConfig, TLS_CREDS_ID};
use colo_qmp::QmpClient;
use colo_types::Role;
use colo_types::qemu_ids as ids;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// The job id of the re-protect's disk copy (so that a second run finds an interrupted one).
pub const REPROTECT_JOB: &str = "colo-reprotect";

/// The export `colo-blockd serve` offers the copy under, by default.
pub const DEFAULT_REPROTECT_EXPORT: &str = "base";

/// `nbd://secondary.host:(disk.nbd_port + 1)/base`: `serve` needs a port of its own, since
/// `colo-blockd secondary` already listens on `disk.nbd_port`.
pub fn default_reprotect_target(cfg: &PairConfig) -> String {
    format!(
        "nbd://{}:{}/{DEFAULT_REPROTECT_EXPORT}",
        cfg.secondary.host,
        cfg.disk.nbd_port.saturating_add(1)
    )
}

/// Options of [`reprotect`].
#[derive(Debug, Clone)]
pub struct ReprotectOptions {
    /// The NBD export the disk is copied to (`colo-blockd serve` on the new secondary's
    /// image), `nbd://HOST:PORT/EXPORT`.
    pub target: String,
    /// Longest wait for the copy to be ready.
    pub copy_timeout: Duration,
    /// Bound on the copy's background rate in bytes/s (`blockdev-mirror`'s `speed`), so that it
    /// leaves the link and the disks room for the guest; 0: none. The guest's own writes
    /// during the copy are not bound by it (write-blocking copies them as they happen).
    pub speed: u64,
    /// Longest wait for the memory migration to reach the switch, and then for COLO.
    pub migrate_timeout: Duration,
    /// Longest wait for the secondary's redirectors to connect to colo-proxyd secondary.
    pub chardev_timeout: Duration,
    /// Polling interval.
    pub poll: Duration,
}

impl ReprotectOptions {
    /// The defaults, copying to `target`.
    pub fn new(target: String) -> Self {
        ReprotectOptions {
            target,
            copy_timeout: Duration::from_secs(3600),
            speed: 0,
            migrate_timeout: Duration::from_secs(600),
            chardev_timeout: Duration::from_secs(15),
            poll: Duration::from_millis(100),
        }
    }
}

/// One phase of the re-protect and how long it took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Phase {
    /// `prepare`, `copy`, `memory`, `switch` or `enter-colo`.
    pub name: String,
    /// Its duration in ms.
    pub ms: f64,
}

/// What [`reprotect`] did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReprotectReport {
    /// The steps on both sides, in order.
    pub steps: Vec<Step>,
    /// The phases, in order.
    pub phases: Vec<Phase>,
    /// The copy job's `len` when it was ready: the disk's size, plus what the guest dirtied
    /// again before the job got there.
    pub disk_bytes: u64,
    /// Bytes the mirror job wrote (its final `offset`: the disk plus what the guest rewrote
    /// during the copy).
    pub bytes_copied: u64,
    /// RAM bytes the migration sent up to the switch.
    pub ram_bytes: u64,
    /// The guest's pause at the switch: from `pre-switchover` (QEMU stopped the VM) to both
    /// VMs running in COLO, in ms. The migration's own stop before `pre-switchover` (its
    /// `downtime`) is in [`ReprotectReport::migration_downtime_ms`].
    pub switch_pause_ms: f64,
    /// QEMU's `downtime` of the migration into COLO, when it reports one.
    pub migration_downtime_ms: Option<f64>,
    /// From the first command to COLO, in ms.
    pub total_ms: f64,
}

/// The progress line of the copy: share, bytes, rate and time left.
fn copy_progress(done: u64, len: u64, elapsed: Duration) -> String {
    if len > 0 && done >= len {
        // QEMU counts holes as done at once; the job is ready only when its last (rate-bound)
        // writes are on the target.
        return format!(
            "the copy: {:.1} MiB accounted for, waiting for the mirror to be in step",
            len as f64 / MIB
        );
    }
    let percent = (done.saturating_mul(100)).checked_div(len).unwrap_or(0);
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
    let eta = if rate > 0.0 && len > done {
        format!("{:.0} s", (len - done) as f64 / rate)
    } else {
        "-".to_string()
    };
    format!(
        "the copy: {percent}% ({:.1} of {:.1} MiB), {:.1} MiB/s, ETA {eta}",
        done as f64 / MIB,
        len as f64 / MIB,
        rate / MIB
    )
}

const MIB: f64 = 1024.0 * 1024.0;

/// Refuses what this first version does not do, before anything changes.
fn check_config(cfg: &PairConfig) -> Result<(), PairError> {
    require_colo_daemons(cfg, Role::Primary, "online re-protect", "re-protect")
}

/// `what` (a move of the running VM) needs colo's own daemons: colo-blockd, colo-proxyd, a
/// relay; otherwise it is done offline, `how_offline`.
pub(super) fn require_colo_daemons(
    cfg: &PairConfig,
    side: Role,
    what: &str,
    how_offline: &str,
) -> Result<(), PairError> {
    if cfg.disk.backend != DiskBackend::ColoBlockd
        || cfg.network.backend != NetworkBackend::ColoProxyd
        || cfg.relay.is_none()
    {
        return Err(PairError::precondition(
            side,
            format!(
                "{what} is implemented for colo's own daemons only (disk.backend = \
                 \"colo-blockd\", network.backend = \"colo-proxyd\", a [relay])"
            ),
            format!(
                "With QEMU's block replication or colo-compare, {how_offline} offline \
                 (docs/operations.md, \"Re-protect\")"
            ),
        ));
    }
    Ok(())
}

/// What QEMU says when `object-add` meets an id already taken (10.0: "attempt to add
/// duplicate property '<id>' to object (type 'container')"; older wordings too).
pub(super) const OBJECT_EXISTS: &[&str] = &["duplicate property", "already exists", "Duplicate ID"];

/// The node the copy writes to: an NBD client of `colo-blockd serve` (with `[tls]` over
/// STARTTLS, as the replication child), added before the mirror and deleted after it.
pub const REPROTECT_TARGET_NODE: &str = "colo-reprotect-target";

/// Where `colo-blockd serve` offers the new secondary's image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdTarget {
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Export name.
    pub export: String,
}

/// Parses `nbd://HOST:PORT/EXPORT` (`HOST` may be `[v6]`): the copy's target is a
/// `blockdev-add`ed NBD node, which takes its server and export apart.
pub fn nbd_target(uri: &str) -> Result<NbdTarget, PairError> {
    let bad = |why: &str| {
        PairError::precondition(
            Role::Primary,
            format!("the copy target {uri:?} {why}"),
            "Give --target nbd://HOST:PORT/EXPORT (colo-blockd serve's --tcp and --export)",
        )
    };
    let rest = uri
        .strip_prefix("nbd://")
        .ok_or_else(|| bad("is not an nbd:// address"))?;
    let (authority, export) = rest.split_once('/').ok_or_else(|| bad("names no export"))?;
    let (host, port) = authority
        .rsplit_once(':')
        .ok_or_else(|| bad("names no port"))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| bad("has no valid port"))?;
    if host.is_empty() || export.is_empty() {
        return Err(bad("lacks a host or an export"));
    }
    Ok(NbdTarget {
        host: host.to_owned(),
        port,
        export: export.to_owned(),
    })
}

/// The copy target's `blockdev-add` options; with `tls_hostname` the client speaks STARTTLS
/// with the source's credentials ([`TLS_CREDS_ID`]) and accepts only that host's certificate.
fn target_node_options(target: &NbdTarget, tls_hostname: Option<&str>) -> Value {
    let mut options = json!({
        "driver": "nbd",
        "node-name": REPROTECT_TARGET_NODE,
        "server": { "type": "inet", "host": target.host, "port": target.port.to_string() },
        "export": target.export,
    });
    if let Some(hostname) = tls_hostname {
        options["tls-creds"] = json!(TLS_CREDS_ID);
        options["tls-hostname"] = json!(hostname);
    }
    options
}

/// The primary must run outside COLO, with no migration under way.
async fn check_primary(primary: &QmpClient) -> Result<(), PairError> {
    let side = Role::Primary;
    let colo = steps::colo_status(primary, side).await?;
    if colo.mode != "none" {
        return Err(PairError::precondition(
            side,
            format!("the primary is in COLO (mode {})", colo.mode),
            "Re-protect a primary that serves alone after a failover (`qmp-driver failover \
             --survivor primary`)",
        ));
    }
    let status = steps::runstate(primary, side).await?;
    if !status.running {
        return Err(PairError::precondition(
            side,
            format!(
                "the primary's VM does not run (run state {})",
                status.status
            ),
            "Re-protect is for a running survivor; a paused primary that never ran is \
             protected with `copy-disk` and `start`",
        ));
    }
    let mig = steps::migration(primary, side).await?;
    if let Some(s) = mig.status.as_deref()
        && [
            "setup",
            "active",
            "device",
            "pre-switchover",
            "wait-unplug",
            "colo",
        ]
        .contains(&s)
    {
        return Err(PairError::precondition(
            side,
            format!("a migration is already `{s}` on the primary"),
            "Wait for it to end, or `migrate_cancel` it, then run reprotect again",
        ));
    }
    Ok(())
}

/// Brings a new secondary into COLO with the primary's guest running; see the module.
///
/// Refuses ([`PairError::Precondition`], nothing changed) a pair not on colo's daemons, a
/// primary in COLO or not running, a secondary not waiting for its migration. A failure
/// after the first change is undone on the primary before it is returned: the
/// guest serves on, unprotected, and the secondary QEMU must be restarted.
pub async fn reprotect(
    primary: &QmpClient,
    secondary: &QmpClient,
    cfg: &PairConfig,
    opts: &ReprotectOptions,
    mut progress: ProgressFn<'_>,
) -> Result<ReprotectReport, PairError> {
    check_config(cfg)?;
    let target = nbd_target(&opts.target)?;
    check_primary(primary).await?;
    let started = Instant::now();
    let mut journal = Journal::new(&mut progress);
    let mut report = ReprotectReport {
        steps: Vec::new(),
        phases: Vec::new(),
        disk_bytes: 0,
        bytes_copied: 0,
        ram_bytes: 0,
        switch_pause_ms: 0.0,
        migration_downtime_ms: None,
        total_ms: 0.0,
    };
    match run(
        primary,
        secondary,
        cfg,
        opts,
        &target,
        &mut journal,
        &mut report,
    )
    .await
    {
        Ok(()) => {
            report.steps = journal.steps;
            report.total_ms = started.elapsed().as_secs_f64() * 1000.0;
            Ok(report)
        }
        Err(e) => {
            journal.note(Progress::Step(Step {
                side: e.side(),
                what: "re-protect failed; undoing it on the primary".into(),
                outcome: Outcome::Failed,
                ms: 0.0,
                detail: Some(e.to_string()),
            }));
            undo(primary, cfg, &mut journal).await;
            Err(e)
        }
    }
}

async fn run(
    primary: &QmpClient,
    secondary: &QmpClient,
    cfg: &PairConfig,
    opts: &ReprotectOptions,
    target: &NbdTarget,
    journal: &mut Journal<'_, '_>,
    report: &mut ReprotectReport,
) -> Result<(), PairError> {
    let p = Role::Primary;
    let mut phase = Instant::now();

    // 1. The secondary listens, its redirectors are connected to colo-proxyd secondary.
    let prepared = super::prepare_secondary(secondary, cfg, &mut |p| journal.note(p)).await?;
    journal.steps.extend(prepared.steps);
    if prepared.already_in_colo {
        return Err(PairError::precondition(
            Role::Secondary,
            "the secondary already runs in COLO",
            "It belongs to another pair: quit it and start a new secondary QEMU",
        ));
    }
    wait_secondary_redirectors(secondary, opts, journal).await?;
    end_phase(&mut phase, report, "prepare", journal);

    // 2. The disk copy, the guest running.
    let tls = cfg.tls.as_ref().map(|t| t.secondary.name.as_str());
    start_copy(primary, p, &cfg.disk.device, target, tls, opts, journal).await?;
    let (len, written) = wait_ready(primary, p, opts, journal).await?;
    report.disk_bytes = len;
    end_phase(&mut phase, report, "copy", journal);

    // 3. The memory, the guest running until QEMU stops it for the switch.
    let caps = steps::capabilities(primary, p).await?;
    steps::enable_colo_capabilities(primary, p, &caps, journal).await?;
    if !steps::capability(&caps, "pause-before-switchover") {
        journal
            .run(
                p,
                "migrate-set-capabilities pause-before-switchover=on",
                primary.migrate_set_capabilities(&[("pause-before-switchover", true)]),
            )
            .await?;
    }
    let delay = cfg.migration.checkpoint_delay_ms;
    journal
        .run(
            p,
            &format!("migrate-set-parameters x-checkpoint-delay={delay}"),
            primary.migrate_set_parameters(json!({ "x-checkpoint-delay": delay })),
        )
        .await?;
    steps::set_migration_tls(primary, cfg, journal).await?;
    let migration_target = cfg.migration.primary_target.to_string();
    journal
        .run(
            p,
            &format!("migrate {migration_target}"),
            primary.migrate(&migration_target),
        )
        .await?;
    report.ram_bytes = wait_pre_switchover(primary, p, opts, journal).await?;
    let switch_started = Instant::now();
    end_phase(&mut phase, report, "memory", journal);

    // 4. The switch: the VM is stopped.
    journal
        .run(
            p,
            &format!("block-job-cancel {REPROTECT_JOB} (ready: completes without pivot)"),
            primary.execute_raw("block-job-cancel", Some(json!({ "device": REPROTECT_JOB }))),
        )
        .await?;
    report.bytes_copied = wait_job_gone(primary, p, journal).await?.max(written);
    delete_target_node(primary, p, journal).await?;
    add_child(primary, cfg, journal).await?;
    add_filters(primary, cfg, journal).await?;
    journal
        .run(
            p,
            "migrate-continue pre-switchover",
            primary.execute_raw(
                "migrate-continue",
                Some(json!({ "state": "pre-switchover" })),
            ),
        )
        .await?;
    end_phase(&mut phase, report, "switch", journal);

    // 5. COLO.
    wait_colo(primary, secondary, opts, journal).await?;
    report.switch_pause_ms = switch_started.elapsed().as_secs_f64() * 1000.0;
    let info = steps::migration(primary, p).await?;
    report.migration_downtime_ms = info.extra["downtime"].as_f64();
    end_phase(&mut phase, report, "enter-colo", journal);
    journal.note(Progress::EnteredColo {
        after: Duration::from_secs_f64(report.phases.iter().map(|ph| ph.ms).sum::<f64>() / 1e3),
    });
    Ok(())
}

/// Closes a phase: records its time and shows it (as a step of the progress, not of the
/// report, which has the phases apart).
fn end_phase(
    phase: &mut Instant,
    report: &mut ReprotectReport,
    name: &'static str,
    journal: &mut Journal<'_, '_>,
) {
    let ms = phase.elapsed().as_secs_f64() * 1000.0;
    journal.note(Progress::Step(Step {
        side: Role::Primary,
        what: format!("phase {name} done"),
        outcome: Outcome::Done,
        ms,
        detail: None,
    }));
    report.phases.push(Phase {
        name: name.to_string(),
        ms,
    });
    *phase = Instant::now();
}

async fn wait_secondary_redirectors(
    secondary: &QmpClient,
    opts: &ReprotectOptions,
    journal: &mut Journal<'_, '_>,
) -> Result<(), PairError> {
    let side = Role::Secondary;
    let wanted = [ids::SECONDARY_MIRROR_IN, ids::SECONDARY_OUT];
    let start = Instant::now();
    loop {
        let missing = steps::unconnected_chardevs(secondary, side, &wanted).await?;
        if missing.is_empty() {
            journal.record(Step {
                side,
                what: format!("redirectors connected: {}", wanted.join(", ")),
                outcome: Outcome::Done,
                ms: start.elapsed().as_secs_f64() * 1000.0,
                detail: None,
            });
            return Ok(());
        }
        if start.elapsed() > opts.chardev_timeout {
            return Err(PairError::precondition(
                side,
                format!(
                    "the secondary's redirectors {} did not connect within {:?}",
                    wanted.join(", "),
                    opts.chardev_timeout
                ),
                "Start colo-proxyd secondary on the secondary host before its QEMU \
                 (`qmp-driver daemon-args --daemon colo-proxyd-secondary`)",
            ));
        }
        tokio::time::sleep(opts.poll).await;
    }
}

/// Starts the live copy of `device` on `source` into the NBD export `target` (or finds an
/// interrupted one still running): an NBD node of the target (with `tls_hostname`, STARTTLS
/// with the source's client credentials `TLS_CREDS_ID`), then `blockdev-mirror`, `sync=full`,
/// `copy-mode=write-blocking`. Shared by the re-protect and the failback.
pub(super) async fn start_copy(
    source: &QmpClient,
    side: Role,
    device: &str,
    target: &NbdTarget,
    tls_hostname: Option<&str>,
    opts: &ReprotectOptions,
    journal: &mut Journal<'_, '_>,
) -> Result<(), PairError> {
    if find_job(source).await?.is_some() {
        journal.skipped(
            side,
            "blockdev-mirror",
            format!("job {REPROTECT_JOB} already runs; waiting for it"),
        );
        return Ok(());
    }
    let tls = if tls_hostname.is_some() { ", TLS" } else { "" };
    journal
        .idempotent(
            side,
            &format!(
                "blockdev-add {REPROTECT_TARGET_NODE} (nbd {}{tls})",
                opts.target
            ),
            &["Duplicate nodes", "already exists"],
            source.blockdev_add(target_node_options(target, tls_hostname)),
        )
        .await?;
    let mut args = json!({
        "job-id": REPROTECT_JOB,
        "device": device,
        "target": REPROTECT_TARGET_NODE,
        "sync": "full",
        "copy-mode": "write-blocking",
    });
    if opts.speed > 0 {
        args["speed"] = json!(opts.speed);
    }
    journal
        .run(
            side,
            &format!(
                "blockdev-mirror {device} → {REPROTECT_TARGET_NODE} (sync=full, \
                 copy-mode=write-blocking)"
            ),
            source.execute_raw("blockdev-mirror", Some(args)),
        )
        .await?;
    Ok(())
}

pub(super) async fn find_job(primary: &QmpClient) -> Result<Option<Value>, PairError> {
    super::copy::block_job(primary, REPROTECT_JOB).await
}

/// Polls the mirror until it is ready, with progress at most once a second; returns the
/// disk's size and the bytes written so far.
pub(super) async fn wait_ready(
    primary: &QmpClient,
    side: Role,
    opts: &ReprotectOptions,
    journal: &mut Journal<'_, '_>,
) -> Result<(u64, u64), PairError> {
    let start = Instant::now();
    let mut last_note: Option<Instant> = None;
    loop {
        let Some(job) = find_job(primary).await? else {
            return Err(PairError::incomplete(
                side,
                format!("the copy job {REPROTECT_JOB} ended before it was ready"),
                "The target may have gone away or refused a write: check that `colo-blockd \
                 serve` runs on the target host with the image writable and at least as \
                 large as the disk, and the source QEMU's log; then run the command again",
            ));
        };
        let (done, len) = (
            job["offset"].as_u64().unwrap_or(0),
            job["len"].as_u64().unwrap_or(0),
        );
        if job["ready"] == true {
            journal.record(Step {
                side,
                what: format!("copy ready ({done} bytes written)"),
                outcome: Outcome::Done,
                ms: start.elapsed().as_secs_f64() * 1000.0,
                detail: None,
            });
            return Ok((len, done));
        }
        if last_note.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            last_note = Some(Instant::now());
            journal.note(Progress::Waiting(copy_progress(done, len, start.elapsed())));
        }
        if start.elapsed() > opts.copy_timeout {
            return Err(PairError::incomplete(
                side,
                format!(
                    "the copy was not ready within {:?} ({done} of {len} bytes)",
                    opts.copy_timeout
                ),
                "Give it longer (--copy-timeout) and check the link to the target host",
            ));
        }
        tokio::time::sleep(opts.poll).await;
    }
}

/// Waits until the migration pauses before the switch (the VM stopped); returns the RAM bytes
/// sent. The mirror must stay alive meanwhile.
pub(super) async fn wait_pre_switchover(
    primary: &QmpClient,
    side: Role,
    opts: &ReprotectOptions,
    journal: &mut Journal<'_, '_>,
) -> Result<u64, PairError> {
    let start = Instant::now();
    let mut last_percent = None;
    let mut polls = 0u32;
    loop {
        polls = polls.wrapping_add(1);
        let info = steps::migration(primary, side).await?;
        let status = info.status.clone().unwrap_or_default();
        let ram = &info.extra["ram"];
        match status.as_str() {
            "pre-switchover" => {
                journal.record(Step {
                    side,
                    what: "migration paused before the switch (VM stopped)".into(),
                    outcome: Outcome::Done,
                    ms: start.elapsed().as_secs_f64() * 1000.0,
                    detail: None,
                });
                return Ok(ram["transferred"].as_u64().unwrap_or(0));
            }
            "failed" | "cancelled" | "cancelling" | "completed" | "colo" => {
                let desc = info.extra["error-desc"].as_str().unwrap_or("no error-desc");
                return Err(PairError::incomplete(
                    side,
                    format!("the migration is `{status}`: {desc}"),
                    "Look at the target QEMU's stderr (and the relay's log, when it goes \
                     through the relay); restart the target QEMU with -incoming defer and run \
                     the command again",
                ));
            }
            _ => {}
        }
        if let (Some(total), Some(remaining)) = (ram["total"].as_u64(), ram["remaining"].as_u64())
            && total > 0
        {
            let percent = total.saturating_sub(remaining) * 100 / total;
            if last_percent != Some(percent) && percent.is_multiple_of(10) {
                journal.note(Progress::Waiting(format!(
                    "the memory: {percent}% of {:.0} MiB, {:.1} MiB sent",
                    total as f64 / MIB,
                    ram["transferred"].as_u64().unwrap_or(0) as f64 / MIB
                )));
            }
            last_percent = Some(percent);
        }
        // The job is checked every 10th poll; the migration's state every 10 ms, because the
        // VM stays stopped from `pre-switchover` until this loop notices it.
        if polls.is_multiple_of(10) && find_job(primary).await?.is_none() {
            return Err(PairError::incomplete(
                side,
                format!("the copy job {REPROTECT_JOB} ended during the memory migration"),
                "The target host's `colo-blockd serve` may have gone away; run the command \
                 again",
            ));
        }
        if start.elapsed() > opts.migrate_timeout {
            return Err(PairError::incomplete(
                side,
                format!(
                    "the memory migration did not reach the switch within {:?} (status \
                     `{status}`)",
                    opts.migrate_timeout
                ),
                "A guest dirtying memory faster than the link sends it never converges: \
                 raise the migration's downtime-limit or bandwidth",
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits for the cancelled (ready) mirror to end; returns the bytes it wrote.
pub(super) async fn wait_job_gone(
    primary: &QmpClient,
    side: Role,
    journal: &mut Journal<'_, '_>,
) -> Result<u64, PairError> {
    let start = Instant::now();
    let mut written = 0;
    while let Some(job) = find_job(primary).await? {
        written = job["offset"].as_u64().unwrap_or(written);
        if start.elapsed() > Duration::from_secs(30) {
            return Err(PairError::incomplete(
                side,
                format!("the copy job {REPROTECT_JOB} did not end after block-job-cancel"),
                "Check `query-block-jobs` on that QEMU",
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    journal.record(Step {
        side,
        what: format!("copy job ended ({written} bytes written in all)"),
        outcome: Outcome::Done,
        ms: start.elapsed().as_secs_f64() * 1000.0,
        detail: None,
    });
    Ok(written)
}

/// The NBD child of colo-blockd's `replica` export into the quorum.
async fn add_child(
    primary: &QmpClient,
    cfg: &PairConfig,
    journal: &mut Journal<'_, '_>,
) -> Result<(), PairError> {
    let p = Role::Primary;
    let node = &cfg.disk.replication_node;
    let export = cfg.disk.primary_child_export();
    let (host, port) = (&cfg.secondary.host, cfg.disk.nbd_port);
    let options = super::start::blockd_child_options(cfg);
    journal
        .idempotent(
            p,
            &format!("blockdev-add {node} (nbd {host}:{port} {export})"),
            &["Duplicate nodes", "already exists"],
            primary.blockdev_add(options),
        )
        .await?;
    super::start::attach_replication_child(primary, cfg, journal).await
}

/// The primary's network filters of `qemu-args`, which the failover to the primary removed.
fn filters(cfg: &PairConfig) -> [Value; 3] {
    let netdev = &cfg.network.netdev;
    [
        json!({ "qom-type": "filter-mirror", "id": ids::MIRROR_FILTER, "netdev": netdev,
                "queue": "tx", "outdev": ids::MIRROR_CHARDEV }),
        json!({ "qom-type": "filter-redirector", "id": ids::COMPARE_OUT_REDIRECTOR,
                "netdev": netdev, "queue": "rx", "indev": ids::COMPARE_OUT_SERVER }),
        json!({ "qom-type": "filter-redirector", "id": ids::COMPARE_IN_REDIRECTOR,
                "netdev": netdev, "queue": "rx", "outdev": ids::COMPARE_PRIMARY_IN_SERVER }),
    ]
}

async fn add_filters(
    primary: &QmpClient,
    cfg: &PairConfig,
    journal: &mut Journal<'_, '_>,
) -> Result<(), PairError> {
    for props in filters(cfg) {
        let id = props["id"].as_str().unwrap_or_default().to_string();
        journal
            .idempotent(
                Role::Primary,
                &format!(
                    "object-add {} {id}",
                    props["qom-type"].as_str().unwrap_or("")
                ),
                OBJECT_EXISTS,
                primary.object_add(props),
            )
            .await?;
    }
    Ok(())
}

/// Polls until the primary's migration is `colo` and both VMs run in their COLO modes.
async fn wait_colo(
    primary: &QmpClient,
    secondary: &QmpClient,
    opts: &ReprotectOptions,
    journal: &mut Journal<'_, '_>,
) -> Result<(), PairError> {
    let p = Role::Primary;
    let start = Instant::now();
    loop {
        let info = steps::migration(primary, p).await?;
        let status = info.status.clone().unwrap_or_default();
        match status.as_str() {
            "colo" => {
                let p_run = steps::runstate(primary, p).await?.running;
                let s_run = steps::runstate(secondary, Role::Secondary).await?.running;
                let p_mode = steps::colo_status(primary, p).await?.mode;
                let s_mode = steps::colo_status(secondary, Role::Secondary).await?.mode;
                if p_run && s_run && p_mode == "primary" && s_mode == "secondary" {
                    journal.record(Step {
                        side: p,
                        what: "both VMs run in COLO".into(),
                        outcome: Outcome::Done,
                        ms: start.elapsed().as_secs_f64() * 1000.0,
                        detail: None,
                    });
                    return Ok(());
                }
            }
            "failed" | "cancelled" | "cancelling" | "completed" => {
                let desc = info.extra["error-desc"].as_str().unwrap_or("no error-desc");
                return Err(PairError::incomplete(
                    p,
                    format!("the migration into COLO is `{status}` after the switch: {desc}"),
                    "Look at the secondary QEMU's stderr and the relay's log",
                ));
            }
            _ => {}
        }
        if start.elapsed() > opts.migrate_timeout {
            return Err(PairError::incomplete(
                p,
                format!(
                    "COLO was not entered within {:?} after the switch (status `{status}`)",
                    opts.migrate_timeout
                ),
                "`qmp-driver status` shows both sides",
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Removes the copy's target node (once its job ended); absent is fine.
pub(super) async fn delete_target_node(
    primary: &QmpClient,
    side: Role,
    journal: &mut Journal<'_, '_>,
) -> Result<bool, PairError> {
    journal
        .idempotent(
            side,
            &format!("blockdev-del {REPROTECT_TARGET_NODE}"),
            &["Failed to find node", "Cannot find"],
            primary.blockdev_del(REPROTECT_TARGET_NODE),
        )
        .await
}

/// Cancels a live move on `source`, best effort: the migration (a paused one resumes the VM),
/// the mirror job, the target node.
pub(super) async fn undo_copy(source: &QmpClient, side: Role, journal: &mut Journal<'_, '_>) {
    if let Ok(info) = steps::migration(source, side).await
        && let Some(s) = info.status.as_deref()
        && ["setup", "active", "device", "pre-switchover", "wait-unplug"].contains(&s)
    {
        journal
            .best_effort(
                side,
                "migrate_cancel",
                source.execute_raw("migrate_cancel", None),
            )
            .await;
    }
    if let Ok(Some(_)) = find_job(source).await {
        journal
            .best_effort(
                side,
                &format!("block-job-cancel {REPROTECT_JOB} (force)"),
                source.execute_raw(
                    "block-job-cancel",
                    Some(json!({ "device": REPROTECT_JOB, "force": true })),
                ),
            )
            .await;
    }
    let _ = delete_target_node(source, side, journal).await;
}

/// Resumes `vm` when a cancelled migration left it paused (it resumes by itself most times).
pub(super) async fn ensure_running(vm: &QmpClient, side: Role, journal: &mut Journal<'_, '_>) {
    for _ in 0..50 {
        match steps::runstate(vm, side).await {
            Ok(s) if s.running => return,
            Ok(s) if s.status == "paused" || s.status == "finish-migrate" => {
                journal.best_effort(side, "cont", vm.cont()).await;
                return;
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Puts the primary back as it was before the re-protect, best effort: cancels a migration
/// (a paused one resumes the VM), the mirror job, removes the NBD child and the filters. A
/// primary that entered COLO is left alone (a failure after that is a failover's business).
/// Undoes an interrupted re-protect on the primary (what [`reprotect`] does itself when it
/// fails): for a caller that had to stop one from outside, e.g. an HA agent stopped during its
/// automatic re-protect. Nothing when the primary is in COLO already; its guest runs after.
pub async fn undo_reprotect(primary: &QmpClient, cfg: &PairConfig, mut progress: ProgressFn<'_>) {
    let mut journal = Journal::new(&mut progress);
    undo(primary, cfg, &mut journal).await;
}

async fn undo(primary: &QmpClient, cfg: &PairConfig, journal: &mut Journal<'_, '_>) {
    let p = Role::Primary;
    if let Ok(colo) = steps::colo_status(primary, p).await
        && colo.mode == "primary"
    {
        journal.skipped(p, "undo", "the primary is in COLO: nothing to undo");
        return;
    }
    undo_copy(primary, p, journal).await;
    let node = &cfg.disk.replication_node;
    let _ = journal
        .idempotent(
            p,
            &format!("x-blockdev-change {} -children.1", cfg.disk.device),
            &["does not have child", "Cannot find"],
            primary.x_blockdev_change_remove(&cfg.disk.device, "children.1"),
        )
        .await;
    let _ = journal
        .idempotent(
            p,
            &format!("blockdev-del {node}"),
            &["Failed to find node", "Cannot find"],
            primary.blockdev_del(node),
        )
        .await;
    for id in [
        ids::MIRROR_FILTER,
        ids::COMPARE_OUT_REDIRECTOR,
        ids::COMPARE_IN_REDIRECTOR,
    ] {
        let _ = journal
            .idempotent(
                p,
                &format!("object-del {id}"),
                &["not found"],
                primary.object_del(id),
            )
            .await;
    }
    // A migration cancelled at pre-switchover resumes the VM; make sure.
    ensure_running(primary, p, journal).await;
}

#[cfg(test)]
mod tests {
    #[test]
    fn copy_targets_parse_and_bad_ones_say_why() {
        let t = super::nbd_target("nbd://192.168.77.2:10810/base").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.export.as_str()),
            ("192.168.77.2", 10810, "base")
        );
        let t = super::nbd_target("nbd://[fd00::2]:10810/disk/a").unwrap();
        assert_eq!((t.host.as_str(), t.export.as_str()), ("fd00::2", "disk/a"));
        for (uri, why) in [
            ("nbd+unix:///base?socket=/s", "not an nbd://"),
            ("nbd://hostb:10810", "no export"),
            ("nbd://hostb/base", "no port"),
            ("nbd://hostb:0/base", "no valid port"),
            ("nbd://hostb:99999/base", "no valid port"),
            ("nbd://:10810/base", "lacks a host"),
            ("nbd://hostb:10810/", "lacks a host or an export"),
        ] {
            let e = super::nbd_target(uri).unwrap_err().to_string();
            assert!(e.contains(why), "{uri}: {e}");
        }
    }

    use super::*;

    #[test]
    fn copy_progress_reports_share_rate_and_eta() {
        let line = copy_progress(8 * 1024 * 1024, 16 * 1024 * 1024, Duration::from_secs(2));
        assert_eq!(line, "the copy: 50% (8.0 of 16.0 MiB), 4.0 MiB/s, ETA 2 s");
        assert_eq!(
            copy_progress(16 << 20, 16 << 20, Duration::from_secs(3)),
            "the copy: 16.0 MiB accounted for, waiting for the mirror to be in step"
        );
        assert_eq!(
            copy_progress(0, 0, Duration::ZERO),
            "the copy: 0% (0.0 of 0.0 MiB), 0.0 MiB/s, ETA -"
        );
    }
}
