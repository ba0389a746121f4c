//! The stock filter-mode pair (QEMU's colo-compare and block replication) with the guest RAM
//! as a shared memfd on both VMs (`vm.memory_backend = "memfd"`; issue 16): the RAM a
//! vhost-user back-end maps, so x-colo must checkpoint it exactly as it does QEMU's default
//! anonymous RAM. The same soak and failovers as `stock_pair.rs`, with the same assertions,
//! plus a check that both QEMUs really ran on the memfd backend.
//!
//! Real QEMU (TCG) in network namespaces; needs root, `integration/setup.sh`'s artifacts and
//! this build's `qmp-driver`.

use std::time::Duration;

#[allow(dead_code)]
mod common;

use colo_testbed::scenario::{self, FailoverPlan, Report};
use colo_testbed::stock::{PairConfig, Role};

fn memfd_pair() -> PairConfig {
    PairConfig {
        checkpoint_delay_ms: 1000,
        guest_load_mib_s: 4,
        memfd_ram: true,
        ..PairConfig::default()
    }
}

/// Both QEMUs were started with the guest RAM on the shared memfd, as large as their `-m`,
/// and `pair.toml` asked for it.
fn assert_memfd_ram(report: &Report) {
    let mem = report.config.memory_mib;
    let toml = std::fs::read_to_string(report.run_dir.join("pair.toml")).expect("pair.toml");
    assert!(toml.contains("memory_backend = \"memfd\""), "{toml}");
    for role in [Role::Primary, Role::Secondary] {
        let path = report.run_dir.join(format!("{}.cmdline", role.name()));
        let cmdline =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            cmdline.contains(&format!(
                "memory-backend-memfd,id=colo-ram0,size={mem}M,share=on"
            )) && cmdline.contains("memory-backend=colo-ram0"),
            "{role}: {cmdline}"
        );
    }
}

/// At least 30 checkpoints under memory load with memfd RAM: both guests' heartbeats count,
/// every request is answered, and the SVM's output reached colo-compare.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn memfd_pair_survives_30_checkpoints_under_load() {
    let report = scenario::soak("t-mfs", memfd_pair(), 30, Duration::from_millis(300))
        .await
        .expect("soak scenario ran");
    assert_memfd_ram(&report);
    common::assert_soak(&report, 30, scenario::BLOB_BYTES as u64);
    for (vm, first, last) in &report.heartbeats {
        let (first, last) = (first.unwrap_or(0), last.expect("heartbeat printed"));
        assert!(
            last >= first + 20,
            "{vm} heartbeat went {first} -> {last} in 30+ s"
        );
    }
}

/// The primary is SIGKILLed mid-download; the secondary, whose memfd RAM held the last
/// checkpoint, takes over.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn memfd_primary_killed_secondary_takes_over() {
    let plan = FailoverPlan {
        kill: Role::Primary,
        ..FailoverPlan::default()
    };
    let report = scenario::failover("t-mfp", memfd_pair(), plan)
        .await
        .expect("failover scenario ran");
    assert_memfd_ram(&report);
    common::assert_failover(&report);
}

/// The secondary is SIGKILLed mid-download; the primary carries on alone on its memfd RAM.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn memfd_secondary_killed_primary_carries_on() {
    let plan = FailoverPlan {
        kill: Role::Secondary,
        ..FailoverPlan::default()
    };
    let report = scenario::failover("t-mfq", memfd_pair(), plan)
        .await
        .expect("failover scenario ran");
    assert_memfd_ram(&report);
    common::assert_failover(&report);
}
