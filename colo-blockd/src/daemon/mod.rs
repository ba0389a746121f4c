//! The secondary's daemon wiring: following the relay's epoch events
//! ([`epochs`]) and asking the primary for a checkpoint when the PVM log
//! fills ([`checkpoint`]). `colo-blockd secondary` runs both next to the NBD
//! server that serves the replica's two views, and with `--metrics`
//! colo-daemon's Prometheus responder.

pub mod checkpoint;
pub mod epochs;
