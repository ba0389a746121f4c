//! The libvirt hook `qemu-configs/libvirt/hook-qemu`, run as libvirt runs it
//! (domain, operation, sub-operation, extra; domain XML on stdin) with
//! temporary `COLO_ETC`/`COLO_RUN` and fakes on `PATH`: a `qmp-driver` that
//! answers `daemon-args` from files next to the config and otherwise (the
//! relay) logs its arguments and runs until SIGTERM, and a `colo-blockd` and a
//! `colo-proxyd` that record their argv and exit on SIGTERM. One `Hook` is one
//! host.

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

/// `qmp-driver`: `--config ETC/D.toml daemon-args --list` prints ETC/D.daemons
/// (nothing without it; ETC/D.list-error makes it fail), `--daemon NAME`
/// prints ETC/D.NAME.args; anything else is the relay.
const FAKE_QMP_DRIVER: &str = r#"#!/bin/bash
if [ "${3:-}" = daemon-args ]; then
    base=${2%.toml}
    case "${4:-}" in
        --list)
            if [ -f "$base.list-error" ]; then cat "$base.list-error" >&2; exit 2; fi
            cat "$base.daemons" 2>/dev/null
            exit 0 ;;
        --daemon)
            [ -f "$base.$5.args" ] || { echo "the config does not use $5" >&2; exit 2; }
            cat "$base.$5.args"
            exit 0 ;;
    esac
fi
echo "start $*" >> "$FAKE_LOG"
trap 'echo term >> "$FAKE_LOG"; exit 0' TERM
end=$((SECONDS + 60))
while [ "$SECONDS" -lt "$end" ]; do sleep 0.05; done
"#;

/// `colo-blockd` and `colo-proxyd`: named colo-blockd, colo-proxyd-primary or
/// colo-proxyd-secondary (by their first argument), they log their start, then
/// write their argv (NUL-terminated) to FAKE_DIR/NAME.argv, and on SIGTERM wait the seconds in
/// FAKE_DIR/NAME.term-delay (0 without it) before exiting.
const FAKE_DAEMON: &str = r#"#!/bin/bash
name=${0##*/}
[ "$name" = colo-blockd ] || name="$name-$1"
echo "$name start" >> "$FAKE_LOG"
printf '%s\0' "$@" > "$FAKE_DIR/$name.argv"
on_term() {
    echo "$name term" >> "$FAKE_LOG"
    sleep "$(cat "$FAKE_DIR/$name.term-delay" 2>/dev/null || echo 0)"
    echo "$name exit" >> "$FAKE_LOG"
    exit 0
}
trap on_term TERM
end=$((SECONDS + 60))
while [ "$SECONDS" -lt "$end" ]; do sleep 0.05; done
"#;

const ALL_DAEMONS: &str = "colo-blockd\ncolo-proxyd-secondary\ncolo-proxyd-primary\n";

fn write_executable(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

impl Hook {
    fn new() -> Hook {
        let dir = tempfile::tempdir().unwrap();
        for d in ["etc", "run", "bin"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        write_executable(&dir.path().join("bin/qmp-driver"), FAKE_QMP_DRIVER);
        write_executable(&dir.path().join("bin/colo-blockd"), FAKE_DAEMON);
        write_executable(&dir.path().join("bin/colo-proxyd"), FAKE_DAEMON);
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

    /// Makes `daemon-args` answer for `domain`: `--list` prints `list`, and
    /// `--daemon NAME` the arguments given for NAME.
    fn set_daemons(&self, domain: &str, list: &str, args: &[(&str, &[String])]) {
        std::fs::write(self.path(&format!("etc/{domain}.daemons")), list).unwrap();
        for (name, argv) in args {
            let text: String = argv.iter().map(|a| format!("{a}\n")).collect();
            std::fs::write(self.path(&format!("etc/{domain}.{name}.args")), text).unwrap();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("fake.log")).unwrap_or_default()
    }

    fn pidfile(&self, domain: &str) -> PathBuf {
        self.daemon_pidfile(domain, "relay")
    }

    fn daemon_pidfile(&self, domain: &str, daemon: &str) -> PathBuf {
        self.path(&format!("run/{domain}-{daemon}.pid"))
    }

    /// The argv a fake daemon was started with.
    fn argv_of(&self, daemon: &str) -> Vec<String> {
        let p = self.path(&format!("{daemon}.argv"));
        wait_until(&format!("{daemon} to record its argv"), || p.exists());
        let raw = std::fs::read_to_string(p).unwrap();
        raw.strip_suffix('\0')
            .unwrap_or(&raw)
            .split('\0')
            .map(str::to_string)
            .collect()
    }

    fn run(&self, domain: &str, op: &str, xml: &str) -> Output {
        self.run_with(domain, op, xml, &[], Duration::from_secs(5))
    }

    /// Runs the hook like libvirt, with `env` added; fails the test if it
    /// takes longer than `limit` (a hook that leaves a child on its
    /// stdout/stderr would hang `output()`).
    fn run_with(
        &self,
        domain: &str,
        op: &str,
        xml: &str,
        env: &[(&str, &str)],
        limit: Duration,
    ) -> Output {
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
            .env("FAKE_DIR", self.dir.path())
            .env("PATH", path)
            .env_remove("COLO_QMP_DRIVER")
            .env_remove("COLO_BLOCKD")
            .env_remove("COLO_PROXYD")
            .envs(env.iter().copied())
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
            .recv_timeout(limit + Duration::from_secs(5))
            .expect("the hook blocked (a background child kept its output open?)")
            .unwrap();
        assert!(
            started.elapsed() < limit,
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

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// SIGKILL to a daemon the hook started and to its children (a fake's
/// `sleep`): the hook runs each in its own session, so its PID is its group's.
fn kill_group(pid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pid}")])
        .status();
}

/// Arguments with what word splitting or globbing would break: runs of
/// spaces, a `*`, leading and trailing blanks.
fn blockd_args() -> Vec<String> {
    strings(&[
        "secondary",
        "--image",
        "/var/lib/colo/vm  one/disk *.raw",
        "--tcp",
        "192.168.77.2:9999",
        "--unix",
        "/run/colo/vm 1/blockd.sock",
        "--control",
        "/run/colo/vm 1/relay.sock",
        "--name",
        " blockd of vm1 ",
    ])
}

fn proxyd_secondary_args() -> Vec<String> {
    strings(&[
        "secondary",
        "--svm-input-listen",
        "127.0.0.1:9003",
        "--control",
        "/run/colo/vm 1/relay.sock",
    ])
}

fn proxyd_primary_args() -> Vec<String> {
    strings(&[
        "primary",
        "--link-listen",
        "192.168.77.1:9006",
        "--control",
        "/run/colo/vm 1/relay.sock",
        "--qmp",
        "unix:/run/colo/vm 1/proxyd.qmp",
    ])
}

fn with_all_daemons(h: &Hook, domain: &str) {
    h.set_daemons(
        domain,
        ALL_DAEMONS,
        &[
            ("colo-blockd", &blockd_args()),
            ("colo-proxyd-secondary", &proxyd_secondary_args()),
            ("colo-proxyd-primary", &proxyd_primary_args()),
        ],
    );
}

#[test]
fn the_secondary_host_runs_its_daemons_from_prepare_to_stopped() {
    let h = Hook::new();
    let config = h.add_config("vm1");
    with_all_daemons(&h, "vm1");

    let out = h.run("vm1", "prepare", SECONDARY_XML);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // Exactly the arguments daemon-args printed, each one whole.
    assert_eq!(h.argv_of("colo-blockd"), blockd_args());
    assert_eq!(h.argv_of("colo-proxyd-secondary"), proxyd_secondary_args());
    let blockd = read_pid(&h.daemon_pidfile("vm1", "colo-blockd"));
    let proxyd = read_pid(&h.daemon_pidfile("vm1", "colo-proxyd-secondary"));
    assert!(alive(blockd) && alive(proxyd));
    // In daemon-args' order; not the primary's daemon; the relay only at `started`.
    let err = stderr(&out);
    let (b, p) = (
        err.find("colo-blockd started").expect(&err),
        err.find("colo-proxyd-secondary started").expect(&err),
    );
    assert!(b < p, "{err}");
    assert!(!h.daemon_pidfile("vm1", "colo-proxyd-primary").exists());
    assert!(!h.pidfile("vm1").exists());
    assert!(!h.log().contains("colo-proxyd-primary"), "{}", h.log());
    assert!(!h.log().contains("relay"), "{}", h.log());

    // Not twice: a second `prepare` keeps the running ones.
    let out = h.run("vm1", "prepare", SECONDARY_XML);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stderr(&out).contains("already running"), "{out:?}");
    assert_eq!(read_pid(&h.daemon_pidfile("vm1", "colo-blockd")), blockd);
    assert_eq!(
        read_pid(&h.daemon_pidfile("vm1", "colo-proxyd-secondary")),
        proxyd
    );
    assert_eq!(h.log().matches("colo-blockd start").count(), 1);
    assert_eq!(h.log().matches("colo-proxyd-secondary start").count(), 1);

    assert_eq!(
        h.run("vm1", "started", SECONDARY_XML).status.code(),
        Some(0)
    );
    let relay = read_pid(&h.pidfile("vm1"));
    let relay_line = format!("start --config {} relay\n", config.display());
    wait_until("the relay to start", || h.log().contains(&relay_line));

    // colo-blockd takes a second to write its image: `stopped` waits for it.
    std::fs::write(h.path("colo-blockd.term-delay"), "1").unwrap();
    let out = h.run("vm1", "stopped", SECONDARY_XML);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let log = h.log();
    assert!(log.contains("colo-blockd exit\n"), "not waited for: {log}");
    assert!(log.contains("colo-proxyd-secondary term\n"), "{log}");
    assert!(log.contains("\nterm\n"), "relay not stopped: {log}");
    for pid in [blockd, proxyd, relay] {
        assert!(!alive(pid), "pid {pid} still running");
    }
    for name in ["relay", "colo-blockd", "colo-proxyd-secondary"] {
        assert!(!h.daemon_pidfile("vm1", name).exists(), "{name}");
    }
    // `release` follows `stopped`: nothing left to do.
    let out = h.run("vm1", "release", "");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(stderr(&out), "");
}

#[test]
fn the_primary_host_runs_colo_proxyd_primary_only() {
    let h = Hook::new();
    h.add_config("vm1");
    with_all_daemons(&h, "vm1");

    let out = h.run("vm1", "prepare", PRIMARY_XML);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(h.argv_of("colo-proxyd-primary"), proxyd_primary_args());
    let pid = read_pid(&h.daemon_pidfile("vm1", "colo-proxyd-primary"));
    assert!(alive(pid));
    for name in ["colo-blockd", "colo-proxyd-secondary"] {
        assert!(!h.daemon_pidfile("vm1", name).exists(), "{name}");
    }
    assert_eq!(h.log(), "colo-proxyd-primary start\n");

    // No relay on the primary host; `release` alone (QEMU failed to start) stops it too.
    assert_eq!(h.run("vm1", "started", PRIMARY_XML).status.code(), Some(0));
    assert!(!h.pidfile("vm1").exists());
    assert_eq!(h.run("vm1", "release", "").status.code(), Some(0));
    assert!(!alive(pid));
    assert!(
        h.log().ends_with("colo-proxyd-primary exit\n"),
        "{}",
        h.log()
    );
    assert!(!h.daemon_pidfile("vm1", "colo-proxyd-primary").exists());

    // The role file decides over the XML.
    std::fs::write(h.path("etc/vm1.role"), "secondary\n").unwrap();
    assert_eq!(h.run("vm1", "prepare", PRIMARY_XML).status.code(), Some(0));
    let blockd = read_pid(&h.daemon_pidfile("vm1", "colo-blockd"));
    assert!(!h.daemon_pidfile("vm1", "colo-proxyd-primary").exists());
    assert_eq!(h.run("vm1", "stopped", PRIMARY_XML).status.code(), Some(0));
    assert!(!alive(blockd));
}

#[test]
fn a_stock_config_starts_no_daemon() {
    let h = Hook::new();
    let config = h.add_config("vm1");
    h.set_daemons("vm1", "", &[]);
    for xml in [SECONDARY_XML, PRIMARY_XML] {
        let out = h.run("vm1", "prepare", xml);
        assert_eq!(out.status.code(), Some(0));
        assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{out:?}");
    }
    assert_eq!(std::fs::read_dir(h.path("run")).unwrap().count(), 0);
    assert_eq!(h.log(), "");

    // The relay, as before.
    assert_eq!(
        h.run("vm1", "started", SECONDARY_XML).status.code(),
        Some(0)
    );
    let relay = read_pid(&h.pidfile("vm1"));
    wait_until("the relay to start", || h.log().contains("start"));
    assert_eq!(h.run("vm1", "stopped", "").status.code(), Some(0));
    assert!(!alive(relay));
    assert_eq!(
        h.log(),
        format!("start --config {} relay\nterm\n", config.display())
    );
}

#[test]
fn a_stale_daemon_pidfile_never_kills_another_process() {
    let h = Hook::new();
    h.add_config("vm1");
    h.add_config("vm2");
    h.set_daemons("vm1", "colo-blockd\n", &[("colo-blockd", &blockd_args())]);
    let mut vm2_args = blockd_args();
    vm2_args[2] = "/var/lib/colo/vm2/disk.raw".into();
    h.set_daemons("vm2", "colo-blockd\n", &[("colo-blockd", &vm2_args)]);

    // A foreign process under a daemon's pidfile.
    let mut bystander = Command::new("sleep").arg("30").spawn().unwrap();
    std::fs::write(
        h.daemon_pidfile("vm1", "colo-blockd"),
        format!("{}\n", bystander.id()),
    )
    .unwrap();
    let out = h.run("vm1", "stopped", "");
    assert_eq!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("left alone"), "{out:?}");
    assert!(
        alive(bystander.id()),
        "the hook killed an unrelated process"
    );
    assert!(!h.daemon_pidfile("vm1", "colo-blockd").exists());

    // A stale pidfile does not keep a daemon from starting.
    std::fs::write(
        h.daemon_pidfile("vm1", "colo-blockd"),
        format!("{}\n", bystander.id()),
    )
    .unwrap();
    assert_eq!(
        h.run("vm1", "prepare", SECONDARY_XML).status.code(),
        Some(0)
    );
    let vm1_blockd = read_pid(&h.daemon_pidfile("vm1", "colo-blockd"));
    assert_ne!(vm1_blockd, bystander.id());
    assert!(alive(vm1_blockd));

    // vm1's colo-blockd dies; its PID "reused" by vm2's colo-blockd: the same program,
    // other arguments. Stopping vm1 must not touch it.
    assert_eq!(
        h.run("vm2", "prepare", SECONDARY_XML).status.code(),
        Some(0)
    );
    let vm2_blockd = read_pid(&h.daemon_pidfile("vm2", "colo-blockd"));
    kill_group(vm1_blockd);
    wait_until("vm1's colo-blockd to die", || !alive(vm1_blockd));
    std::fs::write(
        h.daemon_pidfile("vm1", "colo-blockd"),
        format!("{vm2_blockd}\n"),
    )
    .unwrap();
    let out = h.run("vm1", "stopped", "");
    assert_eq!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("left alone"), "{out:?}");
    assert!(alive(vm2_blockd), "vm1's hook stopped vm2's colo-blockd");
    assert_eq!(h.log().matches("colo-blockd term").count(), 0);

    assert_eq!(h.run("vm2", "stopped", "").status.code(), Some(0));
    assert!(!alive(vm2_blockd));
    bystander.kill().unwrap();
    bystander.wait().unwrap();
}

#[test]
fn a_colo_blockd_that_does_not_exit_is_left_running_after_5_s() {
    let h = Hook::new();
    h.add_config("vm1");
    h.set_daemons("vm1", "colo-blockd\n", &[("colo-blockd", &blockd_args())]);
    assert_eq!(
        h.run("vm1", "prepare", SECONDARY_XML).status.code(),
        Some(0)
    );
    let pid = read_pid(&h.daemon_pidfile("vm1", "colo-blockd"));
    std::fs::write(h.path("colo-blockd.term-delay"), "30").unwrap();

    let started = Instant::now();
    let out = h.run_with("vm1", "stopped", "", &[], Duration::from_secs(9));
    assert_eq!(out.status.code(), Some(0));
    assert!(started.elapsed() >= Duration::from_secs(4), "did not wait");
    assert!(stderr(&out).contains("still running"), "{out:?}");
    assert!(alive(pid), "never SIGKILL: it may be writing its image");
    // Kept, so `release` (or the next prepare) still knows it.
    assert_eq!(read_pid(&h.daemon_pidfile("vm1", "colo-blockd")), pid);
    kill_group(pid);
    wait_until("the fake colo-blockd to die", || !alive(pid));
}

#[test]
fn daemon_problems_are_logged_and_never_stop_the_vm() {
    let h = Hook::new();
    h.add_config("vm1");
    with_all_daemons(&h, "vm1");

    // daemon-args fails (an invalid config).
    std::fs::write(h.path("etc/vm1.list-error"), "disk.backend: bad value\n").unwrap();
    let out = h.run("vm1", "prepare", SECONDARY_XML);
    assert_eq!(out.status.code(), Some(0));
    let err = stderr(&out);
    assert!(err.contains("disk.backend: bad value"), "{err}");
    assert!(err.contains("NOT protected"), "{err}");
    std::fs::remove_file(h.path("etc/vm1.list-error")).unwrap();

    // Neither role can be told.
    std::fs::write(h.path("etc/vm1.role"), "tertiary\n").unwrap();
    let out = h.run("vm1", "prepare", SECONDARY_XML);
    assert_eq!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("NOT protected"), "{out:?}");
    std::fs::remove_file(h.path("etc/vm1.role")).unwrap();
    assert_eq!(h.log(), "");

    // A daemon that exits at once, and one whose binary is missing (COLO_BLOCKD and
    // COLO_PROXYD choose the binaries).
    let failing = h.path("bin/failing-blockd");
    write_executable(
        &failing,
        "#!/bin/bash\necho 'cannot open image' >&2\nexit 1\n",
    );
    let out = h.run_with(
        "vm1",
        "prepare",
        SECONDARY_XML,
        &[
            ("COLO_BLOCKD", failing.to_str().unwrap()),
            ("COLO_PROXYD", "/nonexistent/colo-proxyd"),
        ],
        Duration::from_secs(5),
    );
    assert_eq!(out.status.code(), Some(0));
    let err = stderr(&out);
    assert!(
        err.contains("colo-blockd") && err.contains("exited at once"),
        "{err}"
    );
    assert!(err.contains("/nonexistent/colo-proxyd"), "{err}");
    assert_eq!(err.matches("NOT protected").count(), 2, "{err}");
    let blockd_log = std::fs::read_to_string(h.path("run/vm1-colo-blockd.log")).unwrap();
    assert!(blockd_log.contains("cannot open image"), "{blockd_log}");
    assert_eq!(h.log(), "");
    assert_eq!(h.run("vm1", "stopped", "").status.code(), Some(0));
}
