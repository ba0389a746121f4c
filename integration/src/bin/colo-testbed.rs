//! `colo-testbed`: runs the stock QEMU COLO pair on this machine and reports what happened.
//!
//! With no arguments it runs the demo: bring up the pair, serve a client, kill the primary
//! during a download, let the secondary take over, and report. Needs root (namespaces, taps)
//! and the artifacts `integration/setup.sh` builds.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use colo_testbed::scenario::{self, FailoverPlan, Report};
use colo_testbed::stock::{PairConfig, Role};

/// Runs the stock QEMU COLO pair in network namespaces and reports checkpoints, pauses, HTTP
/// latency and failover times.
///
/// Exit codes: 0 the scenario passed every check; 1 it ran but a check failed (see the
/// report); 2 it could not run (missing QEMU or guest, not root, QEMU refused to start).
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Periodic checkpoint interval (`x-checkpoint-delay`), ms.
    #[arg(
        long,
        global = true,
        default_value_t = 1000,
        env = "COLO_CHECKPOINT_DELAY_MS"
    )]
    checkpoint_delay_ms: u32,
    /// Memory the guest dirties per second, MiB.
    #[arg(long, global = true, default_value_t = 4)]
    guest_load: u32,
    /// Namespace tag, to run several beds side by side.
    #[arg(long, global = true, default_value = "demo")]
    tag: String,
    /// Print the report as JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Bring up the pair, serve a client, kill the primary mid-download, report (default).
    Demo,
    /// Run COLO for a number of checkpoints under memory load while a client keeps asking.
    Soak {
        /// Checkpoints to complete.
        #[arg(long, default_value_t = 30)]
        checkpoints: usize,
    },
    /// Kill one VM during a throttled 1 MiB download and fail over to the other.
    Failover {
        /// Which VM to kill.
        #[arg(long, value_enum, default_value_t = Victim::Primary)]
        kill: Victim,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Victim {
    Primary,
    Secondary,
}

fn passed(report: &Report) -> bool {
    let download_ok = report.download.as_ref().is_none_or(|d| d.ok());
    let disk_ok = report.disk.as_ref().is_none_or(|d| d.is_consistent());
    report.http_failures.is_empty() && report.guest_errors.is_empty() && download_ok && disk_ok
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let cfg = PairConfig {
        checkpoint_delay_ms: cli.checkpoint_delay_ms,
        guest_load_mib_s: cli.guest_load,
        ..PairConfig::default()
    };
    let result = match cli.command.unwrap_or(Command::Demo) {
        Command::Demo => {
            eprintln!(
                "demo: primary and secondary VMs in COLO; the primary is killed mid-download"
            );
            scenario::failover(&cli.tag, cfg, FailoverPlan::default()).await
        }
        Command::Soak { checkpoints } => {
            scenario::soak(&cli.tag, cfg, checkpoints, Duration::from_millis(300)).await
        }
        Command::Failover { kill } => {
            let kill = match kill {
                Victim::Primary => Role::Primary,
                Victim::Secondary => Role::Secondary,
            };
            let plan = FailoverPlan {
                kill,
                ..FailoverPlan::default()
            };
            scenario::failover(&cli.tag, cfg, plan).await
        }
    };
    match result {
        Ok(report) => {
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                print!("{}", report.render());
            }
            if passed(&report) {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "FAILED: see the report above and the logs in {}",
                    report.run_dir.display()
                );
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
