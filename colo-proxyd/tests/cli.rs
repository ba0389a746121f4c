//! The binary's command line: help, and the documented exit codes (2 bad command line or
//! configuration, 1 could not start).

use std::process::Command;

fn colo_proxyd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_colo-proxyd"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

const PRIMARY: &[&str] = &[
    "primary",
    "--pvm-output",
    "127.0.0.1:9",
    "--mirror",
    "127.0.0.1:9",
    "--release",
    "127.0.0.1:9",
    "--control",
    "/nonexistent/relay.sock",
    "--qmp",
    "unix:/nonexistent/qmp.sock",
];

#[test]
fn help_explains_both_daemons_and_their_options() {
    let out = colo_proxyd(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in ["primary", "secondary", "Exit codes"] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
    // The benchmark is an example of the package (`--example proxyd_bench`), not part of the
    // shipped daemon.
    assert!(!text.contains("bench"), "bench still in\n{text}");
    let out = colo_proxyd(&["primary", "--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--pvm-output",
        "compare0",
        "--max-hold-ms",
        "--bypass",
        "--config",
        "--release-redirector",
        "--netdev",
        "--link-down-without-pvm-output",
    ] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
    let out = colo_proxyd(&["secondary", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("red0") && text.contains("--primary-link"),
        "{text}"
    );
    for needle in ["--qmp", "--svm-input-redirector", "re-creates"] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
}

#[test]
fn a_bad_command_line_exits_2() {
    assert_eq!(colo_proxyd(&["primary"]).status.code(), Some(2));
    assert_eq!(colo_proxyd(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(colo_proxyd(&["bench"]).status.code(), Some(2));
    let mut args = PRIMARY.to_vec();
    args.extend(["--link-listen", "127.0.0.1:0", "--max-hold-ms", "0"]);
    let out = colo_proxyd(&args);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max-hold-ms"));
}

#[test]
fn a_busy_listen_address_exits_1() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let mut args = PRIMARY.to_vec();
    args.extend(["--link-listen", addr.as_str()]);
    let out = colo_proxyd(&args);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot listen"),
        "{out:?}"
    );
}
