//! qmp-driver: the operator's side of a COLO pair, as a library and the `qmp-driver` CLI.
//!
//! * [`config`]: the pair's config file, section by section, each validated on its own.
//! * [`pair`]: the pair's orchestration over QMP: `prepare-secondary`, `copy-disk`, `start`,
//!   `status`, `checkpoint`, `failover`, `stop`.
//! * [`agent`]: the HA agent (`qmp-driver agent`): watches its QEMU, decides failovers with
//!   its peer over corosync, fences its VM without quorum.
//! * [`qemu_args`] and [`daemon_args`]: the command lines of both QEMUs and of colo's daemons,
//!   generated from the config.
//!
//! The QMP client is [`colo_qmp`], the relay [`colo_relay`] (`qmp-driver relay` runs it), the
//! shared vocabulary [`colo_types`]. No daemon depends on this crate.

pub mod agent;
pub mod config;
pub mod daemon_args;
pub mod pair;
pub mod qemu_args;
