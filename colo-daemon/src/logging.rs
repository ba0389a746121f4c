//! Structured logs on stderr, the same for every colo binary.
//!
//! Level: `RUST_LOG` (e.g. `info`, `colo_proxyd=debug`), else the binary's default. Format:
//! `--log-format json` (or `COLO_LOG_FORMAT=json`; every binary has the option) writes one JSON
//! object per line (with the span fields: the connection's peer, the epoch), for journald or a
//! log collector; `text` (the default) is for people, coloured only on a terminal so files and
//! journals stay greppable.

/// How log lines are written (`--log-format`, `COLO_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The environment variable that selects the [`LogFormat`]: the `env` of every binary's
/// `--log-format` (clap reads it; a flag beats it, and it beats the default, text).
pub const LOG_FORMAT_ENV: &str = "COLO_LOG_FORMAT";

/// `--log-format`, for a binary's command line (`#[command(flatten)]` on its top-level
/// parser): global, so it may stand after the subcommand too; clap reads `COLO_LOG_FORMAT`
/// when the flag is not given, and the format is text when neither is.
#[cfg(feature = "clap")]
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct LogOptions {
    /// Log format on stderr: text, or json for one JSON object per line. Its variable is
    /// COLO_LOG_FORMAT, as for every colo binary; it is not read from the --config file.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t = LogFormat::Text,
        env = LOG_FORMAT_ENV,
        value_name = "FORMAT"
    )]
    pub log_format: LogFormat,
}

/// Installs the global subscriber: `RUST_LOG`, else `default_level`, in `format`. Call once,
/// first thing in `main`.
pub fn init(default_level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_level.into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

#[cfg(all(test, feature = "clap"))]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        logging: LogOptions,
        #[command(subcommand)]
        command: Command,
    }

    #[derive(Debug, clap::Subcommand)]
    enum Command {
        Serve,
    }

    /// The flag is global, reads COLO_LOG_FORMAT when not given (the test cannot set the
    /// environment: see the binaries' tests) and defaults to text.
    #[test]
    fn log_format_is_a_global_flag_over_colo_log_format_over_text() {
        let cli = Cli::command();
        let arg = cli
            .get_arguments()
            .find(|a| a.get_long() == Some("log-format"))
            .unwrap();
        assert!(arg.is_global_set());
        assert_eq!(arg.get_env(), Some(std::ffi::OsStr::new(LOG_FORMAT_ENV)));
        assert_eq!(arg.get_default_values(), ["text"]);
        for argv in [
            ["cli", "--log-format", "json", "serve"],
            ["cli", "serve", "--log-format", "json"],
        ] {
            let parsed = Cli::try_parse_from(argv).unwrap();
            assert_eq!(parsed.logging.log_format, LogFormat::Json, "{argv:?}");
            assert!(matches!(parsed.command, Command::Serve));
        }
        assert!(Cli::try_parse_from(["cli", "--log-format", "yaml", "serve"]).is_err());
    }
}
