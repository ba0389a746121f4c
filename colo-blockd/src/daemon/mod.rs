//! The secondary's daemon wiring (issue 5): following the relay's epoch
//! events ([`epochs`]) and asking the primary for a checkpoint when the PVM
//! log fills ([`checkpoint`]). `colo-blockd secondary` runs both next to the
//! NBD server that serves the replica's two views, and with `--metrics` the
//! Prometheus endpoint ([`metrics_endpoint`]).

pub mod checkpoint;
pub mod epochs;
pub mod metrics_endpoint;
