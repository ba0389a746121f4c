//! The initial full copy of the primary's disk to a new secondary, with
//! QEMU's `drive-mirror` into an NBD export on the secondary host (for
//! colo-blockd: `colo-blockd serve --export base=S.raw` before `colo-blockd
//! secondary` takes the image over).
//!
//! The copy is exact only if nothing writes the disk after it: the primary
//! must not run (prelaunch under `-S`, or paused), and must stay so until
//! `start` migrates it into COLO. So a running primary is refused.

use super::steps::{self, Journal};
use super::{PairError, Progress, ProgressFn, Step};
use crate::config::PairConfig;
use colo_qmp::QmpClient;
use colo_types::Role;
use serde::Serialize;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// The job id of the copy (so a second run finds an interrupted one).
pub const COPY_JOB: &str = "colo-copy";

/// The export a copy goes to by default (`colo-blockd serve --export base=S.raw`).
pub const DEFAULT_COPY_EXPORT: &str = "base";

/// Options of [`copy_disk`].
#[derive(Debug, Clone)]
pub struct CopyOptions {
    /// The NBD export to copy to, as `nbd://HOST:PORT/EXPORT` or
    /// `nbd+unix:///EXPORT?socket=PATH`; see [`default_target`].
    pub target: String,
    /// Longest wait for the copy to be complete.
    pub timeout: Duration,
}

/// `nbd://secondary.host:disk.nbd_port/base`.
pub fn default_target(cfg: &PairConfig) -> String {
    format!(
        "nbd://{}:{}/{DEFAULT_COPY_EXPORT}",
        cfg.secondary.host, cfg.disk.nbd_port
    )
}

/// What [`copy_disk`] did.
#[derive(Debug, Clone, Serialize)]
pub struct CopyReport {
    /// Where the disk went.
    pub target: String,
    /// Bytes copied (the disk's size).
    pub bytes: u64,
    /// Wall time of the copy, ms.
    pub total_ms: f64,
    /// The steps.
    pub steps: Vec<Step>,
}

/// Copies the primary's disk (`disk.device`) into `opts.target`: refuses a
/// running primary, starts `drive-mirror` (full, into the existing export,
/// raw), reports progress until the job is ready (source and target
/// identical), then cancels it, which leaves the target as the copy.
pub async fn copy_disk(
    primary: &QmpClient,
    cfg: &PairConfig,
    opts: &CopyOptions,
    mut progress: ProgressFn<'_>,
) -> Result<CopyReport, PairError> {
    let side = Role::Primary;
    let started = Instant::now();
    let mut journal = Journal::new(&mut progress);
    let state = steps::runstate(primary, side).await?;
    if state.running {
        return Err(PairError::Precondition {
            side,
            what: format!("the VM runs (state {})", state.status),
            hint: "copy the disk before the guest starts (QEMU under -S) or after `stop`: a \
                   running guest keeps writing and the copy would not be exact"
                .into(),
        });
    }
    if find_job(primary).await?.is_some() {
        journal.skipped(
            side,
            "drive-mirror",
            format!("job {COPY_JOB} already runs; waiting for it"),
        );
    } else {
        let args = json!({
            "job-id": COPY_JOB,
            "device": cfg.disk.device,
            "target": opts.target,
            "format": "raw",
            "mode": "existing",
            "sync": "full",
        });
        let what = format!("drive-mirror {} → {}", cfg.disk.device, opts.target);
        journal
            .run(side, &what, primary.execute_raw("drive-mirror", Some(args)))
            .await?;
    }
    let bytes = wait_ready(primary, opts.timeout, &mut journal).await?;
    // After READY, cancelling completes the job without pivoting: the source
    // stays the disk, the target keeps the copy.
    journal
        .run(
            side,
            &format!("block-job-cancel {COPY_JOB}"),
            primary.execute_raw("block-job-cancel", Some(json!({ "device": COPY_JOB }))),
        )
        .await?;
    wait_gone(primary, &mut journal).await?;
    Ok(CopyReport {
        target: opts.target.clone(),
        bytes,
        total_ms: started.elapsed().as_secs_f64() * 1000.0,
        steps: journal.steps,
    })
}

async fn find_job(primary: &QmpClient) -> Result<Option<Value>, PairError> {
    block_job(primary, COPY_JOB).await
}

/// The primary's block job on `device` (`query-block-jobs`), if one runs. Shared by
/// `copy-disk` and `reprotect`.
pub(super) async fn block_job(
    primary: &QmpClient,
    device: &str,
) -> Result<Option<Value>, PairError> {
    let jobs = primary
        .execute_raw("query-block-jobs", None)
        .await
        .map_err(|source| PairError::Qmp {
            side: Role::Primary,
            step: "query-block-jobs".into(),
            source,
        })?;
    Ok(jobs
        .as_array()
        .into_iter()
        .flatten()
        .find(|j| j["device"] == device)
        .cloned())
}

/// Polls the job until it is ready; returns its length.
async fn wait_ready(
    primary: &QmpClient,
    timeout: Duration,
    journal: &mut Journal<'_, '_>,
) -> Result<u64, PairError> {
    let side = Role::Primary;
    let start = Instant::now();
    let mut last_percent = None;
    loop {
        let Some(job) = find_job(primary).await? else {
            return Err(PairError::Incomplete {
                side,
                what: format!("the copy job {COPY_JOB} ended before it was complete"),
                hint: "the NBD target may have gone away or refused a write: check that the \
                       export is served writable and is at least as large as the disk, and \
                       the primary QEMU's log; then run copy-disk again"
                    .into(),
            });
        };
        let (done, len) = (job["offset"].as_u64(), job["len"].as_u64());
        if job["ready"] == true {
            journal.record(Step {
                side,
                what: format!("copy ready ({} bytes)", len.unwrap_or(0)),
                outcome: super::Outcome::Done,
                ms: start.elapsed().as_secs_f64() * 1000.0,
                detail: None,
            });
            return Ok(len.unwrap_or(0));
        }
        if let (Some(done), Some(len)) = (done, len) {
            let percent = (done * 100).checked_div(len).unwrap_or(0);
            if last_percent != Some(percent) {
                last_percent = Some(percent);
                journal.note(Progress::Waiting(format!(
                    "the copy: {percent}% ({done} of {len} bytes)"
                )));
            }
        }
        if start.elapsed() > timeout {
            return Err(PairError::Incomplete {
                side,
                what: format!("the copy was not complete within {timeout:?} (job {job})"),
                hint: format!(
                    "give it longer (--timeout), or cancel it with `block-job-cancel \
                     {COPY_JOB}` (force) and check the link to the target"
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_gone(primary: &QmpClient, journal: &mut Journal<'_, '_>) -> Result<(), PairError> {
    let start = Instant::now();
    while find_job(primary).await?.is_some() {
        if start.elapsed() > Duration::from_secs(30) {
            return Err(PairError::Incomplete {
                side: Role::Primary,
                what: format!("the copy job {COPY_JOB} did not end after block-job-cancel"),
                hint: "check `query-block-jobs` on the primary".into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    journal.note(Progress::Waiting("the copy job to end: done".into()));
    Ok(())
}
