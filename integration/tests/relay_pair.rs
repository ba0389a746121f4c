//! The checkpoint-barrier relay and the operator's CLI on the test bed.
//!
//! Real QEMU (TCG) in network namespaces; needs root, the artifacts of `integration/setup.sh`
//! and the `qmp-driver` binary of this build (the workspace's test run builds it). Without them
//! the tests fail and say what is missing; they never skip. nextest runs them one at a time
//! (group `qemu`).

use std::time::Duration;

use colo_testbed::barrier;
use colo_testbed::scenario::{self, FailoverPlan, Report};
use colo_testbed::stock::{PairConfig, Role};

fn fast_checkpoints() -> PairConfig {
    PairConfig {
        checkpoint_delay_ms: 300,
        guest_load_mib_s: 4,
        ..PairConfig::default()
    }
}

/// Every one of at least 50 checkpoints gives exactly one `svm-epoch-closed`,
/// `checkpoint-adopted` and `checkpoint-complete`, in order, in step with both QEMUs'
/// STOP/RESUME (in each of two relayed pairs); prints the pause the relay adds against two
/// pairs without it (same run).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn relay_orders_every_checkpoint_and_reports_its_added_pause() {
    let report = barrier::epochs("t-ep", fast_checkpoints(), 50)
        .await
        .expect("epoch scenario ran");
    println!("{}", report.render());
    assert!(
        report.violations.is_empty(),
        "order violations: {:#?}",
        report.violations
    );
    assert_eq!(report.pairs.len(), 4, "without, with, with, without relay");
    for pair in &report.pairs {
        assert!(pair.checkpoints >= 50, "a pair with {pair:?}");
    }
    assert_eq!(report.closed, report.primary_checkpoints);
    assert_eq!(report.adopted, report.primary_checkpoints);
    assert_eq!(report.complete, report.primary_checkpoints);
    assert_eq!(report.secondary_checkpoints, report.primary_checkpoints);
    assert!(report.direct_checkpoints >= 50);
    assert!(
        report.added_pause_ms.is_some(),
        "no pause measured with and without relay"
    );
}

/// A subscriber that acknowledges 50 ms late holds every checkpoint at least that long on both
/// sides: the secondary stays stopped until its `checkpoint-reply` is forwarded
/// (`svm-epoch-closed`), the primary until `vmstate-received` is (`checkpoint-adopted`). One
/// that never acknowledges ends COLO on both QEMUs within the relay's bound, and the primary
/// then serves alone.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn barrier_holds_checkpoints_and_a_stuck_subscriber_ends_colo() {
    let delay = Duration::from_millis(50);
    let cfg = PairConfig {
        checkpoint_delay_ms: 500,
        relay_ack_timeout_ms: 1000,
        ..PairConfig::default()
    };
    let report = barrier::barrier("t-bar", cfg, 8, delay)
        .await
        .expect("barrier scenario ran");
    println!("{}", report.render());
    assert!(report.slow_primary_ms.len() >= 8);
    for ms in &report.slow_primary_ms {
        assert!(
            *ms >= 50.0,
            "a primary pause of {ms} ms with a 50 ms subscriber: {:?}",
            report.slow_primary_ms
        );
    }
    for ms in &report.slow_secondary_ms {
        assert!(
            *ms >= 50.0,
            "a secondary pause of {ms} ms with a 50 ms subscriber: {:?}",
            report.slow_secondary_ms
        );
    }
    assert_eq!(
        report.colo_exit_reason.as_deref(),
        Some("barrier-timeout"),
        "{report:?}"
    );
    let detail = report.colo_exit_detail.as_deref().unwrap_or_default();
    assert!(
        detail.contains("stuck") && !detail.contains("disconnected"),
        "COLO must end because `stuck` never answered: {detail}"
    );
    // The relay waits its whole bound before it gives up (a lower bound, not a timing
    // threshold: it cannot end sooner unless something else failed the barrier).
    let after = report.exit_after_ms.expect("measured");
    assert!(
        after >= report.ack_timeout_ms as f64,
        "COLO ended {after} ms after the stuck subscriber joined, before the {} ms bound",
        report.ack_timeout_ms
    );
    assert_eq!(report.qemu_exit_reasons, ["error", "error"]);
    assert!(report.relay_barrier_timeouts >= 1);
    assert_eq!(report.served_after, 5, "the primary did not serve alone");
}

fn assert_cli_failover(report: &Report) {
    println!("{}", report.render());
    let cli = |name: &str| {
        report
            .cli
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>()
    };
    let start = &cli("start")[0];
    assert_eq!(start["already_in_colo"], false, "{start}");
    let status = cli("status");
    assert_eq!(status.len(), 2);
    for st in &status {
        assert_eq!(st["primary"]["colo_mode"], "primary", "{st}");
        assert_eq!(st["secondary"]["colo_mode"], "secondary", "{st}");
        assert_eq!(st["relay"]["reachable"], true, "{st}");
    }
    let checkpoint = &cli("checkpoint")[0];
    let epoch_before = status[0]["relay"]["status"]["epoch"]
        .as_u64()
        .expect("status shows the relay's epoch");
    let epoch_after = checkpoint["relay"]["epoch"]
        .as_u64()
        .expect("checkpoint shows the relay's epoch");
    assert!(
        epoch_after > epoch_before,
        "the forced checkpoint is not a new epoch: {epoch_before} -> {epoch_after}"
    );
    assert!(checkpoint["pause_ms"].as_f64().is_some_and(|p| p > 0.0));
    assert!(!report.failover_steps.is_empty());
    assert!(
        report.http_failures.is_empty(),
        "failed requests: {:?}",
        report.http_failures
    );
    let download = report.download.as_ref().expect("a download was in flight");
    assert!(download.ok(), "in-flight download broken: {download:?}");
    assert!(report.after_failover_ok >= 10);
    let disk = report.disk.as_ref().expect("survivor disk checked");
    assert!(disk.is_consistent(), "survivor disk inconsistent: {disk:?}");
}

/// `qmp-driver start` from the config file alone, `status`, `checkpoint`; the primary is
/// killed mid-download and `qmp-driver failover --survivor secondary` keeps it alive.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn cli_start_status_checkpoint_and_failover_to_the_secondary() {
    let plan = FailoverPlan {
        kill: Role::Primary,
        via_cli: true,
        ..FailoverPlan::default()
    };
    let report = scenario::failover("t-clip", PairConfig::default(), plan)
        .await
        .expect("CLI failover scenario ran");
    assert_cli_failover(&report);
}

/// The same with the secondary killed and `qmp-driver failover --survivor primary`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn cli_start_status_checkpoint_and_failover_to_the_primary() {
    let plan = FailoverPlan {
        kill: Role::Secondary,
        via_cli: true,
        ..FailoverPlan::default()
    };
    let report = scenario::failover("t-clis", PairConfig::default(), plan)
        .await
        .expect("CLI failover scenario ran");
    assert_cli_failover(&report);
}
