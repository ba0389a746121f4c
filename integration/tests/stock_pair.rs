//! The stock QEMU COLO pair on the test bed.
//!
//! These run real QEMU (TCG) in network namespaces and need root and the artifacts of
//! `integration/setup.sh`. Without them they fail with the command to run; they never skip.
//! nextest runs them one at a time (`.config/nextest.toml`, group `qemu`): two COLO pairs at
//! once would not fit on two cores.

use std::time::Duration;

// Shared with the other bed test files; not every helper is used here.
#[allow(dead_code)]
mod common;

use colo_testbed::scenario::{self, FailoverPlan};
use colo_testbed::stock::{PairConfig, Role};

fn soak_config() -> PairConfig {
    PairConfig {
        checkpoint_delay_ms: 1000,
        guest_load_mib_s: 4,
        ..PairConfig::default()
    }
}

/// 4b: COLO survives at least 30 checkpoints under memory load; both guests' heartbeats
/// count; every request is answered.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn stock_pair_survives_30_checkpoints_under_load() {
    let report = scenario::soak("t-soak", soak_config(), 30, Duration::from_millis(300))
        .await
        .expect("soak scenario ran");
    // The SVM served the 1 MiB blob too, and its output reached colo-compare: the pair really
    // compared.
    common::assert_soak(&report, 30, scenario::BLOB_BYTES as u64);
    for (vm, first, last) in &report.heartbeats {
        let (first, last) = (first.unwrap_or(0), last.expect("heartbeat printed"));
        assert!(
            last >= first + 20,
            "{vm} heartbeat went {first} -> {last} in 30+ s"
        );
    }
}

/// 4c: the primary is SIGKILLed mid-download; the secondary takes over.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn primary_killed_secondary_takes_over() {
    let plan = FailoverPlan {
        kill: Role::Primary,
        ..FailoverPlan::default()
    };
    let report = scenario::failover("t-fop", soak_config(), plan)
        .await
        .expect("failover scenario ran");
    common::assert_failover(&report);
}

/// 4d: the secondary is SIGKILLed mid-download; the primary carries on alone.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn secondary_killed_primary_carries_on() {
    let plan = FailoverPlan {
        kill: Role::Secondary,
        ..FailoverPlan::default()
    };
    let report = scenario::failover("t-fos", soak_config(), plan)
        .await
        .expect("failover scenario ran");
    common::assert_failover(&report);
}
