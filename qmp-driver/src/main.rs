//! Minimal command-line front end to the QMP client, for poking at a QEMU by
//! hand and for shell scripts.
//!
//! Exit codes: 0 success, 1 QEMU returned an error, 2 connection or
//! protocol failure (including bad command-line input).

use anyhow::Context;
use clap::{Parser, Subcommand};
use qmp_driver::qmp::{ConnectOptions, QmpClient, QmpError};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "qmp-driver", about = "Talk QMP to a QEMU instance")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run one QMP command and print its "return" value as JSON.
    Raw {
        /// QMP Unix socket.
        #[arg(long)]
        socket: PathBuf,
        /// Send with exec-oob instead of execute.
        #[arg(long)]
        oob: bool,
        /// Command timeout in seconds.
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
        /// QMP command name, e.g. query-status.
        command: String,
        /// Arguments as a JSON object.
        args: Option<String>,
    },
    /// Print every event as one JSON line until QEMU closes the connection
    /// (exit 0) or the process is interrupted.
    Events {
        /// QMP Unix socket.
        #[arg(long)]
        socket: PathBuf,
    },
}

fn exit_code(e: &QmpError) -> ExitCode {
    match e {
        QmpError::Qemu { .. } => ExitCode::from(1),
        _ => ExitCode::from(2),
    }
}

fn parse_args(raw: Option<&str>) -> anyhow::Result<Option<serde_json::Value>> {
    raw.map(|s| serde_json::from_str(s).context("JSON-ARGS is not valid JSON"))
        .transpose()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Cmd::Raw {
            socket,
            oob,
            timeout,
            command,
            args,
        } => {
            let arguments = match parse_args(args.as_deref()) {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("qmp-driver: {e:#}");
                    return ExitCode::from(2);
                }
            };
            let Ok(timeout) = Duration::try_from_secs_f64(timeout) else {
                eprintln!("qmp-driver: invalid --timeout");
                return ExitCode::from(2);
            };
            let opts = ConnectOptions {
                command_timeout: timeout,
                ..ConnectOptions::default()
            };
            let client = match QmpClient::connect_unix(&socket, opts).await {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("qmp-driver: {e}");
                    return exit_code(&e);
                }
            };
            let result = if oob {
                client.execute_oob_raw(&command, arguments).await
            } else {
                client.execute_raw(&command, arguments).await
            };
            match result {
                Ok(value) => {
                    println!("{value}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("qmp-driver: {e}");
                    exit_code(&e)
                }
            }
        }
        Cmd::Events { socket } => {
            // Subscribed during the handshake so nothing QEMU sends right
            // after it is missed; `_client` keeps the connection open.
            let (_client, mut events) =
                match QmpClient::connect_unix_with_events(&socket, ConnectOptions::default()).await
                {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("qmp-driver: {e}");
                        return exit_code(&e);
                    }
                };
            let mut stdout = std::io::stdout().lock();
            while let Some(event) = events.recv().await {
                let line = match serde_json::to_string(&event) {
                    Ok(l) => l,
                    Err(e) => {
                        eprintln!("qmp-driver: cannot encode event: {e}");
                        return ExitCode::from(2);
                    }
                };
                // A closed stdout (e.g. `| head`) ends the program quietly.
                if writeln!(stdout, "{line}")
                    .and_then(|()| stdout.flush())
                    .is_err()
                {
                    return ExitCode::SUCCESS;
                }
            }
            ExitCode::SUCCESS
        }
    }
}
