//! The HA agent's decisions (issue 11; design in docs/ha.md).
//!
//! Two agents, one per host of a protected VM, share a corosync CPG group and see its
//! messages in one total order. [`Arbiter`] turns what an agent observes (its own VM, the
//! group's membership, quorum, the delivered messages) into [`Action`]s: messages to send,
//! taking over, stopping its own VM. It does no I/O, so the rule that matters most (never two
//! primaries) is tested here without a cluster. `link` (feature `corosync`, on by default)
//! connects an agent to corosync and feeds the arbiter; the agent's loop is not built yet.

pub mod arbiter;
#[cfg(feature = "corosync")]
pub mod link;
pub mod message;

pub use arbiter::{Action, Arbiter, Input, LeaveCause, NodeId};
pub use message::{DecodeError, Message, VmState};
