//! `raw` and `events`: one QMP socket, no config. Their exit codes are the
//! ones they had before the pair commands existed (scripts rely on them).

use anyhow::Context;
use clap::Args;
use colo_qmp::{ConnectOptions, QmpClient, QmpError};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Shown in `raw --help` and `events --help`.
pub const LOWLEVEL_EXIT_CODES: &str = "\
Exit codes (kept from the first qmp-driver for scripts):
  0  success
  1  QEMU returned an error
  2  connection or protocol failure, or bad command-line input";

/// `raw`.
#[derive(Args, Debug)]
pub struct RawArgs {
    /// QMP Unix socket: PATH, or unix:PATH as the config file writes it.
    #[arg(long, value_parser = unix_socket_path)]
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
}

/// `events`.
#[derive(Args, Debug)]
pub struct EventsArgs {
    /// QMP Unix socket: PATH, or unix:PATH as the config file writes it.
    #[arg(long, value_parser = unix_socket_path)]
    socket: PathBuf,
}

/// `--socket`: a path, with or without the `unix:` prefix of the config file's addresses.
fn unix_socket_path(value: &str) -> Result<PathBuf, String> {
    if value.starts_with("tcp:") {
        return Err("only Unix sockets here (PATH or unix:PATH)".into());
    }
    let path = value.strip_prefix("unix:").unwrap_or(value);
    if path.is_empty() {
        return Err("empty socket path".into());
    }
    Ok(PathBuf::from(path))
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

/// Runs one QMP command and prints its `return` value.
pub async fn raw(a: RawArgs) -> ExitCode {
    let arguments = match parse_args(a.args.as_deref()) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("qmp-driver: {e:#}");
            return ExitCode::from(2);
        }
    };
    let Ok(timeout) = Duration::try_from_secs_f64(a.timeout) else {
        eprintln!("qmp-driver: invalid --timeout");
        return ExitCode::from(2);
    };
    let opts = ConnectOptions {
        command_timeout: timeout,
        ..ConnectOptions::default()
    };
    let client = match QmpClient::connect_unix(&a.socket, opts).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("qmp-driver: {e}");
            return exit_code(&e);
        }
    };
    let result = if a.oob {
        client.execute_oob_raw(&a.command, arguments).await
    } else {
        client.execute_raw(&a.command, arguments).await
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

/// Prints every event as a JSON line until QEMU closes the connection.
pub async fn events(a: EventsArgs) -> ExitCode {
    // Subscribed during the handshake so nothing QEMU sends right after it
    // is missed; `_client` keeps the connection open.
    let (_client, mut events) =
        match QmpClient::connect_unix_with_events(&a.socket, ConnectOptions::default()).await {
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
