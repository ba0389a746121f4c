//! The libvirt hook `qemu-configs/libvirt/hook-qemu`, run as libvirt runs it
//! (domain, operation, sub-operation, extra; domain XML on stdin) with
//! temporary `COLO_ETC`/`COLO_RUN` and a fake `qmp-driver` on `PATH` that
//! logs its arguments and runs until SIGTERM.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Hook {
    dir: tempfile::TempDir,
}

const SECONDARY_XML: &str = "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>\
    <name>vm1</name><qemu:commandline><qemu:arg value='-incoming'/><qemu:arg value='defer'/>\
    </qemu:commandline></domain>";
const PRIMARY_XML: &str = "<domain type='kvm'><name>vm1</name><qemu:commandline>\
    <qemu:arg value='-S'/></qemu:commandline></domain>";

impl Hook {
    fn new() -> Hook {
        let dir = tempfile::tempdir().unwrap();
        for d in ["etc", "run", "bin"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        let fake = dir.path().join("bin/qmp-driver");
        std::fs::write(
            &fake,
            "#!/bin/bash\n\
             echo \"start $*\" >> \"$FAKE_LOG\"\n\
             trap 'echo term >> \"$FAKE_LOG\"; exit 0' TERM\n\
             while :; do sleep 0.05; done\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        Hook { dir }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn add_config(&self, domain: &str) -> PathBuf {
        let p = self.path(&format!("etc/{domain}.toml"));
        std::fs::write(&p, "name = \"x\"\n").unwrap();
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("fake.log")).unwrap_or_default()
    }

    fn pidfile(&self, domain: &str) -> PathBuf {
        self.path(&format!("run/{domain}-relay.pid"))
    }

    /// Runs the hook like libvirt; fails the test if it takes long (a hook
    /// that leaves a child on its stdout/stderr would hang `output()`).
    fn run(&self, domain: &str, op: &str, xml: &str) -> Output {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../qemu-configs/libvirt/hook-qemu");
        let path = format!(
            "{}:{}",
            self.path("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let started = Instant::now();
        let mut child = Command::new("bash")
            .arg(&script)
            .args([domain, op, "begin", "-"])
            .env("COLO_ETC", self.path("etc"))
            .env("COLO_RUN", self.path("run"))
            .env("FAKE_LOG", self.path("fake.log"))
            .env("PATH", path)
            .env_remove("COLO_QMP_DRIVER")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The hook reads the XML only when it needs it (as libvirt allows).
        let _ = child.stdin.take().unwrap().write_all(xml.as_bytes());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let out = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the hook blocked (a background child kept its output open?)")
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "hook took {:?}",
            started.elapsed()
        );
        out
    }
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn alive(pid: u32) -> bool {
    // A zombie counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2).is_none_or(|state| state != "Z"))
        .unwrap_or(false)
}

fn read_pid(p: &Path) -> u32 {
    std::fs::read_to_string(p).unwrap().trim().parse().unwrap()
}

#[test]
fn domains_without_colo_config_are_left_alone() {
    let h = Hook::new();
    for op in [
        "prepare",
        "start",
        "started",
        "stopped",
        "release",
        "migrate",
        "reconnect",
    ] {
        let out = h.run("plain-vm", op, SECONDARY_XML);
        assert_eq!(out.status.code(), Some(0), "{op}: {out:?}");
        assert!(
            out.stdout.is_empty() && out.stderr.is_empty(),
            "{op}: {out:?}"
        );
    }
    let out = h.run("", "", "");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(h.log(), "");
    assert_eq!(std::fs::read_dir(h.path("run")).unwrap().count(), 0);
}

#[test]
fn the_secondary_gets_a_relay_from_started_to_stopped() {
    let h = Hook::new();
    let config = h.add_config("vm1");
    for op in ["prepare", "start"] {
        assert_eq!(h.run("vm1", op, SECONDARY_XML).status.code(), Some(0));
    }
    assert!(!h.pidfile("vm1").exists(), "relay started before `started`");

    let out = h.run("vm1", "started", SECONDARY_XML);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let pid = read_pid(&h.pidfile("vm1"));
    wait_until("the relay to start", || h.log().contains("start"));
    assert_eq!(
        h.log(),
        format!("start --config {} relay\n", config.display())
    );
    assert!(alive(pid));

    // Idempotent: a second `started` keeps the same relay.
    assert_eq!(
        h.run("vm1", "started", SECONDARY_XML).status.code(),
        Some(0)
    );
    assert_eq!(read_pid(&h.pidfile("vm1")), pid);
    assert_eq!(h.log().matches("start ").count(), 1);

    let out = h.run("vm1", "stopped", SECONDARY_XML);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    wait_until("the relay to exit", || !alive(pid));
    assert!(h.log().ends_with("term\n"), "{}", h.log());
    assert!(!h.pidfile("vm1").exists());
    // `release` follows `stopped`: nothing left to do.
    assert_eq!(h.run("vm1", "release", "").status.code(), Some(0));
}

#[test]
fn the_role_file_decides_over_the_xml() {
    let h = Hook::new();
    h.add_config("vm1");
    std::fs::write(h.path("etc/vm1.role"), "primary\n").unwrap();
    assert_eq!(
        h.run("vm1", "started", SECONDARY_XML).status.code(),
        Some(0)
    );
    assert!(!h.pidfile("vm1").exists());

    std::fs::write(h.path("etc/vm1.role"), "secondary\n").unwrap();
    assert_eq!(h.run("vm1", "started", PRIMARY_XML).status.code(), Some(0));
    let pid = read_pid(&h.pidfile("vm1"));
    assert!(alive(pid));
    assert_eq!(h.run("vm1", "release", "").status.code(), Some(0));
    wait_until("the relay to exit", || !alive(pid));
}

#[test]
fn the_primary_gets_no_relay() {
    let h = Hook::new();
    h.add_config("vm1");
    assert_eq!(h.run("vm1", "started", PRIMARY_XML).status.code(), Some(0));
    assert!(!h.pidfile("vm1").exists());
    assert_eq!(h.log(), "");
    assert_eq!(h.run("vm1", "stopped", PRIMARY_XML).status.code(), Some(0));
}

#[test]
fn a_stale_pidfile_never_kills_another_process() {
    let h = Hook::new();
    h.add_config("vm1");
    let mut bystander = Command::new("sleep").arg("30").spawn().unwrap();
    std::fs::write(h.pidfile("vm1"), format!("{}\n", bystander.id())).unwrap();
    let out = h.run("vm1", "stopped", "");
    assert_eq!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("left alone"),
        "{out:?}"
    );
    assert!(
        alive(bystander.id()),
        "the hook killed an unrelated process"
    );
    assert!(!h.pidfile("vm1").exists());
    // And a stale pidfile does not stop a new relay from starting.
    std::fs::write(h.pidfile("vm1"), format!("{}\n", bystander.id())).unwrap();
    assert_eq!(
        h.run("vm1", "started", SECONDARY_XML).status.code(),
        Some(0)
    );
    let pid = read_pid(&h.pidfile("vm1"));
    assert_ne!(pid, bystander.id());
    assert_eq!(h.run("vm1", "stopped", "").status.code(), Some(0));
    wait_until("the relay to exit", || !alive(pid));
    bystander.kill().unwrap();
    bystander.wait().unwrap();
}
