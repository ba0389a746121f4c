//! colo-proxyd: compares the primary's and the secondary's network output on the reassembled
//! TCP stream and releases only what both produced (COLO), in place of QEMU's colo-compare,
//! filter-mirror's consumer and filter-rewriter.
//!
//! Exit codes: 0 stopped by SIGINT/SIGTERM, 1 could not start (a port is busy, ...), 2 bad
//! command line or configuration.

use std::process::ExitCode;

use clap::Parser;
use colo_daemon::Exit;
use colo_proxyd::cli::{Cli, Command};
use colo_proxyd::daemon::config::{PrimaryConfig, SecondaryConfig};
use colo_proxyd::daemon::{primary, secondary, vhost_net};

fn main() -> ExitCode {
    let cli = Cli::parse();
    colo_daemon::logging::init("info", cli.logging.log_format);
    match cli.command {
        Command::Primary(args) => match PrimaryConfig::try_from(args) {
            Ok(config) => colo_daemon::run::until_signal("colo-proxyd", async move |shutdown| {
                let listeners = primary::PrimaryListeners::bind(&config).await?;
                primary::run(config, listeners, shutdown).await
            }),
            Err(err) => bad_config(&err),
        },
        Command::Secondary(args) => match SecondaryConfig::try_from(args) {
            Ok(config) => colo_daemon::run::until_signal("colo-proxyd", async move |shutdown| {
                let listeners = secondary::SecondaryListeners::bind(&config).await?;
                secondary::run(config, listeners, shutdown).await
            }),
            Err(err) => bad_config(&err),
        },
        Command::VhostNet(args) => {
            colo_daemon::run::until_signal("colo-proxyd", async move |shutdown| {
                vhost_net::run(args, shutdown).await
            })
        }
    }
}

fn bad_config(err: &dyn std::error::Error) -> ExitCode {
    eprintln!("colo-proxyd: {err}");
    Exit::Usage.into()
}
