//! colo-proxyd in place of QEMU's colo-compare and filter-rewriter on the test bed.
//!
//! The pair with `network.backend = "colo-proxyd"`: no colo-compare object and no
//! filter-rewriter; the primary QEMU's filter sockets go to `colo-proxyd primary`, the
//! secondary's redirectors to `colo-proxyd secondary`, and the two daemons compare the
//! reassembled TCP streams and follow the relay's barrier. Real QEMU (TCG) in network
//! namespaces; needs root, `integration/setup.sh`'s artifacts and this build's `qmp-driver`
//! and `colo-proxyd` binaries. Without them the tests fail and say what is missing.

// Shared with the other bed test files; not every helper is used here.
#[allow(dead_code)]
mod common;

use std::time::Duration;

use colo_testbed::compare_ab::{self, Workload};
use colo_testbed::scenario::{self, FailoverPlan};
use colo_testbed::stock::{NetworkBackend, PairConfig, Role};

fn proxyd_pair() -> PairConfig {
    PairConfig {
        checkpoint_delay_ms: 500,
        guest_load_mib_s: 4,
        network: NetworkBackend::ColoProxyd,
        ..PairConfig::default()
    }
}

/// At least 30 checkpoints while the guest dirties memory: every request answered, the 1 MiB
/// blob intact, and the SVM's output really reached the comparison.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn proxyd_pair_survives_30_checkpoints_under_load() {
    let report = scenario::soak("t-px", proxyd_pair(), 30, Duration::from_millis(300))
        .await
        .expect("soak scenario ran");
    // The SVM produced most of the blob itself. Not all of it: a checkpoint in the middle of
    // the download hands the SVM the PVM's TCP state, and the SVM never sends what the PVM had
    // already sent.
    common::assert_soak(&report, 30, scenario::BLOB_BYTES as u64 / 2);
}

/// The primary is SIGKILLed (with its colo-proxyd) mid-download; the secondary takes over and
/// the download completes with the right checksum.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn proxyd_pair_primary_killed_secondary_takes_over() {
    let plan = FailoverPlan {
        kill: Role::Primary,
        ..FailoverPlan::default()
    };
    let report = scenario::failover("t-pxp", proxyd_pair(), plan)
        .await
        .expect("failover scenario ran");
    common::assert_failover(&report);
}

/// The primary dies one second into a download, with no checkpoint since the connection
/// opened (the periodic one is 20 s away): the SVM opened it with its own initial sequence
/// number, which the client never saw. After the failover colo-proxyd secondary carries the
/// SVM's traffic and shifts that connection's numbers to the PVM's, so the download completes.
///
/// A checkpoint the comparison asks for during that second (an HTTP `Date:` header that ticked
/// over between the VMs, say) hands the SVM the PVM's numbers and leaves nothing to shift: the
/// run still has to keep every promise, but it did not test the shifting, so it is repeated,
/// up to three times in all.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn proxyd_failover_keeps_a_connection_opened_in_the_last_epoch() {
    const ATTEMPTS: usize = 3;
    for attempt in 1..=ATTEMPTS {
        let cfg = PairConfig {
            checkpoint_delay_ms: 20_000,
            guest_load_mib_s: 1,
            ..proxyd_pair()
        };
        let plan = FailoverPlan {
            kill: Role::Primary,
            checkpoints_before: 0,
            kill_after: Duration::from_millis(1000),
            ..FailoverPlan::default()
        };
        let report = scenario::failover("t-pxe", cfg, plan)
            .await
            .expect("failover scenario ran");
        common::assert_failover(&report);
        let log = std::fs::read_to_string(report.run_dir.join("proxyd-secondary.log"))
            .expect("colo-proxyd secondary's log");
        let bridged = log
            .lines()
            .find(|l| l.contains("failover: bridging SVM traffic"))
            .expect("colo-proxyd secondary bridged the SVM's traffic");
        println!("attempt {attempt}: {bridged}");
        let shifted: u64 = bridged
            .split_whitespace()
            .find_map(|f| f.strip_prefix("connections_with_offset="))
            .and_then(|n| n.parse().ok())
            .expect("the bridging line names connections_with_offset");
        if shifted > 0 {
            return;
        }
    }
    panic!(
        "no connection needed its numbers shifted in {ATTEMPTS} runs: the test did not exercise \
         the rewriting"
    );
}

/// The secondary host dies (QEMU and its colo-proxyd); the primary carries on alone.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn proxyd_pair_secondary_killed_primary_carries_on() {
    let plan = FailoverPlan {
        kill: Role::Secondary,
        ..FailoverPlan::default()
    };
    let report = scenario::failover("t-pxs", proxyd_pair(), plan)
        .await
        .expect("failover scenario ran");
    common::assert_failover(&report);
}

/// The same workload on a colo-compare pair and on a colo-proxyd pair: no failures on either,
/// and colo-proxyd asks for no more checkpoints than colo-compare (it compares streams, so
/// segmentation and timing differences do not diverge).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn proxyd_against_colo_compare_on_the_identical_pair() {
    let workload = Workload {
        requests: 300,
        spacing: Duration::from_millis(30),
        blobs: 3,
    };
    let cfg = PairConfig {
        guest_load_mib_s: 1,
        ..PairConfig::default()
    };
    let report = compare_ab::run("t-ab", cfg, workload)
        .await
        .expect("A/B ran");
    println!("{}", report.render());
    for side in [&report.colo_compare, &report.colo_proxyd] {
        assert_eq!(side.requests, 303, "{}", side.backend);
        assert!(
            side.failures.is_empty(),
            "{} failed requests: {:?}",
            side.backend,
            side.failures
        );
    }
    assert!(
        report.colo_proxyd.checkpoints <= report.colo_compare.checkpoints,
        "colo-proxyd asked for more checkpoints than colo-compare: {} > {}",
        report.colo_proxyd.checkpoints,
        report.colo_compare.checkpoints
    );
}
