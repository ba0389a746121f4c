//! Failback at QEMU's level (issue 14): the VM that took over as the **secondary** can become
//! the primary of a new secondary while its guest runs, and that one can take over in turn.
//!
//! This is the part of A → B → A that QEMU owns, checked on the disk layout `qemu-args` gives
//! a secondary on colo-blockd (its NBD client of the `svm` export under a quorum of one child):
//!
//! 1. P (primary) and S1 (secondary) enter COLO and checkpoint;
//! 2. P dies; S1 takes over (`x-colo-lost-heartbeat`) and its guest runs on;
//! 3. S1's disk gets a replication child at run time (`blockdev-add` of an NBD node and
//!    `x-blockdev-change` into its quorum), as `start` and `reprotect` give a primary's;
//! 4. S1 migrates into COLO with a new secondary S2 (S1 in mode `primary`, S2 `secondary`) and
//!    checkpoints go on; every disk record S1's guest writes from then on is on the child too;
//! 5. S1 dies; S2 takes over and its guest runs on.
//!
//! Real QEMU (the tiny guest of `integration/make-guest.sh`), real colo-blockd `serve` for the
//! `svm` export and for the child; no network (the daemons' side of failback is not here).
//! Needs the QEMU of `integration/setup.sh` and this build's colo-blockd; fails, never skips,
//! without them.

use colo_qmp::{ConnectOptions, QmpClient};
use colo_testkit::binaries::BlockdServe;
use colo_testkit::qemu::{qemu_binary, tiny_guest};
use qmp_driver::config::PairConfig;
use qmp_driver::pair::{self, FailbackOptions, ReprotectOptions};
use qmp_driver::qemu_args::{primary_args, secondary_args};
use serde_json::json;
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

const DISK_BYTES: u64 = 16 << 20;
const MIB: u32 = 128;
/// Short, so that the test sees many checkpoints in a few seconds of TCG.
const CHECKPOINT_DELAY_MS: u64 = 300;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `colo-blockd serve` of `image` (created, `DISK_BYTES` of zeros) as export `name`.
fn serve(name: &str, image: &Path, log: &Path) -> BlockdServe {
    File::create(image)
        .and_then(|f| f.set_len(DISK_BYTES))
        .expect("create the image");
    BlockdServe::start(name, image, log)
}

/// A pair config on colo's daemons whose secondary disk is colo-blockd's `svm` export on
/// `svm_port`; only the `-drive` options of `qemu-args` are taken from it.
fn config(dir: &Path, svm_port: u16) -> PairConfig {
    let text = format!(
        r#"
        name = "failback"
        [primary]
        qmp = "unix:/unused/p.qmp"
        host = "127.0.0.1"
        [secondary]
        qmp = "unix:/unused/s.qmp"
        host = "127.0.0.1"
        [migration]
        secondary_incoming = "tcp:127.0.0.1:9999"
        primary_target = "tcp:127.0.0.1:9998"
        [disk]
        backend = "colo-blockd"
        nbd_port = {svm_port}
        [network]
        backend = "colo-proxyd"
        [relay]
        listen = "tcp:127.0.0.1:9998"
        target = "tcp:127.0.0.1:9999"
        control = "/unused/relay.sock"
        [vm]
        tap = "tap-p"
        mac = "52:54:00:12:34:56"
        memory_mib = {MIB}
        primary_image = "{}"
        secondary_image = "/unused/secondary.raw"
        "#,
        dir.join("p.raw").display()
    );
    PairConfig::from_toml(&text, "test").expect("config")
}

/// The values of `-drive` in `args`.
fn drives(args: &[String]) -> Vec<String> {
    args.windows(2)
        .filter(|w| w[0] == "-drive")
        .map(|w| w[1].clone())
        .collect()
}

/// One VM: the tiny guest with `drives` under `colo-disk0`, its console in `NAME.serial`.
struct Vm {
    proc: Proc,
    qmp: QmpClient,
    serial: PathBuf,
}

async fn start_vm(dir: &Path, name: &str, drives: &[String], extra: &[&str]) -> Vm {
    let qemu = qemu_binary().unwrap_or_else(|msg| panic!("{msg}"));
    let serial = dir.join(format!("{name}.serial"));
    let socket = dir.join(format!("{name}.qmp"));
    let mut cmd = tiny_guest(&qemu, MIB, &serial, "10.0.0.2/24");
    for d in drives {
        cmd.args(["-drive", d]);
    }
    cmd.args(["-device", "virtio-blk-pci,drive=colo-disk0", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", socket.display()))
        .args(extra)
        .stderr(File::create(dir.join(format!("{name}.log"))).expect("log"));
    let mut child = cmd.spawn().expect("start QEMU");
    let deadline = Instant::now() + Duration::from_secs(20);
    let qmp = loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "QEMU {name} exited ({status}): {}",
                std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
            );
        }
        match QmpClient::connect_unix(&socket, ConnectOptions::default()).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(Instant::now() < deadline, "QMP of {name}: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    Vm {
        proc: Proc(child),
        qmp,
        serial,
    }
}

/// The guest's last heartbeat: record n is on its disk (sector n) before it prints n.
fn last_heartbeat(serial: &Path) -> u64 {
    std::fs::read_to_string(serial)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("COLO-HB n="))
        .filter_map(|n| n.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

async fn wait_heartbeat(vm: &Vm, at_least: u64, what: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n = last_heartbeat(&vm.serial);
        if n >= at_least {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: heartbeat {n}, wanted {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn enable_colo(vm: &Vm) {
    vm.qmp
        .migrate_set_capabilities(&[("x-colo", true)])
        .await
        .expect("x-colo");
}

/// `primary` migrates into COLO with `secondary` (already `migrate-incoming` on `uri`); returns
/// once both report their COLO mode.
async fn enter_colo(primary: &Vm, secondary: &Vm, uri: &str) {
    enable_colo(primary).await;
    primary
        .qmp
        .migrate_set_parameters(json!({ "x-checkpoint-delay": CHECKPOINT_DELAY_MS }))
        .await
        .expect("x-checkpoint-delay");
    primary.qmp.migrate(uri).await.expect("migrate");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let p = primary.qmp.query_colo_status().await.expect("colo status");
        let s = secondary
            .qmp
            .query_colo_status()
            .await
            .expect("colo status");
        if p.mode == "primary" && s.mode == "secondary" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not in COLO: primary {p:?}, secondary {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for `n` checkpoints of `primary`'s COLO: its VM stopped and resumed `n` times.
async fn wait_checkpoints(primary: &Vm, n: usize) {
    let mut events = primary.qmp.subscribe();
    let mut resumed = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while resumed < n {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(e)) if e.name == "RESUME" => resumed += 1,
            Ok(Some(_)) => {}
            other => panic!("{resumed} of {n} checkpoints, then {other:?}"),
        }
    }
}

async fn incoming(dir: &Path, name: &str, drives: &[String]) -> (Vm, String) {
    let vm = start_vm(dir, name, drives, &["-incoming", "defer"]).await;
    enable_colo(&vm).await;
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    vm.qmp
        .migrate_incoming(&uri)
        .await
        .expect("migrate-incoming");
    (vm, uri)
}

/// The survivor's side of a failover: `x-colo-lost-heartbeat`, then its VM runs outside COLO.
async fn take_over(vm: &Vm) {
    vm.qmp
        .x_colo_lost_heartbeat()
        .await
        .expect("lost heartbeat");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = vm.qmp.query_status().await.expect("status");
        let colo = vm.qmp.query_colo_status().await.expect("colo");
        if status.running && colo.mode == "none" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no take-over: {status:?} {colo:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Disk record `n` of the tiny guest (sector n): `REC%012d\n` repeated.
fn has_record(image: &Path, n: u64) -> bool {
    let data = std::fs::read(image).expect("read the image");
    let sector = &data[(n as usize) * 512..(n as usize + 1) * 512];
    sector.starts_with(format!("REC{n:012}\n").as_bytes())
}

/// A run's directory, colo-blockd `serve` of the secondary's `svm` export, the pair config
/// and the `-drive` options `qemu-args` gives each role.
struct Bed {
    dir: tempfile::TempDir,
    _svm_server: BlockdServe,
    cfg: PairConfig,
    primary_drives: Vec<String>,
    secondary_drives: Vec<String>,
}

impl Bed {
    fn new() -> Bed {
        let dir = tempfile::tempdir().expect("tempdir");
        File::create(dir.path().join("p.raw"))
            .and_then(|f| f.set_len(DISK_BYTES))
            .expect("the primary's image");
        let svm_server = serve(
            "svm",
            &dir.path().join("s1.raw"),
            &dir.path().join("svm.log"),
        );
        let cfg = config(dir.path(), svm_server.port);
        let primary_drives = drives(&primary_args(&cfg).expect("primary args"));
        let secondary_drives = drives(&secondary_args(&cfg).expect("secondary args"));
        assert!(
            secondary_drives
                .last()
                .is_some_and(|d| d.contains("driver=quorum")),
            "the secondary's disk is no quorum: {secondary_drives:?}"
        );
        Bed {
            dir,
            _svm_server: svm_server,
            cfg,
            primary_drives,
            secondary_drives,
        }
    }

    /// The primary host back for a failback: `serve` on its (stale) image for the copy, its
    /// QEMU with the primary's drives waiting for the migration, and the failback's options
    /// (the copy bound to `speed` bytes/s, 0: none).
    async fn primary_host_back(&self, speed: u64) -> (BlockdServe, Vm, FailbackOptions) {
        let dir = self.dir.path();
        let copy_server = BlockdServe::start("base", &dir.join("p.raw"), &dir.join("copy.log"));
        let home = start_vm(
            dir,
            "home",
            &self.primary_drives,
            &["-S", "-incoming", "defer"],
        )
        .await;
        let opts = FailbackOptions {
            copy: ReprotectOptions {
                speed,
                ..ReprotectOptions::new(format!("nbd://127.0.0.1:{}/base", copy_server.port))
            },
            incoming: Some(format!("tcp:127.0.0.1:{}", free_port())),
            offsets_metrics: None,
            offsets_timeout: Duration::from_secs(10),
        };
        (copy_server, home, opts)
    }

    /// The first pair (P paused and migrated into COLO with S1) checkpoints; P dies; S1 takes
    /// over and its guest writes on. Returns S1.
    async fn first_pair_then_the_secondary_takes_over(&self) -> Vm {
        let dir = self.dir.path();
        let mut p = start_vm(dir, "p", &self.primary_drives, &["-S"]).await;
        let (s1, uri) = incoming(dir, "s1", &self.secondary_drives).await;
        enter_colo(&p, &s1, &uri).await;
        wait_checkpoints(&p, 3).await;
        p.proc.kill();
        take_over(&s1).await;
        wait_heartbeat(&s1, 1, "the survivor's guest").await;
        s1
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier qemu: needs the patched QEMU of integration/setup.sh; select with --include-ignored (integration/test.sh does)"]
async fn a_secondary_that_took_over_enters_colo_again_as_the_primary_of_a_new_secondary() {
    let bed = Bed::new();
    let dir = bed.dir.path();
    File::create(dir.join("s2.raw"))
        .and_then(|f| f.set_len(DISK_BYTES))
        .expect("the new secondary's image");
    let child_server = serve("base", &dir.join("child.raw"), &dir.join("child.log"));
    let child_port = child_server.port;
    let mut s1 = bed.first_pair_then_the_secondary_takes_over().await;

    // 3. The survivor's quorum takes a replication child while the guest runs.
    s1.qmp
        .blockdev_add(json!({
            "driver": "nbd",
            "node-name": "replication0",
            "server": { "type": "inet", "host": "127.0.0.1", "port": child_port.to_string() },
            "export": "base",
        }))
        .await
        .expect("blockdev-add of the child");
    s1.qmp
        .x_blockdev_change_add("colo-disk0", "replication0")
        .await
        .expect("x-blockdev-change into the survivor's quorum");
    // The record being written while the child came in may have missed it; the next ones not.
    let added = last_heartbeat(&s1.serial);

    // 4. Into COLO again, the survivor as the primary of a new secondary.
    let (mut s2, uri) = incoming(dir, "s2", &[
        "if=none,id=img0,driver=raw,file.filename=".to_string() + &dir.join("s2.raw").display().to_string(),
        "if=none,id=colo-disk0,driver=quorum,read-pattern=fifo,vote-threshold=1,children.0=img0"
            .to_string(),
    ])
    .await;
    enter_colo(&s1, &s2, &uri).await;
    wait_checkpoints(&s1, 5).await;
    let in_colo = wait_heartbeat(&s1, added + 6, "the failback primary's guest").await;
    // The control: the child got no copy of the disk, so an early record is not on it.
    assert!(
        !has_record(&dir.join("child.raw"), 1),
        "record 1 is on the child, which only new writes reach: the check proves nothing"
    );
    for n in added + 2..=in_colo {
        assert!(
            has_record(&dir.join("child.raw"), n),
            "record {n} of the failback primary's guest is not on its replication child"
        );
    }

    println!(
        "records {}..={in_colo} of the failback primary's guest are on its replication child",
        added + 2
    );

    // 5. The failback primary dies; the new secondary takes over and its guest runs on.
    s1.proc.kill();
    take_over(&s2).await;
    let after = last_heartbeat(&s2.serial);
    wait_heartbeat(
        &s2,
        after + 2,
        "the new secondary's guest after it took over",
    )
    .await;
    s2.proc.kill();
}

/// Every record `1..=last` of the tiny guest is on `image`.
fn missing_records(image: &Path, last: u64) -> Vec<u64> {
    (1..=last).filter(|n| !has_record(image, *n)).collect()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier qemu: needs the patched QEMU of integration/setup.sh; select with --include-ignored (integration/test.sh does)"]
async fn failback_moves_the_vm_the_secondary_took_over_home_while_its_guest_runs() {
    let bed = Bed::new();
    let dir = bed.dir.path();
    let mut s1 = bed.first_pair_then_the_secondary_takes_over().await;
    let before = wait_heartbeat(&s1, 3, "the survivor's guest").await;

    // The primary host comes back: `serve` on its (stale) image for the copy, and its QEMU
    // with the primary's command line, waiting for the migration.
    let image = dir.join("p.raw");
    let (mut copy_server, home, opts) = bed.primary_host_back(0).await;
    let mut steps = Vec::new();
    let report = pair::failback(&s1.qmp, &home.qmp, &bed.cfg, &opts, &mut |p| {
        steps.push(p.to_string())
    })
    .await
    .unwrap_or_else(|e| panic!("failback: {e}\n{}", steps.join("\n")));
    println!("{}", steps.join("\n"));
    let phases: Vec<&str> = report.phases.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        phases,
        ["prepare", "copy", "memory", "switch"],
        "{report:?}"
    );
    assert_eq!(report.disk_bytes, DISK_BYTES, "{report:?}");
    assert!(report.ram_bytes > 0, "{report:?}");

    // The old copy is gone, the VM runs at home and its guest writes on.
    assert!(
        tokio::time::timeout(Duration::from_secs(10), async {
            while s1.proc.0.try_wait().ok().flatten().is_none() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .is_ok(),
        "the secondary's QEMU did not quit after the failback"
    );
    let status = home.qmp.query_status().await.expect("status");
    assert!(status.running, "{status:?}");
    // The guest's heartbeats go on where they were (its console is now the home QEMU's).
    let hb_home = wait_heartbeat(&home, before + 3, "the guest at home").await;
    copy_server.stop();
    let last = last_heartbeat(&home.serial);
    assert!(
        last > before,
        "no heartbeat after the failback: {before} then {last}"
    );
    // Every record the guest wrote, before the failover, on the secondary and at home, is on
    // the home image.
    let missing = missing_records(&image, last);
    assert!(
        missing.is_empty(),
        "records {missing:?} of 1..={last} are not on the home image"
    );
    println!(
        "failback: {:.0} ms ({:?}), pause at the switch {:.0} ms, {} bytes copied; heartbeat \
         {before} on the secondary, {hb_home}..{last} at home, records 1..={last} on its image",
        report.total_ms,
        report
            .phases
            .iter()
            .map(|p| format!("{} {:.0} ms", p.name, p.ms))
            .collect::<Vec<_>>(),
        report.switch_pause_ms,
        report.bytes_copied
    );
}

/// A failback whose target dies during the copy (the primary host's `serve` killed as the
/// mirror starts) fails, and leaves the secondary as it was: its VM runs, no block job, no
/// target node, no migration, and its guest writes on.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "tier qemu: needs the patched QEMU of integration/setup.sh; select with --include-ignored (integration/test.sh does)"]
async fn a_failback_whose_target_dies_during_the_copy_leaves_the_secondary_serving() {
    let bed = Bed::new();
    let s1 = bed.first_pair_then_the_secondary_takes_over().await;
    let before = wait_heartbeat(&s1, 2, "the survivor's guest").await;
    // Slow enough that the copy is still running when its target dies.
    let (mut copy_server, home, opts) = bed.primary_host_back(1 << 20).await;
    let mut steps = Vec::new();
    let mut killed = false;
    let result = pair::failback(&s1.qmp, &home.qmp, &bed.cfg, &opts, &mut |p| {
        let line = p.to_string();
        if !killed && line.contains("blockdev-mirror") {
            copy_server.stop();
            killed = true;
        }
        steps.push(line);
    })
    .await;
    assert!(killed, "the copy never started: {steps:#?}");
    let err = result.expect_err("the failback went through although its target died");
    println!("failback failed as it should: {err}\n{}", steps.join("\n"));

    let status = s1.qmp.query_status().await.expect("status");
    assert!(
        status.running,
        "the secondary's VM does not run: {status:?}"
    );
    let jobs = s1
        .qmp
        .execute_raw("query-block-jobs", None)
        .await
        .expect("jobs");
    assert_eq!(jobs, json!([]), "a block job was left behind");
    let nodes = s1
        .qmp
        .execute_raw("query-named-block-nodes", Some(json!({ "flat": true })))
        .await
        .expect("nodes");
    assert!(
        !nodes
            .as_array()
            .into_iter()
            .flatten()
            .any(|n| n["node-name"] == "colo-reprotect-target"),
        "the target node was left behind: {nodes}"
    );
    let migration = s1.qmp.query_migrate().await.expect("query-migrate");
    assert!(
        !matches!(
            migration.status.as_deref(),
            Some("setup" | "active" | "pre-switchover" | "device")
        ),
        "a migration was left running: {migration:?}"
    );
    wait_heartbeat(
        &s1,
        before + 2,
        "the secondary's guest after the failed failback",
    )
    .await;
}
