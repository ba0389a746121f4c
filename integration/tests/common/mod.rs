//! Checks shared by the test-bed test files.

use colo_testbed::scenario::Report;
use colo_testbed::stock::{DiskBackend, NetworkBackend, PairConfig, Role};

/// A failover run kept every promise: no failed request, the in-flight download intact, the
/// survivor serving and its heartbeat advancing, its disk holding every record its heartbeat
/// promised, and the SVM's output compared before the kill.
pub fn assert_failover(report: &Report) {
    println!("{}", report.render());
    assert!(
        report.http_failures.is_empty(),
        "failed requests: {:?}",
        report.http_failures
    );
    assert!(
        report.guest_errors.is_empty(),
        "guest errors: {:?}",
        report.guest_errors
    );
    let download = report.download.as_ref().expect("a download was in flight");
    assert!(download.ok(), "in-flight download broken: {download:?}");
    assert!(
        report.kill_to_first_success_ms.is_some(),
        "no request succeeded after the kill"
    );
    assert!(
        report.after_failover_ok >= 10,
        "only {} requests after failover",
        report.after_failover_ok
    );
    assert!(report.checkpoints_primary >= 3 || report.killed == Some(Role::Primary));
    assert!(
        report.svm_output_bytes.is_some_and(|b| b > 0),
        "no SVM output reached colo-compare before the kill"
    );
    let disk = report
        .disk
        .as_ref()
        .expect("the survivor's disk was checked");
    assert!(disk.last_heartbeat > 0, "the survivor printed no heartbeat");
    assert!(disk.is_consistent(), "survivor disk inconsistent: {disk:?}");
    let (_, first, last) = &report.heartbeats[0];
    assert!(
        last > first,
        "survivor heartbeat did not advance: {first:?} -> {last:?}"
    );
}

/// A soak run kept every promise: at least `checkpoints` on both sides, requests made and all
/// answered, no guest error, and at least `min_svm_bytes` of the SVM's own output compared
/// (a dead SVM NIC would leave that near zero while periodic checkpoints still answer every
/// request).
pub fn assert_soak(report: &Report, checkpoints: usize, min_svm_bytes: u64) {
    println!("{}", report.render());
    assert!(
        report.checkpoints_primary >= checkpoints && report.checkpoints_secondary >= checkpoints,
        "{} / {} checkpoints",
        report.checkpoints_primary,
        report.checkpoints_secondary
    );
    assert!(report.http_requests > 0, "no requests made");
    assert!(
        report.http_failures.is_empty(),
        "failed requests: {:?}",
        report.http_failures
    );
    assert!(
        report.guest_errors.is_empty(),
        "guest errors: {:?}",
        report.guest_errors
    );
    let svm = report.svm_output_bytes.expect("SVM output measured");
    assert!(
        svm >= min_svm_bytes,
        "only {svm} bytes of SVM output reached the comparison"
    );
}

/// The pair of the fault and HA tests: colo-blockd and colo-proxyd, 500 ms checkpoints.
pub fn daemons_pair() -> PairConfig {
    PairConfig {
        checkpoint_delay_ms: 500,
        guest_load_mib_s: 4,
        disk: DiskBackend::ColoBlockd,
        network: NetworkBackend::ColoProxyd,
        ..PairConfig::default()
    }
}
