//! `colo-proxyd vhost-net` under the project's patched QEMU (TCG) and the tiny guest: the
//! socket is owner-only before QEMU connects, the guest serves HTTP (its 1 MiB blob intact)
//! through the back-end and the tap, and a restarted QEMU is served again by the same daemon,
//! on the same tap. The tap lives in a network namespace of the test's own (`vpx-<pid>`,
//! removed at start and end).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const GUEST_IP: &str = "10.78.0.2";

fn ok(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The namespace and the processes in it; all gone on drop.
struct Bed {
    ns: String,
    daemon: Option<Child>,
    qemu: Option<Child>,
}

impl Drop for Bed {
    fn drop(&mut self) {
        for child in [self.qemu.as_mut(), self.daemon.as_mut()]
            .into_iter()
            .flatten()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

impl Bed {
    /// The guest on QEMU, its NIC on the vhost-user socket; returns once the guest serves.
    fn boot(&mut self, qemu: &Path, socket: &Path, serial: &Path) {
        let child = colo_testkit::qemu::tiny_guest_on_vhost_user(
            qemu,
            256,
            serial,
            &format!("{GUEST_IP}/24"),
            socket,
            true,
            "52:54:00:78:00:02",
        )
        .spawn()
        .expect("starting QEMU");
        self.qemu = Some(child);
        wait_for(
            "COLO-READY on the guest's console",
            Duration::from_secs(240),
            || std::fs::read_to_string(serial).is_ok_and(|s| s.contains("COLO-READY")),
        );
    }

    fn curl(&self, path: &str) -> Vec<u8> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "curl", "-sf", "-m", "60"])
            .arg(format!("http://{GUEST_IP}{path}"))
            .output()
            .expect("curl runs");
        assert!(out.status.success(), "curl {path}: {:?}", out.status);
        out.stdout
    }
}

fn md5_hex(bytes: &[u8]) -> String {
    let mut child = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("md5sum runs");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[test]
#[ignore = "tier qemu: needs the patched QEMU of integration/setup.sh and root (a network namespace and a tap); select with --include-ignored (integration/test.sh does)"]
fn a_guest_serves_through_colo_proxyd_vhost_net_and_a_restarted_qemu_is_served_again() {
    let qemu = colo_testkit::qemu::qemu_binary().unwrap_or_else(|e| panic!("{e}"));
    let ns = format!("vpx-{}", std::process::id());
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    ok(&["ip", "netns", "add", &ns]);
    let mut bed = Bed {
        ns: ns.clone(),
        daemon: None,
        qemu: None,
    };
    ok(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vu.sock");
    bed.daemon = Some(
        Command::new("ip")
            .args(["netns", "exec", &ns, env!("CARGO_BIN_EXE_colo-proxyd")])
            .args(["vhost-net", "--tap", "vpx0", "--socket"])
            .arg(&socket)
            .stdout(Stdio::null())
            .spawn()
            .expect("starting colo-proxyd vhost-net"),
    );
    wait_for("the vhost-user socket", Duration::from_secs(20), || {
        socket.exists()
    });
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the socket must be owner-only");
    ok(&[
        "ip",
        "-n",
        &ns,
        "addr",
        "add",
        "10.78.0.1/24",
        "dev",
        "vpx0",
    ]);
    ok(&["ip", "-n", &ns, "link", "set", "vpx0", "up"]);

    bed.boot(&qemu, &socket, &dir.path().join("serial-1.log"));
    assert_eq!(bed.curl("/"), b"colo guest ok\n");
    let blob = bed.curl("/blob");
    assert_eq!(blob.len(), 1 << 20);
    let published = String::from_utf8(bed.curl("/blob.md5")).unwrap();
    assert_eq!(md5_hex(&blob), published.trim(), "the blob was corrupted");

    // QEMU goes away and a new one connects: the same daemon serves it, on the same tap (its
    // address and link state kept).
    let mut first = bed.qemu.take().unwrap();
    first.kill().unwrap();
    first.wait().unwrap();
    bed.boot(&qemu, &socket, &dir.path().join("serial-2.log"));
    assert_eq!(bed.curl("/"), b"colo guest ok\n");
    let daemon = bed.daemon.as_mut().unwrap();
    assert!(
        daemon.try_wait().unwrap().is_none(),
        "colo-proxyd vhost-net exited"
    );
}
