//! The control protocol between the checkpoint-barrier relay
//! (`qmp-driver relay`) and the processes that must follow COLO's epochs:
//! colo-blockd and colo-proxyd subscribe to events, operator tools ask for
//! status and announce decisions.
//!
//! Newline-delimited JSON over a Unix stream socket on the relay's host, or
//! over TCP from the other host of the pair; the full description is
//! `docs/control-protocol.md`.
//!
//! * [`protocol`]: the messages (pure, no I/O).
//! * [`hub`]: the relay side, [`hub::ControlHub`]: fan-out of events and the
//!   synchronous checkpoint barrier, on any number of [`ControlListener`]s.
//! * [`client`]: the daemon side ([`client::Subscriber`]) and operator side
//!   ([`client::Operator`], [`client::query_status`], ...).
//!
//! A daemon taking part in barriers:
//!
//! ```no_run
//! use colo_types::Address;
//! use colo_control::client::Subscriber;
//! use colo_control::protocol::EventKind;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! // `unix:/run/colo/relay.sock` (or that path) on the relay's host.
//! let relay: Address = "tcp:192.168.77.2:9990".parse()?;
//! let mut sub = Subscriber::connect(relay, "colo-blockd", true).await?;
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
pub mod follow;
pub mod hub;
pub mod protocol;
mod transport;

pub use client::{ControlError, Operator, Subscriber};
pub use hub::{
    BarrierError, BarrierReport, ControlHub, ControlListener, HubOptions, OperatorPolicy,
};
pub use protocol::{Event, EventBody, EventKind, PROTOCOL_VERSION, RelayState, RelayStatus};
pub use transport::{
    OWNER_AND_GROUP, OWNER_ONLY, Peer, TCP_DEAD_PEER, bind_private_unix, tune_tcp,
};
