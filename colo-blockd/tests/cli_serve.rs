//! The `colo-blockd serve` binary end to end: it exports a raw file on a
//! Unix socket, TCP or both to qemu-io and nbdinfo and stops cleanly on
//! SIGTERM.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{file_bytes, free_tcp_addr, patterned_image, require_tool, run_ok};

const SIZE: usize = 1 << 20;

/// Waits until `serve` listens on the Unix socket `sock`.
fn wait_for_socket(child: &mut std::process::Child, sock: &std::path::Path) {
    wait_until_serving(child, || sock.exists());
}

/// Waits until `listening` holds while `serve` runs; the bound only turns a hang into a
/// failure.
fn wait_until_serving(child: &mut std::process::Child, mut listening: impl FnMut() -> bool) {
    let started = Instant::now();
    while !listening() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "colo-blockd exited early"
        );
        assert!(started.elapsed() < Duration::from_secs(60), "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
#[ignore = "tier clients: needs qemu-io, qemu-img and nbdinfo (integration/setup.sh); select with --include-ignored (integration/test.sh does)"]
fn serve_exports_a_file_until_sigterm() {
    require_tool("qemu-io", "qemu-utils");
    require_tool("nbdinfo", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let img = patterned_image(dir.path(), "disk.raw", SIZE);
    let sock = dir.path().join("blockd.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_colo-blockd"))
        .args(["serve", "--export"])
        .arg(format!("disk={}", img.display()))
        .arg("--unix")
        .arg(&sock)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_socket(&mut child, &sock);
    // The Unix socket serves without TLS: only its owner may connect.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0x3c 4k 8k",
            "-c",
            "read -P 0x3c 4k 8k",
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    let list = run_ok(
        "nbdinfo",
        &["--list", &format!("nbd+unix:///?socket={}", sock.display())],
    );
    assert!(list.contains("export=\"disk\""), "{list}");

    run_ok("kill", &["-TERM", &child.id().to_string()]);
    let status = child.wait().unwrap();
    assert!(status.success(), "colo-blockd exited with {status}");
    assert!(file_bytes(&img, 4096, 8192).iter().all(|&b| b == 0x3c));
    assert_eq!(
        file_bytes(&img, 0, 4096),
        (0..4096).map(|i| (i % 251) as u8).collect::<Vec<_>>()
    );
}

#[test]
fn serve_fails_clearly_on_a_missing_image() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_colo-blockd"))
        .args(["serve", "--export", "disk=/nonexistent/disk.raw", "--unix"])
        .arg(dir.path().join("s.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot open /nonexistent/disk.raw"), "{err}");
}

/// `--unix` and `--tcp` together: one process, one export, reached by both;
/// what a client writes on one socket the other reads.
#[test]
#[ignore = "tier clients: needs qemu-io, qemu-img and nbdinfo (integration/setup.sh); select with --include-ignored (integration/test.sh does)"]
fn serve_answers_on_unix_and_tcp_at_once() {
    require_tool("qemu-io", "qemu-utils");
    require_tool("nbdinfo", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let img = patterned_image(dir.path(), "disk.raw", SIZE);
    let sock = dir.path().join("blockd.sock");
    let tcp = free_tcp_addr();
    let mut child = Command::new(env!("CARGO_BIN_EXE_colo-blockd"))
        .args(["serve", "--export"])
        .arg(format!("disk={}", img.display()))
        .arg("--unix")
        .arg(&sock)
        .args(["--tcp", &tcp.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Both sockets are bound before either serves; connecting to the TCP
    // one proves both are there.
    wait_until_serving(&mut child, || {
        sock.exists() && std::net::TcpStream::connect(tcp).is_ok()
    });
    let unix_uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let tcp_uri = format!("nbd://{tcp}/disk");
    let out = run_ok(
        "qemu-io",
        &["-f", "raw", &tcp_uri, "-c", "write -P 0x5a 0 64k"],
    );
    assert!(!out.contains("failed"), "{out}");
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &unix_uri,
            "-c",
            "read -P 0x5a 0 64k",
            "-c",
            "write -P 0xa5 64k 4k",
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    let out = run_ok(
        "qemu-io",
        &["-f", "raw", &tcp_uri, "-c", "read -P 0xa5 64k 4k"],
    );
    assert!(!out.contains("failed"), "{out}");
    for uri in [
        format!("nbd+unix:///?socket={}", sock.display()),
        format!("nbd://{tcp}/"),
    ] {
        let list = run_ok("nbdinfo", &["--list", &uri]);
        assert!(list.contains("export=\"disk\""), "{uri}: {list}");
    }

    run_ok("kill", &["-TERM", &child.id().to_string()]);
    let status = child.wait().unwrap();
    assert!(status.success(), "colo-blockd exited with {status}");
    assert!(file_bytes(&img, 0, 65536).iter().all(|&b| b == 0x5a));
    assert!(file_bytes(&img, 65536, 4096).iter().all(|&b| b == 0xa5));
}

/// `--exit-after-client`: the serve of a re-protect's copy. A connection that never opens an
/// export (a port probe) leaves it serving; the first client that wrote through an export
/// makes it exit 0 once that client is gone, with the write on the image and the port closed.
#[test]
#[ignore = "tier clients: needs qemu-io, qemu-img and nbdinfo (integration/setup.sh); select with --include-ignored (integration/test.sh does)"]
fn serve_exits_after_its_first_client_with_exit_after_client() {
    require_tool("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let img = patterned_image(dir.path(), "disk.raw", SIZE);
    let tcp = free_tcp_addr();
    let mut child = Command::new(env!("CARGO_BIN_EXE_colo-blockd"))
        .args(["serve", "--exit-after-client", "--export"])
        .arg(format!("disk={}", img.display()))
        .args(["--tcp", &tcp.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The probe itself is a connection that opens no export.
    wait_until_serving(&mut child, || std::net::TcpStream::connect(tcp).is_ok());
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "a connection that opened no export stopped the server"
    );
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &format!("nbd://{tcp}/disk"),
            "-c",
            "write -P 0x7e 0 64k",
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("colo-blockd serve did not exit after its client left");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "colo-blockd exited with {status}");
    assert!(file_bytes(&img, 0, 65536).iter().all(|&b| b == 0x7e));
    assert!(
        std::net::TcpStream::connect(tcp).is_err(),
        "the port still accepts after the exit"
    );
}

/// An image a failover made the VM's disk (its `.colo-failed-over` marker next to it) holds
/// the pair's newest data: `serve` refuses to offer it for writing (a re-protect's copy into it
/// would destroy that data), with a clear error, and leaves it untouched; read-only is allowed.
#[test]
fn serve_refuses_to_write_a_failed_over_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = patterned_image(dir.path(), "disk.raw", SIZE);
    let marker = common::sibling(&img, ".colo-failed-over");
    std::fs::write(&marker, b"").unwrap();
    let before = std::fs::read(&img).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_colo-blockd"))
        .args(["serve", "--exit-after-client", "--export"])
        .arg(format!("base={}", img.display()))
        .arg("--unix")
        .arg(dir.path().join("s.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("was failed over to") && err.contains("delete the marker"),
        "{err}"
    );
    assert!(!dir.path().join("s.sock").exists(), "nothing was served");
    assert_eq!(std::fs::read(&img).unwrap(), before);
    assert!(marker.exists());

    // Read-only it is served (reading it back is how an operator checks it).
    let sock = dir.path().join("ro.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_colo-blockd"))
        .args(["serve", "--read-only", "--export"])
        .arg(format!("base={}", img.display()))
        .arg("--unix")
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_socket(&mut child, &sock);
    run_ok("kill", &["-TERM", &child.id().to_string()]);
    assert!(child.wait().unwrap().success());
}
