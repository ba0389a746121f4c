//! Pacemaker on the bed's corosync cluster (`colo_testbed::pacemaker`) and colo's OCF resource
//! agent `ha/ocf/colo-vm` against the real `qmp-driver agent` and a real QEMU.
//!
//! Needs root, network namespaces, the packages corosync, corosync-qdevice, corosync-qnetd,
//! pacemaker, pacemaker-cli-utils, resource-agents (ocf-tester) and libxml2-utils
//! (`integration/setup.sh`), the bed's QEMU (`COLO_QEMU` or the cache) and `qmp-driver`
//! (`COLO_QMP_DRIVER` or this build's target directory) with its `agent` command. Whatever is
//! missing fails the test and says so; nothing is stubbed.
//!
//! Run: `cargo nextest run -p colo-testbed --test pacemaker_bed --run-ignored all -j 1
//! --no-capture`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use colo_testbed::artifacts::{Artifacts, FIRMWARE_DIRS, run_dir};
use colo_testbed::cluster::{Cluster, ClusterOptions, Host};
use colo_testbed::pacemaker::{Pacemaker, PacemakerOptions, netns_inode};
use colo_testbed::process::QemuProcess;
use colo_testbed::stock::driver::qmp_driver_binary;
use colo_testbed::stock::{PairConfig, Role, StockPair, driver::config_path};
use colo_testbed::topology::{Topology, addr};

/// Generous bound for corosync and Pacemaker to settle (Pacemaker's DC election alone can
/// take ~20 s: its `dc-deadtime`).
const SETTLE: Duration = Duration::from_secs(90);

/// The repository's `ha/ocf` (the `colo` OCF provider).
fn ha_ocf_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ha/ocf")
}

/// Topology with a witness, corosync with qdevice on both hosts (quorate, 3 votes), and
/// Pacemaker formed on both with stonith disabled.
fn pacemaker_cluster(tag: &str) -> (Topology, Cluster, Pacemaker) {
    pacemaker_cluster_with(tag, false)
}

/// [`pacemaker_cluster`]; with `fencing`, `ha/fence` is among the hosts' fence agents and
/// stonith stays enabled (Pacemaker's default) for the caller to configure a device.
fn pacemaker_cluster_with(tag: &str, fencing: bool) -> (Topology, Cluster, Pacemaker) {
    let topo = Topology::create_with_witness(tag).expect("topology with witness");
    let cluster = Cluster::start(&topo, &ClusterOptions::default()).expect("corosync cluster");
    for host in Host::BOTH {
        cluster
            .wait_until(host, SETTLE, "quorate with 2 nodes and 3 votes", |q| {
                q.quorate && q.nodes == 2 && q.total_votes == 3
            })
            .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.log_tail(host)));
    }
    let started = Instant::now();
    let options = PacemakerOptions {
        ocf_providers: vec![("colo".to_string(), ha_ocf_dir())],
        fence_agents: fencing.then(|| ha_ocf_dir().join("../fence")),
        ..PacemakerOptions::default()
    };
    let mut pcmk = Pacemaker::start(&cluster, &options).expect("pacemakerd started");
    let formed = pcmk
        .wait_formed(&cluster, SETTLE)
        .unwrap_or_else(|e| panic!("{e:#}"));
    println!(
        "Pacemaker formed on both hosts in {formed:?} (since its start {:?})",
        started.elapsed()
    );
    if !fencing {
        // No fence device: without stonith-enabled=false Pacemaker starts no resource.
        pcmk.set_property(&cluster, Host::A, "stonith-enabled", "false")
            .expect("stonith-enabled=false");
    }
    (topo, cluster, pcmk)
}

#[test]
#[ignore = "tier bed: root, network namespaces, corosync, pacemaker"]
fn pacemaker_forms_on_the_bed_cluster_with_the_witness() {
    let (_topo, cluster, mut pcmk) = pacemaker_cluster("pm1");
    for host in Host::BOTH {
        let mon = pcmk.crm_mon(&cluster, host).expect("crm_mon -1");
        println!("{host:?}: crm_mon -1:\n{}", mon.text);
        assert!(
            mon.formed(),
            "{host:?} does not see both nodes with a DC:\n{}",
            mon.text
        );
        // Each node knows its own name (the resource agent compares it with primary_node).
        let name = pcmk
            .tool_ok(&cluster, host, "crm_node", &["-n"])
            .expect("crm_node -n");
        assert_eq!(name.trim(), host.name());
        // Quorum comes from corosync's votequorum, the witness's vote included.
        let q = cluster.quorum(host).expect("quorum");
        assert!(q.quorate && q.qdevice && q.total_votes == 3, "{q:?}");
    }
    let dc = pcmk.crm_mon(&cluster, Host::A).expect("crm_mon").dc;
    assert!(
        dc.as_deref() == Some("hosta") || dc.as_deref() == Some("hostb"),
        "{dc:?}"
    );
    // Both agree on the DC and the property is in the CIB on the other node.
    let other = pcmk.crm_mon(&cluster, Host::B).expect("crm_mon").dc;
    assert_eq!(dc, other);
    let prop = pcmk
        .tool_ok(
            &cluster,
            Host::B,
            "crm_attribute",
            &["-t", "crm_config", "-n", "stonith-enabled", "-G", "-q"],
        )
        .expect("stonith-enabled read back");
    assert_eq!(prop.trim(), "false");
    // A split at the switch: host A (lowest node id, the witness's tie-breaker) keeps quorum.
    _topo.isolate_hosts(true).expect("isolate");
    let t = Instant::now();
    pcmk.wait_until(&cluster, Host::A, SETTLE, "alone and quorate", |m| {
        m.quorate && m.online == ["hosta"]
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
    println!(
        "split: Pacemaker on A quorate alone after {:?}",
        t.elapsed()
    );
    pcmk.wait_until(&cluster, Host::B, SETTLE, "without quorum", |m| !m.quorate)
        .unwrap_or_else(|e| panic!("{e:#}"));
    println!(
        "split: Pacemaker on B without quorum after {:?}",
        t.elapsed()
    );
    _topo.isolate_hosts(false).expect("heal");
    pcmk.wait_formed(&cluster, SETTLE)
        .unwrap_or_else(|e| panic!("{e:#}"));
    println!("healed: both online again after {:?}", t.elapsed());
}

/// `qmp-driver` of this build; fails loudly when it has no `agent` command yet.
fn qmp_driver_with_agent() -> PathBuf {
    let bin = qmp_driver_binary().unwrap_or_else(|e| panic!("{e:#}"));
    let out = Command::new(&bin)
        .args(["agent", "--help"])
        .output()
        .unwrap_or_else(|e| panic!("running {} agent --help: {e}", bin.display()));
    assert!(
        out.status.success(),
        "{} has no working `agent` command (the HA agent colo-vm runs); build the workspace \
         with it, or set COLO_QMP_DRIVER: {}",
        bin.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    bin
}

/// One side's QEMU, paused and empty: `-S -nodefaults -display none`, an operator QMP socket
/// and the agent's own (watch) QMP socket, a pid file.
struct SideVm {
    qemu: QemuProcess,
    qmp: PathBuf,
    watch_qmp: PathBuf,
    pidfile: PathBuf,
}

fn start_side_vm(qemu: &Path, ns: &str, side: &str, dir: &Path) -> SideVm {
    let qmp = dir.join(format!("{side}.qmp"));
    let watch_qmp = dir.join(format!("{side}-watch.qmp"));
    let pidfile = dir.join(format!("{side}.pid"));
    let mut args: Vec<String> = vec![
        "-S".into(),
        "-nodefaults".into(),
        "-display".into(),
        "none".into(),
        "-m".into(),
        "64".into(),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp.display()),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", watch_qmp.display()),
        "-pidfile".into(),
        pidfile.display().to_string(),
    ];
    for fw in FIRMWARE_DIRS {
        args.extend(["-L".into(), fw.into()]);
    }
    let qemu = QemuProcess::spawn(qemu, ns, side, dir, qmp.clone(), &args)
        .unwrap_or_else(|e| panic!("starting the {side} QEMU: {e:#}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(qmp.exists() && watch_qmp.exists()) {
        assert!(
            Instant::now() < deadline,
            "{side} QEMU made no QMP sockets: {}",
            qemu.stderr_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    SideVm {
        qemu,
        qmp,
        watch_qmp,
        pidfile,
    }
}

/// The pair's config: both sides' QMP sockets (operator and watch) on the shared run dir.
fn write_pair_toml(dir: &Path, name: &str) -> PathBuf {
    let sock = |f: &str| format!("unix:{}", dir.join(f).display());
    let text = format!(
        "name = {name:?}\n\n[primary]\nqmp = {pq:?}\nwatch_qmp = {pw:?}\nhost = {ph:?}\n\n\
         [secondary]\nqmp = {sq:?}\nwatch_qmp = {sw:?}\nhost = {sh:?}\n\n\
         [migration]\nsecondary_incoming = \"tcp:{sh}:9998\"\n",
        pq = sock("primary.qmp"),
        pw = sock("primary-watch.qmp"),
        ph = addr::PRIMARY_HOST,
        sq = sock("secondary.qmp"),
        sw = sock("secondary-watch.qmp"),
        sh = addr::SECONDARY_HOST,
    );
    let path = dir.join("pair.toml");
    std::fs::write(&path, text).expect("writing pair.toml");
    path
}

#[test]
#[ignore = "tier bed: root, network namespaces, corosync, pacemaker, QEMU, qmp-driver agent"]
fn colo_vm_passes_ocf_tester_with_the_real_agent() {
    let driver = qmp_driver_with_agent();
    let artifacts = Artifacts::locate().unwrap_or_else(|e| panic!("{e:#}"));
    let (topo, cluster, pcmk) = pacemaker_cluster("pm2");
    let dir = run_dir("pacemaker-ocf-tester").expect("run dir");
    let config = write_pair_toml(&dir, "vm1");
    let mut vm = start_side_vm(&artifacts.qemu, &topo.primary, "primary", &dir);
    let agent = ha_ocf_dir().join("colo-vm");
    let opt = |k: &str, v: &str| format!("{k}={v}");
    let args = [
        "-v".to_string(),
        "-n".into(),
        "colo".into(),
        "-o".into(),
        opt("config", &config.display().to_string()),
        "-o".into(),
        opt("primary_node", Host::A.name()),
        "-o".into(),
        opt("secondary_node", Host::B.name()),
        "-o".into(),
        opt("qmp_driver", &driver.display().to_string()),
        "-o".into(),
        opt("qemu_pidfile", &vm.pidfile.display().to_string()),
        agent.display().to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // On host A, in its network and mount namespace: the agent reaches A's corosync, the RA's
    // pid file and the agent's state file land in A's private /run, crm_node -n says hosta.
    let t = Instant::now();
    let out = pcmk
        .tool(&cluster, Host::A, "/usr/sbin/ocf-tester", &args)
        .expect("running ocf-tester");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("ocf-tester ({:?}):\n{text}", t.elapsed());
    let log = cluster
        .exec_in_host(
            Host::A,
            "sh",
            &["-c", "cat /run/resource-agents/colo-vm-colo.log"],
        )
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(
        out.status.success() && text.contains("passed all tests"),
        "ocf-tester failed:\n{text}\nagent log (A):\n{log}\nQEMU: {}",
        vm.qemu.stderr_tail()
    );
    // ocf-tester's stops must leave a QEMU that was never in COLO running (stop only quits a
    // VM that serves or replicates).
    assert!(!vm.qemu.has_exited(), "the paused QEMU was stopped");
    assert!(vm.qmp.exists() && vm.watch_qmp.exists());
}

/// The CIB of the promotable clone, as `cibadmin -C -o resources` takes it.
fn clone_xml(config: &Path, driver: &Path) -> String {
    format!(
        r#"<clone id="colo-clone">
  <meta_attributes id="colo-clone-meta">
    <nvpair id="colo-clone-promotable" name="promotable" value="true"/>
    <nvpair id="colo-clone-promoted-max" name="promoted-max" value="1"/>
    <nvpair id="colo-clone-clone-max" name="clone-max" value="2"/>
    <nvpair id="colo-clone-clone-node-max" name="clone-node-max" value="1"/>
    <nvpair id="colo-clone-notify" name="notify" value="true"/>
  </meta_attributes>
  <primitive id="colo" class="ocf" provider="colo" type="colo-vm">
    <instance_attributes id="colo-params">
      <nvpair id="colo-config" name="config" value="{config}"/>
      <nvpair id="colo-primary-node" name="primary_node" value="hosta"/>
      <nvpair id="colo-secondary-node" name="secondary_node" value="hostb"/>
      <nvpair id="colo-qmp-driver" name="qmp_driver" value="{driver}"/>
    </instance_attributes>
    <operations>
      <op id="colo-monitor-promoted" name="monitor" interval="9s" role="Promoted" timeout="20s"/>
      <op id="colo-monitor-unpromoted" name="monitor" interval="10s" role="Unpromoted" timeout="20s"/>
      <op id="colo-start" name="start" interval="0s" timeout="30s"/>
      <op id="colo-stop" name="stop" interval="0s" timeout="30s"/>
      <op id="colo-promote" name="promote" interval="0s" timeout="60s"/>
      <op id="colo-demote" name="demote" interval="0s" timeout="30s"/>
    </operations>
  </primitive>
</clone>"#,
        config = config.display(),
        driver = driver.display(),
    )
}

#[test]
#[ignore = "tier bed: root, network namespaces, corosync, pacemaker, QEMU, qmp-driver agent"]
fn colo_vm_promotable_clone_starts_with_the_primary_side_promoted() {
    let driver = qmp_driver_with_agent();
    let artifacts = Artifacts::locate().unwrap_or_else(|e| panic!("{e:#}"));
    let (topo, cluster, mut pcmk) = pacemaker_cluster("pm3");
    let dir = run_dir("pacemaker-clone").expect("run dir");
    let config = write_pair_toml(&dir, "vm1");
    let mut pvm = start_side_vm(&artifacts.qemu, &topo.primary, "primary", &dir);
    let mut svm = start_side_vm(&artifacts.qemu, &topo.secondary, "secondary", &dir);
    let xml = clone_xml(&config, &driver);
    pcmk.cib_create(&cluster, Host::A, "resources", &xml)
        .expect("adding the colo-vm clone");
    let t = Instant::now();
    // Both sides wait (neither QEMU is in COLO): the primary side gets the pre-COLO score and
    // is promoted; the secondary, without its copy, has no score and stays unpromoted.
    let roles = |m: &colo_testbed::pacemaker::CrmMon| {
        let t = &m.text;
        t.contains("Promoted: [ hosta ]") && t.contains("Unpromoted: [ hostb ]")
    };
    let res = pcmk.wait_until(
        &cluster,
        Host::A,
        SETTLE,
        "showing the clone's roles",
        roles,
    );
    let mon = pcmk
        .crm_mon(&cluster, Host::A)
        .map(|m| m.text)
        .unwrap_or_default();
    println!("crm_mon -1 after {:?}:\n{mon}", t.elapsed());
    if let Err(e) = res {
        panic!(
            "{e:#}\nagent log A: {}\nagent log B: {}",
            agent_log(&cluster, Host::A),
            agent_log(&cluster, Host::B)
        );
    }
    for (host, expect) in [(Host::A, "10"), (Host::B, "")] {
        let out = pcmk
            .tool(
                &cluster,
                host,
                "crm_attribute",
                &[
                    "-N",
                    host.name(),
                    "-n",
                    "master-colo",
                    "-l",
                    "reboot",
                    "-G",
                    "-q",
                ],
            )
            .expect("crm_attribute");
        let score = String::from_utf8_lossy(&out.stdout).trim().to_string();
        println!("{host:?}: promotion score {score:?}");
        assert_eq!(score, expect, "promotion score on {host:?}");
    }
    assert!(!pvm.qemu.has_exited() && !svm.qemu.has_exited());
}

fn agent_log(cluster: &Cluster, host: Host) -> String {
    cluster
        .exec_in_host(
            host,
            "sh",
            &["-c", "tail -n 20 /run/resource-agents/colo-vm-colo.log"],
        )
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

#[test]
#[ignore = "tier bed: root, network namespaces, corosync, pacemaker"]
fn stonith_fences_the_host_that_lost_quorum_with_the_bed_fence_agent() {
    let (topo, cluster, mut pcmk) = pacemaker_cluster_with("pm4", true);
    let map = format!(
        "hosta:{},hostb:{}",
        netns_inode(&topo.primary).expect("netns inode of A"),
        netns_inode(&topo.secondary).expect("netns inode of B")
    );
    let device = format!(
        r#"<primitive id="fence-bed" class="stonith" type="fence_colo_bed">
  <instance_attributes id="fence-bed-params">
    <nvpair id="fence-bed-ns-map" name="ns_map" value="{map}"/>
    <nvpair id="fence-bed-host-list" name="pcmk_host_list" value="hosta hostb"/>
  </instance_attributes>
  <operations>
    <op id="fence-bed-monitor" name="monitor" interval="60s" timeout="20s"/>
  </operations>
</primitive>"#
    );
    pcmk.cib_create(&cluster, Host::A, "resources", &device)
        .expect("adding the fence device");
    pcmk.wait_until(&cluster, Host::A, SETTLE, "running the fence device", |m| {
        m.text
            .lines()
            .any(|l| l.contains("fence-bed") && l.contains("Started"))
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
    let agents = pcmk
        .tool_ok(&cluster, Host::A, "stonith_admin", &["--list-installed"])
        .expect("stonith_admin --list-installed");
    assert!(agents.contains("fence_colo_bed"), "{agents}");

    // Split at the switch: B loses quorum (the witness's tie-breaker favours A), A fences B.
    let b_pacemakerd = pcmk.pacemakerd_pid(Host::B).expect("B's pacemakerd");
    let t = Instant::now();
    topo.isolate_hosts(true).expect("isolate");
    while !pcmk.has_exited(Host::B) {
        assert!(
            t.elapsed() < SETTLE,
            "B's pacemakerd ({b_pacemakerd}) still runs {SETTLE:?} after the split; A's log:\n{}",
            pcmk.log_tail(Host::A, 30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "split: B fenced (its pacemakerd killed) {:?} after the cut",
        t.elapsed()
    );
    pcmk.wait_until(&cluster, Host::A, SETTLE, "showing hostb offline", |m| {
        m.quorate && m.online == ["hosta"] && m.text.contains("OFFLINE: [ hostb ]")
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
    let history = pcmk
        .tool_ok(&cluster, Host::A, "stonith_admin", &["--history", "hostb"])
        .expect("stonith_admin --history");
    println!("A: stonith_admin --history hostb:\n{history}");
    assert!(
        history.contains("successful") && history.contains("hostb"),
        "{history}"
    );
    // Nothing of B survives: its corosync went with the fence.
    let b_ns = netns_inode(&topo.secondary).expect("inode");
    let left: Vec<String> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path().join("ns/net"))
                .is_ok_and(|l| l.to_string_lossy() == format!("net:[{b_ns}]"))
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.is_empty(), "processes left in B's namespace: {left:?}");
}

/// A host's file, read inside its mount namespace (its private `/run`); "" if absent.
fn host_file(cluster: &Cluster, host: Host, path: &str) -> String {
    cluster
        .exec_in_host(host, "cat", &[path])
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// `"key": "value"` or `"key": scalar` at the top of a pretty-printed state file.
fn state_value(state: &str, key: &str) -> String {
    state
        .lines()
        .find_map(|l| l.trim().strip_prefix(&format!("\"{key}\": ")))
        .map(|v| v.trim_end_matches(',').trim_matches('"').to_string())
        .unwrap_or_default()
}

fn promotion_score(pcmk: &Pacemaker, cluster: &Cluster, host: Host) -> String {
    pcmk.tool(
        cluster,
        host,
        "crm_attribute",
        &[
            "-N",
            host.name(),
            "-n",
            "master-colo",
            "-l",
            "reboot",
            "-G",
            "-q",
        ],
    )
    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    .unwrap_or_default()
}

/// The clone for a pair in COLO: each node's QEMU pid file by a per-node rule, the bed's agent
/// timings.
fn pair_clone_xml(config: &Path, driver: &Path, dir: &Path) -> String {
    let pidfile = |side: &str| dir.join(format!("{side}-qemu.pid")).display().to_string();
    let base = clone_xml(config, driver);
    let per_node = format!(
        r##"    <instance_attributes id="colo-params-a" score="2">
      <rule id="colo-params-a-rule" score="0">
        <expression id="colo-params-a-expr" attribute="#uname" operation="eq" value="hosta"/>
      </rule>
      <nvpair id="colo-pidfile-a" name="qemu_pidfile" value="{a}"/>
    </instance_attributes>
    <instance_attributes id="colo-params-b" score="1">
      <rule id="colo-params-b-rule" score="0">
        <expression id="colo-params-b-expr" attribute="#uname" operation="eq" value="hostb"/>
      </rule>
      <nvpair id="colo-pidfile-b" name="qemu_pidfile" value="{b}"/>
    </instance_attributes>
    <operations>"##,
        a = pidfile("primary"),
        b = pidfile("secondary"),
    );
    base.replace(
        r#"      <nvpair id="colo-qmp-driver""#,
        &format!(
            "      <nvpair id=\"colo-agent-options\" name=\"agent_options\" value=\"{}\"/>\n      <nvpair id=\"colo-qmp-driver\"",
            colo_testbed::ha::AGENT_ARGS.join(" ")
        ),
    )
    .replacen("    <operations>", &per_node, 1)
}

/// A stock COLO pair (with the witness) in COLO, corosync and Pacemaker on its hosts (stonith
/// off), and the colo-vm clone up: hosta promoted with score 1000, hostb unpromoted with 100.
async fn colo_pair_under_pacemaker(tag: &str) -> (StockPair, Cluster, Pacemaker) {
    let driver = qmp_driver_with_agent();
    let dir = run_dir(&format!("pacemaker-{tag}")).expect("run dir");
    let cfg = PairConfig {
        witness: true,
        ..PairConfig::default()
    };
    let pair = StockPair::start(tag, dir.clone(), cfg)
        .await
        .expect("COLO pair started");
    let cluster = Cluster::start(&pair.topology, &ClusterOptions::default()).expect("corosync");
    for host in Host::BOTH {
        cluster
            .wait_until(host, SETTLE, "quorate with 3 votes", |q| {
                q.quorate && q.nodes == 2 && q.total_votes == 3
            })
            .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.log_tail(host)));
    }
    let options = PacemakerOptions {
        ocf_providers: vec![("colo".to_string(), ha_ocf_dir())],
        ..PacemakerOptions::default()
    };
    let mut pcmk = Pacemaker::start(&cluster, &options).expect("pacemakerd");
    pcmk.wait_formed(&cluster, SETTLE)
        .unwrap_or_else(|e| panic!("{e:#}"));
    // These tests kill a QEMU or move a role, never a host: no node is lost, no fencing.
    pcmk.set_property(&cluster, Host::A, "stonith-enabled", "false")
        .expect("stonith-enabled=false");
    for role in [Role::Primary, Role::Secondary] {
        let pid = pair.vm(role).expect("vm").process.pid().expect("pid");
        std::fs::write(
            dir.join(format!("{}-qemu.pid", role.name())),
            format!("{pid}\n"),
        )
        .expect("pid file");
    }
    let xml = pair_clone_xml(&config_path(&dir), &driver, &dir);
    pcmk.cib_create(&cluster, Host::A, "resources", &xml)
        .expect("adding the clone");

    let roles = |promoted: &str, unpromoted: &str| {
        let p = format!("Promoted: [ {promoted} ]");
        let u = format!("Unpromoted: [ {unpromoted} ]");
        move |m: &colo_testbed::pacemaker::CrmMon| m.text.contains(&p) && m.text.contains(&u)
    };
    let t = Instant::now();
    pcmk.wait_until(
        &cluster,
        Host::A,
        SETTLE,
        "A promoted, B unpromoted",
        roles("hosta", "hostb"),
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}\nA: {}\nB: {}",
            agent_log(&cluster, Host::A),
            agent_log(&cluster, Host::B)
        )
    });
    // Both agents see the pair in COLO: scores 1000 (primary) and 100 (in-sync secondary).
    let deadline = Instant::now() + SETTLE;
    while !(promotion_score(&pcmk, &cluster, Host::A) == "1000"
        && promotion_score(&pcmk, &cluster, Host::B) == "100")
    {
        assert!(
            Instant::now() < deadline,
            "scores A {:?} B {:?}; states:\nA {}\nB {}",
            promotion_score(&pcmk, &cluster, Host::A),
            promotion_score(&pcmk, &cluster, Host::B),
            host_file(&cluster, Host::A, "/run/colo/testbed/agent-primary.json"),
            host_file(&cluster, Host::B, "/run/colo/testbed/agent-secondary.json")
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!(
        "clone up in {:?}: hosta promoted (score 1000), hostb unpromoted (score 100)",
        t.elapsed()
    );
    (pair, cluster, pcmk)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: root, network namespaces, corosync, pacemaker, QEMU and the guest, qmp-driver agent"]
async fn pacemaker_follows_the_agents_own_failover_without_restarting_the_survivor() {
    let (mut pair, cluster, mut pcmk) = colo_pair_under_pacemaker("pm5").await;
    // The agent's default state file, /run/colo/<pair name>/agent-<side>.json.
    let b_state_file = "/run/colo/testbed/agent-secondary.json";
    let b_agent_pid = host_file(&cluster, Host::B, "/run/resource-agents/colo-vm-colo.pid");
    assert!(!b_agent_pid.is_empty(), "no agent pid file on B");

    // The primary's QEMU dies. B's agent takes over by itself; Pacemaker must follow.
    let t = Instant::now();
    pair.kill(Role::Primary).expect("kill the primary QEMU");
    let mut alone_at = None;
    let mut promoted_at = None;
    let mut last = String::new();
    while promoted_at.is_none() {
        if alone_at.is_none()
            && state_value(&host_file(&cluster, Host::B, b_state_file), "vm") == "alone"
        {
            alone_at = Some(t.elapsed());
            println!(
                "+{:?}: B's agent reports alone (its own take-over)",
                t.elapsed()
            );
        }
        if let Ok(m) = pcmk.crm_mon(&cluster, Host::B) {
            if m.text.contains("Promoted: [ hostb ]") {
                promoted_at = Some(t.elapsed());
            }
            last = m.text;
        }
        assert!(
            t.elapsed() < SETTLE,
            "Pacemaker did not promote hostb within {SETTLE:?}; last crm_mon:\n{last}\nB state: {}\nB RA log: {}",
            host_file(&cluster, Host::B, b_state_file),
            agent_log(&cluster, Host::B)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "+{:?}: Pacemaker shows hostb promoted\n{last}",
        promoted_at.unwrap()
    );
    let alone_at = alone_at.expect("B was promoted before its agent reported alone");
    assert!(alone_at <= promoted_at.unwrap());
    // Pacemaker followed without restarting B: the same agent process, its VM still alone,
    // no failed action on hostb.
    assert_eq!(
        host_file(&cluster, Host::B, "/run/resource-agents/colo-vm-colo.pid"),
        b_agent_pid,
        "B's agent was restarted"
    );
    assert_eq!(
        state_value(&host_file(&cluster, Host::B, b_state_file), "vm"),
        "alone"
    );
    let failures: Vec<&str> = last
        .lines()
        .filter(|l| l.contains("on hostb") && (l.contains("error") || l.contains("failed")))
        .collect();
    assert!(
        failures.is_empty(),
        "failed actions on hostb: {failures:?}\n{last}"
    );
    // The old primary's side (its QEMU dead) must never be a promotion candidate while B
    // serves: no score on hosta (its instance restarted with the VM gone, or failed).
    let deadline = Instant::now() + SETTLE;
    while !promotion_score(&pcmk, &cluster, Host::A).is_empty() {
        assert!(
            Instant::now() < deadline,
            "hosta keeps promotion score {:?}; its state: {}",
            promotion_score(&pcmk, &cluster, Host::A),
            host_file(&cluster, Host::A, "/run/colo/testbed/agent-primary.json")
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!(
        "hosta: no promotion score; its agent's state: {}",
        host_file(&cluster, Host::A, "/run/colo/testbed/agent-primary.json")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    );
    // hosta's instance: its QEMU is dead, so its restart fails (qemu_pidfile) and it stays
    // stopped there.
    let a_stopped = pcmk.wait_until(&cluster, Host::A, SETTLE, "hosta's instance stopped", |m| {
        m.text.contains("start on hosta returned 'error'")
            && !m.text.contains("Unpromoted: [ hosta ]")
    });
    let text = pcmk
        .crm_mon(&cluster, Host::A)
        .map(|m| m.text)
        .unwrap_or_default();
    println!("crm_mon -1 at the end:\n{text}");
    a_stopped.unwrap_or_else(|e| panic!("{e:#}"));
    let survivor = pair
        .vm(Role::Secondary)
        .expect("the survivor")
        .process
        .pid();
    assert!(
        survivor.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists()),
        "the survivor's QEMU is gone"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier bed: root, network namespaces, corosync, pacemaker, QEMU and the guest, qmp-driver agent"]
async fn banning_the_promoted_role_from_hosta_switches_over_to_hostb() {
    let (pair, cluster, mut pcmk) = colo_pair_under_pacemaker("pm6").await;
    let a_qemu = pair
        .vm(Role::Primary)
        .expect("vm")
        .process
        .pid()
        .expect("pid");
    let b_state_file = "/run/colo/testbed/agent-secondary.json";
    // An operator's switch-over: keep the promoted role off hosta. Pacemaker demotes hosta
    // (which quits its VM: a COLO primary cannot become a secondary), B's agent takes over by
    // itself on seeing its peer's QEMU gone, and Pacemaker's promote of hostb confirms it.
    let t = Instant::now();
    pcmk.tool_ok(
        &cluster,
        Host::A,
        "crm_resource",
        &[
            "--ban",
            "--resource",
            "colo-clone",
            "--promoted",
            "--node",
            "hosta",
        ],
    )
    .expect("crm_resource --ban --promoted");
    let res = pcmk.wait_until(
        &cluster,
        Host::A,
        SETTLE,
        "hostb promoted, hosta unpromoted",
        |m| m.text.contains("Promoted: [ hostb ]") && m.text.contains("Unpromoted: [ hosta ]"),
    );
    let text = pcmk
        .crm_mon(&cluster, Host::A)
        .map(|m| m.text)
        .unwrap_or_default();
    println!("after {:?}:\n{text}", t.elapsed());
    res.unwrap_or_else(|e| {
        panic!(
            "{e:#}\nA RA log: {}\nB RA log: {}",
            agent_log(&cluster, Host::A),
            agent_log(&cluster, Host::B)
        )
    });
    assert_eq!(
        state_value(&host_file(&cluster, Host::B, b_state_file), "vm"),
        "alone"
    );
    assert!(
        !Path::new(&format!("/proc/{a_qemu}")).exists()
            || std::fs::read_to_string(format!("/proc/{a_qemu}/stat"))
                .is_ok_and(|s| s.contains(") Z ")),
        "hosta's QEMU still runs after the demote"
    );
    // The demoted side is an empty, unpromoted instance: no failed action, no score.
    assert!(!text.contains("Failed Resource Actions"), "{text}");
    assert!(promotion_score(&pcmk, &cluster, Host::A).is_empty());
    let b_log = host_file(&cluster, Host::B, "/run/resource-agents/colo-vm-colo.log");
    println!(
        "B's agent: {}",
        b_log
            .lines()
            .filter(|l| l.contains("decision") || l.contains("own VM"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    pcmk.tool_ok(
        &cluster,
        Host::A,
        "crm_resource",
        &["--clear", "--resource", "colo-clone"],
    )
    .expect("crm_resource --clear");
}
