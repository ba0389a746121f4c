//! `qmp-driver` without any QEMU: help texts, config errors, unreachable
//! sockets, and `qemu-args`.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_qmp-driver"));
    cmd.args(args)
        .env_remove("COLO_CONFIG")
        .env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run qmp-driver")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn example() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../qemu-configs/pair.example.toml")
        .display()
        .to_string()
}

#[test]
fn every_command_has_help_that_says_what_it_does() {
    let exit_codes = [
        "0  success",
        "3  a precondition",
        "4  cannot reach",
        "5  the operation started",
    ];
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--help"],
            &["COLO", "--config", "COLO_CONFIG", "failover", "qemu-args"],
        ),
        (
            &["prepare-secondary", "--help"],
            &[
                "SECONDARY",
                "-incoming defer",
                "x-colo",
                "nbd",
                "migrate-incoming",
            ],
        ),
        (
            &["start", "--help"],
            &[
                "drive_add",
                "x-blockdev-change",
                "x-checkpoint-delay",
                "prelaunch",
                "--timeout",
            ],
        ),
        (
            &["status", "--help"],
            &["COLO mode", "run state", "epoch", "subscriber", "--json"],
        ),
        (
            &["checkpoint", "--help"],
            &["x-checkpoint-delay", "STOP/RESUME", "relay", "--reason"],
        ),
        (
            &["failover", "--help"],
            &[
                "--survivor",
                "yank",
                "x-colo-lost-heartbeat",
                "announce-self",
                "hook",
                "drive_del",
            ],
        ),
        (
            &["stop", "--help"],
            &["primary", "quit", "secondary", "yank"],
        ),
        (
            &["qemu-args", "--help"],
            &[
                "--role",
                "nodelay=on",
                "-incoming defer",
                "-machine",
                "colo-proxyd",
                "colo-blockd",
                "daemon-args",
            ],
        ),
        (
            &["daemon-args", "--help"],
            &[
                "colo-blockd",
                "colo-proxyd-primary",
                "colo-proxyd-secondary",
                "--list",
                "--shell",
                "before its QEMU",
            ],
        ),
        (
            &["copy-disk", "--help"],
            &["drive-mirror", "block-job-cancel", "--target", "-S"],
        ),
    ];
    for (args, words) in cases {
        let out = run(args, &[]);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", text(&out));
        let t = text(&out);
        for w in words.iter().chain(exit_codes.iter()) {
            assert!(
                t.contains(w),
                "`qmp-driver {}` does not mention {w:?}:\n{t}",
                args.join(" ")
            );
        }
    }
    for (args, words) in [
        (["raw", "--help"], ["--socket", "--oob", "QMP"]),
        (["events", "--help"], ["--socket", "event", "JSON"]),
        (["relay", "--help"], ["--listen", "--target", "--control"]),
    ] {
        let out = run(&args, &[]);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        let t = text(&out);
        for w in words {
            assert!(t.contains(w), "{args:?} lacks {w}:\n{t}");
        }
    }
}

#[test]
fn usage_errors_exit_two() {
    assert_eq!(run(&["nonsense"], &[]).status.code(), Some(2));
    assert_eq!(run(&["failover"], &[]).status.code(), Some(2));
    assert_eq!(
        run(&["failover", "--survivor", "both"], &[]).status.code(),
        Some(2)
    );
    let out = run(&["status"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("COLO_CONFIG"), "{}", text(&out));
    let out = run(&["raw", "--socket", "tcp:127.0.0.1:1", "query-status"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("only Unix sockets"), "{}", text(&out));
}

#[test]
fn raw_takes_the_config_files_unix_prefix() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("nobody.sock");
    for socket in [
        missing.display().to_string(),
        format!("unix:{}", missing.display()),
    ] {
        let out = run(&["raw", "--socket", &socket, "query-status"], &[]);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        // The error names the path itself: the prefix was taken off, not kept as part of a
        // relative file name.
        assert!(
            text(&out).contains(&format!("on {}:", missing.display())),
            "{}",
            text(&out)
        );
    }
}

#[test]
fn a_bad_config_exits_two_and_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("network.compare_port", "[network]\ncompare_port = 9003\n"),
        ("migration.checkpoint_delay_ms", "checkpoint_delay_ms = 0\n"),
        ("chekpoint_delay_ms", "chekpoint_delay_ms = 5\n"),
    ];
    for (key, extra) in cases {
        let path = dir.path().join("bad.toml");
        // Appended keys land in [migration] unless they open a table.
        std::fs::write(
            &path,
            format!(
                "name = \"x\"\n[primary]\nqmp = \"unix:/p\"\nhost = \"a\"\n[secondary]\n\
                 qmp = \"unix:/s\"\nhost = \"b\"\n[migration]\nsecondary_incoming = \"unix:/i\"\n{extra}"
            ),
        )
        .unwrap();
        for args in [
            vec!["status"],
            vec!["failover", "--survivor", "secondary"],
            vec!["qemu-args", "--role", "primary"],
        ] {
            let mut full = vec!["--config", path.to_str().unwrap()];
            full.extend(args.iter());
            let out = run(&full, &[]);
            assert_eq!(out.status.code(), Some(2), "{full:?}: {}", text(&out));
            assert!(
                text(&out).contains(key),
                "{full:?} does not name {key}: {}",
                text(&out)
            );
        }
    }
    // COLO_CONFIG works like --config.
    let out = run(&["status"], &[("COLO_CONFIG", "/nonexistent/pair.toml")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("/nonexistent/pair.toml"));
}

#[test]
fn unreachable_qmp_sockets_exit_four_fast() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pair.toml");
    let d = dir.path().display();
    std::fs::write(
        &path,
        format!(
            "name = \"x\"\n[primary]\nqmp = \"unix:{d}/nope-p.qmp\"\nhost = \"127.0.0.1\"\n\
             [secondary]\nqmp = \"unix:{d}/nope-s.qmp\"\nhost = \"127.0.0.1\"\n\
             [migration]\nsecondary_incoming = \"unix:{d}/in.sock\"\n"
        ),
    )
    .unwrap();
    let config = path.to_str().unwrap();
    for args in [
        vec!["status"],
        vec!["status", "--json"],
        vec!["start"],
        vec!["prepare-secondary"],
        vec!["checkpoint"],
        vec!["failover", "--survivor", "secondary"],
        vec!["failover", "--survivor", "primary", "--json"],
        vec!["stop"],
    ] {
        let mut full = vec!["--config", config];
        full.extend(args.iter());
        let started = Instant::now();
        let out = run(&full, &[]);
        assert_eq!(out.status.code(), Some(4), "{full:?}: {}", text(&out));
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{full:?} took {:?}",
            started.elapsed()
        );
        assert!(
            text(&out).contains("nope-"),
            "{full:?} does not say which socket: {}",
            text(&out)
        );
    }
    let out = run(&["--config", config, "status", "--json"], &[]);
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["primary"]["reachable"], false);
    assert_eq!(st["secondary"]["reachable"], false);
}

#[test]
fn qemu_args_prints_the_generated_arguments() {
    let cfg = example();
    let out = run(&["--config", &cfg, "qemu-args", "--role", "primary"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.last(), Some(&"-S"));
    assert!(lines.contains(&"-chardev"));
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("colo-compare,id=comp0,"))
    );
    let out = run(
        &[
            "--config",
            &cfg,
            "qemu-args",
            "--role",
            "secondary",
            "--shell",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0));
    let line = String::from_utf8(out.stdout).unwrap();
    assert_eq!(line.lines().count(), 1);
    assert!(line.trim_end().ends_with("-incoming defer"), "{line}");
    assert!(line.contains("filter-rewriter,id=rew0"));
    // The reminder of what is left to the caller goes to stderr.
    assert!(String::from_utf8_lossy(&out.stderr).contains("-m 1024"));
}

#[test]
fn qemu_args_without_a_vm_section_exits_two() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pair.toml");
    std::fs::write(
        &path,
        "name = \"x\"\n[primary]\nqmp = \"unix:/p\"\nhost = \"a\"\n[secondary]\nqmp = \"unix:/s\"\n\
         host = \"b\"\n[migration]\nsecondary_incoming = \"unix:/i\"\n",
    )
    .unwrap();
    let out = run(
        &[
            "--config",
            path.to_str().unwrap(),
            "qemu-args",
            "--role",
            "primary",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("[vm]"));
}

/// `qemu-configs/libvirt/colo-domain-fragment.xml` carries exactly what
/// `qemu-args` prints for the example config, role by role.
#[test]
fn the_libvirt_fragment_matches_the_generator() {
    let xml_path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../qemu-configs/libvirt/colo-domain-fragment.xml");
    let xml = std::fs::read_to_string(xml_path).unwrap();
    let domains: Vec<&str> = xml.split("<domain ").skip(1).collect();
    assert_eq!(domains.len(), 2, "one domain per role");
    for (role, domain) in ["primary", "secondary"].iter().zip(domains) {
        let in_xml: Vec<&str> = domain
            .split("<qemu:arg value='")
            .skip(1)
            .map(|s| s.split("'/>").next().unwrap())
            .collect();
        let out = run(&["--config", &example(), "qemu-args", "--role", role], &[]);
        let generated = String::from_utf8(out.stdout).unwrap();
        let generated: Vec<&str> = generated.lines().collect();
        assert_eq!(
            in_xml, generated,
            "{role}: regenerate the fragment from `qemu-args`"
        );
    }
}
