//! `colo-testbed`: runs a COLO pair on this machine (colo's daemons by default, QEMU's own
//! colo-compare and replication with `--network colo-compare --disk replication`) and reports
//! what happened.
//!
//! With no arguments it runs the whole life of a protected VM on colo's daemons with the HA
//! agents (`life`: the primary's host dies, failback and online re-protect, the primary's host
//! dies again) and reports checkpoints, divergences, failover, failback and re-protect times
//! and what was lost. `demo`
//! is the operator's view: the checkpoint-barrier relay and `qmp-driver start` bring the pair
//! into COLO, `qmp-driver status` and `checkpoint` show it, a client downloads, the primary is
//! killed, `qmp-driver failover` lets the secondary take over. Needs root (namespaces, taps)
//! and the artifacts `integration/setup.sh` builds.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use colo_testbed::reprotect::{self, Interrupt};
use colo_testbed::scenario::{self, FailoverPlan, Report};
use colo_testbed::stock::{DiskBackend, NetworkBackend, PairConfig, Role};
use colo_testbed::{barrier, compare_ab, workloads};

/// Runs a COLO pair (colo's daemons by default) in network namespaces and reports
/// checkpoints, pauses, HTTP latency and failover times.
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
    /// Who keeps the secondary's disk: colo-blockd (the checkpoint-barrier relay is then
    /// always on), or QEMU's block replication for comparison [default: colo-blockd;
    /// replication for relay-epochs and relay-barrier, which need pairs without colo's
    /// daemons].
    #[arg(long, global = true, value_enum)]
    disk: Option<Disk>,
    /// Who compares the VMs' network output: colo-proxyd on both hosts (the relay is then
    /// always on), or QEMU's colo-compare for comparison [default: colo-proxyd;
    /// colo-compare for relay-epochs and relay-barrier].
    #[arg(long, global = true, value_enum)]
    network: Option<Network>,
    /// Namespace tag, to run several beds side by side.
    #[arg(long, global = true, default_value = "demo")]
    tag: String,
    /// Print the report as JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The whole life of a protected VM on colo's daemons (default): the pair (relay,
    /// colo-proxyd, colo-blockd) with the HA agents on a real corosync cluster with a
    /// witness; clients stream both ways over one long-lived connection, ask and download;
    /// the primary's host dies and the secondary's agent takes over; the host comes back, the
    /// running VM moves home (`qmp-driver failback`'s sequence) and the secondary is
    /// re-protected online (`reprotect`'s); the primary's host dies again during a download
    /// and the secondary's agent takes over once more. Reports checkpoints, divergences by
    /// reason, each failover's time, the failback's and the re-protect's time and longest
    /// client stall, and what was lost (0 bytes, 0 disk records).
    Life,
    /// The operator's view: start the pair with `qmp-driver start` through the
    /// checkpoint-barrier relay, `status`, `checkpoint`, serve a client, kill the primary
    /// mid-download, `qmp-driver failover --survivor secondary`, report.
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
        /// Drive the pair with the `qmp-driver` commands and the relay (as the demo does)
        /// instead of calling the same sequences as a library.
        #[arg(long)]
        cli: bool,
    },
    /// The relay's epoch events against both QEMUs' checkpoints, and the pause it adds
    /// (pairs without relay, with, with, without; the medians of each kind compared).
    RelayEpochs {
        /// Checkpoints per pair.
        #[arg(long, default_value_t = 50)]
        checkpoints: usize,
    },
    /// QEMU's colo-compare, then colo-proxyd, on the identical pair under the same client
    /// workload: HTTP latency, failures, checkpoints per 1000 requests (the periodic
    /// checkpoint is pushed out of the way, so these are the ones the comparison asked for).
    CompareAb {
        /// Small-page requests per pair.
        #[arg(long, default_value_t = 300)]
        requests: usize,
        /// Pause between requests, ms.
        #[arg(long, default_value_t = 30)]
        spacing_ms: u64,
        /// 1 MiB blob downloads per pair, spread over the requests.
        #[arg(long, default_value_t = 3)]
        blobs: usize,
    },
    /// The workload suite (a benchmark; nothing timed is asserted): web, download, upload, disk
    /// and memory workloads against the guest without COLO, beside an equally loaded twin (the
    /// fair native on two cores), on stock COLO (colo-compare, replication) and on colo's
    /// daemons, in one run; prints markdown tables and writes report.md, report.json, a CSV
    /// per workload and (with gnuplot) a PNG per workload into the run directory. Needs `ab` (apache2-utils, installed by
    /// integration/setup.sh). `--disk`/`--network` are ignored: each setup picks its own.
    Bench {
        /// The workloads to run on each setup (comma-separated: web, download, upload, disk,
        /// memory; memory runs on the COLO setups only).
        #[arg(
            long,
            value_delimiter = ',',
            value_enum,
            default_value = "web,download,upload,disk,memory"
        )]
        workloads: Vec<BenchWorkload>,
        /// web: concurrent clients, one ab run each (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
        concurrency: Vec<u32>,
        /// web: requests per ab run.
        #[arg(long, default_value_t = 1000)]
        requests: u32,
        /// ab's timeout per request (web and download), seconds.
        #[arg(long, default_value_t = 30)]
        timeout_s: u32,
        /// download: concurrent clients, one ab run each (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "1,4")]
        download_concurrency: Vec<u32>,
        /// download: 1 MiB downloads per ab run.
        #[arg(long, default_value_t = 40)]
        downloads: u32,
        /// upload: concurrent clients, one run each (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "1,4")]
        upload_concurrency: Vec<u32>,
        /// upload: MiB each client streams into the guest's echo service.
        #[arg(long, default_value_t = 8)]
        upload_mib: u32,
        /// The disk workload's options (boxed: the enum's largest variant stays small).
        #[command(flatten)]
        disk: Box<BenchDiskArgs>,
        /// memory: the guest's dirtying rates, MiB/s (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "0,4,16,64")]
        memory_rates: Vec<u32>,
        /// memory: the measured window at each rate, seconds.
        #[arg(long, default_value_t = 20)]
        memory_seconds: u32,
        /// memory: the periodic checkpoint during the memory workload, ms.
        #[arg(long, default_value_t = 1000)]
        memory_period_ms: u32,
        /// Guest RAM, MiB, on every setup (the memory workload's 64 MiB/s needs 168 or more).
        #[arg(long, default_value_t = 192)]
        guest_mib: u32,
        /// The periodic checkpoint of the COLO setups, ms (QEMU's own default is 20000; colo's
        /// daemons ask for the checkpoints they need in between).
        #[arg(long, default_value_t = 5000)]
        period_ms: u32,
        /// colo-proxyd's equivalence rules on the colo setup (`;`-separated, as
        /// COLO_PROXYD_EQUIVALENT; docs/equivalence.md), as an operator of a web server sets
        /// them; `none` compares every byte.
        #[arg(long, default_value = "tcp:80 header Date")]
        equivalent: String,
        /// The setups to run, in order (comma-separated: native, twin, stock, colo).
        #[arg(
            long,
            value_delimiter = ',',
            value_enum,
            default_value = "native,twin,stock,colo"
        )]
        setups: Vec<BenchSetup>,
        /// Record each COLO VM's NIC traffic in `primary-nic.pcap` and `secondary-nic.pcap`
        /// in the setup's run directory (QEMU's filter-dump; it slows the pair, so the figures
        /// of such a run are for diagnosis, not comparison).
        #[arg(long)]
        capture: bool,
    },
    /// The life of a protected VM on colo's daemons (which it always uses): the secondary's
    /// host dies and the primary serves alone (`failover --survivor primary`); the host comes
    /// back and `qmp-driver reprotect` brings it into COLO online while clients keep a
    /// request loop and an echo connection going; then the primary dies mid-download and the
    /// new secondary takes over. Reports the re-protect's phases, its pause and longest client
    /// stall, and what the second failover kept (download, echo, disk records).
    Reprotect {
        /// Losses and online re-protects of the secondary before the primary is killed.
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// Let the HA agents (`qmp-driver agent` on a real corosync cluster with a quorum
        /// device on a witness host) decide both failovers instead of `qmp-driver failover`;
        /// one round.
        #[arg(long, conflicts_with = "rounds")]
        ha_agents: bool,
        /// The primary's host dies first (A → B → A → B): the secondary takes over, the VM
        /// moves home with `qmp-driver failback`'s sequence, the secondary is re-protected,
        /// and the primary's host dies again; one round, `qmp-driver failover` deciding.
        #[arg(long, conflicts_with_all = ["rounds", "ha_agents"])]
        primary_first: bool,
    },
    /// A subscriber that acknowledges late, then one that never does.
    RelayBarrier {
        /// Checkpoints per phase.
        #[arg(long, default_value_t = 8)]
        checkpoints: usize,
        /// The late subscriber's delay, ms.
        #[arg(long, default_value_t = 50)]
        ack_delay_ms: u64,
        /// The relay's bound on an acknowledgement, ms.
        #[arg(long, default_value_t = 1000)]
        ack_timeout_ms: u64,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Disk {
    Replication,
    ColoBlockd,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Network {
    ColoCompare,
    ColoProxyd,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum BenchSetup {
    Native,
    Twin,
    Stock,
    Colo,
}

/// The disk workload's options of `bench`.
#[derive(Debug, Clone, clap::Args)]
struct BenchDiskArgs {
    /// disk: offered rates, 4 KiB synchronous writes per second (comma-separated, each at
    /// most 1024).
    #[arg(long, value_delimiter = ',', default_value = "0,16,64,256")]
    disk_rates: Vec<u32>,
    /// disk: the measured window at each rate, seconds.
    #[arg(long, default_value_t = 15)]
    disk_seconds: u32,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum BenchWorkload {
    Web,
    Download,
    Upload,
    Disk,
    Memory,
}

impl From<BenchWorkload> for workloads::Workload {
    fn from(w: BenchWorkload) -> Self {
        match w {
            BenchWorkload::Web => workloads::Workload::Web,
            BenchWorkload::Download => workloads::Workload::Download,
            BenchWorkload::Upload => workloads::Workload::Upload,
            BenchWorkload::Disk => workloads::Workload::Disk,
            BenchWorkload::Memory => workloads::Workload::Memory,
        }
    }
}

impl From<BenchSetup> for workloads::Setup {
    fn from(s: BenchSetup) -> Self {
        match s {
            BenchSetup::Native => workloads::Setup::Native,
            BenchSetup::Twin => workloads::Setup::Twin,
            BenchSetup::Stock => workloads::Setup::Stock,
            BenchSetup::Colo => workloads::Setup::Colo,
        }
    }
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

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Some(Command::Bench { equivalent, .. }) = &cli.command {
        // colo-proxyd reads its rules from the environment the bed's daemons inherit. Set
        // here, before the runtime's threads exist: no other thread can read the environment
        // while it changes.
        // SAFETY: single-threaded at this point (the runtime is built below).
        unsafe {
            if equivalent == "none" {
                std::env::remove_var("COLO_PROXYD_EQUIVALENT");
            } else {
                std::env::set_var("COLO_PROXYD_EQUIVALENT", equivalent);
            }
        }
    }
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(run_command_line(cli)),
        Err(e) => {
            eprintln!("colo-testbed: cannot start the async runtime: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run_command_line(mut cli: Cli) -> ExitCode {
    let command = cli.command.take().unwrap_or(Command::Life);
    // colo's own daemons by default; the relay scenarios compare pairs with and without the
    // relay, which only QEMU's own stack can run without it.
    let stock = matches!(
        command,
        Command::RelayEpochs { .. } | Command::RelayBarrier { .. }
    );
    let cfg = PairConfig {
        checkpoint_delay_ms: cli.checkpoint_delay_ms,
        guest_load_mib_s: cli.guest_load,
        disk: match cli.disk {
            Some(Disk::Replication) => DiskBackend::Replication,
            Some(Disk::ColoBlockd) => DiskBackend::ColoBlockd,
            None if stock => DiskBackend::Replication,
            None => DiskBackend::ColoBlockd,
        },
        network: match cli.network {
            Some(Network::ColoCompare) => NetworkBackend::ColoCompare,
            Some(Network::ColoProxyd) => NetworkBackend::ColoProxyd,
            None if stock => NetworkBackend::ColoCompare,
            None => NetworkBackend::ColoProxyd,
        },
        ..PairConfig::default()
    };
    // Ctrl-C or SIGTERM drops the scenario, and with it the pair: QEMUs killed by PID, relay
    // stopped, namespaces deleted. Without this an interrupted run leaves them behind.
    let outcome = tokio::select! {
        outcome = run(command, &cli, cfg) => outcome,
        signal = colo_daemon::run::wait_for_signal() => {
            eprintln!("interrupted ({signal}): the pair was torn down");
            return ExitCode::from(130);
        }
    };
    report(outcome, cli.json)
}

/// `cfg` on colo's daemons (colo-blockd, colo-proxyd, the relay); refuses QEMU's own stack,
/// which the online re-protect does not take.
fn colo_daemons(cli: &Cli, cfg: PairConfig) -> anyhow::Result<PairConfig> {
    if matches!(cli.disk, Some(Disk::Replication))
        || matches!(cli.network, Some(Network::ColoCompare))
    {
        anyhow::bail!(
            "this scenario runs on colo's daemons only (online re-protect is not implemented \
             for QEMU's replication and colo-compare); drop --disk/--network, or compare the \
             stacks with `demo` or `failover`"
        );
    }
    Ok(PairConfig {
        disk: DiskBackend::ColoBlockd,
        network: NetworkBackend::ColoProxyd,
        ..cfg
    })
}

/// A re-protect run as the report: its summary, its figures, and what it failed to keep.
fn reprotect_outcome(run: anyhow::Result<reprotect::ReprotectRun>) -> anyhow::Result<Outcome> {
    run.map(|run| {
        let problems = run.problems();
        let mut text = format!("{}\n\n{}", run.summary(), run.render());
        for p in &problems {
            text.push_str(&format!("\nFAILED: {p}"));
        }
        Outcome {
            text,
            json: serde_json::json!({ "run": run, "problems": problems }),
            passed: problems.is_empty(),
            run_dir: Some(run.run_dir.clone()),
        }
    })
}

async fn run(command: Command, cli: &Cli, cfg: PairConfig) -> anyhow::Result<Outcome> {
    match command {
        Command::Demo => {
            eprintln!(
                "demo: `qmp-driver start` brings the pair into COLO through the relay; the \
                 primary is killed mid-download and `qmp-driver failover` hands over"
            );
            let plan = FailoverPlan {
                via_cli: true,
                ..FailoverPlan::default()
            };
            failover_outcome(scenario::failover(&cli.tag, cfg, plan).await)
        }
        Command::Soak { checkpoints } => failover_outcome(
            scenario::soak(&cli.tag, cfg, checkpoints, Duration::from_millis(300)).await,
        ),
        Command::Failover { kill, cli: via_cli } => {
            let kill = match kill {
                Victim::Primary => Role::Primary,
                Victim::Secondary => Role::Secondary,
            };
            let plan = FailoverPlan {
                kill,
                via_cli,
                ..FailoverPlan::default()
            };
            failover_outcome(scenario::failover(&cli.tag, cfg, plan).await)
        }
        Command::Life => {
            eprintln!(
                "life: the pair on colo's daemons with the HA agents; the primary's host dies, \
                 the VM moves home and is re-protected online, then the primary's host dies \
                 again"
            );
            reprotect_outcome(
                reprotect::life_with_ha_agents(&cli.tag, colo_daemons(cli, cfg)?).await,
            )
        }
        Command::Reprotect {
            rounds,
            ha_agents,
            primary_first,
        } => {
            let cfg = colo_daemons(cli, cfg)?;
            reprotect_outcome(if ha_agents {
                reprotect::with_ha_agents(&cli.tag, cfg).await
            } else if primary_first {
                reprotect::after_losing_the_primary(&cli.tag, cfg).await
            } else {
                reprotect::after_losing_the_secondary(&cli.tag, cfg, Interrupt::None, rounds.max(1))
                    .await
            })
        }
        Command::RelayEpochs { checkpoints } => barrier::epochs(&cli.tag, cfg, checkpoints)
            .await
            .map(|r| Outcome {
                text: r.render(),
                json: serde_json::to_value(&r).unwrap_or_default(),
                passed: r.violations.is_empty() && r.closed >= checkpoints,
                run_dir: None,
            }),
        Command::CompareAb {
            requests,
            spacing_ms,
            blobs,
        } => {
            let workload = compare_ab::Workload {
                requests,
                spacing: Duration::from_millis(spacing_ms),
                blobs,
            };
            compare_ab::run(&cli.tag, cfg, workload)
                .await
                .map(|r| Outcome {
                    passed: r.colo_compare.failures.is_empty() && r.colo_proxyd.failures.is_empty(),
                    text: r.render(),
                    json: serde_json::to_value(&r).unwrap_or_default(),
                    run_dir: None,
                })
        }
        Command::Bench {
            workloads: selected,
            concurrency,
            requests,
            timeout_s,
            download_concurrency,
            downloads,
            upload_concurrency,
            upload_mib,
            disk,
            memory_rates,
            memory_seconds,
            memory_period_ms,
            guest_mib,
            period_ms,
            equivalent,
            setups,
            capture,
        } => {
            let config = workloads::SuiteConfig {
                setups: setups.into_iter().map(Into::into).collect(),
                workloads: selected.into_iter().map(Into::into).collect(),
                web: workloads::WebConfig {
                    concurrency,
                    requests,
                    timeout_s,
                },
                download: workloads::DownloadConfig {
                    concurrency: download_concurrency,
                    downloads,
                    timeout_s,
                },
                upload: workloads::UploadConfig {
                    concurrency: upload_concurrency,
                    mib_per_client: upload_mib,
                    timeout_s: timeout_s.max(60),
                },
                disk: workloads::DiskConfig {
                    rates: disk.disk_rates,
                    seconds: disk.disk_seconds,
                },
                memory: workloads::MemoryConfig {
                    rates: memory_rates,
                    seconds: memory_seconds,
                    period_ms: memory_period_ms,
                },
                equivalent,
                pair: PairConfig {
                    checkpoint_delay_ms: period_ms,
                    memory_mib: guest_mib,
                    capture,
                    ..cfg
                },
            };
            workloads::suite(&cli.tag, config).await.map(|r| Outcome {
                passed: r.all_ran(),
                text: r.render_markdown(),
                json: serde_json::to_value(&r).unwrap_or_default(),
                run_dir: Some(r.run_dir.clone()),
            })
        }
        Command::RelayBarrier {
            checkpoints,
            ack_delay_ms,
            ack_timeout_ms,
        } => {
            let cfg = PairConfig {
                relay_ack_timeout_ms: ack_timeout_ms,
                ..cfg
            };
            let delay = Duration::from_millis(ack_delay_ms);
            barrier::barrier(&cli.tag, cfg, checkpoints, delay)
                .await
                .map(|r| {
                    let held = |v: &[f64]| v.iter().all(|ms| *ms >= ack_delay_ms as f64);
                    Outcome {
                        passed: held(&r.slow_primary_ms)
                            && held(&r.slow_secondary_ms)
                            && r.colo_exit_reason.as_deref() == Some("barrier-timeout")
                            && r.served_after > 0,
                        text: r.render(),
                        json: serde_json::to_value(&r).unwrap_or_default(),
                        run_dir: None,
                    }
                })
        }
    }
}

/// Prints the outcome and maps it to the exit code.
fn report(outcome: anyhow::Result<Outcome>, json: bool) -> ExitCode {
    match outcome {
        Ok(outcome) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&outcome.json).unwrap_or_default()
                );
            } else {
                print!("{}", outcome.text);
            }
            if outcome.passed {
                ExitCode::SUCCESS
            } else {
                match outcome.run_dir {
                    Some(dir) => eprintln!(
                        "FAILED: see the report above and the logs in {}",
                        dir.display()
                    ),
                    None => eprintln!("FAILED: see the report above"),
                }
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// A finished scenario, whichever it was.
struct Outcome {
    text: String,
    json: serde_json::Value,
    passed: bool,
    run_dir: Option<std::path::PathBuf>,
}

fn failover_outcome(result: anyhow::Result<Report>) -> anyhow::Result<Outcome> {
    result.map(|report| Outcome {
        text: report.render(),
        json: serde_json::to_value(&report).unwrap_or_default(),
        passed: passed(&report),
        run_dir: Some(report.run_dir.clone()),
    })
}
