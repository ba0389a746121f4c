//! Automatic failover by the HA agents (issue 11): `qmp-driver agent` on both hosts, on a real
//! corosync cluster (corosync + corosync-qdevice on each VM host, corosync-qnetd on a witness
//! namespace), with colo's own daemons (colo-proxyd on both hosts, colo-blockd, the relay).
//! Nobody runs `qmp-driver failover`: the agents decide.
//!
//! Each test runs an in-flight download and new requests across the failure, and checks the
//! survivor's disk against the guest's heartbeat records (`common::assert_failover`). The
//! times (failure to first answered request; the agent's own detection and failover) are
//! printed, never asserted.
//!
//! Real QEMU (TCG) in network namespaces; needs root, `integration/setup.sh`'s artifacts and
//! packages (corosync, corosync-qdevice, corosync-qnetd), and this build's `qmp-driver`,
//! `colo-proxyd` and `colo-blockd`. Without them the tests fail and say what is missing.

// Shared with the other bed test files; this one has no soak.
#[allow(dead_code)]
mod common;

use colo_testbed::scenario::{self, FailoverPlan, Failure, Report};
use colo_testbed::stock::{DiskBackend, NetworkBackend, PairConfig, Role};

/// colo-blockd and colo-proxyd, 500 ms checkpoints.
fn daemons_pair() -> PairConfig {
    PairConfig {
        checkpoint_delay_ms: 500,
        guest_load_mib_s: 4,
        disk: DiskBackend::ColoBlockd,
        network: NetworkBackend::ColoProxyd,
        ..PairConfig::default()
    }
}

async fn run(tag: &str, kill: Role, failure: Failure) -> Report {
    let plan = FailoverPlan {
        kill,
        failure,
        ha_agents: true,
        ..FailoverPlan::default()
    };
    let report = scenario::failover(tag, daemons_pair(), plan)
        .await
        .expect("HA scenario ran");
    common::assert_failover(&report);
    let ha = report.ha.as_ref().expect("the HA agents' report");
    let survivor = kill.other();
    assert_eq!(ha.survivor.side, survivor.name());
    assert_eq!(ha.survivor.vm, "alone", "the survivor serves alone: {ha:?}");
    let decision = ha
        .survivor
        .last_decision
        .as_ref()
        .expect("the survivor's agent decided");
    assert_eq!(decision.action, "take-over", "{decision:?}");
    assert!(
        decision.failover_ms.is_some(),
        "the take-over's failover finished: {decision:?}"
    );
    println!(
        "HA {}: failure -> first answered request {:?} ms; agent: detection {:?} ms, failover {:?} ms; reason: {}",
        report.scenario,
        report.kill_to_first_success_ms,
        decision.detection_ms,
        decision.failover_ms,
        decision.reason
    );
    report
}

/// The primary's QEMU is SIGKILLed (colo's daemons on its host with it; the host and its
/// agent live on): the primary's agent reports its VM gone, the secondary's agent claims the
/// VM and takes over.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, corosync, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn a_killed_primary_qemu_makes_the_secondary_take_over() {
    let report = run("h-kp", Role::Primary, Failure::Kill).await;
    let reason = &report
        .ha
        .as_ref()
        .unwrap()
        .survivor
        .last_decision
        .as_ref()
        .unwrap()
        .reason;
    assert!(reason.contains("gone"), "{reason}");
}

/// The secondary's QEMU is SIGKILLed: the primary takes over (carries on alone).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, corosync, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn a_killed_secondary_qemu_leaves_the_primary_serving_alone() {
    run("h-ks", Role::Secondary, Failure::Kill).await;
}

/// The primary's host dies silently (uplink down, corosync killed, every other process
/// frozen: no FIN anywhere): the secondary's node sees the primary's node leave the
/// membership, stays quorate with the witness's vote, claims and takes over.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, corosync, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn a_silently_dead_primary_host_makes_the_secondary_take_over() {
    let report = run("h-dp", Role::Primary, Failure::HostDeath).await;
    let reason = &report
        .ha
        .as_ref()
        .unwrap()
        .survivor
        .last_decision
        .as_ref()
        .unwrap()
        .reason;
    assert!(reason.contains("left the membership"), "{reason}");
}

/// The secondary's host dies silently: the primary carries on alone.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, corosync, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn a_silently_dead_secondary_host_leaves_the_primary_serving_alone() {
    run("h-ds", Role::Secondary, Failure::HostDeath).await;
}

/// Only the path between the hosts is cut, at the switch: both VMs stay reachable by the
/// client, both agents live. Exactly one side serves afterwards: the primary's node keeps
/// quorum (the witness's tie-breaker), claims and carries on alone; the secondary's node
/// loses quorum and its agent fences its VM (its QEMU is killed), so the client can never get
/// answers from both.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, corosync, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn a_partition_between_the_hosts_leaves_exactly_one_side_serving() {
    let report = run("h-sp", Role::Secondary, Failure::Partition).await;
    let ha = report.ha.as_ref().unwrap();
    let loser = ha.failed.as_ref().expect("the loser's agent state");
    assert_eq!(
        loser.vm, "fenced",
        "the minority side fenced its VM: {loser:?}"
    );
    let fence = loser.last_decision.as_ref().expect("the loser decided");
    assert_eq!(fence.action, "fence", "{fence:?}");
    assert!(!loser.quorate, "{loser:?}");
}
