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

use colo_control::protocol::EventKind;
use colo_testbed::scenario::{self, BLOB_BYTES, FailoverPlan, Failure, Report};
use colo_testbed::stats::{median, quantile};
use colo_testbed::stock::{Daemon, Role};
use std::time::Duration;

/// Requests after the failure give up this soon and try again, so the time to the first
/// answered one measures the outage, not TCP's retransmission of a request sent into it.
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_millis(100);

async fn run(tag: &str, kill: Role, failure: Failure) -> Report {
    let plan = FailoverPlan {
        kill,
        failure,
        ha_agents: true,
        first_request_timeout: FIRST_REQUEST_TIMEOUT,
        echo: true,
        ..FailoverPlan::default()
    };
    let report = scenario::failover(tag, common::daemons_pair(), plan)
        .await
        .expect("HA scenario ran");
    common::assert_failover(&report);
    let echo = report.echo.as_ref().expect("the echo connection's report");
    assert!(
        echo.ok(),
        "the connection carrying data both ways broke: {echo:?}"
    );
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
        "HA {}: failure -> first answered request {:.0} ms; echo connection: {} lines, longest wait {:.0} ms; agent: detection {:.0} ms, failover {:.0} ms; reason: {}; corosync: {}",
        report.scenario,
        report.kill_to_first_success_ms.unwrap_or(f64::NAN),
        echo.echoed,
        echo.longest_wait_ms,
        decision.detection_ms.unwrap_or(f64::NAN),
        decision.failover_ms.unwrap_or(f64::NAN),
        decision.reason,
        ha.corosync
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
/// answers from both. Then the partition heals: the cluster is whole again, the loser stays
/// fenced (docs/ha.md: an operator re-protects from the survivor), the survivor serves on.
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
    // Captured after the partition healed: the cluster whole again, the loser still fenced.
    let peer = ha
        .survivor
        .peer
        .as_ref()
        .expect("the survivor knows its peer");
    assert_eq!(peer.vm, "fenced", "{:?}", ha.survivor);
    assert!(ha.survivor.quorate, "{:?}", ha.survivor);
}

/// colo-blockd crashes mid-epoch and its supervisor restarts it at once: COLO cannot go on
/// (the relay fails the next barrier and ends COLO), the primary's agent sees COLO_EXIT,
/// claims and carries on alone; nothing the guest wrote is lost and no output was released
/// uncompared before.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, corosync, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn a_colo_blockd_crash_leaves_the_primary_serving_alone() {
    run(
        "h-bd",
        Role::Secondary,
        Failure::RestartDaemon(Daemon::Blockd),
    )
    .await;
}

/// The primary's colo-proxyd crashes and is restarted: the same, for the comparator.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, corosync, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn a_primary_colo_proxyd_crash_leaves_the_primary_serving_alone() {
    run(
        "h-pp",
        Role::Secondary,
        Failure::RestartDaemon(Daemon::Proxyd(Role::Primary)),
    )
    .await;
}

/// The secondary's QEMU alone freezes (SIGSTOP), its host, its agent and every link up: the
/// relay ends COLO when the checkpoint's reply is `--reply-timeout-ms` late, and the primary's
/// agent claims on the COLO_EXIT and carries on alone.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, corosync, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn a_frozen_secondary_qemu_leaves_the_primary_serving_alone() {
    run("h-fz", Role::Secondary, Failure::FreezeQemu).await;
}

/// A small deterministic generator (xorshift64*): the run prints its seed, and
/// `COLO_HA_SEED=<seed>` repeats a run's choices.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// How many random failovers [`twenty_random_failovers_keep_every_byte_and_every_write`] runs
/// (`COLO_HA_RUNS` overrides, e.g. for a longer soak).
const RANDOM_RUNS: usize = 20;

/// 20 failovers decided by the agents at random moments, both directions: the primary's or the
/// secondary's QEMU is SIGKILLed at a random point of an epoch (500 ms checkpoints), or, one
/// run in three, while a checkpoint is held at a random barrier (the SVM's epoch closed, or the
/// checkpoint being adopted). Each run checks everything `common::assert_failover` checks; one
/// summary line gives runs, intact runs, lost bytes, and the agents' detection and the
/// failure-to-first-answer times (median and max).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, corosync, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn twenty_random_failovers_keep_every_byte_and_every_write() {
    let seed = std::env::var("COLO_HA_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
                | 1
        });
    let runs = std::env::var("COLO_HA_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(RANDOM_RUNS);
    println!("random failovers: seed {seed} (COLO_HA_SEED repeats it), {runs} runs");
    let mut rng = Rng(seed);
    let mut intact = 0;
    let mut lost_bytes = 0usize;
    let mut detection = Vec::new();
    let mut first_answer = Vec::new();
    let mut problems = Vec::new();
    for run in 0..runs {
        let kill = if run % 2 == 0 {
            Role::Primary
        } else {
            Role::Secondary
        };
        let kill_at_event = match rng.below(6) {
            0 => Some(EventKind::SvmEpochClosed),
            1 => Some(EventKind::CheckpointAdopted),
            _ => None,
        };
        let plan = FailoverPlan {
            kill,
            failure: Failure::Kill,
            ha_agents: true,
            first_request_timeout: FIRST_REQUEST_TIMEOUT,
            checkpoints_before: 2,
            // 1 MiB at 512 KiB/s: a 2 s download, the kill inside its first 1.5 s.
            download_rate: 512 * 1024,
            kill_after: Duration::from_millis(200 + rng.below(1300)),
            requests_after: 3,
            kill_at_event,
            echo: true,
            ..FailoverPlan::default()
        };
        let what = format!(
            "run {run}: kill {} after {:?} at {kill_at_event:?}",
            kill.name(),
            plan.kill_after
        );
        let report = match scenario::failover("h-rnd", common::daemons_pair(), plan).await {
            Ok(report) => report,
            Err(e) => {
                problems.push(format!("{what}: the scenario failed: {e:#}"));
                lost_bytes += BLOB_BYTES;
                continue;
            }
        };
        let download_ok = report.download.as_ref().is_some_and(|d| d.ok());
        let disk_ok = report.disk.as_ref().is_some_and(|d| d.is_consistent());
        let decided = report
            .ha
            .as_ref()
            .and_then(|h| h.survivor.last_decision.clone());
        if let Some(ms) = decided.as_ref().and_then(|d| d.detection_ms) {
            detection.push(ms);
        }
        if let Some(ms) = report.kill_to_first_success_ms {
            first_answer.push(ms);
        }
        if !download_ok {
            let got = report.download.as_ref().map_or(0, |d| d.bytes);
            lost_bytes += BLOB_BYTES.saturating_sub(got).max(1);
        }
        let took_over = decided.as_ref().is_some_and(|d| d.action == "take-over");
        let echo_ok = report.echo.as_ref().is_some_and(|e| e.ok());
        if download_ok && disk_ok && took_over && echo_ok && report.http_failures.is_empty() {
            intact += 1;
        } else {
            problems.push(format!(
                "{what}: download ok {download_ok}, disk ok {disk_ok}, take-over {took_over}, \
                 echo {:?}, HTTP failures {:?}; run dir {}",
                report.echo,
                report.http_failures,
                report.run_dir.display()
            ));
        }
    }
    let stat = |v: &[f64]| {
        let d: Vec<Duration> = v
            .iter()
            .map(|ms| Duration::from_secs_f64(ms / 1000.0))
            .collect();
        let ms = |x: Option<Duration>| x.map_or(f64::NAN, |x| x.as_secs_f64() * 1000.0);
        format!(
            "median {:.0} ms, p90 {:.0} ms, max {:.0} ms",
            ms(median(&d)),
            ms(quantile(&d, 0.9)),
            ms(d.iter().max().copied())
        )
    };
    println!(
        "HA random failovers: {runs} runs, {intact} intact, {lost_bytes} bytes lost; agent detection {}; failure to first answered request {} (seed {seed})",
        stat(&detection),
        stat(&first_answer)
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert_eq!(intact, runs);
    assert_eq!(lost_bytes, 0);
}
