//! The skeleton every colo daemon runs on (the relay, colo-proxyd, colo-blockd and whatever comes
//! next), so that each gets the same behaviour an operator learns once:
//!
//! * [`run`]: a multi-threaded runtime, SIGINT/SIGTERM turned into a graceful shutdown
//!   (a [`CancellationToken`](tokio_util::sync::CancellationToken)), one [`Exit`] code type.
//! * [`logging`]: structured logs on stderr (text on a terminal, `--log-format json` or
//!   `COLO_LOG_FORMAT=json` for a journal or a collector), `RUST_LOG` levels; [`RateLimited`]
//!   keeps a per-packet or per-request warning from flooding them.
//! * [`socket`]: binding an [`Address`](colo_types::Address), removing only a *stale* Unix socket
//!   (never a live one, never another kind of file).
//! * [`metrics`]: the one metrics registry (prometheus-client's) and the one hardened
//!   `/metrics` responder (connection cap, path check, timeouts).
//! * [`checkpoint`]: the one checkpoint requester (coalesced, rate limited, checks that COLO
//!   runs, retried, every request with its reason).
//! * [`options`]: each option from its flag, else its environment variable, else the
//!   `--config` file, else its default; an invalid one named where it came from.

#![warn(missing_docs)]

pub mod checkpoint;
mod exit;
pub mod logging;
pub mod metrics;
pub mod options;
pub mod qmp_session;
mod rate_limit;
pub mod run;
pub mod socket;

pub use exit::{DAEMON_EXIT_CODES, Exit};
pub use rate_limit::RateLimited;
