//! Failback: the VM that the **secondary** took over moves home to the primary host while its
//! guest runs, and serves there alone, as a primary that survived a failover does; `reprotect`
//! then brings the secondary host back into COLO. Roles never swap: the config stays as it is
//! through any number of failures (A fails, B serves, the VM moves home to A, B is re-protected,
//! A fails again, B serves, ...).
//!
//! Only colo's own daemons (`disk.backend = "colo-blockd"`, `network.backend = "colo-proxyd"`,
//! a `[relay]`) are implemented, with or without `[tls]` (then the copy and the migration run
//! under mutual TLS: [`set_failback_tls`]). The primary host runs, before this starts:
//! `colo-blockd serve --export base=P.raw` on `disk.nbd_port + 1` (the copy's target, the
//! primary QEMU's own image; with `[tls]` `--tls-dir PRIMARY_DIR --tls-peer SECONDARY_NAME`),
//! colo-proxyd primary, and the primary QEMU (`qemu-args --role primary`, with `-incoming
//! defer` added).
//!
//! The sequence, the guest running on the secondary host until the switch:
//!
//! 1. **prepare**: `migrate-incoming` on the primary; on the secondary x-colo off (it was on
//!    for COLO: left on, the migration would start a COLO pair) and `pause-before-switchover`;
//! 2. **copy**: the secondary's disk (`disk.device`, its quorum over colo-blockd's `svm`
//!    export) mirrored into the primary's image with `sync=full`, `copy-mode=write-blocking`,
//!    as `reprotect` does it (progress: bytes, rate, ETA) until ready;
//! 3. **memory**: `migrate` to the primary; the guest runs while RAM is sent; QEMU stops it
//!    and waits in `pre-switchover`;
//! 4. **switch**: `block-job-cancel` of the ready mirror (the primary's image now holds the
//!    disk as it is), `blockdev-del` of the target node, `migrate-continue`; once the
//!    migration completed, on the primary (its VM paused: `-S`) `object-del` of the network
//!    filters (a primary serving alone has none; the guest talks to the tap directly), `cont`
//!    and `announce-self`; on the secondary `quit`: the old copy must never run again.
//!
//! Connections the SVM opened in the epoch before the failover reach the clients through
//! colo-proxyd secondary's sequence shifts (`colo_proxyd_failover_offset_connections`); the
//! primary applies none, so such connections break at the switch. With `--offsets-metrics` the
//! failback waits until the gauge is 0 before it starts.
//!
//! A failure before `migrate-continue` is undone on the secondary (migration and job
//! cancelled, the target node deleted, the VM resumed): the guest serves on where it was.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use super::reprotect::{
    NbdTarget, OBJECT_EXISTS, Phase, ReprotectOptions, delete_target_node, ensure_running,
    nbd_target, require_colo_daemons, start_copy, undo_copy, wait_job_gone, wait_pre_switchover,
    wait_ready,
};
use super::steps::{self, Journal};
use super::{Outcome, PairError, Progress, ProgressFn, Step};
use crate::config::{
    PairConfig, TLS_AUTHZ_ID, TLS_CREDS_ID, TLS_SERVER_CREDS_ID, TlsConfig, peer_authz,
};
use colo_qmp::QmpClient;
use colo_types::Role;
use colo_types::qemu_ids as ids;

/// `nbd://primary.host:(disk.nbd_port + 1)/base`: `colo-blockd serve` on the primary's image.
pub fn default_failback_target(cfg: &PairConfig) -> String {
    format!(
        "nbd://{}:{}/{}",
        cfg.primary.host,
        cfg.disk.nbd_port.saturating_add(1),
        super::reprotect::DEFAULT_REPROTECT_EXPORT
    )
}

/// The primary QEMU's `migrate-incoming` address: `tcp:primary.host:PORT` with the port of
/// `migration.secondary_incoming` when that is a TCP address; none otherwise (give one).
pub fn default_failback_incoming(cfg: &PairConfig) -> Option<String> {
    let incoming = cfg.migration.secondary_incoming.to_string();
    let port = incoming.strip_prefix("tcp:")?.rsplit_once(':')?.1;
    Some(format!("tcp:{}:{port}", cfg.primary.host))
}

/// Options of [`failback`].
#[derive(Debug, Clone)]
pub struct FailbackOptions {
    /// The copy and the migration's bounds; `target` is the primary's `colo-blockd serve`.
    pub copy: ReprotectOptions,
    /// Where the primary QEMU listens for the migration (`migrate-incoming`); `None`:
    /// [`default_failback_incoming`].
    pub incoming: Option<String>,
    /// colo-proxyd secondary's metrics endpoint (`HOST:PORT`): wait until it shifts no
    /// connection's sequence numbers before the failback starts.
    pub offsets_metrics: Option<String>,
    /// Longest wait for those connections to end.
    pub offsets_timeout: Duration,
}

/// What [`failback`] did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FailbackReport {
    /// The steps on both sides, in order.
    pub steps: Vec<Step>,
    /// `prepare`, `copy`, `memory`, `switch`.
    pub phases: Vec<Phase>,
    /// The copy job's `len` when it was ready.
    pub disk_bytes: u64,
    /// Bytes the mirror wrote.
    pub bytes_copied: u64,
    /// RAM bytes the migration sent up to the switch.
    pub ram_bytes: u64,
    /// The guest's pause at the switch: from `pre-switchover` (the secondary stopped the VM)
    /// to the VM running on the primary, in ms.
    pub switch_pause_ms: f64,
    /// From the first command to the VM running on the primary, in ms.
    pub total_ms: f64,
}

fn check_config(cfg: &PairConfig) -> Result<(), PairError> {
    require_colo_daemons(cfg, Role::Secondary, "failback", "fail back")
}

/// With `[tls]`, the copy and the migration between the two QEMUs run under mutual TLS, as
/// every other inter-host channel. Neither QEMU's command line has the objects for that
/// direction (the secondary is a client of nobody on colo's daemons, the primary accepts
/// nothing), so they are added here, idempotently (a QEMU that already has them, e.g. from a
/// failed attempt, keeps its own):
/// - on the secondary, the client object [`TLS_CREDS_ID`] with the secondary host's
///   identity: the copy's NBD node (`colo-blockd serve --tls-dir PRIMARY_DIR --tls-peer
///   SECONDARY_NAME` on the primary host) and the migration's `tls-creds`, checking the
///   primary's certificate against `tls-hostname` = the primary's name;
/// - on the primary, the server object [`TLS_SERVER_CREDS_ID`] (`verify-peer=on`) and the
///   `authz-list` [`TLS_AUTHZ_ID`] allowing only the secondary's certificate, named in its
///   incoming migration's `tls-creds`/`tls-authz` before `migrate-incoming`.
async fn set_failback_tls(
    secondary: &QmpClient,
    primary: &QmpClient,
    tls: &TlsConfig,
    journal: &mut Journal<'_, '_>,
) -> Result<(), PairError> {
    let (s, p) = (Role::Secondary, Role::Primary);
    let objects = [
        (
            s,
            secondary,
            json!({ "qom-type": "tls-creds-x509", "id": TLS_CREDS_ID, "endpoint": "client",
                    "dir": tls.secondary.dir, "verify-peer": true }),
        ),
        (
            p,
            primary,
            json!({ "qom-type": "tls-creds-x509", "id": TLS_SERVER_CREDS_ID,
                    "endpoint": "server", "dir": tls.primary.dir, "verify-peer": true }),
        ),
        (p, primary, peer_authz(&tls.secondary)),
    ];
    for (side, qmp, props) in objects {
        let what = format!(
            "object-add {} {}",
            props["qom-type"].as_str().unwrap_or_default(),
            props["id"].as_str().unwrap_or_default()
        );
        journal
            .idempotent(side, &what, OBJECT_EXISTS, qmp.object_add(props))
            .await?;
    }
    journal
        .run(
            p,
            &format!(
                "migrate-set-parameters tls-creds={TLS_SERVER_CREDS_ID} tls-authz={TLS_AUTHZ_ID}"
            ),
            primary.migrate_set_parameters(
                json!({ "tls-creds": TLS_SERVER_CREDS_ID, "tls-authz": TLS_AUTHZ_ID }),
            ),
        )
        .await?;
    steps::set_migration_tls_client(secondary, s, &tls.primary.name, journal).await
}

/// The secondary must run outside COLO (it took over), with no migration under way; the
/// primary must wait for its migration.
async fn check_sides(secondary: &QmpClient, primary: &QmpClient) -> Result<(), PairError> {
    let s = Role::Secondary;
    let colo = steps::colo_status(secondary, s).await?;
    let status = steps::runstate(secondary, s).await?;
    if colo.mode != "none" || !status.running {
        return Err(PairError::precondition(
            s,
            format!(
                "the secondary does not serve alone (COLO mode {}, run state {})",
                colo.mode, status.status
            ),
            "Fail back a secondary that took over (`qmp-driver failover --survivor \
             secondary`) and runs",
        ));
    }
    let mig = steps::migration(secondary, s).await?;
    if let Some(st) = mig.status.as_deref()
        && [
            "setup",
            "active",
            "device",
            "pre-switchover",
            "wait-unplug",
            "colo",
        ]
        .contains(&st)
    {
        return Err(PairError::precondition(
            s,
            format!("a migration is already `{st}` on the secondary"),
            "Wait for it to end, or `migrate_cancel` it, then run failback again",
        ));
    }
    let p = Role::Primary;
    let status = steps::runstate(primary, p).await?;
    if status.status != "inmigrate" {
        return Err(PairError::precondition(
            p,
            format!(
                "the primary QEMU does not wait for a migration (run state {})",
                status.status
            ),
            "Start the primary QEMU with its `qemu-args --role primary` line and \
             `-incoming defer`",
        ));
    }
    Ok(())
}

/// Moves the VM the secondary took over home to the primary; see the module.
///
/// Refuses ([`PairError::Precondition`], nothing changed) a pair not on colo's daemons, a
/// secondary not serving alone, a primary QEMU not waiting with `-incoming`.
/// A failure before the switch is undone on the secondary, whose guest serves on.
pub async fn failback(
    secondary: &QmpClient,
    primary: &QmpClient,
    cfg: &PairConfig,
    opts: &FailbackOptions,
    mut progress: ProgressFn<'_>,
) -> Result<FailbackReport, PairError> {
    check_config(cfg)?;
    let target = nbd_target(&opts.copy.target)?;
    let incoming = match &opts.incoming {
        Some(uri) => uri.clone(),
        None => default_failback_incoming(cfg).ok_or_else(|| {
            PairError::precondition(
                Role::Primary,
                "migration.secondary_incoming is no TCP address, so the primary's incoming \
                 address cannot be derived from it",
                "Give --incoming (the URI the primary QEMU listens on)",
            )
        })?,
    };
    check_sides(secondary, primary).await?;
    let started = Instant::now();
    let mut journal = Journal::new(&mut progress);
    let mut report = FailbackReport {
        steps: Vec::new(),
        phases: Vec::new(),
        disk_bytes: 0,
        bytes_copied: 0,
        ram_bytes: 0,
        switch_pause_ms: 0.0,
        total_ms: 0.0,
    };
    match &opts.offsets_metrics {
        Some(metrics) => wait_no_offsets(metrics, opts, &mut journal).await?,
        None => journal.skipped(
            Role::Secondary,
            "wait for the connections colo-proxyd shifts",
            "not checked (no --offsets-metrics): a connection the VM opened in the epoch \
             before the failover, if one is still open, breaks at the switch",
        ),
    }
    let mut switched = false;
    match run(
        secondary,
        primary,
        cfg,
        opts,
        &incoming,
        &target,
        &mut journal,
        &mut report,
        &mut switched,
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
                what: if switched {
                    "failback failed after the switch; nothing undone".into()
                } else {
                    "failback failed; undoing it on the secondary".into()
                },
                outcome: Outcome::Failed,
                ms: 0.0,
                detail: Some(e.to_string()),
            }));
            if !switched {
                undo(secondary, &mut journal).await;
            }
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    secondary: &QmpClient,
    primary: &QmpClient,
    cfg: &PairConfig,
    opts: &FailbackOptions,
    incoming: &str,
    target: &NbdTarget,
    journal: &mut Journal<'_, '_>,
    report: &mut FailbackReport,
    switched: &mut bool,
) -> Result<(), PairError> {
    let (s, p) = (Role::Secondary, Role::Primary);
    let mut phase = Instant::now();

    // 1. The primary listens; the secondary migrates as a plain source, paused at the switch.
    if let Some(tls) = &cfg.tls {
        set_failback_tls(secondary, primary, tls, journal).await?;
    }
    journal
        .run(
            p,
            &format!("migrate-incoming {incoming}"),
            primary.migrate_incoming(incoming),
        )
        .await?;
    journal
        .run(
            s,
            "migrate-set-capabilities x-colo=off pause-before-switchover=on",
            secondary
                .migrate_set_capabilities(&[("x-colo", false), ("pause-before-switchover", true)]),
        )
        .await?;
    end_phase(&mut phase, report, "prepare");

    // 2. The disk copy, the guest running.
    let tls = cfg.tls.as_ref().map(|t| t.primary.name.as_str());
    start_copy(
        secondary,
        s,
        &cfg.disk.device,
        target,
        tls,
        &opts.copy,
        journal,
    )
    .await?;
    let (len, written) = wait_ready(secondary, s, &opts.copy, journal).await?;
    report.disk_bytes = len;
    end_phase(&mut phase, report, "copy");

    // 3. The memory, the guest running until QEMU stops it for the switch.
    journal
        .run(
            s,
            &format!("migrate {incoming}"),
            secondary.migrate(incoming),
        )
        .await?;
    report.ram_bytes = wait_pre_switchover(secondary, s, &opts.copy, journal).await?;
    let switch_started = Instant::now();
    end_phase(&mut phase, report, "memory");

    // 4. The switch: the VM is stopped.
    journal
        .run(
            s,
            &format!(
                "block-job-cancel {} (ready: completes without pivot)",
                super::reprotect::REPROTECT_JOB
            ),
            secondary.execute_raw(
                "block-job-cancel",
                Some(json!({ "device": super::reprotect::REPROTECT_JOB })),
            ),
        )
        .await?;
    report.bytes_copied = wait_job_gone(secondary, s, journal).await?.max(written);
    delete_target_node(secondary, s, journal).await?;
    *switched = true;
    journal
        .run(
            s,
            "migrate-continue pre-switchover",
            secondary.execute_raw(
                "migrate-continue",
                Some(json!({ "state": "pre-switchover" })),
            ),
        )
        .await?;
    wait_arrived(secondary, primary, opts, journal).await?;
    for id in [
        ids::MIRROR_FILTER,
        ids::COMPARE_OUT_REDIRECTOR,
        ids::COMPARE_IN_REDIRECTOR,
    ] {
        journal
            .idempotent(
                p,
                &format!("object-del {id}"),
                &["not found"],
                primary.object_del(id),
            )
            .await?;
    }
    journal.run(p, "cont", primary.cont()).await?;
    report.switch_pause_ms = switch_started.elapsed().as_secs_f64() * 1000.0;
    journal
        .run(p, "announce-self", primary.announce_self())
        .await?;
    // The old copy must never run again: a `cont` there would be a second VM.
    journal
        .best_effort(s, "quit (the old copy)", secondary.quit())
        .await;
    end_phase(&mut phase, report, "switch");
    Ok(())
}

/// Waits until the secondary's migration completed and the primary holds the VM (paused:
/// its command line has `-S`).
async fn wait_arrived(
    secondary: &QmpClient,
    primary: &QmpClient,
    opts: &FailbackOptions,
    journal: &mut Journal<'_, '_>,
) -> Result<(), PairError> {
    let start = Instant::now();
    loop {
        let status = steps::runstate(primary, Role::Primary).await?;
        match status.status.as_str() {
            "paused" | "running" => break,
            "inmigrate" | "finish-migrate" => {}
            other => {
                return Err(PairError::incomplete(
                    Role::Primary,
                    format!("the primary QEMU is `{other}` after the migration"),
                    "Look at the primary QEMU's stderr; the secondary's VM is stopped in \
                     `postmigrate`: `cont` it there to serve on",
                ));
            }
        }
        if start.elapsed() > opts.copy.migrate_timeout {
            return Err(PairError::incomplete(
                Role::Primary,
                "the migration did not complete on the primary",
                "Look at both QEMUs' stderr",
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let info = steps::migration(secondary, Role::Secondary).await?;
    journal.record(Step {
        side: Role::Primary,
        what: format!(
            "the VM arrived (the secondary's migration `{}`)",
            info.status.unwrap_or_default()
        ),
        outcome: Outcome::Done,
        ms: start.elapsed().as_secs_f64() * 1000.0,
        detail: None,
    });
    Ok(())
}

/// Polls colo-proxyd secondary's `colo_proxyd_failover_offset_connections` until it is 0.
async fn wait_no_offsets(
    metrics: &str,
    opts: &FailbackOptions,
    journal: &mut Journal<'_, '_>,
) -> Result<(), PairError> {
    let side = Role::Secondary;
    let start = Instant::now();
    let mut last_note: Option<Instant> = None;
    loop {
        let shifted = offset_connections(metrics).await.map_err(|why| {
            PairError::precondition(
                side,
                format!("colo-proxyd secondary's metrics at {metrics}: {why}"),
                "Give --offsets-metrics the HOST:PORT of its --metrics, or leave it out",
            )
        })?;
        if shifted == 0 {
            journal.record(Step {
                side,
                what: "no connection needs colo-proxyd's sequence shifts".into(),
                outcome: Outcome::Done,
                ms: start.elapsed().as_secs_f64() * 1000.0,
                detail: None,
            });
            return Ok(());
        }
        if start.elapsed() > opts.offsets_timeout {
            return Err(PairError::precondition(
                side,
                format!(
                    "{shifted} connections opened in the epoch before the failover are still \
                     open after {:?}; they would break at the failback",
                    opts.offsets_timeout
                ),
                "Wait for them to close (or give --offsets-timeout longer), then run failback \
                 again",
            ));
        }
        if last_note.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
            last_note = Some(Instant::now());
            journal.note(Progress::Waiting(format!(
                "{shifted} connections opened in the epoch before the failover to end"
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The gauge's value from a Prometheus text endpoint (`HOST:PORT`, path `/metrics`).
async fn offset_connections(metrics: &str) -> Result<u64, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(metrics)
            .await
            .map_err(|e| e.to_string())?;
        stream
            .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {metrics}\r\n\r\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut body = Vec::new();
        stream
            .take(4 << 20)
            .read_to_end(&mut body)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(String::from_utf8_lossy(&body).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .map_err(|_| "no answer within 5 s".to_string())??;
    gauge_value(&text, "colo_proxyd_failover_offset_connections")
        .ok_or_else(|| "it exports no colo_proxyd_failover_offset_connections".to_string())
}

/// The value of the unlabelled sample `name` in Prometheus text.
fn gauge_value(text: &str, name: &str) -> Option<u64> {
    let value = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))?;
    let value: f64 = value.trim().parse().ok()?;
    (value.is_finite() && value >= 0.0).then_some(value as u64)
}

fn end_phase(phase: &mut Instant, report: &mut FailbackReport, name: &'static str) {
    report.phases.push(Phase {
        name: name.to_string(),
        ms: phase.elapsed().as_secs_f64() * 1000.0,
    });
    *phase = Instant::now();
}

/// Puts the secondary back as it was, best effort: cancels the migration (a paused one
/// resumes the VM) and the mirror, deletes the target node, resumes the VM.
async fn undo(secondary: &QmpClient, journal: &mut Journal<'_, '_>) {
    undo_copy(secondary, Role::Secondary, journal).await;
    ensure_running(secondary, Role::Secondary, journal).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> PairConfig {
        let text = format!(
            r#"
            name = "vm1"
            [primary]
            qmp = "unix:/run/p.qmp"
            host = "192.168.77.1"
            [secondary]
            qmp = "unix:/run/s.qmp"
            host = "192.168.77.2"
            [migration]
            secondary_incoming = "tcp:192.168.77.2:9999"
            primary_target = "tcp:192.168.77.2:9998"
            [disk]
            backend = "colo-blockd"
            nbd_port = 10809
            [network]
            backend = "colo-proxyd"
            [relay]
            listen = "tcp:0.0.0.0:9998"
            target = "tcp:192.168.77.2:9999"
            control = "/run/relay.sock"
            {extra}
            "#
        );
        PairConfig::from_toml(&text, "test").unwrap()
    }

    #[test]
    fn the_defaults_name_the_primary_host() {
        let cfg = config("");
        assert_eq!(
            default_failback_target(&cfg),
            "nbd://192.168.77.1:10810/base"
        );
        assert_eq!(
            default_failback_incoming(&cfg).as_deref(),
            Some("tcp:192.168.77.1:9999")
        );
    }

    /// Serves one HTTP answer with `body` on a local port; returns `HOST:PORT`.
    async fn metrics_endpoint(body: &'static str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 1024];
            let n = stream.read(&mut request).await.unwrap();
            assert!(request[..n].starts_with(b"GET /metrics HTTP/1.0\r\n"));
            let answer = format!("HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\n{body}");
            stream.write_all(answer.as_bytes()).await.unwrap();
        });
        addr
    }

    #[tokio::test]
    async fn the_offsets_gauge_is_scraped_from_colo_proxyd_metrics_endpoint() {
        let addr = metrics_endpoint(
            "# TYPE colo_proxyd_failover_offset_connections gauge\n\
             colo_proxyd_failover_offset_connections 2\n",
        )
        .await;
        assert_eq!(offset_connections(&addr).await, Ok(2));
        let addr = metrics_endpoint("colo_proxyd_flows 3\n").await;
        let err = offset_connections(&addr).await.unwrap_err();
        assert!(err.contains("exports no"), "{err}");
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        assert!(offset_connections(&closed).await.is_err());
    }

    #[test]
    fn the_gauge_is_read_from_prometheus_text() {
        let text = "# HELP colo_proxyd_failover_offset_connections x\n\
                    # TYPE colo_proxyd_failover_offset_connections gauge\n\
                    colo_proxyd_failover_offset_connections 3\n\
                    colo_proxyd_flows 12\n";
        assert_eq!(
            gauge_value(text, "colo_proxyd_failover_offset_connections"),
            Some(3)
        );
        assert_eq!(gauge_value(text, "colo_proxyd_epoch"), None);
        assert_eq!(
            gauge_value("colo_proxyd_flows nan\n", "colo_proxyd_flows"),
            None
        );
    }
}
