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

fn options() -> ClusterOptions {
    ClusterOptions::from_env()
}

fn describe(o: &ClusterOptions) -> String {
    o.describe()
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

// ---- The HA agent's corosync link (`colo_cluster::link`), through the `cpg-probe` binary ----

/// A `cpg-probe` in a host's network namespace: its JSON events, and what they told so far.
struct Probe {
    host: Host,
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    lines: std::sync::mpsc::Receiver<serde_json::Value>,
    /// Every event so far, in order.
    seen: Vec<serde_json::Value>,
    /// The latest ring seq.
    ring: Option<u64>,
    /// The latest quorum verdict (quorate, ring).
    quorum: Option<(bool, u64)>,
}

impl Probe {
    fn start(cluster: &Cluster, host: Host, group: &str) -> Probe {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let mut child = Command::new("ip")
            .args(["netns", "exec", cluster.namespace(host)])
            .arg(env!("CARGO_BIN_EXE_cpg-probe"))
            .arg(group)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cpg-probe started");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("cpg-probe printed {line:?}: {e}"));
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        let mut probe = Probe {
            host,
            child,
            stdin,
            lines,
            seen: Vec::new(),
            ring: None,
            quorum: None,
        };
        let ready = probe.wait_for("ready", |_, e| e["event"] == "ready");
        assert_eq!(
            ready["node"],
            host.node_id(),
            "{host:?}'s probe reports another node id"
        );
        probe
    }

    /// Reads events until `done` holds for the probe and the latest event; returns that event.
    fn wait_for(
        &mut self,
        what: &str,
        mut done: impl FnMut(&Probe, &serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + SETTLE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = match self.lines.recv_timeout(left) {
                Ok(e) => e,
                Err(e) => panic!(
                    "{:?}'s probe: no {what} within {SETTLE:?} ({e}); events so far:\n{}",
                    self.host,
                    self.dump()
                ),
            };
            match event["event"].as_str() {
                Some("ring") => self.ring = event["seq"].as_u64(),
                Some("quorum") => {
                    self.quorum = Some((
                        event["quorate"].as_bool().expect("quorate"),
                        event["ring"].as_u64().expect("ring"),
                    ))
                }
                _ => {}
            }
            self.seen.push(event.clone());
            if done(self, &event) {
                return event;
            }
        }
    }

    /// Quorate, by a verdict about the latest ring.
    fn quorate_for_current_ring(&self) -> bool {
        self.ring.is_some() && self.quorum == Some((true, self.ring.unwrap()))
    }

    fn joined(&self, node: u32) -> bool {
        self.seen
            .iter()
            .any(|e| e["event"] == "joined" && e["node"] == node)
    }

    fn command(&mut self, line: &str) {
        use std::io::Write;
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("command written to the probe");
        stdin.flush().expect("flushed");
    }

    /// The (from, message) of every delivered message so far.
    fn deliveries(&self) -> Vec<(u64, serde_json::Value)> {
        self.seen
            .iter()
            .filter(|e| e["event"] == "delivered")
            .map(|e| (e["from"].as_u64().expect("from"), e["message"].clone()))
            .collect()
    }

    fn count(&self, event: &str) -> usize {
        self.seen.iter().filter(|e| e["event"] == event).count()
    }

    fn dump(&self) -> String {
        self.seen
            .iter()
            .map(|e| format!("  {e}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Closes stdin (the probe leaves the group and exits) and waits for the exit.
    fn close(mut self) {
        drop(self.stdin.take());
        let status = self.child.wait().expect("probe waited for");
        assert!(
            status.success(),
            "{:?}'s probe exited with {status}",
            self.host
        );
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Both hosts' probes in `group`, each having seen the other join and a quorate verdict
/// about its current ring.
fn joined_pair(cluster: &Cluster, group: &str) -> (Probe, Probe) {
    let mut a = Probe::start(cluster, Host::A, group);
    let mut b = Probe::start(cluster, Host::B, group);
    for (p, other) in [(&mut a, Host::B), (&mut b, Host::A)] {
        let me = p.host;
        p.wait_for("the peer joined and quorum for the current ring", |p, _| {
            p.joined(other.node_id()) && p.joined(me.node_id()) && p.quorate_for_current_ring()
        });
        println!(
            "{me:?}'s probe: ring {:?}, quorum {:?}; events:\n{}",
            p.ring,
            p.quorum,
            p.dump()
        );
    }
    (a, b)
}

#[test]
#[ignore = "tier bed: root, network namespaces, corosync"]
fn link_members_see_each_other_and_quorum_for_their_ring() {
    let (_topo, cluster) = full_cluster("cl1");
    let (a, b) = joined_pair(&cluster, "colo-test-vm");
    for p in [&a, &b] {
        // The current ring is announced before the first verdict (the link derives it from
        // that verdict: CPG sends no totem confchg for the ring a process joins in).
        let first = p
            .seen
            .iter()
            .find(|e| e["event"] == "ring" || e["event"] == "quorum")
            .expect("a ring or a verdict");
        assert_eq!(first["event"], "ring", "{:?}:\n{}", p.host, p.dump());
        assert!(p.quorate_for_current_ring(), "{:?}:\n{}", p.host, p.dump());
    }
    assert_eq!(a.ring, b.ring, "both nodes are in one ring");
    a.close();
    b.close();
}

#[test]
#[ignore = "tier bed: root, network namespaces, corosync"]
fn link_delivers_concurrent_claims_in_one_order_on_both_nodes() {
    const ROUNDS: usize = 50;
    let (_topo, cluster) = full_cluster("cl2");
    let (mut a, mut b) = joined_pair(&cluster, "colo-test-vm");
    for i in 0..ROUNDS {
        a.command(&format!("claim a{i}"));
        b.command(&format!("claim b{i}"));
    }
    for p in [&mut a, &mut b] {
        p.wait_for("every claim delivered", |p, _| {
            p.deliveries().len() >= 2 * ROUNDS && p.count("sent") + p.count("send-error") >= ROUNDS
        });
        assert_eq!(p.count("send-error"), 0, "{:?}:\n{}", p.host, p.dump());
    }
    let (da, db) = (a.deliveries(), b.deliveries());
    assert_eq!(da.len(), 2 * ROUNDS);
    assert_eq!(da, db, "A and B saw different orders");
    // Each sender's own claims stay in its order, and the two streams did interleave.
    for (node, prefix) in [(1, "a"), (2, "b")] {
        let own: Vec<String> = da
            .iter()
            .filter(|(from, _)| *from == node)
            .map(|(_, m)| m["reason"].as_str().expect("reason").to_string())
            .collect();
        let expected: Vec<String> = (0..ROUNDS).map(|i| format!("{prefix}{i}")).collect();
        assert_eq!(own, expected);
    }
    let switches = da.windows(2).filter(|w| w[0].0 != w[1].0).count();
    println!(
        "{} claims delivered in the same order on both nodes; the sender changed {switches} times",
        da.len()
    );
    a.close();
    b.close();
}

#[test]
#[ignore = "tier bed: root, network namespaces, corosync"]
fn link_survivor_sees_node_down_a_new_ring_and_quorum_for_it() {
    let (_topo, mut cluster) = full_cluster("cl3");
    let (mut a, mut b) = joined_pair(&cluster, "colo-test-vm");
    let old_ring = a.ring.expect("ring");
    let killed = Instant::now();
    cluster.kill_host(Host::B).expect("host B killed");
    let left = a.wait_for("B left", |_, e| e["event"] == "left");
    println!("A: {left} after {:?}", killed.elapsed());
    assert_eq!(left["node"], 2);
    assert_eq!(left["cause"], "node-down");
    // The link passes the node's leave on after the ring without that node (corosync sends
    // them the other way round), so the arbiter judges it against the new ring's verdict.
    assert!(
        a.ring.is_some_and(|r| r != old_ring),
        "B's leave before the new ring:\n{}",
        a.dump()
    );
    let new_ring = a.ring.unwrap();
    a.wait_for("quorum for the new ring", |p, _| {
        p.quorum.is_some_and(|(_, ring)| ring == p.ring.unwrap())
    });
    println!(
        "A: ring {old_ring} -> {new_ring}, verdict {:?} after {:?}; events:\n{}",
        a.quorum,
        killed.elapsed(),
        a.dump()
    );
    assert!(new_ring > old_ring);
    assert_eq!(a.quorum, Some((true, new_ring)), "{}", a.dump());
    // Every verdict names a ring that was announced before it: the seqs are comparable.
    let mut rings = Vec::new();
    for e in &a.seen {
        match e["event"].as_str() {
            Some("ring") => rings.push(e["seq"].as_u64().unwrap()),
            Some("quorum") => assert_eq!(
                rings.last().copied(),
                e["ring"].as_u64(),
                "a verdict about a ring other than the latest:\n{}",
                a.dump()
            ),
            _ => {}
        }
    }
    // B's corosync got SIGKILL with the host: its probe lost the cluster.
    b.wait_for("cluster lost", |_, e| e["event"] == "cluster-lost");
    a.close();
    drop(b);
}

#[test]
#[ignore = "tier bed: root, network namespaces, corosync"]
fn link_reports_a_killed_corosync_as_cluster_lost() {
    let (_topo, cluster) = full_cluster("cl4");
    let (mut a, mut b) = joined_pair(&cluster, "colo-test-vm");
    let pid = cluster.corosync_pid(Host::A).expect("A's corosync runs");
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    a.wait_for("cluster lost", |_, e| e["event"] == "cluster-lost");
    assert_eq!(a.count("cluster-lost"), 1);
    // Sending now fails cleanly.
    a.command("claim too-late");
    let answer = a.wait_for("the send's answer", |_, e| {
        e["event"] == "sent" || e["event"] == "send-error"
    });
    println!("A after losing corosync: {answer}");
    assert_eq!(answer["event"], "send-error");
    // The peer sees A's node go.
    let left = b.wait_for("A left", |_, e| e["event"] == "left");
    assert_eq!(left["node"], 1);
    assert_eq!(left["cause"], "node-down");
    println!("B: {left}; events:\n{}", b.dump());
    a.close();
    b.close();
}

#[test]
#[ignore = "tier bed: root, network namespaces, corosync"]
fn link_split_gives_exactly_one_side_quorum_for_its_new_ring() {
    let (topo, cluster) = full_cluster("cl5");
    let (mut a, mut b) = joined_pair(&cluster, "colo-test-vm");
    let old_ring = a.ring.expect("ring");
    topo.isolate_hosts(true)
        .expect("hosts isolated at the switch");
    for (p, other) in [(&mut a, Host::B), (&mut b, Host::A)] {
        let left = p.wait_for("the peer left", |_, e| e["event"] == "left");
        assert_eq!(left["node"], other.node_id());
        assert_eq!(left["cause"], "node-down");
        assert!(
            p.ring.is_some_and(|r| r != old_ring),
            "{:?}: the peer's leave before the new ring:\n{}",
            p.host,
            p.dump()
        );
        p.wait_for("a verdict about the new ring", |p, _| {
            p.quorum.is_some_and(|(_, ring)| Some(ring) == p.ring)
        });
        println!("{:?} after the split:\n{}", p.host, p.dump());
    }
    let (qa, qb) = (a.quorum.unwrap(), b.quorum.unwrap());
    assert_ne!(qa.0, qb.0, "exactly one side quorate: A {qa:?}, B {qb:?}");
    // Neither side's verdict changes in the next seconds (the qdevice has decided).
    std::thread::sleep(Duration::from_secs(3));
    a.command("state alone");
    b.command("state alone");
    for p in [&mut a, &mut b] {
        p.wait_for("own message delivered", |_, e| e["event"] == "delivered");
    }
    assert_eq!((a.quorum.unwrap(), b.quorum.unwrap()), (qa, qb));
    // In a split each side's messages reach only its own partition.
    assert!(a.deliveries().iter().all(|(from, _)| *from == 1));
    assert!(b.deliveries().iter().all(|(from, _)| *from == 2));
    topo.isolate_hosts(false).expect("healed");
    a.close();
    b.close();
}
