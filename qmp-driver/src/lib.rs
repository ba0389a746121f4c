//! Async client for the QEMU Machine Protocol (QMP).
//!
//! Written in-house rather than using the `qapi` crate because that crate
//! decodes every incoming line into a closed enum and tears the connection
//! down on any event it does not know. A COLO pair emits events that vary
//! between QEMU versions and patch sets, so here events stay generic
//! ([`qmp::Event`] carries the name and raw JSON data) and nothing the peer
//! sends, short of an oversized line, ends the connection.
//!
//! Start with [`qmp::QmpClient`]:
//!
//! ```no_run
//! use qmp_driver::qmp::{ConnectOptions, QmpClient};
//! use std::time::Duration;
//!
//! # async fn demo() -> qmp_driver::qmp::Result<()> {
//! let qmp = QmpClient::connect_unix("/run/colo/primary.qmp", ConnectOptions::default()).await?;
//! // Subscribe before acting, so the event cannot slip past.
//! let mut events = qmp.subscribe();
//! qmp.cont().await?;
//! let resume = events.wait_for("RESUME", Duration::from_secs(5)).await?;
//! println!("resumed at {} us", resume.timestamp.as_micros());
//! # Ok(())
//! # }
//! ```

pub mod config;
pub mod daemon_args;
pub mod pair;
pub mod qemu_args;
pub mod qmp;
pub mod relay;
