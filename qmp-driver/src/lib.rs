//! Async client for the QEMU Machine Protocol (QMP).
//!
//! Written in-house rather than using the `qapi` crate because that crate
//! decodes every incoming line into a closed enum and tears the connection
//! down on any event it does not know. A COLO pair emits events that vary
//! between QEMU versions and patch sets, so here events stay generic
//! ([`qmp::Event`] carries the name and raw JSON data) and nothing the peer
//! sends, short of an oversized line, ends the connection.
//!
//! Start with [`qmp::QmpClient`].

pub mod qmp;
