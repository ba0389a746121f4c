//! Every command line `qmp-driver daemon-args` prints parses with the daemon's own command-line
//! definition (`colo_blockd::cli::Args`, `colo_proxyd::cli::Cli`), so a flag renamed in a daemon
//! cannot leave the generated command lines behind. Runs the real `qmp-driver` binary on the
//! shipped example config, switched to colo's daemons, with and without every optional setting.

use clap::Parser;
use std::path::Path;
use std::process::Command;

/// The shipped example with colo-blockd and colo-proxyd as the backends; `extra` uncomments
/// the optional settings, `tls` the `[tls]` section.
fn example_on_colo_daemons(extra: bool, tls: bool) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../qemu-configs/pair.example.toml");
    let mut text = std::fs::read_to_string(path).unwrap();
    // proxyd_qmp: colo-proxyd primary needs a monitor of its own.
    for backend in [
        "backend = \"colo-blockd\"",
        "backend = \"colo-proxyd\"",
        "proxyd_qmp = ",
    ] {
        let commented = format!("# {backend}");
        assert!(text.contains(&commented), "the example lost {commented}");
        text = text.replace(&commented, backend);
    }
    // colo-blockd keeps the secondary's disk: no replication overlays.
    text = text
        .lines()
        .filter(|l| !l.starts_with("secondary_active") && !l.starts_with("secondary_hidden"))
        .collect::<Vec<_>>()
        .join("\n");
    if tls {
        for key in [
            "[tls]",
            "primary_dir = ",
            "primary_name = ",
            "secondary_dir = ",
            "secondary_name = ",
        ] {
            let commented = format!("# {key}");
            assert!(text.contains(&commented), "the example lost {commented}");
            text = text.replace(&commented, key);
        }
    }
    if extra {
        for optional in [
            "control_tcp = ",
            "blockd_socket = ",
            "proxyd_secondary_qmp = ",
            "link_port = ",
            "blockd_primary_qmp = ",
            "qemu_uid = ",
        ] {
            text = text.replace(&format!("# {optional}"), optional);
        }
    }
    text
}

fn qmp_driver(config: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_qmp-driver"))
        .arg("--config")
        .arg(config)
        .args(["daemon-args"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "daemon-args {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn every_generated_command_line_parses_with_the_daemons_own_cli() {
    let dir = tempfile::tempdir().unwrap();
    let mut parsed = 0;
    for (extra, tls) in [(false, false), (true, false), (true, true)] {
        let config = dir.path().join(format!("pair-{extra}-{tls}.toml"));
        std::fs::write(&config, example_on_colo_daemons(extra, tls)).unwrap();
        let daemons = qmp_driver(&config, &["--list"]);
        let daemons: Vec<&str> = daemons.lines().collect();
        assert_eq!(
            daemons,
            [
                "colo-blockd",
                "colo-proxyd-secondary",
                "colo-proxyd-primary"
            ],
            "the config should need every daemon"
        );
        for daemon in daemons {
            // One argument per line, after the binary's name.
            let printed = qmp_driver(&config, &["--daemon", daemon]);
            let binary = daemon
                .trim_end_matches("-primary")
                .trim_end_matches("-secondary");
            let argv: Vec<&str> = std::iter::once(binary).chain(printed.lines()).collect();
            assert!(argv.len() > 2, "{daemon}: {printed}");
            // With [tls] every daemon gets its host's identity and the other host's name.
            assert_eq!(
                argv.contains(&"--tls-dir") && argv.contains(&"--tls-peer"),
                tls,
                "{daemon} {argv:?}"
            );
            match daemon {
                "colo-blockd" => {
                    let args = colo_blockd::cli::Args::try_parse_from(&argv)
                        .unwrap_or_else(|e| panic!("{daemon} {argv:?}:\n{e}"));
                    assert!(matches!(args.command, colo_blockd::cli::Cmd::Secondary(_)));
                }
                "colo-proxyd-primary" | "colo-proxyd-secondary" => {
                    let cli = colo_proxyd::cli::Cli::try_parse_from(&argv)
                        .unwrap_or_else(|e| panic!("{daemon} {argv:?}:\n{e}"));
                    let primary = matches!(cli.command, colo_proxyd::cli::Command::Primary(_));
                    assert_eq!(primary, daemon == "colo-proxyd-primary", "{argv:?}");
                    // The example's `qemu_uid = 107` (uncommented with the optional keys)
                    // reaches both roles' own --qemu-uid.
                    let expected: &[u32] = if extra { &[107] } else { &[] };
                    let qemu_uid = match &cli.command {
                        colo_proxyd::cli::Command::Secondary(args) => &args.qemu_uid,
                        colo_proxyd::cli::Command::Primary(args) => &args.qemu_uid,
                        colo_proxyd::cli::Command::VhostNet(_) => {
                            panic!("daemon-args printed a vhost-net command line: {argv:?}")
                        }
                    };
                    assert_eq!(qemu_uid, expected, "{argv:?}");
                }
                other => panic!("daemon-args --list printed an unknown daemon {other}"),
            }
            parsed += 1;
        }
    }
    assert_eq!(parsed, 9);
}
