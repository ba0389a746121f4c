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
