//! The corosync cluster of the bed (`colo_testbed::cluster`): two nodes, one per VM host
//! namespace, with corosync-qdevice on each host and corosync-qnetd on a witness namespace as
//! the third vote (ffsplit), and the faults the HA agent's tests need.
//!
//! Needs root, network namespaces and the packages corosync, corosync-qdevice and
//! corosync-qnetd (`integration/setup.sh`). Without them the tests fail and say what is missing.
//! Measured times are printed (run with `--no-capture`); nothing asserts on timing.

use std::time::{Duration, Instant};

use colo_testbed::cluster::{Cluster, ClusterOptions, Host, QuorumInfo};
use colo_testbed::topology::Topology;

/// Generous bound for anything the short timeouts should settle in a few seconds.
const SETTLE: Duration = Duration::from_secs(30);

/// The defaults (token 1000 ms); `COLO_CLUSTER_TOKEN_MS` overrides the token to measure others.
fn options() -> ClusterOptions {
    let mut o = ClusterOptions::default();
    if let Some(token) = std::env::var("COLO_CLUSTER_TOKEN_MS")
        .ok()
        .and_then(|t| t.parse().ok())
    {
        o.token_ms = token;
    }
    o
}

fn describe(o: &ClusterOptions) -> String {
    format!(
        "token {} ms, consensus {}, qdevice timeout {} ms, sync_timeout {} ms",
        o.token_ms,
        o.consensus_ms
            .map_or("default (1.2 × token)".to_string(), |c| format!("{c} ms")),
        o.qdevice_timeout_ms,
        o.qdevice_sync_timeout_ms
    )
}

/// The cluster as it should be: this node quorate, with both nodes and the witness's vote.
fn whole(q: &QuorumInfo) -> bool {
    q.quorate && q.nodes == 2 && q.total_votes == 3
}

/// Starts the bed and the cluster and waits until both nodes count all three votes.
fn full_cluster(tag: &str) -> (Topology, Cluster) {
    let topo = Topology::create_with_witness(tag).expect("topology with witness");
    let opts = options();
    let started = Instant::now();
    let cluster = Cluster::start(&topo, &opts).expect("cluster started");
    for host in Host::BOTH {
        cluster
            .wait_until(host, SETTLE, "quorate with 2 nodes and 3 votes", whole)
            .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.log_tail(host)));
    }
    println!(
        "cluster formed with the witness vote in {:?} ({})",
        started.elapsed(),
        describe(&opts)
    );
    (topo, cluster)
}

/// One poll of a host, `None` when its corosync does not answer.
fn sample(cluster: &Cluster, host: Host) -> Option<QuorumInfo> {
    cluster.quorum(host).ok()
}

fn show(q: &Option<QuorumInfo>) -> String {
    match q {
        Some(q) => format!(
            "nodes {} votes {}/{} {}",
            q.nodes,
            q.total_votes,
            q.expected_votes,
            if q.quorate { "quorate" } else { "NOT quorate" }
        ),
        None => "no answer".to_string(),
    }
}

/// Polls `hosts` every 50 ms from `since` until `done` has held for `hold` (or `within` passes),
/// printing every change of state; returns when `done` first held (of the final streak).
/// `done` gets the time of the poll since `since`.
fn trace(
    cluster: &Cluster,
    hosts: &[Host],
    since: Instant,
    within: Duration,
    hold: Duration,
    mut done: impl FnMut(Duration, &[Option<QuorumInfo>]) -> bool,
) -> Duration {
    let mut last: Vec<Option<String>> = vec![None; hosts.len()];
    let mut streak: Option<Duration> = None;
    loop {
        let now = since.elapsed();
        let states: Vec<Option<QuorumInfo>> = hosts.iter().map(|&h| sample(cluster, h)).collect();
        for (i, (h, s)) in hosts.iter().zip(&states).enumerate() {
            let text = show(s);
            if last[i].as_deref() != Some(text.as_str()) {
                println!("  +{:>5} ms  {h:?}: {text}", now.as_millis());
                last[i] = Some(text);
            }
        }
        if done(now, &states) {
            let first = *streak.get_or_insert(now);
            if now - first >= hold {
                return first;
            }
        } else {
            streak = None;
        }
        assert!(
            now < within,
            "condition not reached (and held {hold:?}) within {within:?}; last: {last:?}\nA: {}\nB: {}",
            cluster.log_tail(Host::A),
            cluster.log_tail(Host::B)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[ignore = "tier bed: root, network namespaces, corosync"]
fn both_hosts_are_quorate_with_the_witness_vote() {
    let (_topo, cluster) = full_cluster("cq1");
    for host in Host::BOTH {
        let status = cluster.quorum_status(host).expect("quorumtool");
        println!("{host:?}:\n{status}");
        let q = QuorumInfo::parse(&status).expect("parsed");
        assert!(q.quorate, "{host:?} not quorate:\n{status}");
        assert_eq!(q.nodes, 2, "{status}");
        assert_eq!(q.total_votes, 3, "{status}");
        assert_eq!(q.expected_votes, 3, "{status}");
        assert!(q.qdevice, "no Qdevice flag:\n{status}");

        // The key fact for the HA agent: a libqb client in the host's network namespace only
        // (no private /run) reaches that host's corosync, the same one as from its mount ns.
        let in_host = cluster
            .exec_in_host(host, "corosync-quorumtool", &["-s"])
            .expect("quorumtool via nsenter");
        let in_host = QuorumInfo::parse(&String::from_utf8_lossy(&in_host.stdout)).unwrap();
        assert_eq!(in_host, q);
        let id = cluster
            .exec_in_netns(
                host,
                "corosync-cmapctl",
                &["-g", "runtime.votequorum.this_node_id"],
            )
            .expect("cmapctl");
        let id = String::from_utf8_lossy(&id.stdout);
        assert!(
            id.trim_end().ends_with(&format!("= {}", host.node_id())),
            "{host:?} answered as another node: {id}"
        );
        let cpg = cluster
            .exec_in_netns(host, "corosync-cpgtool", &[])
            .expect("cpgtool");
        assert!(
            cpg.status.success(),
            "corosync-cpgtool from the plain netns of {host:?}: {}",
            String::from_utf8_lossy(&cpg.stderr)
        );
    }
    let qnetd = cluster.qnetd_status().expect("qnetd-tool");
    println!("qnetd:\n{qnetd}");
    assert!(
        qnetd.contains("Node ID 1") && qnetd.contains("Node ID 2"),
        "{qnetd}"
    );
}

#[test]
#[ignore = "tier bed: root, network namespaces, corosync"]
fn the_survivor_of_a_silent_host_death_stays_quorate() {
    let (_topo, mut cluster) = full_cluster("cq2");
    let opts = cluster.options().clone();
    let wall = std::process::Command::new("date")
        .arg("+%T.%3N")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let killed = Instant::now();
    cluster.kill_host(Host::B).expect("host B killed");
    println!("host B killed silently (uplink down, SIGKILL corosync + qdevice)");
    let mut lost_quorum = false;
    let mut membership_1: Option<Duration> = None;
    // Done: A alone in its membership, quorate with its vote and the witness's, for 3 s.
    let quorate_alone = trace(
        &cluster,
        &[Host::A],
        killed,
        SETTLE,
        Duration::from_secs(3),
        |now, s| {
            let Some(a) = &s[0] else { return false };
            if a.nodes == 1 {
                membership_1.get_or_insert(now);
            }
            lost_quorum |= !a.quorate;
            a.nodes == 1 && a.quorate && a.total_votes == 2
        },
    );
    let membership_1 = membership_1.expect("A saw the membership of 1");
    println!(
        "silent death of B: A's membership shows 1 node after {membership_1:?}; \
         A quorate alone (2 votes) after {quorate_alone:?}; A {} quorum in between ({})",
        if lost_quorum { "lost" } else { "never lost" },
        describe(&opts)
    );
    let a = cluster.quorum(Host::A).expect("A answers");
    assert!(a.quorate && a.nodes == 1, "{a:?}");
    // When corosync itself (totem, so CPG) saw it, from A's log: compare with the kill at `wall`.
    let log = std::fs::read_to_string(cluster.corosync_log(Host::A)).unwrap_or_default();
    println!("B killed at {wall}; A's corosync log after that:");
    for line in log.lines().filter(|l| {
        l.contains("membership")
            || l.contains("Members left")
            || l.contains("Token has not been received")
            || l.contains("synchronization")
            || l.contains("quorum")
            || l.contains("Quorum")
    }) {
        if line
            .split_whitespace()
            .nth(2)
            .is_some_and(|t| t >= wall.as_str())
        {
            println!("  {line}");
        }
    }

    // The host comes back (uplink up, corosync and qdevice started again) and rejoins.
    let back = Instant::now();
    cluster.start_node(Host::B).expect("host B restarted");
    let rejoined = trace(
        &cluster,
        &Host::BOTH,
        back,
        SETTLE,
        Duration::from_secs(1),
        |_, s| s.iter().all(|q| q.as_ref().is_some_and(whole)),
    );
    println!("host B restarted: both quorate with 2 nodes and 3 votes after {rejoined:?}");
}

#[test]
#[ignore = "tier bed: root, network namespaces, corosync"]
fn a_split_between_the_hosts_leaves_exactly_one_quorate() {
    let (topo, cluster) = full_cluster("cq3");
    let opts = cluster.options().clone();
    let cut = Instant::now();
    topo.isolate_hosts(true)
        .expect("hosts isolated at the switch");
    println!("hosts isolated from each other at the switch (both still reach the witness)");
    let resolved = trace(
        &cluster,
        &Host::BOTH,
        cut,
        SETTLE,
        Duration::from_secs(3),
        |_, s| {
            let (Some(a), Some(b)) = (&s[0], &s[1]) else {
                return false;
            };
            a.nodes == 1 && b.nodes == 1 && (a.quorate != b.quorate)
        },
    );
    let a = cluster.quorum(Host::A).expect("A answers");
    let b = cluster.quorum(Host::B).expect("B answers");
    assert_ne!(a.quorate, b.quorate, "A: {a:?}, B: {b:?}");
    let winner = if a.quorate { Host::A } else { Host::B };
    println!(
        "split resolved after {resolved:?}: {winner:?} (nodeid {}) is quorate, the other not \
         (tie_breaker {}; {})",
        winner.node_id(),
        opts.tie_breaker,
        describe(&opts)
    );

    let healed = Instant::now();
    topo.isolate_hosts(false).expect("healed");
    println!("switch healed");
    let rejoined = trace(
        &cluster,
        &Host::BOTH,
        healed,
        SETTLE,
        Duration::from_secs(1),
        |_, s| s.iter().all(|q| q.as_ref().is_some_and(whole)),
    );
    println!("after healing both hosts are quorate with 2 nodes and 3 votes after {rejoined:?}");
}
