//! Async client for the QEMU Machine Protocol (QMP).
//!
//! Written in-house rather than using the `qapi` crate because that crate
//! decodes every incoming line into a closed enum and tears the connection
//! down on any event it does not know. A COLO pair emits events that vary
//! between QEMU versions and patch sets, so here events stay generic
//! ([`Event`] carries the name and raw JSON data) and nothing the peer
//! sends, short of an oversized line, ends the connection.
//!
//! Start with [`QmpClient`]:
//!
//! ```no_run
//! use colo_qmp::{ConnectOptions, QmpClient};
//! use std::time::Duration;
//!
//! # async fn demo() -> colo_qmp::Result<()> {
//! let qmp = QmpClient::connect_unix("/run/colo/primary.qmp", ConnectOptions::default()).await?;
//! // Subscribe before acting, so the event cannot slip past.
//! let mut events = qmp.subscribe();
//! qmp.cont().await?;
//! let resume = events.wait_for("RESUME", Duration::from_secs(5)).await?;
//! println!("resumed at {} us", resume.timestamp.as_micros());
//! # Ok(())
//! # }
//! ```
//!
//! One connection is served by two background tasks: a reader that owns the
//! read half and routes every line (replies by `id`, events to every
//! subscriber), and a writer that owns the write half so a caller that gives
//! up (timeout, dropped future) can never leave half a command on the wire.

#![warn(missing_docs)]

mod client;
mod codec;
mod commands;
mod error;
mod events;
mod options;
mod schema;
mod state;
mod types;
mod wire;
mod writer;

mod reader;

pub use client::QmpClient;
pub use error::{QmpError, Result};
pub use events::EventStream;
pub use options::ConnectOptions;
pub use schema::{AnnounceParameters, ColoStatus, MigrationInfo, StatusInfo};
pub use types::{Event, Greeting, QemuVersion, Timestamp};
