//! Preparing the secondary and starting COLO.

use super::steps::{self, Journal, hmp};
use super::{PairError, Progress, ProgressFn, Step};
use crate::config::{
    DiskBackend, NetworkBackend, PairConfig, TLS_AUTHZ_ID, TLS_CREDS_ID, TLS_SERVER_CREDS_ID,
};
use colo_qmp::QmpClient;
use colo_types::Role;
use colo_types::qemu_ids as ids;
use serde::Serialize;
use serde_json::json;
use std::time::{Duration, Instant};

/// What [`prepare_secondary`] did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PrepareReport {
    /// The secondary was already running in COLO: nothing to prepare.
    pub already_in_colo: bool,
    /// The steps, in order.
    pub steps: Vec<Step>,
}

/// Bounds of [`start`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartOptions {
    /// How long the first migration may take until both sides run in COLO.
    pub colo_timeout: Duration,
    /// How long to wait for the secondary's redirectors to connect to the
    /// primary's filter sockets.
    pub chardev_timeout: Duration,
    /// Polling interval while waiting.
    pub poll: Duration,
}

impl Default for StartOptions {
    fn default() -> Self {
        StartOptions {
            colo_timeout: Duration::from_secs(120),
            chardev_timeout: Duration::from_secs(15),
            poll: Duration::from_millis(100),
        }
    }
}

/// What [`start`] did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StartReport {
    /// Both sides were already in COLO: nothing was done.
    pub already_in_colo: bool,
    /// The steps on both sides, in order.
    pub steps: Vec<Step>,
    /// From `migrate` to both sides running in COLO, in ms (`None` when it
    /// was already running, or a migration was already under way).
    pub entered_colo_ms: Option<f64>,
    /// The `x-checkpoint-delay` set on the primary.
    pub checkpoint_delay_ms: u32,
}

/// What the secondary looks like before it is prepared.
enum SecondaryState {
    /// Already running in COLO.
    InColo,
    /// Waiting for an incoming migration (`-incoming defer`).
    Waiting {
        /// `migrate-incoming` was already run.
        listening: bool,
        /// Its migration capabilities.
        caps: Vec<(String, bool)>,
    },
}

const SECONDARY_START_HINT: &str = "Start the secondary QEMU with the arguments of `qmp-driver \
     qemu-args --role secondary` (they include `-incoming defer`), never `cont` it, and run \
     `qmp-driver prepare-secondary` or `start`";

/// Reads the secondary's state and refuses any state prepare cannot work
/// from. Changes nothing.
async fn check_secondary(qmp: &QmpClient) -> Result<SecondaryState, PairError> {
    let side = Role::Secondary;
    let colo = steps::colo_status(qmp, side).await?;
    if colo.mode == "secondary" {
        return Ok(SecondaryState::InColo);
    }
    let status = steps::runstate(qmp, side).await?;
    if status.status != "inmigrate" {
        let last = colo.last_mode.as_deref().unwrap_or("none");
        let hint = if last == "secondary" {
            "It took over after a failover and runs the VM now: to protect it again, make it the \
             primary of a new pair (docs/operations.md, \"Re-protect\")"
                .to_string()
        } else {
            SECONDARY_START_HINT.to_string()
        };
        return Err(PairError::precondition(
            side,
            format!(
                "the secondary QEMU is in run state `{}` (COLO mode {}, last mode {last}), not \
                 `inmigrate`: it is not waiting for an incoming migration",
                status.status, colo.mode
            ),
            hint,
        ));
    }
    let mig = steps::migration(qmp, side).await?;
    let listening = match mig.status.as_deref() {
        None | Some("none") => false,
        Some("setup") => true,
        Some(other) => {
            return Err(PairError::precondition(
                side,
                format!("an incoming migration is already `{other}`"),
                "Wait for it, or restart the secondary QEMU and start again",
            ));
        }
    };
    let caps = steps::capabilities(qmp, side).await?;
    if listening && !steps::capability(&caps, "x-colo") {
        return Err(PairError::precondition(
            side,
            "the secondary already listens for the migration, but without x-colo (it must be \
             set before migrate-incoming)",
            format!("Restart the secondary QEMU. {SECONDARY_START_HINT}"),
        ));
    }
    Ok(SecondaryState::Waiting { listening, caps })
}

/// The secondary's changes: x-colo, NBD server and export, migrate-incoming.
async fn apply_prepare(
    qmp: &QmpClient,
    cfg: &PairConfig,
    listening: bool,
    caps: &[(String, bool)],
    journal: &mut Journal<'_, '_>,
) -> Result<(), PairError> {
    let side = Role::Secondary;
    if listening {
        journal.skipped(
            side,
            "migrate-set-capabilities x-colo=on",
            "x-colo is already on",
        );
    } else {
        steps::enable_colo_capabilities(qmp, side, caps, journal).await?;
    }
    match cfg.disk.backend {
        DiskBackend::Replication => {
            let host = &cfg.secondary.host;
            let port = cfg.disk.nbd_port;
            // With [tls] only the primary's certificate may connect: the server object and
            // the authz `qemu-args` gave this QEMU.
            let tls = cfg
                .tls
                .as_ref()
                .map(|_| (TLS_SERVER_CREDS_ID, TLS_AUTHZ_ID));
            let over_tls = if tls.is_some() { " (TLS)" } else { "" };
            journal
                .idempotent(
                    side,
                    &format!("nbd-server-start {host}:{port}{over_tls}"),
                    &["already running"],
                    qmp.nbd_server_start_inet_tls(host, port, tls),
                )
                .await?;
            journal
                .idempotent(
                    side,
                    &format!("nbd-server-add {} (writable)", cfg.disk.export),
                    &["already in use", "already has export"],
                    qmp.nbd_server_add(&cfg.disk.export, true),
                )
                .await?;
        }
        DiskBackend::ColoBlockd => journal.skipped(
            side,
            "nbd-server-start",
            "disk.backend is colo-blockd: it serves the replica, not QEMU",
        ),
    }
    let incoming = cfg.migration.secondary_incoming.to_string();
    let what = format!("migrate-incoming {incoming}");
    if listening {
        journal.skipped(side, &what, "already listening");
    } else {
        journal
            .run(side, &what, qmp.migrate_incoming(&incoming))
            .await?;
    }
    journal.note(Progress::SecondaryPrepared);
    Ok(())
}

/// Prepares the secondary QEMU (started with `-incoming defer`) for COLO:
/// turns x-colo on (and return-path off), starts the NBD server on
/// `secondary.host:disk.nbd_port`, exports `disk.export` writable, and
/// listens on `migration.secondary_incoming`. Each step is skipped when
/// already done; a secondary already in COLO is left alone.
///
/// Refuses ([`PairError::Precondition`]) a secondary that is not waiting
/// for an incoming migration.
pub async fn prepare_secondary(
    secondary: &QmpClient,
    cfg: &PairConfig,
    mut progress: ProgressFn<'_>,
) -> Result<PrepareReport, PairError> {
    let mut journal = Journal::new(&mut progress);
    match check_secondary(secondary).await? {
        SecondaryState::InColo => {
            journal.skipped(Role::Secondary, "prepare", "already running in COLO");
            Ok(PrepareReport {
                already_in_colo: true,
                steps: journal.steps,
            })
        }
        SecondaryState::Waiting { listening, caps } => {
            apply_prepare(secondary, cfg, listening, &caps, &mut journal).await?;
            Ok(PrepareReport {
                already_in_colo: false,
                steps: journal.steps,
            })
        }
    }
}

/// Migration states in which a `migrate` is under way.
const MIGRATING: &[&str] = &["setup", "active", "device", "pre-switchover", "wait-unplug"];

/// Starts COLO: checks both sides, waits for the secondary's redirectors to
/// connect to the primary, prepares the secondary (as
/// [`prepare_secondary`]), adds the replication child to the primary's
/// quorum (`drive_add -n buddy driver=replication,mode=primary,...` then
/// `x-blockdev-change`), turns x-colo on, sets `x-checkpoint-delay`,
/// migrates the still paused (`-S`) primary to `migration.primary_target`,
/// and waits until the primary's migration status is `colo` and both VMs
/// run.
///
/// Idempotent: a pair already in COLO is reported as such; a migration
/// already under way is waited for; an existing replication child is kept.
/// Refuses a primary that has already run (its disk differs from the
/// secondary's: re-protecting a running VM needs a full disk copy, which
/// is not implemented yet).
pub async fn start(
    primary: &QmpClient,
    secondary: &QmpClient,
    cfg: &PairConfig,
    opts: &StartOptions,
    mut progress: ProgressFn<'_>,
) -> Result<StartReport, PairError> {
    let mut journal = Journal::new(&mut progress);
    let delay = cfg.migration.checkpoint_delay_ms;
    let p = Role::Primary;

    // Preconditions, both sides, before anything changes.
    let p_colo = steps::colo_status(primary, p).await?;
    let p_mig = steps::migration(primary, p).await?;
    let p_mig_status = p_mig.status.clone().unwrap_or_default();
    if p_colo.mode == "primary" {
        let s_colo = steps::colo_status(secondary, Role::Secondary).await?;
        if s_colo.mode != "secondary" {
            return Err(PairError::precondition(
                Role::Secondary,
                format!(
                    "the primary is in COLO but the secondary reports COLO mode {}",
                    s_colo.mode
                ),
                "The pair is split: run `qmp-driver failover --survivor primary` to end COLO on \
                 the primary, then start a new secondary",
            ));
        }
        journal.skipped(p, "start", "both sides already run in COLO");
        return Ok(StartReport {
            already_in_colo: true,
            steps: journal.steps,
            entered_colo_ms: None,
            checkpoint_delay_ms: steps::checkpoint_delay(primary, p).await?,
        });
    }
    let resuming = MIGRATING.contains(&p_mig_status.as_str());
    if !resuming {
        let p_status = steps::runstate(primary, p).await?;
        if p_status.status != "prelaunch" {
            let last = p_colo.last_mode.as_deref().unwrap_or("none");
            return Err(PairError::precondition(
                p,
                format!(
                    "the primary QEMU is in run state `{}` (COLO mode {}, last mode {last}), not \
                     `prelaunch`: its guest has already run, so the secondary's disk is not a \
                     copy of its disk",
                    p_status.status, p_colo.mode
                ),
                "Start the primary QEMU paused with the arguments of `qmp-driver qemu-args \
                 --role primary` (they include -S), and give the secondary an identical disk \
                 (`qmp-driver copy-disk` while it is paused). A VM that serves alone after a \
                 failover to the primary on colo's daemons is protected again online with \
                 `qmp-driver reprotect`; otherwise after a restart (docs/operations.md, \
                 Re-protect)",
            ));
        }
    }
    if resuming {
        journal.skipped(
            p,
            "migrate",
            format!("a migration is already `{p_mig_status}`: waiting for it"),
        );
    } else {
        let (listening, caps) = match check_secondary(secondary).await? {
            SecondaryState::InColo => {
                return Err(PairError::precondition(
                    Role::Secondary,
                    "the secondary already runs in COLO, but the primary does not",
                    "The secondary belongs to another (dead) primary: fail over to it or quit \
                     it, then start a new secondary",
                ));
            }
            SecondaryState::Waiting { listening, caps } => (listening, caps),
        };
        wait_redirectors(primary, secondary, cfg, opts, &mut journal).await?;
        apply_prepare(secondary, cfg, listening, &caps, &mut journal).await?;
        add_replication_child(primary, cfg, &mut journal).await?;
        let p_caps = steps::capabilities(primary, p).await?;
        steps::enable_colo_capabilities(primary, p, &p_caps, &mut journal).await?;
        journal
            .run(
                p,
                &format!("migrate-set-parameters x-checkpoint-delay={delay}"),
                primary.migrate_set_parameters(json!({ "x-checkpoint-delay": delay })),
            )
            .await?;
        steps::set_migration_tls(primary, cfg, &mut journal).await?;
        let target = cfg.migration.primary_target.to_string();
        journal
            .run(p, &format!("migrate {target}"), primary.migrate(&target))
            .await?;
    }
    let migrate_started = Instant::now();
    wait_colo(primary, secondary, opts, &mut journal).await?;
    let after = migrate_started.elapsed();
    journal.note(Progress::EnteredColo { after });
    Ok(StartReport {
        already_in_colo: false,
        steps: journal.steps,
        entered_colo_ms: (!resuming).then_some(after.as_secs_f64() * 1000.0),
        checkpoint_delay_ms: delay,
    })
}

/// The sockets that must be connected before the PVM's first packet, or
/// the primary's filter-mirror drops it and the SVM never sees it (or, with
/// colo-proxyd, the primary's redirector passes the PVM's output uncompared):
/// per side, the chardev ids and what to check when they stay unconnected.
fn filter_sockets(cfg: &PairConfig) -> Vec<(Role, Vec<&'static str>, String)> {
    let net = &cfg.network;
    match net.backend {
        NetworkBackend::ColoCompare => vec![(
            Role::Primary,
            vec![ids::MIRROR_CHARDEV, ids::COMPARE_SECONDARY_IN],
            format!(
                "Check that the secondary QEMU runs and can reach {host}:{} and {host}:{} \
                 (primary.host, network.mirror_port, network.compare_port)",
                net.mirror_port,
                net.compare_port,
                host = cfg.primary.host,
            ),
        )],
        NetworkBackend::ColoProxyd => vec![
            (
                Role::Primary,
                vec![
                    ids::MIRROR_CHARDEV,
                    ids::COMPARE_PRIMARY_IN_SERVER,
                    ids::COMPARE_OUT_SERVER,
                ],
                format!(
                    "Check that `colo-proxyd primary` runs on the primary host and listens on \
                     127.0.0.1 ports {}, {} and {} (network.mirror_port, \
                     compare_primary_in_port, compare_out_port), and that it serves QEMU's uid \
                     (its log names the uids it refused; network.qemu_uid)",
                    net.mirror_port, net.compare_primary_in_port, net.compare_out_port
                ),
            ),
            (
                Role::Secondary,
                vec![ids::SECONDARY_MIRROR_IN, ids::SECONDARY_OUT],
                format!(
                    "Check that `colo-proxyd secondary` runs on the secondary host and listens \
                     on 127.0.0.1 ports {} and {} (network.mirror_port, compare_port), and \
                     that it serves QEMU's uid (its log names the uids it refused; \
                     network.qemu_uid)",
                    net.mirror_port, net.compare_port
                ),
            ),
        ],
    }
}

/// Waits until every socket of [`filter_sockets`] is connected.
async fn wait_redirectors(
    primary: &QmpClient,
    secondary: &QmpClient,
    cfg: &PairConfig,
    opts: &StartOptions,
    journal: &mut Journal<'_, '_>,
) -> Result<(), PairError> {
    for (side, wanted, hint) in filter_sockets(cfg) {
        let qmp = match side {
            Role::Primary => primary,
            Role::Secondary => secondary,
        };
        wait_connected(qmp, side, &wanted, &hint, opts, journal).await?;
    }
    Ok(())
}

async fn wait_connected(
    qmp: &QmpClient,
    side: Role,
    wanted: &[&str],
    hint: &str,
    opts: &StartOptions,
    journal: &mut Journal<'_, '_>,
) -> Result<(), PairError> {
    let start = Instant::now();
    let deadline = start + opts.chardev_timeout;
    let mut announced = false;
    loop {
        let missing = steps::unconnected_chardevs(qmp, side, wanted).await?;
        if let Some((id, _)) = missing.iter().find(|(_, exists)| !exists) {
            return Err(PairError::precondition(
                side,
                format!("the {side} QEMU has no chardev `{id}`"),
                format!(
                    "Start it with the arguments of `qmp-driver qemu-args --role {side}` (and \
                     the same network.backend)"
                ),
            ));
        }
        if missing.is_empty() {
            journal.record(super::Step {
                side,
                what: format!("filter sockets connected: {}", wanted.join(", ")),
                outcome: super::Outcome::Done,
                ms: start.elapsed().as_secs_f64() * 1000.0,
                detail: None,
            });
            return Ok(());
        }
        if Instant::now() > deadline {
            let ids: Vec<&str> = missing.iter().map(|(id, _)| *id).collect();
            return Err(PairError::precondition(
                side,
                format!(
                    "the {side} QEMU's filter sockets {} did not connect within {:?}",
                    ids.join(", "),
                    opts.chardev_timeout
                ),
                hint,
            ));
        }
        if !announced {
            journal.note(Progress::Waiting(format!(
                "the {side}'s filter sockets {} to connect",
                wanted.join(", ")
            )));
            announced = true;
        }
        tokio::time::sleep(opts.poll).await;
    }
}

/// `drive_add -n buddy driver=replication,...` (skipped when the node
/// exists) and `x-blockdev-change` (skipped when the node already has its
/// parent).
async fn add_replication_child(
    primary: &QmpClient,
    cfg: &PairConfig,
    journal: &mut Journal<'_, '_>,
) -> Result<(), PairError> {
    let p = Role::Primary;
    let node = &cfg.disk.replication_node;
    let nodes = primary
        .execute_raw("query-named-block-nodes", Some(json!({ "flat": true })))
        .await
        .map_err(|source| PairError::Qmp {
            side: p,
            step: "query-named-block-nodes".into(),
            source,
        })?;
    let exists = nodes
        .as_array()
        .into_iter()
        .flatten()
        .any(|n| n["node-name"] == node.as_str());
    let (host, port) = (&cfg.secondary.host, cfg.disk.nbd_port);
    let export = cfg.disk.primary_child_export();
    let tls = if cfg.tls.is_some() { ", TLS" } else { "" };
    let what = match cfg.disk.backend {
        DiskBackend::Replication => {
            format!("drive_add {node} (replication → nbd {host}:{port} {export}{tls})")
        }
        DiskBackend::ColoBlockd => {
            format!("blockdev-add {node} (nbd {host}:{port} {export}{tls})")
        }
    };
    if exists {
        journal.skipped(p, &what, format!("node {node} already exists"));
    } else {
        match cfg.disk.backend {
            DiskBackend::Replication => {
                // With [tls] the NBD client speaks STARTTLS with the primary's client object
                // and accepts only the secondary host's server certificate (by name: QEMU
                // connects by address).
                let tls = match &cfg.tls {
                    Some(tls) => format!(
                        ",file.tls-creds={TLS_CREDS_ID},file.tls-hostname={}",
                        tls.secondary.name
                    ),
                    None => String::new(),
                };
                let drive_add = format!(
                    "drive_add -n buddy driver=replication,mode=primary,file.driver=nbd,\
                     file.host={host},file.port={port},file.export={export},node-name={node}\
                     {tls}"
                );
                journal.run(p, &what, hmp(primary, &drive_add)).await?;
            }
            // colo-blockd needs no replication driver: it learns the epochs
            // from the relay, so the child is a plain NBD client.
            DiskBackend::ColoBlockd => {
                let options = blockd_child_options(cfg);
                journal.run(p, &what, primary.blockdev_add(options)).await?;
            }
        }
    }
    attach_replication_child(primary, cfg, journal).await
}

/// Puts the replication (NBD) child node into the primary's quorum: from this step on every
/// guest write goes to both disks. Shared by `start` and `reprotect`.
pub(super) async fn attach_replication_child(
    primary: &QmpClient,
    cfg: &PairConfig,
    journal: &mut Journal<'_, '_>,
) -> Result<(), PairError> {
    let node = &cfg.disk.replication_node;
    journal
        .idempotent(
            Role::Primary,
            &format!("x-blockdev-change {} +{node}", cfg.disk.device),
            &["already has a parent"],
            primary.x_blockdev_change_add(&cfg.disk.device, node),
        )
        .await?;
    journal.note(Progress::ReplicationChildAdded);
    Ok(())
}

/// The primary's `blockdev-add` of its NBD child of colo-blockd's `replica` export. With
/// `[tls]` the child speaks NBD `STARTTLS` with the primary's credentials object (the one
/// `qemu-args` gives the primary, also the migration's) and accepts only a server certificate
/// for the secondary host's name: QEMU connects by address, so the name must be given
/// (`tls-hostname`). colo-blockd, with `--tls-dir`/`--tls-peer` from `daemon-args`, requires
/// both ends of that.
pub(super) fn blockd_child_options(cfg: &PairConfig) -> serde_json::Value {
    let mut options = json!({
        "driver": "nbd",
        "node-name": cfg.disk.replication_node,
        "server": {
            "type": "inet",
            "host": cfg.secondary.host,
            "port": cfg.disk.nbd_port.to_string(),
        },
        "export": cfg.disk.primary_child_export(),
    });
    if let Some(tls) = &cfg.tls {
        options["tls-creds"] = json!(TLS_CREDS_ID);
        options["tls-hostname"] = json!(tls.secondary.name);
    }
    options
}

/// Polls until the primary's migration is `colo` and both VMs run.
async fn wait_colo(
    primary: &QmpClient,
    secondary: &QmpClient,
    opts: &StartOptions,
    journal: &mut Journal<'_, '_>,
) -> Result<(), PairError> {
    let p = Role::Primary;
    let deadline = Instant::now() + opts.colo_timeout;
    let mut last_percent = None;
    loop {
        let info = steps::migration(primary, p).await?;
        let status = info.status.clone().unwrap_or_else(|| "none".into());
        let mut not_running = None;
        match status.as_str() {
            "colo" => {
                let p_run = steps::runstate(primary, p).await?.running;
                let s_run = steps::runstate(secondary, Role::Secondary).await?.running;
                if p_run && s_run {
                    break;
                }
                not_running = Some(if p_run { Role::Secondary } else { p });
            }
            "failed" | "cancelled" | "cancelling" => {
                let desc = info.extra["error-desc"].as_str().unwrap_or("no error-desc");
                return Err(PairError::incomplete(
                    p,
                    format!("the migration to the secondary is `{status}`: {desc}"),
                    "Look at the secondary QEMU's stderr (it exits when an incoming migration \
                     fails), restart it with -incoming defer, then run start again",
                ));
            }
            "completed" => {
                return Err(PairError::incomplete(
                    p,
                    "the migration completed without entering COLO",
                    "This QEMU has the 10.0/10.1 regression that never enters COLO; use a QEMU \
                     with the fix (docs/qemu-versions.md). Both VMs must be restarted",
                ));
            }
            _ => {
                if let Some(percent) = ram_percent(&info.extra)
                    && last_percent != Some(percent)
                {
                    last_percent = Some(percent);
                    journal.note(Progress::Migrating { percent });
                }
            }
        }
        if Instant::now() > deadline {
            let what = match not_running {
                Some(side) => format!(
                    "COLO was entered but the {side} VM did not run within {:?}",
                    opts.colo_timeout
                ),
                None => format!(
                    "COLO was not entered within {:?} (migration status `{status}`)",
                    opts.colo_timeout
                ),
            };
            return Err(PairError::incomplete(
                p,
                what,
                "A large guest may need longer (--timeout); `qmp-driver status` shows both \
                 sides, and the QEMUs' stderr says more",
            ));
        }
        tokio::time::sleep(opts.poll).await;
    }
    for (qmp, side, mode) in [
        (primary, p, "primary"),
        (secondary, Role::Secondary, "secondary"),
    ] {
        let colo = steps::colo_status(qmp, side).await?;
        if colo.mode != mode {
            return Err(PairError::incomplete(
                side,
                format!("reports COLO mode {} instead of {mode}", colo.mode),
                "`qmp-driver status` shows both sides; the QEMU's stderr says why",
            ));
        }
    }
    Ok(())
}

/// Share of RAM sent during the first migration, from `query-migrate`'s
/// `ram` statistics.
fn ram_percent(extra: &serde_json::Value) -> Option<u8> {
    let ram = &extra["ram"];
    let total = ram["total"].as_u64().filter(|t| *t > 0)?;
    let done = total.saturating_sub(ram["remaining"].as_u64()?);
    Some(u8::try_from(done.saturating_mul(100) / total).unwrap_or(100))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_percent_from_query_migrate() {
        assert_eq!(
            ram_percent(&json!({"ram": {"total": 200, "remaining": 126}})),
            Some(37)
        );
        assert_eq!(
            ram_percent(&json!({"ram": {"total": 200, "remaining": 0}})),
            Some(100)
        );
        assert_eq!(
            ram_percent(&json!({"ram": {"total": 0, "remaining": 0}})),
            None
        );
        assert_eq!(ram_percent(&json!({})), None);
    }

    fn blockd_config(tls: &str) -> PairConfig {
        PairConfig::from_toml(
            &format!(
                r#"
                name = "vm1"
                [primary]
                qmp = "unix:/run/colo/vm1/primary.qmp"
                host = "192.168.77.1"
                [secondary]
                qmp = "unix:/run/colo/vm1/secondary.qmp"
                host = "192.168.77.2"
                [migration]
                secondary_incoming = "unix:/run/colo/vm1/incoming.sock"
                primary_target = "tcp:192.168.77.2:9998"
                [relay]
                listen = "tcp:192.168.77.2:9998"
                control = "/run/colo/vm1/relay.sock"
                [disk]
                backend = "colo-blockd"
                nbd_port = 10809
                {tls}
                "#
            ),
            "test",
        )
        .unwrap()
    }

    /// With `[tls]` the NBD child of colo-blockd's `replica` names the primary's credentials
    /// object and the secondary host's certificate name; without it, neither.
    #[test]
    fn with_tls_the_blockd_child_uses_the_credentials_and_the_secondarys_name() {
        let tls = blockd_config(
            "[tls]\nprimary_dir = \"/etc/colo/pki-a\"\nprimary_name = \"hosta\"\n\
             secondary_dir = \"/etc/colo/pki-b\"\nsecondary_name = \"hostb\"\n",
        );
        assert_eq!(
            blockd_child_options(&tls),
            json!({
                "driver": "nbd",
                "node-name": "replication0",
                "server": { "type": "inet", "host": "192.168.77.2", "port": "10809" },
                "export": "replica",
                "tls-creds": "colo-tls0",
                "tls-hostname": "hostb",
            })
        );
        let plain = blockd_child_options(&blockd_config(""));
        assert_eq!(plain["export"], "replica");
        assert!(plain.get("tls-creds").is_none(), "{plain}");
        assert!(plain.get("tls-hostname").is_none(), "{plain}");
    }
}
