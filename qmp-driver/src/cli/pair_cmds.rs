//! The pair commands: connect what the command needs, call
//! [`qmp_driver::pair`], print the result, map errors to exit codes.

use super::render;
use super::{Command, DaemonName, Exit, Globals, fail};
use colo_qmp::QmpClient;
use colo_types::Role;
use qmp_driver::config::PairConfig;
use qmp_driver::daemon_args::{self, Daemon};
use qmp_driver::pair::{
    self, CheckpointOptions, CopyOptions, FailbackOptions, FailoverOptions, Hook, PairError,
    Progress, StartOptions,
};
use qmp_driver::qemu_args;
use serde::Serialize;
use serde_json::json;
use std::process::ExitCode;

/// Prints progress on stderr.
fn progress(p: Progress) {
    eprintln!("  {p}");
}

/// Prints `report` (JSON or text) and succeeds.
fn print_ok<T: Serialize>(json: bool, report: &T, text: impl FnOnce(&T) -> String) -> ExitCode {
    if json {
        match serde_json::to_string(report) {
            Ok(s) => println!("{s}"),
            Err(e) => return fail(&format!("cannot encode the report: {e}"), Exit::Usage),
        }
    } else {
        print!("{}", text(report));
    }
    Exit::Success.into()
}

/// The failover options `failover` and `stop` take from `--no-hook` and `--no-relay`.
fn failover_options(no_hook: bool, no_relay: bool) -> FailoverOptions<'static> {
    FailoverOptions {
        hook: if no_hook {
            Hook::Skip
        } else {
            Hook::FromConfig
        },
        notify_relay: !no_relay,
        ..FailoverOptions::default()
    }
}

/// Prints the error on stderr (and as JSON on stdout with `--json`).
fn print_err(json: bool, e: &PairError) -> ExitCode {
    let code = super::exit::for_pair_error(e);
    if json {
        println!(
            "{}",
            json!({ "ok": false, "side": e.side(), "error": e.to_string(), "exit_code": code as u8 })
        );
    }
    fail(e, code)
}

async fn connect(cfg: &PairConfig, g: &Globals, side: Role) -> Result<QmpClient, PairError> {
    pair::connect(cfg, side, g.connect_options()).await
}

/// Runs a pair command.
pub async fn run(command: Command, cfg: &PairConfig, g: &Globals) -> ExitCode {
    match command {
        Command::PrepareSecondary(out) => {
            let result = async {
                let sec = connect(cfg, g, Role::Secondary).await?;
                pair::prepare_secondary(&sec, cfg, &mut progress).await
            }
            .await;
            match result {
                Ok(r) => print_ok(out.json, &r, |r| render::prepare(cfg, r)),
                Err(e) => print_err(out.json, &e),
            }
        }
        Command::Start {
            output,
            timeout,
            chardev_timeout,
        } => {
            let opts = StartOptions {
                colo_timeout: timeout,
                chardev_timeout,
                ..StartOptions::default()
            };
            let result = async {
                let (pri, sec) = tokio::join!(
                    connect(cfg, g, Role::Primary),
                    connect(cfg, g, Role::Secondary)
                );
                let (pri, sec) = (pri?, sec?);
                pair::start(&pri, &sec, cfg, &opts, &mut progress).await
            }
            .await;
            match result {
                Ok(r) => print_ok(output.json, &r, |r| render::start(cfg, r)),
                Err(e) => print_err(output.json, &e),
            }
        }
        Command::CopyDisk {
            output,
            target,
            timeout,
        } => {
            let opts = CopyOptions {
                target: target.unwrap_or_else(|| pair::default_target(cfg)),
                timeout,
            };
            let result = async {
                let pri = connect(cfg, g, Role::Primary).await?;
                pair::copy_disk(&pri, cfg, &opts, &mut progress).await
            }
            .await;
            match result {
                Ok(r) => print_ok(output.json, &r, render::copy),
                Err(e) => print_err(output.json, &e),
            }
        }
        Command::Reprotect {
            output,
            target,
            live,
        } => {
            let opts = live.options(target.unwrap_or_else(|| pair::default_reprotect_target(cfg)));
            let result = async {
                let (pri, sec) = tokio::join!(
                    connect(cfg, g, Role::Primary),
                    connect(cfg, g, Role::Secondary)
                );
                let (pri, sec) = (pri?, sec?);
                pair::reprotect(&pri, &sec, cfg, &opts, &mut progress).await
            }
            .await;
            match result {
                Ok(r) => print_ok(output.json, &r, |r| render::reprotect(cfg, r)),
                Err(e) => print_err(output.json, &e),
            }
        }
        Command::Failback {
            output,
            target,
            incoming,
            offsets_metrics,
            offsets_timeout,
            live,
        } => {
            let opts = FailbackOptions {
                copy: live.options(target.unwrap_or_else(|| pair::default_failback_target(cfg))),
                incoming,
                offsets_metrics,
                offsets_timeout,
            };
            let result = async {
                let (pri, sec) = tokio::join!(
                    connect(cfg, g, Role::Primary),
                    connect(cfg, g, Role::Secondary)
                );
                let (pri, sec) = (pri?, sec?);
                pair::failback(&sec, &pri, cfg, &opts, &mut progress).await
            }
            .await;
            match result {
                Ok(r) => print_ok(output.json, &r, |r| render::failback(cfg, r)),
                Err(e) => print_err(output.json, &e),
            }
        }
        Command::Status(out) => {
            let st = pair::status(cfg, g.connect_options()).await;
            let code = if st.all_reachable() {
                Exit::Success
            } else {
                Exit::Unreachable
            };
            print_ok(out.json, &st, render::status);
            code.into()
        }
        Command::Checkpoint {
            output,
            reason,
            timeout,
            no_relay,
        } => {
            let opts = CheckpointOptions {
                reason,
                timeout,
                use_relay: !no_relay,
            };
            let result = async {
                let pri = connect(cfg, g, Role::Primary).await?;
                pair::checkpoint(&pri, cfg, &opts).await
            }
            .await;
            match result {
                Ok(r) => print_ok(output.json, &r, render::checkpoint),
                Err(e) => print_err(output.json, &e),
            }
        }
        Command::Failover {
            output,
            survivor,
            no_hook,
            no_relay,
        } => {
            let opts = failover_options(no_hook, no_relay);
            let result = async {
                let qmp = connect(cfg, g, survivor).await?;
                match survivor {
                    Role::Secondary => {
                        pair::failover_to_secondary(&qmp, cfg, opts, &mut progress).await
                    }
                    Role::Primary => {
                        pair::failover_to_primary(&qmp, cfg, opts, &mut progress).await
                    }
                }
            }
            .await;
            match result {
                Ok(r) => print_ok(output.json, &r, render::failover),
                Err(e) => print_err(output.json, &e),
            }
        }
        Command::Stop {
            output,
            no_hook,
            no_relay,
        } => {
            let opts = failover_options(no_hook, no_relay);
            let result = async {
                let (pri, sec) = tokio::join!(
                    connect(cfg, g, Role::Primary),
                    connect(cfg, g, Role::Secondary)
                );
                let pri = pri?;
                let sec = match sec {
                    Ok(s) => Some(s),
                    Err(e) => {
                        eprintln!("  {e}: it will not be quit");
                        None
                    }
                };
                pair::stop_protection(&pri, sec.as_ref(), cfg, opts, &mut progress).await
            }
            .await;
            match result {
                Ok(r) => print_ok(output.json, &r, render::stop),
                Err(e) => print_err(output.json, &e),
            }
        }
        Command::QemuArgs { role, shell } => qemu_args(cfg, role, shell),
        Command::DaemonArgs {
            daemon,
            list,
            shell,
        } => daemon_args(cfg, daemon, list, shell),
        Command::Raw(_)
        | Command::Events(_)
        | Command::Relay(_)
        | Command::Pki(_)
        | Command::Watch { .. }
        | Command::Agent { .. } => fail(&"internal error: not a pair command", Exit::Usage),
    }
}

/// `daemon-args`.
pub fn daemon_args(
    cfg: &PairConfig,
    daemon: Option<DaemonName>,
    list: bool,
    shell: bool,
) -> ExitCode {
    if list {
        for d in Daemon::needed(cfg) {
            println!("{}", DaemonName::from(d).name());
        }
        return ExitCode::SUCCESS;
    }
    let Some(daemon) = daemon else {
        return fail(&"give --daemon or --list", Exit::Usage);
    };
    let daemon = Daemon::from(daemon);
    let args = match daemon_args::daemon_args(cfg, daemon) {
        Ok(a) => a,
        Err(e) => return fail(&e, Exit::Usage),
    };
    if shell {
        let line: Vec<String> = std::iter::once(daemon.binary().to_string())
            .chain(args)
            .collect();
        println!("{}", qemu_args::shell_line(&line));
    } else {
        for a in &args {
            println!("{a}");
        }
    }
    ExitCode::SUCCESS
}

/// `qemu-args`.
pub fn qemu_args(cfg: &PairConfig, role: Role, shell: bool) -> ExitCode {
    let args = match qemu_args::colo_args(cfg, role) {
        Ok(a) => a,
        Err(e) => return fail(&e, Exit::Usage),
    };
    if shell {
        println!("{}", qemu_args::shell_line(&args));
    } else {
        for a in &args {
            println!("{a}");
        }
    }
    if let Some(vm) = &cfg.vm {
        let memory = match role {
            Role::Primary => format!("-m {}", vm.memory_mib),
            Role::Secondary => format!(
                "-m {} (and about {} MiB free on this host: RAM plus the COLO cache)",
                vm.memory_mib,
                2 * u64::from(vm.memory_mib)
            ),
        };
        eprintln!(
            "qmp-driver: add the same -machine, -accel/-cpu, -smp and boot options on both \
             sides, and {memory}"
        );
    }
    Exit::Success.into()
}
