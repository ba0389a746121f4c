//! `relay`: the relay engineer's `RelayArgs`, completed from the config's
//! `[relay]` section for the options the command line leaves out (so that
//! `qmp-driver relay --config /etc/colo/vm1.toml` is enough, as the libvirt
//! hook runs it).

use super::{Cli, Command, Globals};
use clap::FromArgMatches;
use clap::parser::ValueSource;
use colo_relay::{RelayArgs, RelayConfig};
use colo_types::Address;
use qmp_driver::config::ConfigError;
use std::path::PathBuf;
use std::process::ExitCode;

fn usage(msg: impl std::fmt::Display) -> clap::Error {
    clap::Error::raw(
        clap::error::ErrorKind::MissingRequiredArgument,
        format!("{msg}\n"),
    )
}

/// Builds the `relay` invocation from `sub` (the relay's matches) and the
/// config file for whatever is missing.
pub fn parse(top: &clap::ArgMatches, sub: &clap::ArgMatches) -> Result<Cli, clap::Error> {
    let globals = Globals::from_arg_matches(sub).or_else(|_| Globals::from_arg_matches(top))?;
    let listen = sub.get_one::<Address>("listen").cloned();
    let target = sub.get_one::<Address>("target").cloned();
    let control = sub.get_one::<PathBuf>("control").cloned();
    let control_tcp = sub.get_one::<Address>("control_tcp").cloned();
    let ack_explicit = sub.value_source("ack_timeout_ms") != Some(ValueSource::DefaultValue);
    let ack = sub.get_one::<u64>("ack_timeout_ms").copied();

    let complete = listen.is_some() && target.is_some() && control.is_some();
    let from_config = if complete && ack_explicit {
        None
    } else if globals.config.is_some() {
        let cfg = globals.load_config().map_err(usage)?;
        let relay = cfg.relay.ok_or_else(|| {
            usage(format!(
                "{}: the config has no [relay] section; give --listen, --target and --control",
                globals
                    .config
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ))
        })?;
        Some(relay)
    } else if complete {
        None
    } else {
        return Err(usage(format!(
            "relay needs --listen, --target and --control, or a config with a [relay] section \
             (--config). {}",
            ConfigError::Missing
        )));
    };
    let args = RelayArgs {
        listen: listen
            .or_else(|| from_config.as_ref().map(|r| r.listen.clone()))
            .ok_or_else(|| usage("relay: --listen is missing"))?,
        target: target
            .or_else(|| from_config.as_ref().map(|r| r.target.clone()))
            .ok_or_else(|| usage("relay: --target is missing"))?,
        control: control
            .or_else(|| from_config.as_ref().map(|r| r.control.clone()))
            .ok_or_else(|| usage("relay: --control is missing"))?,
        control_tcp: control_tcp
            .or_else(|| from_config.as_ref().and_then(|r| r.control_tcp.clone())),
        ack_timeout_ms: match (&from_config, ack_explicit) {
            (Some(r), false) => r.ack_timeout_ms,
            _ => ack.unwrap_or(qmp_driver::config::DEFAULT_ACK_TIMEOUT_MS),
        },
    };
    Ok(Cli {
        globals,
        command: Command::Relay(args),
    })
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
