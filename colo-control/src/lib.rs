//! The control protocol between the checkpoint-barrier relay
//! (`qmp-driver relay`) and the processes that must follow COLO's epochs:
//! colo-blockd and colo-proxyd subscribe to events, operator tools ask for
//! status and announce decisions.
//!
//! Newline-delimited JSON over a Unix stream socket; the full description is
//! `docs/control-protocol.md`.
//!
//! * [`protocol`]: the messages (pure, no I/O).
//! * [`hub`]: the relay side, [`hub::ControlHub`]: fan-out of events and the
//!   synchronous checkpoint barrier.
//! * [`client`]: the daemon side ([`client::Subscriber`]) and operator side
//!   ([`client::Operator`], [`client::query_status`], ...).
//!
//! A daemon taking part in barriers:
//!
//! ```no_run
//! use colo_control::client::Subscriber;
//! use colo_control::protocol::EventKind;
//!
//! # async fn demo() -> colo_control::client::Result<()> {
//! let mut sub = Subscriber::connect("/run/colo/relay.sock", "colo-blockd", true).await?;
//! while let Some(ev) = sub.next_event().await? {
//!     match ev.event {
//!         EventKind::SvmEpochClosed => { /* hold new SVM writes */ }
//!         EventKind::CheckpointAdopted => { /* commit the PVM log, drop the SVM overlay */ }
//!         _ => {}
//!     }
//!     if ev.sync {
//!         sub.ack(ev.seq).await?;
//!     }
//! }
//! // The relay went away.
//! # Ok(())
//! # }
//! ```

pub mod client;
pub mod hub;
pub mod protocol;

pub use client::{ControlError, Operator, Subscriber};
pub use hub::{BarrierError, BarrierReport, ControlHub};
pub use protocol::{Event, EventBody, EventKind, PROTOCOL_VERSION, RelayState, RelayStatus};
