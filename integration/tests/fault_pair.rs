//! Faults other than a dead VM (issue 12), on the bed with colo's own daemons (colo-proxyd on
//! both hosts, colo-blockd, the relay) and the primary's watch agent (`qmp-driver watch`).
//!
//! Real QEMU (TCG) in network namespaces; needs root, `integration/setup.sh`'s artifacts and
//! this build's `qmp-driver`, `colo-proxyd` and `colo-blockd` binaries. Without them the tests
//! fail and say what is missing.

// Shared with the other bed test files; this one has no soak.
#[allow(dead_code)]
mod common;

use colo_testbed::scenario::{self, FailoverPlan, Failure};
use colo_testbed::stock::{Daemon, PairConfig, Role};

/// The secondary fails by `failure` while the primary's watch agent watches: runs the
/// scenario, checks that the side that serves lost nothing, and returns the report with the
/// watch agent's log.
async fn watched_failover(tag: &str, failure: Failure) -> (scenario::Report, String) {
    let plan = FailoverPlan {
        kill: Role::Secondary,
        failure,
        watch_agent: true,
        ..FailoverPlan::default()
    };
    let report = scenario::failover(tag, common::daemons_pair(), plan)
        .await
        .unwrap_or_else(|e| panic!("{failure:?} scenario ran: {e:#}"));
    common::assert_failover(&report);
    let watch =
        std::fs::read_to_string(report.run_dir.join("watch.log")).expect("the watch agent's log");
    (report, watch)
}

/// The secondary's host goes silent (its uplink down, no FIN, both VMs and every daemon still
/// running) during a download. Nobody runs a failover: the primary's watch agent notices
/// (QEMU's monitor hangs on the NBD child, or a checkpoint never ends) within its 2 s stall
/// bound, yanks the dead peer and fails over to the primary. The client sees a stall, then
/// the download completes intact, every later request is answered, and the primary's disk
/// holds every record the guest's heartbeat promised.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn a_silent_secondary_host_leaves_the_primary_serving_alone() {
    let (report, watch) = watched_failover("t-up", Failure::CutUplink).await;
    let trigger = watch
        .lines()
        .find(|l| l.contains("the secondary no longer takes part in COLO"))
        .expect("the watch agent decided the failover");
    println!("watch agent: {trigger}");
    println!(
        "cut to first answered request: {:?} ms",
        report.kill_to_first_success_ms
    );
}

/// A daemon of the pair is SIGKILLed mid-epoch and restarted at once, during a download.
/// COLO cannot go on (the relay fails the next barrier and ends COLO), so the watch agent
/// fails over to the primary. Then the primary's colo-proxyd is killed and restarted again,
/// after COLO ended: it must learn from QEMU that the primary serves alone and release, not
/// hold for ever (nor release while QEMU is still a COLO primary).
async fn daemon_restarted(daemon: Daemon, tag: &str) {
    let plan = FailoverPlan {
        kill: Role::Secondary,
        failure: Failure::RestartDaemon(daemon),
        watch_agent: true,
        restart_after_failover: Some(Daemon::Proxyd(Role::Primary)),
        ..FailoverPlan::default()
    };
    let report = scenario::failover(tag, common::daemons_pair(), plan)
        .await
        .expect("restart scenario ran");
    common::assert_failover(&report);
    let watch =
        std::fs::read_to_string(report.run_dir.join("watch.log")).expect("the watch agent's log");
    assert!(
        watch.contains("failover to the primary done"),
        "the watch agent did not fail over:\n{watch}"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn the_primary_proxyd_restarted_mid_epoch_loses_nothing() {
    daemon_restarted(Daemon::Proxyd(Role::Primary), "t-rpp").await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn the_secondary_proxyd_restarted_mid_epoch_loses_nothing() {
    daemon_restarted(Daemon::Proxyd(Role::Secondary), "t-rps").await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn colo_blockd_restarted_mid_epoch_loses_nothing() {
    daemon_restarted(Daemon::Blockd, "t-rbd").await;
}

/// The primary's host dies; the secondary takes over (the operator's failover); then its
/// colo-blockd is killed and restarted after COLO ended. It must reopen the image failed over,
/// so that the SVM's writes keep going into the image itself: the survivor's disk must still
/// hold every record its heartbeat promised.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn colo_blockd_restarted_after_a_failover_to_the_secondary_loses_nothing() {
    let plan = FailoverPlan {
        kill: Role::Primary,
        restart_after_failover: Some(Daemon::Blockd),
        ..FailoverPlan::default()
    };
    let report = scenario::failover("t-rbs", common::daemons_pair(), plan)
        .await
        .expect("failover scenario ran");
    common::assert_failover(&report);
}

/// The primary's host dies; the secondary takes over; then the secondary's colo-proxyd (now
/// the survivor's network path) is SIGKILLed and started again after COLO ended. It must learn
/// from its QEMU that the pair failed over to it and bridge the SVM's traffic with the last
/// epoch's sequence offsets, not wait for a primary that is gone: every later request is
/// answered and the survivor's disk holds every record its heartbeat promised.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn the_secondary_proxyd_restarted_after_a_failover_to_the_secondary_loses_nothing() {
    let plan = FailoverPlan {
        kill: Role::Primary,
        restart_after_failover: Some(Daemon::Proxyd(Role::Secondary)),
        ..FailoverPlan::default()
    };
    let report = scenario::failover("t-rp2", common::daemons_pair(), plan)
        .await
        .expect("failover scenario ran");
    common::assert_failover(&report);
}

/// The path between the two hosts stalls at the switch (packets dropped, no FIN, no link
/// down) during a download, with both VMs and every daemon running. The primary's watch agent
/// notices within its 2 s stall bound and makes the primary carry on alone; the client sees a
/// stall, then the download completes intact. Then the path heals: the abandoned secondary's
/// daemons find the primary's again, and the primary, serving alone, is not disturbed by them
/// (every request after the heal is answered). The secondary's colo-proxyd noticed the dead
/// link by its heartbeats, not by a FIN.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn a_stalled_inter_host_link_ends_colo_and_its_healing_disturbs_nothing() {
    let (report, watch) = watched_failover("t-stl", Failure::StallLink).await;
    assert!(
        watch.contains("failover to the primary done"),
        "the watch agent did not fail over:\n{watch}"
    );
    let secondary = std::fs::read_to_string(report.run_dir.join("proxyd-secondary.log"))
        .expect("the secondary colo-proxyd's log");
    let dead = secondary
        .lines()
        .find(|l| l.contains("the peer is dead"))
        .expect("the secondary's colo-proxyd detected the stalled link by its heartbeats");
    println!("secondary colo-proxyd: {dead}");
    println!(
        "stall to first answered request: {:?} ms",
        report.kill_to_first_success_ms
    );
}

/// The file system under the secondary's image (and colo-blockd's journal and spill files)
/// fills up during COLO. colo-blockd cannot commit the next checkpoint, does not acknowledge
/// it, the relay ends COLO, and the watch agent makes the primary carry on alone: no
/// acknowledged write or byte is lost on the primary.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn a_full_disk_under_the_secondary_ends_colo_and_the_primary_serves() {
    let cfg = PairConfig {
        secondary_fs_mib: Some(64),
        ..common::daemons_pair()
    };
    let plan = FailoverPlan {
        kill: Role::Secondary,
        failure: Failure::FillSecondaryDisk,
        watch_agent: true,
        ..FailoverPlan::default()
    };
    let report = scenario::failover("t-full", cfg, plan)
        .await
        .expect("disk-full scenario ran");
    common::assert_failover(&report);
    let blockd =
        std::fs::read_to_string(report.run_dir.join("blockd.log")).expect("colo-blockd's log");
    let failed = blockd
        .lines()
        .find(|l| l.contains("No space left on device") || l.contains("could not be kept"))
        .expect("colo-blockd reports the full disk");
    println!("colo-blockd: {failed}");
}

/// The secondary's QEMU alone is frozen (SIGSTOP) mid-COLO, its host and every link up: no
/// connection breaks, and QEMU's primary waits for the checkpoint's reply with its VM running
/// while colo-proxyd holds its output. The relay ends COLO when the reply is
/// `--reply-timeout-ms` late, the watch agent fails over to the primary, and nothing
/// acknowledged is lost. (Before the reply's bound, no request was answered within 60 s.)
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn a_frozen_secondary_qemu_leaves_the_primary_serving_alone() {
    let (report, watch) = watched_failover("t-fz", Failure::FreezeQemu).await;
    let relay = std::fs::read_to_string(report.run_dir.join("relay.log")).expect("the relay's log");
    let trigger = watch
        .lines()
        .find(|l| l.contains("the secondary no longer takes part in COLO"))
        .expect("the watch agent failed over");
    // Frozen while it waited for the primary's request, or stopping for one: the reply never
    // comes and the relay ends COLO. Frozen between its reply and `vmstate-loaded` (a few
    // percent of runs: the pause over the checkpoint period): the primary stays stopped in
    // the checkpoint, and the watch agent's stall bound fails over first.
    if trigger.contains("trigger=\"colo-exit\"") {
        assert!(
            relay.contains("did not answer the checkpoint request"),
            "a COLO_EXIT without the relay's reply timeout:\n{relay}"
        );
    } else {
        assert!(
            trigger.contains("trigger=\"checkpoint-stalled\""),
            "{trigger}"
        );
    }
    println!("watch agent: {trigger}");
    println!(
        "freeze to first answered request: {:?} ms",
        report.kill_to_first_success_ms
    );
}
