//! Online re-protect (issue 14) on the bed with colo's own daemons (colo-blockd, colo-proxyd on
//! both hosts, the relay): `qmp-driver reprotect`'s sequence brings a new secondary into COLO
//! while the survivor serves, and a second failover afterwards loses nothing.
//!
//! Real QEMU (TCG) in network namespaces; needs root, `integration/setup.sh`'s artifacts and
//! this build's `qmp-driver`, `colo-proxyd` and `colo-blockd` binaries. Without them the test
//! fails and says what is missing.

// Shared with the other bed test files; this one uses only the daemons' pair.
#[allow(dead_code)]
mod common;

use colo_testbed::reprotect::{self, Interrupt, ReprotectRun};
use colo_testbed::stock::Role;

/// The secondary's host dies, the primary serves alone, the host comes back and the primary
/// is re-protected online (the guest writing a record a second and dirtying memory, a client
/// asking one request after the other and an echo connection open all along). The pair is
/// back in COLO (checkpoints on both sides), no request failed and the echo connection
/// survived the switch; then the primary is killed during a download and the new secondary
/// takes over: the download is intact, the echo connection across that failover too, the
/// survivor serves, and its disk holds every record its heartbeat promised.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn a_primary_serving_alone_is_reprotected_online_and_a_second_failover_loses_nothing() {
    let run =
        reprotect::after_losing_the_secondary("t-rpp1", common::daemons_pair(), Interrupt::None, 1)
            .await
            .expect("re-protect scenario ran");
    assert_reprotected(&run);
}

/// Failback, A → B → A → B: the **primary's** host dies and the secondary serves on; the host
/// comes back, the VM moves home to it while it runs (`qmp-driver failback`'s sequence: disk
/// copy into the primary's image, memory migration, the primary resumed serving alone, the
/// old copy quit), the secondary host is re-protected online, and the primary's host dies
/// again: the secondary takes over once more. Clients are served throughout (one echo
/// connection across the whole life); the download in flight at the second loss is intact
/// and the survivor's disk holds every record.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn the_vm_fails_back_home_after_the_primary_dies_and_a_second_failover_loses_nothing() {
    let run = reprotect::after_losing_the_primary("t-rpfb", common::daemons_pair())
        .await
        .expect("failback scenario ran");
    assert_reprotected(&run);
    assert!(run.failback.is_some(), "no failback ran");
}

/// The same life with `[tls]`: the failback's copy (the secondary QEMU into `colo-blockd
/// serve` on the primary host) and its migration (the secondary QEMU to the primary's) run
/// under mutual TLS with the credentials `failback` adds to both QEMUs, then the re-protect's
/// as before; nothing is lost. While the home QEMU's migration listener waits for the VM, two
/// strangers knock on it (no certificate; the primary host's own, which the authz refuses):
/// QEMU refuses both and the failback goes on.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn a_tls_pair_fails_back_home_and_a_second_failover_loses_nothing() {
    let cfg = colo_testbed::stock::PairConfig {
        tls: true,
        ..common::daemons_pair()
    };
    let run = reprotect::after_losing_the_primary("t-rpft", cfg)
        .await
        .expect("failback scenario over TLS ran");
    let failback = run.failback.as_ref().expect("a failback ran");
    let step = |prefix: &str| {
        failback
            .steps
            .iter()
            .find(|s| s.what.starts_with(prefix))
            .unwrap_or_else(|| panic!("no failback step {prefix:?}: {:#?}", failback.steps))
    };
    let copy = step("blockdev-add colo-reprotect-target");
    assert_eq!(copy.side, Role::Secondary);
    assert!(copy.what.ends_with(", TLS)"), "{}", copy.what);
    let incoming = step("migrate-set-parameters tls-creds=colo-tls-server0");
    assert_eq!(incoming.side, Role::Primary);
    assert!(incoming.what.contains("tls-authz=colo-tls-peer0"));
    let outgoing = step("migrate-set-parameters tls-creds=colo-tls0");
    assert_eq!(outgoing.side, Role::Secondary);
    // Two strangers knocked on the home QEMU's migration listener before the VM came: QEMU
    // refused both (no certificate: verify-peer; the primary host's own: the authz), and the
    // failback went on (a stranger taken for the source would have failed the migration).
    let knocks = &run.failback_strangers;
    assert_eq!(knocks.len(), 2, "{knocks:?}");
    let refused = |i: usize, what: &str| {
        knocks[i]
            .qemu_said
            .as_ref()
            .is_some_and(|line| line.contains(what))
    };
    assert!(refused(0, "No certificate was found"), "{knocks:?}");
    assert!(
        refused(1, "authz check for CN=colo-primary is denied"),
        "{knocks:?}"
    );
    assert_reprotected(&run);
}

/// Three failovers in a row, the serving host alternating (B, A, B), with online re-protects
/// between them: the primary's host dies (the secondary serves, the VM moves home, the
/// secondary is re-protected), the secondary's host dies (the primary serves, re-protect),
/// and the primary's host dies during a download (the secondary serves). Nothing is lost.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn three_failovers_in_a_row_alternating_hosts_lose_nothing() {
    let run = reprotect::three_failovers_alternating("t-rp3f", common::daemons_pair())
        .await
        .expect("three-failovers scenario ran");
    assert_reprotected(&run);
    assert_eq!(run.earlier_rounds.len(), 1, "one earlier round");
    assert!(run.failback.is_some(), "no failback ran");
}

/// The secondary is lost and the primary re-protected online twice in a row (the second time
/// with `pause-before-switchover` already on, the filters and the NBD child removed by the
/// second failover, the relay's third session); each round leaves the clients undisturbed and
/// COLO checkpointing, and the failover after the second loses nothing.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn the_primary_is_reprotected_twice_in_a_row_and_a_failover_after_loses_nothing() {
    let run =
        reprotect::after_losing_the_secondary("t-rpp2", common::daemons_pair(), Interrupt::None, 2)
            .await
            .expect("re-protect scenario ran");
    assert_eq!(run.earlier_rounds.len(), 1, "one earlier round");
    assert_reprotected(&run);
}

/// The same with `[tls]`: the copy's NBD link to `colo-blockd serve`, the replication child,
/// the migration through the relay and colo-proxyd's link all under mutual TLS; the
/// re-protect and the failover after it keep every promise.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn a_tls_pair_is_reprotected_online_and_a_second_failover_loses_nothing() {
    let cfg = colo_testbed::stock::PairConfig {
        tls: true,
        ..common::daemons_pair()
    };
    let run = reprotect::after_losing_the_secondary("t-rppt", cfg, Interrupt::None, 1)
        .await
        .expect("re-protect scenario ran");
    let copy = run
        .reprotect
        .steps
        .iter()
        .find(|s| s.what.starts_with("blockdev-add colo-reprotect-target"))
        .expect("the copy target was added");
    assert!(copy.what.ends_with(", TLS)"), "{}", copy.what);
    assert_reprotected(&run);
}

/// What every run must show: the re-protect's phases and figures, clients served throughout,
/// the pair back in COLO, and the second failover losing nothing.
fn assert_reprotected(run: &ReprotectRun) {
    println!("{}\n\n{}", run.summary(), run.render());
    let problems = run.problems();
    assert!(problems.is_empty(), "{problems:#?}");
}

/// A first re-protect whose new secondary host dies (its QEMU and daemons SIGKILLed) at
/// `interrupt` fails, leaves the primary running outside COLO with no block job and no NBD
/// child, and no client noticed; the host comes back and a second attempt succeeds, with the
/// same checks as above.
async fn cut_short(interrupt: Interrupt, tag: &str) {
    let run = reprotect::after_losing_the_secondary(tag, common::daemons_pair(), interrupt, 1)
        .await
        .expect("re-protect scenario ran");
    assert_undone(&run);
    assert_reprotected(&run);
}

/// The first attempt was cut short and undone: the primary runs outside COLO, with no block
/// job and no NBD child left.
fn assert_undone(run: &ReprotectRun) {
    let failed = run
        .failed_attempt
        .as_ref()
        .expect("a first attempt was cut short");
    println!("first attempt failed: {}", failed.error);
    for step in &failed.steps {
        println!("  {step}");
    }
    assert!(
        failed.primary_running,
        "the primary does not run: {failed:?}"
    );
    assert_eq!(failed.primary_colo_mode, "none", "{failed:?}");
    assert_eq!(failed.block_jobs, 0, "a block job was left: {failed:?}");
    assert!(!failed.child_left, "the NBD child was left: {failed:?}");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn a_reprotect_whose_secondary_dies_during_the_disk_copy_harms_nothing_and_a_retry_succeeds()
{
    cut_short(Interrupt::DuringCopy, "t-rpc").await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU and the guest; select with --include-ignored (integration/test.sh does)"]
async fn a_reprotect_whose_secondary_dies_during_the_memory_migration_harms_nothing_and_a_retry_succeeds()
 {
    cut_short(Interrupt::DuringMemory, "t-rpm").await;
}

/// The primary's agent re-protects by itself, and the new secondary's host dies during the
/// agent's disk copy: the agent undoes its attempt (the primary serves on alone, no job, no
/// NBD child), tries again as soon as the host is back, and succeeds; the primary then dies
/// and the secondary's agent takes over with nothing lost.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU, the guest and corosync; select with --include-ignored (integration/test.sh does)"]
async fn an_automatic_reprotect_cut_short_by_the_new_secondary_dying_is_undone_and_retried() {
    let run = reprotect::auto_reprotect_cut_short("t-rpau", common::daemons_pair())
        .await
        .expect("the cut-short automatic re-protect ran");
    assert!(run.reprotect_by_agent, "the agent did not re-protect");
    let agents = run.agents.as_ref().expect("the agents' take-overs");
    assert_eq!(agents.first.action, "take-over");
    assert_eq!(agents.second.action, "take-over");
    assert_undone(&run);
    assert_reprotected(&run);
}

/// The same life with the HA agents deciding both failovers (no `qmp-driver failover`): the
/// secondary's host dies and the primary's agent takes over; the host comes back with a new
/// agent, the primary is re-protected online, both agents see the pair protected again; the
/// primary dies during a download and the new secondary's agent takes over. Nothing is lost.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU, the guest and corosync; select with --include-ignored (integration/test.sh does)"]
async fn the_ha_agents_fail_over_again_after_an_online_reprotect() {
    let run = reprotect::with_ha_agents("t-rpha", common::daemons_pair())
        .await
        .expect("re-protect scenario with the agents ran");
    let agents = run.agents.as_ref().expect("the agents' take-overs");
    assert_eq!(agents.first.action, "take-over");
    assert_eq!(agents.second.action, "take-over");
    assert_reprotected(&run);
}

/// The README's main command as a test: the life with the HA agents, the primary's host dying
/// first. The secondary's agent takes over; the VM moves home with `failback` (that agent
/// stepping aside, the primary's agent back with the VM); the secondary host and its agent
/// come back, and the primary's agent (`--auto-reprotect`) re-protects by itself once the new
/// secondary's QEMU waits, both agents then seeing the pair protected; the primary's host
/// dies again and the secondary's agent takes over once more. Nothing is lost.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: needs root, network namespaces, QEMU, the guest and corosync; select with --include-ignored (integration/test.sh does)"]
async fn the_life_with_the_ha_agents_the_primary_dying_first_loses_nothing() {
    let run = reprotect::life_with_ha_agents("t-rplf", common::daemons_pair())
        .await
        .expect("the life with the agents ran");
    let agents = run.agents.as_ref().expect("the agents' take-overs");
    assert_eq!(agents.first.action, "take-over");
    assert_eq!(agents.second.action, "take-over");
    assert!(run.failback.is_some(), "no failback ran");
    assert!(
        run.reprotect_by_agent,
        "the primary's agent did not re-protect by itself"
    );
    assert_reprotected(&run);
}
