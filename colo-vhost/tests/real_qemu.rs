//! The back-end under the project's patched QEMU (TCG) and the tiny guest: the start, stop/start
//! and reset message sequences as the shim recorded them, and HTTP through a tap in a network
//! namespace of the test's own (`vhb-<pid>`, removed at start and end).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TIER: &str = "tier qemu: needs the patched QEMU of integration/setup.sh; select with --include-ignored (integration/test.sh does)";

fn cache() -> PathBuf {
    std::env::var_os("COLO_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/colo".into())
}

fn qemu() -> PathBuf {
    let q = std::env::var_os("COLO_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache().join("qemu/bin/qemu-system-x86_64"));
    assert!(
        q.is_file(),
        "patched QEMU not found at {}: run `sudo integration/setup.sh`",
        q.display()
    );
    q
}

fn sh(args: &[&str]) -> std::process::Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn ok(args: &[&str]) -> String {
    let out = sh(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One short HTTP probe from the client namespace: does the guest answer its page?
fn guest_serves(ns: &str) -> bool {
    let out = sh(&[
        "ip",
        "netns",
        "exec",
        ns,
        "curl",
        "-s",
        "-m",
        "5",
        "http://10.77.0.2/",
    ]);
    out.stdout == b"colo guest ok\n"
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

struct Qmp(BufReader<UnixStream>);

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let mut q = Qmp(BufReader::new(
            UnixStream::connect(path).expect("QMP socket"),
        ));
        let mut greeting = String::new();
        q.0.read_line(&mut greeting).unwrap();
        q.cmd("qmp_capabilities");
        q
    }
    fn cmd(&mut self, c: &str) {
        writeln!(self.0.get_mut(), "{{\"execute\":\"{c}\"}}").unwrap();
        loop {
            let mut line = String::new();
            assert!(
                self.0.read_line(&mut line).unwrap() > 0,
                "QMP closed during {c}"
            );
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if v.get("return").is_some() {
                return;
            }
            assert!(v.get("error").is_none(), "{c}: {line}");
        }
    }
}

struct Bed {
    ns: String,
    children: Vec<Child>,
}

impl Drop for Bed {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = sh(&["ip", "netns", "del", &self.ns]);
    }
}

/// The names of the trace's lines, from `from` on.
fn names(trace: &str) -> Vec<String> {
    trace
        .lines()
        .map(|l| {
            let mut w = l.split_whitespace().skip(1);
            let name = w.next().unwrap_or("").to_owned();
            if l.ends_with("[held]") {
                format!("{name}[held]")
            } else {
                name
            }
        })
        .collect()
}

/// The device start QEMU performs, from SET_FEATURES on (one ring pair, no log).
const START: [&str; 12] = [
    "SET_FEATURES",
    "SET_MEM_TABLE",
    "SET_VRING_NUM",
    "SET_VRING_BASE",
    "SET_VRING_ADDR",
    "SET_VRING_KICK",
    "SET_VRING_CALL",
    "SET_VRING_NUM",
    "SET_VRING_BASE",
    "SET_VRING_ADDR",
    "SET_VRING_KICK",
    "SET_VRING_CALL",
];

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
#[ignore = "tier qemu: needs the patched QEMU of integration/setup.sh; select with --include-ignored (integration/test.sh does)"]
fn guest_serves_http_through_the_backend_and_the_trace_matches() {
    let _ = TIER;
    let qemu = qemu();
    let guest = cache().join("guest");
    let ns = format!("vhb-{}", std::process::id());
    let _ = sh(&["ip", "netns", "del", &ns]);
    ok(&["ip", "netns", "add", &ns]);
    let mut bed = Bed {
        ns: ns.clone(),
        children: vec![],
    };
    ok(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vu.sock");
    let trace = dir.path().join("trace.txt");
    let serial = dir.path().join("serial.log");
    let qmp = dir.path().join("qmp.sock");

    bed.children.push(
        Command::new("ip")
            .args(["netns", "exec", &ns, env!("CARGO_BIN_EXE_colo-vhost-net")])
            .args(["--tap", "vhb0", "--socket"])
            .arg(&sock)
            .arg("--trace")
            .arg(&trace)
            .stdout(Stdio::null())
            .spawn()
            .expect("starting colo-vhost-net"),
    );
    wait_for("the back-end's socket", Duration::from_secs(20), || {
        sock.exists()
    });
    ok(&[
        "ip",
        "-n",
        &ns,
        "addr",
        "add",
        "10.77.0.1/24",
        "dev",
        "vhb0",
    ]);
    ok(&["ip", "-n", &ns, "link", "set", "vhb0", "up"]);

    let mut q = Command::new(&qemu);
    q.args([
        "-machine",
        "pc,accel=tcg",
        "-m",
        "256",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-L",
        "/usr/share/qemu",
        "-L",
        "/usr/share/seabios",
    ])
    .arg("-kernel")
    .arg(guest.join("vmlinuz"))
    .arg("-initrd")
    .arg(guest.join("initrd.img"))
    .args([
        "-append",
        "console=ttyS0 quiet panic=-1 colo_ip=10.77.0.2/24 colo_load=0",
    ])
    .arg("-serial")
    .arg(format!("file:{}", serial.display()))
    .arg("-qmp")
    .arg(format!("unix:{},server=on,wait=off", qmp.display()))
    .args([
        "-object",
        "memory-backend-memfd,id=mem,size=256M,share=on",
        "-numa",
        "node,memdev=mem",
    ])
    .arg("-chardev")
    .arg(format!("socket,id=c,path={}", sock.display()))
    .args([
        "-netdev",
        "vhost-user,id=n,chardev=c",
        "-device",
        "virtio-net-pci,netdev=n,mac=52:54:00:77:00:02",
    ])
    .stdout(Stdio::null());
    bed.children.push(q.spawn().expect("starting QEMU"));
    wait_for(
        "COLO-READY on the guest's console",
        Duration::from_secs(240),
        || read(&serial).contains("COLO-READY"),
    );

    let curl = |path: &str| {
        ok(&[
            "ip",
            "netns",
            "exec",
            &ns,
            "curl",
            "-s",
            "-m",
            "30",
            &format!("http://10.77.0.2{path}"),
        ])
    };
    wait_for("HTTP through the back-end", Duration::from_secs(60), || {
        guest_serves(&ns)
    });
    let blob = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns,
            "sh",
            "-c",
            "curl -s -m 60 http://10.77.0.2/blob | md5sum",
        ])
        .output()
        .unwrap();
    let blob_md5 = String::from_utf8_lossy(&blob.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_owned();
    assert_eq!(
        blob_md5,
        curl("/blob.md5").trim(),
        "1 MiB download through the back-end is intact"
    );

    // Start: every early enable held, then the start sequence after SET_FEATURES.
    let boot = names(&read(&trace));
    let f = boot
        .iter()
        .position(|n| n == "SET_FEATURES")
        .expect("SET_FEATURES in the trace");
    assert!(
        boot[..f].iter().any(|n| n == "SET_VRING_ENABLE[held]"),
        "QEMU sent SET_VRING_ENABLE before SET_FEATURES: {boot:?}"
    );
    assert!(
        boot[..f].iter().all(|n| n != "SET_VRING_ENABLE"),
        "an early enable reached the crate: {boot:?}"
    );
    assert_eq!(
        &boot[f..f + START.len()],
        &START,
        "start sequence: {boot:?}"
    );

    // Stop and start: GET_VRING_BASE on both rings, then the enables (passed through now) and the start.
    let before = boot.len();
    let mut m = Qmp::connect(&qmp);
    m.cmd("stop");
    wait_for("the stop", Duration::from_secs(20), || {
        names(&read(&trace)).len() >= before + 2
    });
    m.cmd("cont");
    wait_for("the start", Duration::from_secs(20), || {
        names(&read(&trace)).len() >= before + 4 + START.len()
    });
    let after = names(&read(&trace))[before..].to_vec();
    assert_eq!(
        &after[..4],
        &[
            "GET_VRING_BASE",
            "GET_VRING_BASE",
            "SET_VRING_ENABLE",
            "SET_VRING_ENABLE"
        ],
        "{after:?}"
    );
    assert_eq!(&after[4..4 + START.len()], &START, "{after:?}");
    wait_for("HTTP after stop/start", Duration::from_secs(60), || {
        guest_serves(&ns)
    });

    // Reset: the guest boots again on the same connection and serves again.
    let before = names(&read(&trace)).len();
    m.cmd("system_reset");
    wait_for("the restart after reset", Duration::from_secs(240), || {
        names(&read(&trace))[before..]
            .iter()
            .filter(|n| *n == "SET_VRING_CALL")
            .count()
            >= 2
    });
    let reset = names(&read(&trace))[before..].to_vec();
    assert_eq!(
        &reset[..2],
        &["GET_VRING_BASE", "GET_VRING_BASE"],
        "{reset:?}"
    );
    let f = reset.iter().position(|n| n == "SET_FEATURES").unwrap();
    assert_eq!(&reset[f..f + START.len()], &START, "{reset:?}");
    wait_for("HTTP after reset", Duration::from_secs(240), || {
        guest_serves(&ns)
    });

    // QEMU quits: the back-end ends by itself.
    m.cmd("quit");
    let backend = &mut bed.children[0];
    let start = Instant::now();
    let status = loop {
        if let Some(s) = backend.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "back-end still running after QEMU quit"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "back-end exit: {status}");
    eprintln!("trace:\n{}", read(&trace));
}
