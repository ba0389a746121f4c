//! Running, timing and recording steps; the read-only queries the
//! preconditions use.

use super::{Outcome, PairError, Progress, ProgressFn, Step};
use colo_qmp::{ColoStatus, MigrationInfo, QmpClient, QmpError, StatusInfo};
use colo_types::Role;
use serde_json::Value;
use std::future::Future;
use std::time::{Duration, Instant};

/// The steps of one operation, forwarded to the progress callback as they
/// finish.
pub(crate) struct Journal<'a, 'p> {
    pub(crate) steps: Vec<Step>,
    progress: &'a mut ProgressFn<'p>,
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

impl<'a, 'p> Journal<'a, 'p> {
    pub(crate) fn new(progress: &'a mut ProgressFn<'p>) -> Self {
        Journal {
            steps: Vec::new(),
            progress,
        }
    }

    pub(crate) fn note(&mut self, p: Progress) {
        (self.progress)(p);
    }

    pub(crate) fn record(&mut self, step: Step) {
        tracing::info!(side = %step.side, what = %step.what, outcome = ?step.outcome, ms = step.ms, detail = ?step.detail, "step");
        (self.progress)(Progress::Step(step.clone()));
        self.steps.push(step);
    }

    fn push(
        &mut self,
        side: Role,
        what: &str,
        outcome: Outcome,
        start: Instant,
        detail: Option<String>,
    ) {
        self.record(Step {
            side,
            what: what.to_string(),
            outcome,
            ms: ms(start),
            detail,
        });
    }

    /// A required step: any error fails the operation.
    pub(crate) async fn run<T>(
        &mut self,
        side: Role,
        what: &str,
        fut: impl Future<Output = Result<T, QmpError>>,
    ) -> Result<T, PairError> {
        let start = Instant::now();
        match fut.await {
            Ok(v) => {
                self.push(side, what, Outcome::Done, start, None);
                Ok(v)
            }
            Err(e) => {
                self.push(side, what, Outcome::Failed, start, Some(e.to_string()));
                Err(PairError::Qmp {
                    side,
                    step: what.to_string(),
                    source: e,
                })
            }
        }
    }

    /// A step that may already have been done: a QEMU error whose text
    /// contains one of `done_markers` means "already in that state" and is
    /// recorded as skipped. Returns whether the step did something.
    pub(crate) async fn idempotent<T>(
        &mut self,
        side: Role,
        what: &str,
        done_markers: &[&str],
        fut: impl Future<Output = Result<T, QmpError>>,
    ) -> Result<bool, PairError> {
        let start = Instant::now();
        match fut.await {
            Ok(_) => {
                self.push(side, what, Outcome::Done, start, None);
                Ok(true)
            }
            Err(QmpError::Qemu { desc, .. }) if done_markers.iter().any(|m| desc.contains(m)) => {
                self.push(side, what, Outcome::Skipped, start, Some(desc));
                Ok(false)
            }
            Err(e) => {
                self.push(side, what, Outcome::Failed, start, Some(e.to_string()));
                Err(PairError::Qmp {
                    side,
                    step: what.to_string(),
                    source: e,
                })
            }
        }
    }

    /// A best-effort step: an error is recorded and the operation goes on.
    pub(crate) async fn best_effort<T, E: std::fmt::Display>(
        &mut self,
        side: Role,
        what: &str,
        fut: impl Future<Output = Result<T, E>>,
    ) -> Option<T> {
        let start = Instant::now();
        match fut.await {
            Ok(v) => {
                self.push(side, what, Outcome::Done, start, None);
                Some(v)
            }
            Err(e) => {
                self.push(side, what, Outcome::Failed, start, Some(e.to_string()));
                None
            }
        }
    }

    /// Records a step that was not needed.
    pub(crate) fn skipped(&mut self, side: Role, what: &str, why: impl Into<String>) {
        self.push(
            side,
            what,
            Outcome::Skipped,
            Instant::now(),
            Some(why.into()),
        );
    }
}

/// Runs an HMP command line; HMP reports errors as text, so non-empty
/// output (other than `OK`) becomes a [`QmpError::Qemu`] with class `HMP`.
pub(crate) async fn hmp(qmp: &QmpClient, command_line: &str) -> Result<(), QmpError> {
    let out = qmp.human_monitor_command(command_line).await?;
    let text = out.trim();
    if text.is_empty() || text == "OK" {
        Ok(())
    } else {
        Err(QmpError::Qemu {
            command: format!("human-monitor-command {command_line}"),
            class: "HMP".to_string(),
            desc: text.to_string(),
        })
    }
}

fn query_error(side: Role, what: &str, source: QmpError) -> PairError {
    PairError::Qmp {
        side,
        step: what.to_string(),
        source,
    }
}

/// `query-status`.
pub(crate) async fn runstate(qmp: &QmpClient, side: Role) -> Result<StatusInfo, PairError> {
    qmp.query_status()
        .await
        .map_err(|e| query_error(side, "query-status", e))
}

/// `query-colo-status`.
pub(crate) async fn colo_status(qmp: &QmpClient, side: Role) -> Result<ColoStatus, PairError> {
    qmp.query_colo_status()
        .await
        .map_err(|e| query_error(side, "query-colo-status", e))
}

/// `query-colo-status` with a short first try: a QEMU whose migration
/// thread is stuck on a dead peer's socket (holding the big lock) does not
/// answer in-band commands. Then yank the migration out of band, which
/// unsticks it, and ask again.
pub(crate) async fn colo_status_unsticking(
    qmp: &QmpClient,
    side: Role,
    journal: &mut Journal<'_, '_>,
    yanked: &mut bool,
) -> Result<ColoStatus, PairError> {
    let first = qmp
        .execute_raw_timeout("query-colo-status", None, Duration::from_secs(3))
        .await;
    match first {
        Ok(v) => serde_json::from_value(v).map_err(|e| {
            query_error(
                side,
                "query-colo-status",
                QmpError::Decode {
                    command: "query-colo-status".into(),
                    detail: e.to_string(),
                },
            )
        }),
        Err(QmpError::Timeout { .. }) => {
            tracing::warn!(%side, "query-colo-status hangs: yanking the migration stream first");
            yank_migration(qmp, side, journal).await;
            if side == Role::Primary {
                // A hung NBD child holds the big lock too (QEMU drains the
                // disk's requests under it at every checkpoint).
                yank_replication_child(qmp, journal).await;
            }
            *yanked = true;
            colo_status(qmp, side).await
        }
        Err(e) => Err(query_error(side, "query-colo-status", e)),
    }
}

/// `query-migrate`.
pub(crate) async fn migration(qmp: &QmpClient, side: Role) -> Result<MigrationInfo, PairError> {
    qmp.query_migrate()
        .await
        .map_err(|e| query_error(side, "query-migrate", e))
}

/// Migration capabilities as `(name, state)` pairs.
pub(crate) async fn capabilities(
    qmp: &QmpClient,
    side: Role,
) -> Result<Vec<(String, bool)>, PairError> {
    let v = qmp
        .execute_raw("query-migrate-capabilities", None)
        .await
        .map_err(|e| query_error(side, "query-migrate-capabilities", e))?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| Some((c["capability"].as_str()?.to_string(), c["state"].as_bool()?)))
        .collect())
}

pub(crate) fn capability(caps: &[(String, bool)], name: &str) -> bool {
    caps.iter().any(|(n, s)| n == name && *s)
}

/// The current `x-checkpoint-delay` from `query-migrate-parameters`.
pub(crate) async fn checkpoint_delay(qmp: &QmpClient, side: Role) -> Result<u32, PairError> {
    qmp.checkpoint_delay()
        .await
        .map_err(|e| query_error(side, "query-migrate-parameters", e))
}

/// Sets the capabilities COLO needs: x-colo on, return-path off (with
/// return-path on, 10.0.2's primary fails at once). Skipped when they
/// already are.
pub(crate) async fn enable_colo_capabilities(
    qmp: &QmpClient,
    side: Role,
    caps: &[(String, bool)],
    journal: &mut Journal<'_, '_>,
) -> Result<(), PairError> {
    let mut wanted: Vec<(&str, bool)> = Vec::new();
    if !capability(caps, "x-colo") {
        wanted.push(("x-colo", true));
    }
    if capability(caps, "return-path") {
        wanted.push(("return-path", false));
    }
    if wanted.is_empty() {
        journal.skipped(
            side,
            "migrate-set-capabilities x-colo=on",
            "x-colo is already on",
        );
        return Ok(());
    }
    let what = wanted
        .iter()
        .map(|(c, s)| format!("{c}={}", if *s { "on" } else { "off" }))
        .collect::<Vec<_>>()
        .join(" ");
    journal
        .run(
            side,
            &format!("migrate-set-capabilities {what}"),
            qmp.migrate_set_capabilities(&wanted),
        )
        .await
}

/// With `[tls]`, the primary's migration parameters for TLS: the relay on the secondary host
/// terminates the migration's TLS, the primary presents its host's certificate (the
/// `qemu-args` credentials object) and accepts only the secondary host's. Nothing without.
pub(crate) async fn set_migration_tls(
    primary: &QmpClient,
    cfg: &crate::config::PairConfig,
    journal: &mut Journal<'_, '_>,
) -> Result<(), PairError> {
    let Some(tls) = &cfg.tls else {
        return Ok(());
    };
    set_migration_tls_client(primary, Role::Primary, &tls.secondary.name, journal).await
}

/// The migration parameters of a TLS source: the client object
/// [`crate::config::TLS_CREDS_ID`], accepting only `peer`'s certificate (`tls-hostname`).
pub(crate) async fn set_migration_tls_client(
    source: &QmpClient,
    side: Role,
    peer: &str,
    journal: &mut Journal<'_, '_>,
) -> Result<(), PairError> {
    let creds = crate::config::TLS_CREDS_ID;
    journal
        .run(
            side,
            &format!("migrate-set-parameters tls-creds={creds} tls-hostname={peer}"),
            source.migrate_set_parameters(
                serde_json::json!({ "tls-creds": creds, "tls-hostname": peer }),
            ),
        )
        .await
}

/// Out-of-band `yank` of the migration stream, best effort: with a dead
/// peer it unsticks QEMU; when the stream is already gone QEMU says so,
/// which is fine.
pub(crate) async fn yank_migration(qmp: &QmpClient, side: Role, journal: &mut Journal<'_, '_>) {
    let what = if qmp.oob_enabled() {
        "yank migration (out of band)"
    } else {
        "yank migration (in band: QEMU did not offer OOB)"
    };
    journal
        .best_effort(
            side,
            what,
            qmp.yank(serde_json::json!([{ "type": "migration" }])),
        )
        .await;
}

/// Out-of-band `yank` of the primary's NBD client nodes (the quorum's
/// replication child), best effort. A secondary host that stopped answering
/// leaves the child's requests pending for ever (QEMU's NBD client has no
/// request timeout, and the quorum waits for every child), which freezes
/// the guest's disk and, at the next checkpoint's drain, the whole monitor.
/// The yank fails those requests at once, so the quorum completes them from
/// the local child and the child can be removed.
///
/// Which nodes: every `block-node` instance `query-yank` lists on the
/// primary. Only NBD clients register one, and the primary's only NBD
/// client is the replication child (its own disk is a local file).
pub(crate) async fn yank_replication_child(qmp: &QmpClient, journal: &mut Journal<'_, '_>) {
    let side = Role::Primary;
    let listed = if qmp.oob_enabled() {
        qmp.execute_oob_raw("query-yank", None).await
    } else {
        qmp.execute_raw_timeout("query-yank", None, Duration::from_secs(3))
            .await
    };
    let instances = match listed {
        Ok(list) => block_node_instances(&list),
        Err(e) => {
            journal.record(Step {
                side,
                what: "query-yank".into(),
                outcome: Outcome::Failed,
                ms: 0.0,
                detail: Some(e.to_string()),
            });
            return;
        }
    };
    if instances.is_empty() {
        journal.skipped(side, "yank NBD child", "no NBD client node left");
        return;
    }
    let names: Vec<&str> = instances
        .iter()
        .filter_map(|i| i["node-name"].as_str())
        .collect();
    let what = format!("yank NBD child {}", names.join(", "));
    journal
        .best_effort(side, &what, qmp.yank(Value::Array(instances.clone())))
        .await;
}

/// The `block-node` entries of a `query-yank` answer.
fn block_node_instances(list: &Value) -> Vec<Value> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["type"] == "block-node" && i["node-name"].is_string())
        .cloned()
        .collect()
}

/// Labels of chardevs that are not connected (or do not exist).
pub(crate) async fn unconnected_chardevs<'i>(
    qmp: &QmpClient,
    side: Role,
    ids: &[&'i str],
) -> Result<Vec<(&'i str, bool)>, PairError> {
    let list = qmp
        .execute_raw("query-chardev", None)
        .await
        .map_err(|e| query_error(side, "query-chardev", e))?;
    let find =
        |id: &str| -> Option<Value> { list.as_array()?.iter().find(|c| c["label"] == id).cloned() };
    Ok(ids
        .iter()
        .filter_map(|id| match find(id) {
            None => Some((*id, false)),
            Some(c) => c["filename"]
                .as_str()
                .is_none_or(|f| f.starts_with("disconnected"))
                .then_some((*id, true)),
        })
        .collect())
}
