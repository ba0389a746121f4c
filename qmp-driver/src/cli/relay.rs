//! `relay`: the relay engineer's `RelayArgs`, each option taken from the first of
//!
//! 1. its flag (`--listen`),
//! 2. its environment variable (`COLO_RELAY_LISTEN`; clap reads both),
//! 3. the pair config's `[relay]` section (`relay.listen`; `--config` or `COLO_CONFIG`),
//! 4. its default (`--ack-timeout-ms` only; `--control-tcp` is off without one),
//!
//! The access options come from the same layers: `--control-group`, `--operator-uid`,
//! `--operator-gid`, `--control-tcp-peer`, `--migration-peer` from `relay.control_group`,
//! `relay.operator_uids`, `relay.operator_gid`, `relay.control_tcp_peers`,
//! `relay.migration_peers` (a list given on the command line replaces the file's), and
//! `--tls-dir`, `--tls-peer`, `--migration-tls` from the `[tls]` section (the secondary host's
//! directory, the primary host's name, migration TLS on),
//!
//! so that `qmp-driver relay --config /etc/colo/vm1.toml` is enough, as the libvirt hook runs
//! it, and any option can still be overridden for one run.

use super::{Cli, Command, Globals};
use clap::FromArgMatches;
use clap::parser::ValueSource;
use colo_relay::{RelayArgs, RelayConfig};
use colo_types::Address;
use qmp_driver::config::{CONFIG_ENV, DEFAULT_ACK_TIMEOUT_MS, RelaySettings};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn usage(msg: impl std::fmt::Display) -> clap::Error {
    clap::Error::raw(
        clap::error::ErrorKind::MissingRequiredArgument,
        format!("{msg}\n"),
    )
}

/// What the command line and the environment gave (clap puts a flag over its variable);
/// `None` where neither did.
#[derive(Debug, Default)]
struct Given {
    listen: Option<Address>,
    target: Option<Address>,
    control: Option<PathBuf>,
    control_tcp: Option<Address>,
    ack_timeout_ms: Option<u64>,
    /// The command line or the environment (no config-file key; the relay's default else).
    reply_timeout_ms: Option<u64>,
    access: Access,
}

/// Who may reach the relay: the options only the command line and the environment give.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Access {
    control_group: Option<u32>,
    operator_uids: Vec<u32>,
    operator_gid: Option<u32>,
    control_tcp_peers: Vec<IpAddr>,
    migration_peers: Vec<IpAddr>,
    tls_dir: Option<PathBuf>,
    tls_peer: Option<String>,
    migration_tls: bool,
}

impl Given {
    fn from_matches(sub: &clap::ArgMatches) -> Given {
        // clap fills in `--ack-timeout-ms`'s default: that is the last layer, not the first.
        let given = |id: &str| {
            matches!(
                sub.value_source(id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        };
        Given {
            listen: sub.get_one::<Address>("listen").cloned(),
            target: sub.get_one::<Address>("target").cloned(),
            control: sub.get_one::<PathBuf>("control").cloned(),
            control_tcp: sub.get_one::<Address>("control_tcp").cloned(),
            ack_timeout_ms: given("ack_timeout_ms")
                .then(|| sub.get_one::<u64>("ack_timeout_ms").copied())
                .flatten(),
            reply_timeout_ms: given("reply_timeout_ms")
                .then(|| sub.get_one::<u64>("reply_timeout_ms").copied())
                .flatten(),
            access: Access {
                control_group: sub.get_one::<u32>("control_group").copied(),
                operator_uids: many(sub, "operator_uids"),
                operator_gid: sub.get_one::<u32>("operator_gid").copied(),
                control_tcp_peers: many(sub, "control_tcp_peers"),
                migration_peers: many(sub, "migration_peers"),
                tls_dir: sub.get_one::<PathBuf>("tls_dir").cloned(),
                tls_peer: sub.get_one::<String>("tls_peer").cloned(),
                migration_tls: sub.get_flag("migration_tls"),
            },
        }
    }
}

/// Every value of a repeatable option (none when not given).
fn many<T: Clone + Send + Sync + 'static>(sub: &clap::ArgMatches, id: &str) -> Vec<T> {
    sub.get_many::<T>(id)
        .map(|v| v.cloned().collect())
        .unwrap_or_default()
}

/// Where the config file stands: not given, given without `[relay]`, or its section.
#[derive(Debug)]
enum File<'a> {
    None,
    NoRelay(&'a Path),
    Relay(Box<RelaySettings>),
}

/// Builds the `relay` invocation from `sub` (the relay's matches), the config file filling
/// what the command line and the environment leave out.
pub fn parse(top: &clap::ArgMatches, sub: &clap::ArgMatches) -> Result<Cli, clap::Error> {
    let globals = Globals::from_arg_matches(sub).or_else(|_| Globals::from_arg_matches(top))?;
    let file = match &globals.config {
        None => File::None,
        Some(path) => match globals.load_config().map_err(usage)?.relay {
            Some(relay) => File::Relay(Box::new(relay)),
            None => File::NoRelay(path),
        },
    };
    let args = resolve(Given::from_matches(sub), file).map_err(usage)?;
    Ok(Cli {
        globals,
        command: Command::Relay(args),
    })
}

/// Each option from the first layer that has it: flag or environment, file, default.
fn resolve(given: Given, file: File<'_>) -> Result<RelayArgs, String> {
    let section = match &file {
        File::Relay(r) => Some(r),
        File::None | File::NoRelay(_) => None,
    };
    let missing = |flag: &str, env: &str| {
        let why = match &file {
            File::None => format!("no config file (--config or {CONFIG_ENV})"),
            File::NoRelay(path) => format!("{} has no [relay] section", path.display()),
            File::Relay(_) => unreachable!("the [relay] section has every required key"),
        };
        format!(
            "relay: --{flag} is missing: give it, or {env}, or relay.{key} in the config's \
             [relay] section ({why})",
            key = flag.replace('-', "_"),
        )
    };
    let file_tls = section.and_then(|r| r.tls.as_ref());
    Ok(RelayArgs {
        listen: given
            .listen
            .or_else(|| section.map(|r| r.listen.clone()))
            .ok_or_else(|| missing("listen", "COLO_RELAY_LISTEN"))?,
        target: given
            .target
            .or_else(|| section.map(|r| r.target.clone()))
            .ok_or_else(|| missing("target", "COLO_RELAY_TARGET"))?,
        control: given
            .control
            .or_else(|| section.map(|r| r.control.clone()))
            .ok_or_else(|| missing("control", "COLO_RELAY_CONTROL"))?,
        control_tcp: given
            .control_tcp
            .or_else(|| section.and_then(|r| r.control_tcp.clone())),
        ack_timeout_ms: given
            .ack_timeout_ms
            .or_else(|| section.map(|r| r.ack_timeout_ms))
            .unwrap_or(DEFAULT_ACK_TIMEOUT_MS),
        reply_timeout_ms: given
            .reply_timeout_ms
            .unwrap_or(colo_relay::DEFAULT_REPLY_TIMEOUT.as_millis() as u64),
        control_group: given
            .access
            .control_group
            .or_else(|| section.and_then(|r| r.control_group)),
        operator_uids: or_file(
            given.access.operator_uids,
            section.map(|r| &r.operator_uids),
        ),
        operator_gid: given
            .access
            .operator_gid
            .or_else(|| section.and_then(|r| r.operator_gid)),
        control_tcp_peers: or_file(
            given.access.control_tcp_peers,
            section.map(|r| &r.control_tcp_peers),
        ),
        migration_peers: or_file(
            given.access.migration_peers,
            section.map(|r| &r.migration_peers),
        ),
        tls_dir: given
            .access
            .tls_dir
            .or_else(|| file_tls.map(|t| t.dir.clone())),
        tls_peer: given
            .access
            .tls_peer
            .or_else(|| file_tls.map(|t| t.peer.clone())),
        // With [tls] the primary migrates with tls-creds (`start`): the relay must terminate it.
        migration_tls: given.access.migration_tls || file_tls.is_some(),
    })
}

/// A list from the command line, else the file's (none given: empty).
fn or_file<T: Clone>(given: Vec<T>, file: Option<&Vec<T>>) -> Vec<T> {
    if given.is_empty() {
        file.cloned().unwrap_or_default()
    } else {
        given
    }
}

/// Runs the relay until SIGINT or SIGTERM.
pub async fn run(args: RelayArgs) -> ExitCode {
    let config = match RelayConfig::try_from(args) {
        Ok(c) => c,
        Err(e) => return super::fail(&e, super::Exit::Usage),
    };
    let shutdown = colo_daemon::run::shutdown_on_signal();
    match colo_relay::run(config, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qmp-driver: {e}");
            super::Exit::Failed.into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use colo_testkit::rerun::{Case, child_case, rerun_with_env};

    /// `argv` parsed as `cli::parse` does it, clap reading this process's environment.
    fn parse_relay(argv: &[&str]) -> Result<RelayArgs, clap::Error> {
        let cmd = Cli::command().mut_subcommand("relay", |s| {
            s.mut_arg("listen", |a| a.required(false))
                .mut_arg("target", |a| a.required(false))
                .mut_arg("control", |a| a.required(false))
        });
        let matches = cmd.try_get_matches_from(argv)?;
        let (_, sub) = matches.subcommand().expect("a subcommand");
        match parse(&matches, sub)?.command {
            Command::Relay(args) => Ok(args),
            other => panic!("not relay: {other:?}"),
        }
    }

    const PAIR: &str = r#"
        name = "vm1"
        [primary]
        qmp = "unix:/run/colo/vm1/primary.qmp"
        host = "192.168.77.1"
        [secondary]
        qmp = "unix:/run/colo/vm1/secondary.qmp"
        host = "192.168.77.2"
        [migration]
        secondary_incoming = "unix:/run/colo/vm1/incoming.sock"
        primary_target = "tcp:192.168.77.2:9998"
    "#;
    const RELAY: &str = r#"
        [relay]
        listen = "tcp:192.168.77.2:9998"
        control = "/run/colo/vm1/relay.sock"
        ack_timeout_ms = 300
    "#;

    /// The variables the child may see: the ones of the case, none inherited (prefixes).
    const RELAY_ENV: [&str; 2] = ["COLO_RELAY_", CONFIG_ENV];

    /// flag > env > file > default, for `--ack-timeout-ms` (`COLO_RELAY_ACK_TIMEOUT_MS`,
    /// `relay.ack_timeout_ms`, 2000) and `--control` (`COLO_RELAY_CONTROL`,
    /// `relay.control`, no default). The environment is process-wide and tests run beside
    /// each other, so each case runs this test again in a child process with its own
    /// variables, and clap reads them there as it does in `qmp-driver`.
    #[test]
    fn a_flag_beats_its_env_var_which_beats_the_file_which_beats_the_default() {
        if let Some(case) = child_case() {
            let (want_ack, want_control) = case.want.split_once(' ').expect("two values");
            let mut full = vec!["qmp-driver"];
            full.extend(case.args.iter().map(String::as_str));
            let args = parse_relay(&full).unwrap_or_else(|e| panic!("{case}: {e}"));
            assert_eq!(args.ack_timeout_ms.to_string(), want_ack, "{case}");
            assert_eq!(args.control.display().to_string(), want_control, "{case}");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let with_relay = dir.path().join("with-relay.toml");
        std::fs::write(&with_relay, format!("{PAIR}{RELAY}")).unwrap();
        let without_relay = dir.path().join("without-relay.toml");
        std::fs::write(&without_relay, PAIR).unwrap();
        let (with_relay, without_relay) = (
            with_relay.to_str().unwrap(),
            without_relay.to_str().unwrap(),
        );
        let flags = "relay --listen tcp:0.0.0.0:1 --target unix:/t";
        let file = "/run/colo/vm1/relay.sock";
        let env = [
            ("COLO_RELAY_ACK_TIMEOUT_MS", "200"),
            ("COLO_RELAY_CONTROL", "/env.sock"),
        ];
        let cases: &[Case] = &[
            // The flag wins over the variable and the file.
            (
                format!("--config {with_relay} {flags} --ack-timeout-ms 100 --control /flag.sock"),
                &env,
                "100 /flag.sock",
            ),
            // The variable wins over the file.
            (
                format!("--config {with_relay} {flags}"),
                &env,
                "200 /env.sock",
            ),
            // The file wins over the default.
            (
                format!("--config {with_relay} {flags}"),
                &[],
                &*format!("300 {file}"),
            ),
            // COLO_CONFIG names the file as --config does.
            (
                flags.to_string(),
                &[(CONFIG_ENV, with_relay)],
                &*format!("300 {file}"),
            ),
            // The default, when nothing else gives one (a file without [relay] is fine then).
            (
                format!("--config {without_relay} {flags} --control /flag.sock"),
                &[],
                "2000 /flag.sock",
            ),
            (
                format!("{flags} --control /flag.sock"),
                &[],
                "2000 /flag.sock",
            ),
        ];
        rerun_with_env(
            "cli::relay::tests::a_flag_beats_its_env_var_which_beats_the_file_which_beats_the_default",
            &RELAY_ENV,
            cases,
        );
    }

    #[test]
    fn the_file_fills_each_option_the_command_line_leaves_out() {
        let file = RelaySettings {
            listen: Address::tcp("192.168.77.2", 9998),
            target: Address::unix("/run/in.sock"),
            control: "/run/relay.sock".into(),
            control_tcp: Some(Address::tcp("192.168.77.2", 9990)),
            ack_timeout_ms: 300,
            control_group: None,
            operator_uids: Vec::new(),
            operator_gid: None,
            control_tcp_peers: Vec::new(),
            migration_peers: Vec::new(),
            tls: None,
        };
        let given = Given {
            target: Some(Address::unix("/other/in.sock")),
            ..Given::default()
        };
        let args = resolve(given, File::Relay(Box::new(file.clone()))).unwrap();
        assert_eq!(args.listen, file.listen);
        assert_eq!(args.target, Address::unix("/other/in.sock"));
        assert_eq!(args.control, file.control);
        assert_eq!(args.control_tcp, file.control_tcp);
        assert_eq!(args.ack_timeout_ms, 300);
        // A complete command line still takes control_tcp from the file.
        let given = Given {
            listen: Some(Address::tcp("0.0.0.0", 1)),
            target: Some(Address::unix("/t")),
            control: Some("/c".into()),
            ack_timeout_ms: Some(5),
            ..Given::default()
        };
        let args = resolve(given, File::Relay(Box::new(file.clone()))).unwrap();
        assert_eq!(args.control_tcp, file.control_tcp);
        assert_eq!(args.ack_timeout_ms, 5);
    }

    /// `--reply-timeout-ms` has no key in the file: the command line (or its variable), else
    /// the relay's default.
    #[test]
    fn the_reply_timeout_comes_from_the_command_line_or_the_default() {
        let base = [
            "qmp-driver",
            "relay",
            "--listen",
            "unix:/l",
            "--target",
            "unix:/t",
            "--control",
            "/c",
        ];
        let args = parse_relay(&base).unwrap();
        assert_eq!(args.reply_timeout_ms, 10_000);
        let mut argv = base.to_vec();
        argv.extend(["--reply-timeout-ms", "3000"]);
        let args = parse_relay(&argv).unwrap();
        assert_eq!(args.reply_timeout_ms, 3000);
        let cfg = RelayConfig::try_from(args).unwrap();
        assert_eq!(cfg.reply_timeout, std::time::Duration::from_secs(3));
    }

    /// The access options come from the command line (or their variables) only, and reach
    /// the relay's arguments whatever the file says.
    #[test]
    fn access_options_come_from_the_command_line() {
        let args = parse_relay(&[
            "qmp-driver",
            "relay",
            "--listen",
            "tcp:192.168.77.2:9998",
            "--target",
            "unix:/t",
            "--control",
            "/c",
            "--control-tcp",
            "192.168.77.2:9990",
            "--control-group",
            "990",
            "--operator-uid",
            "1000",
            "--operator-uid",
            "1001",
            "--operator-gid",
            "991",
            "--control-tcp-peer",
            "192.168.77.1",
            "--migration-peer",
            "192.168.77.1",
            "--tls-dir",
            "/etc/colo/pki/hostb",
            "--tls-peer",
            "hosta",
        ])
        .unwrap();
        assert_eq!(
            (args.tls_dir.as_deref(), args.tls_peer.as_deref()),
            (Some(Path::new("/etc/colo/pki/hostb")), Some("hosta"))
        );
        assert_eq!(args.control_group, Some(990));
        assert_eq!(args.operator_uids, [1000, 1001]);
        assert_eq!(args.operator_gid, Some(991));
        let primary: IpAddr = "192.168.77.1".parse().unwrap();
        assert_eq!(args.control_tcp_peers, [primary]);
        assert_eq!(args.migration_peers, [primary]);
        // None given: none set.
        let args = parse_relay(&[
            "qmp-driver",
            "relay",
            "--listen",
            "tcp:0.0.0.0:1",
            "--target",
            "unix:/t",
            "--control",
            "/c",
        ])
        .unwrap();
        assert_eq!((args.control_group, args.operator_gid), (None, None));
        assert!(
            args.operator_uids.is_empty()
                && args.control_tcp_peers.is_empty()
                && args.migration_peers.is_empty()
        );
    }

    /// The file's access keys and `[tls]` fill what the command line leaves out; a list on
    /// the command line replaces the file's.
    #[test]
    fn the_file_gives_the_access_options_and_tls() {
        let primary: IpAddr = "192.168.77.1".parse().unwrap();
        let other: IpAddr = "10.0.0.1".parse().unwrap();
        let file = RelaySettings {
            listen: Address::tcp("192.168.77.2", 9998),
            target: Address::unix("/run/in.sock"),
            control: "/run/relay.sock".into(),
            control_tcp: Some(Address::tcp("192.168.77.2", 9990)),
            ack_timeout_ms: 300,
            control_group: Some(990),
            operator_uids: vec![1000],
            operator_gid: Some(991),
            control_tcp_peers: vec![primary],
            migration_peers: vec![primary],
            tls: Some(qmp_driver::config::RelayTls {
                dir: "/etc/colo/pki".into(),
                peer: "hosta".into(),
            }),
        };
        let args = resolve(Given::default(), File::Relay(Box::new(file.clone()))).unwrap();
        assert_eq!(args.control_group, Some(990));
        assert_eq!(args.operator_uids, [1000]);
        assert_eq!(args.operator_gid, Some(991));
        assert_eq!(args.control_tcp_peers, [primary]);
        assert_eq!(args.migration_peers, [primary]);
        assert_eq!(args.tls_dir.as_deref(), Some(Path::new("/etc/colo/pki")));
        assert_eq!(args.tls_peer.as_deref(), Some("hosta"));
        assert!(args.migration_tls);
        let cfg = RelayConfig::try_from(args).unwrap();
        assert_eq!(cfg.migration_tls, cfg.control_tls);
        assert_eq!(cfg.migration_tls.unwrap().peer, "hosta");
        // The command line wins, list by list.
        let given = Given {
            access: Access {
                migration_peers: vec![other],
                tls_peer: Some("hostc".into()),
                ..Access::default()
            },
            ..Given::default()
        };
        let args = resolve(given, File::Relay(Box::new(file.clone()))).unwrap();
        assert_eq!(args.migration_peers, [other]);
        assert_eq!(args.control_tcp_peers, [primary]);
        assert_eq!(args.tls_peer.as_deref(), Some("hostc"));
        // Without [tls]: no TLS.
        let plain = RelaySettings { tls: None, ..file };
        let args = resolve(Given::default(), File::Relay(Box::new(plain))).unwrap();
        assert_eq!(
            (args.tls_dir, args.tls_peer, args.migration_tls),
            (None, None, false)
        );
    }

    #[test]
    fn a_missing_option_names_its_flag_env_var_and_key() {
        let err = resolve(Given::default(), File::None).unwrap_err();
        assert!(
            err.contains("--listen")
                && err.contains("COLO_RELAY_LISTEN")
                && err.contains("relay.listen")
                && err.contains("--config"),
            "{err}"
        );
        let given = Given {
            listen: Some(Address::tcp("0.0.0.0", 1)),
            target: Some(Address::unix("/t")),
            ..Given::default()
        };
        let err = resolve(given, File::NoRelay(Path::new("/etc/colo/vm1.toml"))).unwrap_err();
        assert!(
            err.contains("--control") && err.contains("/etc/colo/vm1.toml has no [relay]"),
            "{err}"
        );
    }
}
