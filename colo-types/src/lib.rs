//! colo's shared vocabulary: the words every crate of the workspace uses for the same things,
//! defined once. No I/O here.
//!
//! * [`Address`]: a Unix-socket or TCP address (`unix:PATH`, `tcp:HOST:PORT`), for every socket
//!   colo opens or listens on.
//! * [`Role`]: primary or secondary.
//! * [`qemu_ids`]: the ids of the QEMU objects and chardevs of a pair.

#![warn(missing_docs)]

mod address;
pub mod qemu_ids;
mod role;

pub use address::{ADDRESS_FORMS, Address, AddressError};
pub use role::{Role, RoleError};
