//! The COLO QMP sequences of the stock pair, as a library: prepare the
//! secondary, start COLO, force a checkpoint, fail over either way, stop
//! protection, and report status.
//!
//! Every operation works on [`QmpClient`]s the caller connected (see
//! [`connect`]) plus the validated [`PairConfig`], checks its preconditions
//! before it changes anything, is idempotent where QEMU allows (an NBD server
//! already started, an export already added, a replication child already
//! present, x-colo already on, a failover already done), times every QMP
//! step and returns them in a report ([`Step`]), and fails with a
//! [`PairError`] that says what failed on which side and what to do.
//!
//! Long operations report progress through a callback (`&mut dyn
//! FnMut(Progress)`); pass `&mut |_| {}` to ignore it.
//!
//! ```no_run
//! use qmp_driver::config::PairConfig;
//! use colo_types::Role;
//! use qmp_driver::pair::{self, FailoverOptions};
//! use colo_qmp::ConnectOptions;
//!
//! # async fn demo(cfg: PairConfig) -> Result<(), qmp_driver::pair::PairError> {
//! let qmp = pair::connect(&cfg, Role::Secondary, ConnectOptions::default()).await?;
//! let report = pair::failover_to_secondary(&qmp, &cfg, FailoverOptions::default(), &mut |p| {
//!     eprintln!("{p}")
//! })
//! .await?;
//! println!("took over in {:.1} ms", report.total_ms);
//! # Ok(())
//! # }
//! ```

mod checkpoint;
mod copy;
mod failback;
mod failover;
mod relay_link;
mod reprotect;
mod socket_modes;
mod start;
mod status;
mod steps;
mod watch;

use crate::config::PairConfig;
use colo_qmp::{ConnectOptions, QmpClient, QmpError};
use colo_types::Role;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

pub use checkpoint::{CheckpointOptions, CheckpointReport, RelayEpoch, checkpoint};
pub use copy::{COPY_JOB, CopyOptions, CopyReport, DEFAULT_COPY_EXPORT, copy_disk, default_target};
pub use failback::{
    FailbackOptions, FailbackReport, default_failback_incoming, default_failback_target, failback,
};
pub use failover::{
    FailoverOptions, FailoverReport, StopOptions, StopReport, failover_to_primary,
    failover_to_secondary, stop_protection,
};
pub use relay_link::RelayStatus;
pub use reprotect::{
    DEFAULT_REPROTECT_EXPORT, Phase, REPROTECT_JOB, ReprotectOptions, ReprotectReport,
    default_reprotect_target, reprotect, undo_reprotect,
};
pub use socket_modes::{OpenSocket, open_sockets};
pub use start::{PrepareReport, StartOptions, StartReport, prepare_secondary, start};
pub use status::{
    AgentReport, PairStatus, RelayReport, SideStatus, local_agents, relay_status, side_status,
    status,
};
pub use watch::{Trigger, WatchEvent, WatchOptions, watch_primary};
pub(crate) use watch::{checkpoint_stall, yank_peer_links};

/// What went wrong, on which side, and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    /// The QMP socket of a side could not be connected (or the handshake
    /// timed out).
    #[error(
        "cannot reach the {side} QEMU at {address}: {source}. Check that it runs and that \
         `{side}.qmp` in the config names its QMP socket"
    )]
    Unreachable {
        /// The side.
        side: Role,
        /// Its QMP address.
        address: String,
        /// The connection error.
        source: QmpError,
    },
    /// A QMP command failed: QEMU refused it ([`QmpError::Qemu`]) or the
    /// connection failed or timed out while it ran.
    #[error("{side} QEMU: `{step}` failed: {source}")]
    Qmp {
        /// The side.
        side: Role,
        /// The step, e.g. `object-del comp0`.
        step: String,
        /// The error.
        source: QmpError,
    },
    /// The side is not in a state where the operation makes sense; nothing
    /// was changed.
    #[error("{side}: {what}. {hint}")]
    Precondition {
        /// The side whose state is wrong.
        side: Role,
        /// What is wrong.
        what: String,
        /// What to do.
        hint: String,
    },
    /// The operation started but did not finish (e.g. COLO was not entered
    /// in time, the VM did not run after a failover, a hook failed).
    #[error("{side}: {what}. {hint}")]
    Incomplete {
        /// The side.
        side: Role,
        /// What did not happen.
        what: String,
        /// What to do.
        hint: String,
    },
}

impl PairError {
    /// The side the error concerns.
    pub fn side(&self) -> Role {
        match self {
            PairError::Unreachable { side, .. }
            | PairError::Qmp { side, .. }
            | PairError::Precondition { side, .. }
            | PairError::Incomplete { side, .. } => *side,
        }
    }

    /// True when QEMU itself refused a command (as opposed to a connection
    /// failure or timeout).
    pub fn is_qemu_refusal(&self) -> bool {
        matches!(
            self,
            PairError::Qmp {
                source: QmpError::Qemu { .. } | QmpError::Decode { .. },
                ..
            }
        )
    }

    pub(crate) fn precondition(
        side: Role,
        what: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        PairError::Precondition {
            side,
            what: what.into(),
            hint: hint.into(),
        }
    }

    pub(crate) fn incomplete(side: Role, what: impl Into<String>, hint: impl Into<String>) -> Self {
        PairError::Incomplete {
            side,
            what: what.into(),
            hint: hint.into(),
        }
    }
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Done now.
    Done,
    /// Not needed: already in the wanted state (see [`Step::detail`]).
    Skipped,
    /// Failed; see [`Step::detail`]. Only best-effort steps (the yank of a
    /// dead peer's stream, relay notifications) fail without failing the
    /// operation.
    Failed,
}

/// One step of an operation and how long it took (also read back from the `--json`
/// output of the CLI).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// Which VM (or host) the step acted on.
    pub side: Role,
    /// What was done, e.g. `object-del comp0`.
    pub what: String,
    /// How it ended.
    pub outcome: Outcome,
    /// Its duration in milliseconds.
    pub ms: f64,
    /// Why it was skipped, or the error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} ({:.1} ms)", self.side, self.what, self.ms)?;
        match (self.outcome, &self.detail) {
            (Outcome::Done, _) => Ok(()),
            (Outcome::Skipped, Some(d)) => write!(f, " skipped: {d}"),
            (Outcome::Skipped, None) => write!(f, " skipped"),
            (Outcome::Failed, Some(d)) => write!(f, " failed: {d}"),
            (Outcome::Failed, None) => write!(f, " failed"),
        }
    }
}

/// Progress of a long operation, for humans (each has a one-line
/// `Display`).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Progress {
    /// A step finished.
    Step(Step),
    /// Waiting for something, e.g. the secondary's redirectors to connect.
    Waiting(String),
    /// The secondary listens for the migration with x-colo on and its disk
    /// exported.
    SecondaryPrepared,
    /// The primary's quorum has its replication (NBD) child.
    ReplicationChildAdded,
    /// The first (full) migration is under way.
    Migrating {
        /// Share of RAM sent, 0-100.
        percent: u8,
    },
    /// Both VMs run in COLO.
    EnteredColo {
        /// Time from `migrate` to both sides running in COLO.
        after: Duration,
    },
}

impl fmt::Display for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Progress::Step(s) => s.fmt(f),
            Progress::Waiting(what) => write!(f, "waiting for {what}"),
            Progress::SecondaryPrepared => f.write_str("secondary prepared"),
            Progress::ReplicationChildAdded => f.write_str("replication child added"),
            Progress::Migrating { percent } => write!(f, "migrating… {percent}%"),
            Progress::EnteredColo { after } => {
                write!(f, "entered COLO in {:.1} s", after.as_secs_f64())
            }
        }
    }
}

/// The progress callback every long operation takes.
pub type ProgressFn<'a> = &'a mut (dyn FnMut(Progress) + Send);

/// A hook run during a failover or stop, after the survivor left COLO.
pub enum Hook<'a> {
    /// Run the shell command the config gives for the survivor
    /// (`failover.secondary_takeover_hook` / `failover.primary_continue_hook`),
    /// if any, with `sh -c` on this host.
    FromConfig,
    /// Run nothing.
    Skip,
    /// Run this future instead (the test bed bridges its tap with one). Its
    /// `Err` text fails the operation with [`PairError::Incomplete`].
    Custom {
        /// Shown in the step list.
        what: String,
        /// The work.
        run: Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>,
    },
}

impl fmt::Debug for Hook<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hook::FromConfig => f.write_str("Hook::FromConfig"),
            Hook::Skip => f.write_str("Hook::Skip"),
            Hook::Custom { what, .. } => write!(f, "Hook::Custom({what:?})"),
        }
    }
}

/// Connects to the QMP socket of `side` as the config gives it.
pub async fn connect(
    cfg: &PairConfig,
    side: Role,
    opts: ConnectOptions,
) -> Result<QmpClient, PairError> {
    let ep = &cfg.host(side).qmp;
    QmpClient::connect_to(ep, opts)
        .await
        .map_err(|source| PairError::Unreachable {
            side,
            address: ep.to_string(),
            source,
        })
}
