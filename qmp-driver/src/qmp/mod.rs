//! QMP client: connection handling, command execution and event delivery.
//!
//! One connection is served by two background tasks: a reader that owns the
//! read half and routes every line (replies by `id`, events to every
//! subscriber), and a writer that owns the write half so a caller that gives
//! up (timeout, dropped future) can never leave half a command on the wire.

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
