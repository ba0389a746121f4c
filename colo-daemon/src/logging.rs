//! Structured logs on stderr, the same for every colo binary.
//!
//! Level: `RUST_LOG` (e.g. `info`, `colo_proxyd=debug`), else the binary's default. Format:
//! `--log-format json` (or `COLO_LOG_FORMAT=json`) writes one JSON object per line (with the span fields: the
//! connection's peer, the epoch), for journald or a log collector; `text` (the default) is for
//! people, coloured only on a terminal so files and journals stay greppable.

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

/// The environment variable that selects the [`LogFormat`].
pub const LOG_FORMAT_ENV: &str = "COLO_LOG_FORMAT";

impl LogFormat {
    /// `COLO_LOG_FORMAT` (`text` or `json`); an unknown value is reported and ignored.
    pub fn from_env() -> LogFormat {
        match std::env::var(LOG_FORMAT_ENV).as_deref() {
            Ok("json") => LogFormat::Json,
            Ok("text") | Err(_) => LogFormat::Text,
            Ok(other) => {
                eprintln!("{LOG_FORMAT_ENV}={other:?} is neither text nor json; writing text");
                LogFormat::Text
            }
        }
    }
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
