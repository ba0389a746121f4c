//! colo-blockd in place of QEMU's block replication on the test bed.
//!
//! The stock pair with `disk.backend = "colo-blockd"`: the primary's quorum gets an NBD child
//! of colo-blockd's `replica` export (`blockdev-add` + `x-blockdev-change`), the secondary VM's
//! disk is its `svm` export, and colo-blockd follows the relay's barrier. The guest writes a
//! heartbeat record per second; after the failover the survivor's disk must hold every record
//! its heartbeat promised, none missing, none torn. Real QEMU (TCG) in network namespaces;
//! needs root, `integration/setup.sh`'s artifacts and this build's `qmp-driver` and
//! `colo-blockd` binaries. Without them the tests fail and say what is missing.

// Shared with the other bed test files; this one has no soak.
#[allow(dead_code)]
mod common;

use std::path::Path;

use colo_control::protocol::EventKind;
use colo_testbed::scenario::{self, FailoverPlan, Report};
use colo_testbed::stock::{DiskBackend, PairConfig, Role};

fn blockd_pair() -> PairConfig {
    PairConfig {
        checkpoint_delay_ms: 500,
        guest_load_mib_s: 4,
        disk: DiskBackend::ColoBlockd,
        ..PairConfig::default()
    }
}

/// Lines of colo-blockd's log (`blockd.log` in the run directory) that contain `what`.
fn blockd_log_lines(report: &Report, what: &str) -> usize {
    let log = std::fs::read_to_string(Path::new(&report.run_dir).join("blockd.log"))
        .expect("colo-blockd's log exists");
    log.lines().filter(|l| l.contains(what)).count()
}

fn assert_blockd_failover(report: &Report, checkpoints: usize) {
    common::assert_failover(report);
    // colo-blockd really held the secondary's disk: it committed one PVM log per checkpoint
    // the secondary adopted.
    let commits = blockd_log_lines(report, "PVM log committed");
    assert!(
        commits >= checkpoints,
        "colo-blockd committed {commits} checkpoints, expected at least {checkpoints}"
    );
    if report.killed == Some(Role::Primary) {
        assert_eq!(
            blockd_log_lines(report, "failover to the secondary"),
            1,
            "colo-blockd did not switch to the SVM's side exactly once"
        );
    }
}

/// At least 30 checkpoints with the guest writing a record per second, then the primary dies
/// during a download: the secondary takes over on colo-blockd's disk.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn blockd_pair_30_checkpoints_then_the_secondary_takes_over() {
    let plan = FailoverPlan {
        kill: Role::Primary,
        checkpoints_before: 30,
        ..FailoverPlan::default()
    };
    let report = scenario::failover("t-bd", blockd_pair(), plan)
        .await
        .expect("failover scenario ran");
    assert!(
        report.checkpoints_secondary >= 30,
        "{} checkpoints",
        report.checkpoints_secondary
    );
    assert_blockd_failover(&report, 30);
}

/// The primary dies while the relay holds a checkpoint at `svm-epoch-closed` (the SVM stopped,
/// its epoch closed, the primary's state not sent): the secondary goes on from its own state,
/// so colo-blockd must drop the PVM log and keep the SVM's writes.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn blockd_failover_while_the_epoch_closes() {
    let plan = FailoverPlan {
        kill: Role::Primary,
        checkpoints_before: 5,
        kill_at_event: Some(EventKind::SvmEpochClosed),
        ..FailoverPlan::default()
    };
    let report = scenario::failover("t-bdc", blockd_pair(), plan)
        .await
        .expect("failover scenario ran");
    assert_eq!(report.killed_at_event.as_deref(), Some("svm-epoch-closed"));
    assert_blockd_failover(&report, 5);
}

/// The primary dies while the relay holds a checkpoint at `checkpoint-adopted` (the
/// secondary received the primary's state and loads it): the secondary goes on from the
/// checkpoint, so colo-blockd must have committed that epoch's PVM log.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn blockd_failover_while_the_checkpoint_is_adopted() {
    let plan = FailoverPlan {
        kill: Role::Primary,
        checkpoints_before: 5,
        kill_at_event: Some(EventKind::CheckpointAdopted),
        ..FailoverPlan::default()
    };
    let report = scenario::failover("t-bda", blockd_pair(), plan)
        .await
        .expect("failover scenario ran");
    assert_eq!(
        report.killed_at_event.as_deref(),
        Some("checkpoint-adopted")
    );
    assert_blockd_failover(&report, 5);
}

/// The secondary host dies: the primary removes colo-blockd's child from its quorum
/// (`x-blockdev-change`, `blockdev-del`) and carries on alone on its own disk.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn blockd_secondary_dies_and_the_primary_drops_its_child() {
    let plan = FailoverPlan {
        kill: Role::Secondary,
        checkpoints_before: 5,
        ..FailoverPlan::default()
    };
    let report = scenario::failover("t-bds", blockd_pair(), plan)
        .await
        .expect("failover scenario ran");
    let removed: Vec<&str> = report
        .failover_steps
        .iter()
        .map(|s| s.what.as_str())
        .filter(|w| w.starts_with("x-blockdev-change") || w.starts_with("blockdev-del"))
        .collect();
    assert_eq!(
        removed.len(),
        2,
        "the quorum child was not removed: {:#?}",
        report.failover_steps
    );
    assert_blockd_failover(&report, 5);
}
