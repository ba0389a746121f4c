//! The colo test bed: a client and two VM hosts as network namespaces on one machine, a tiny
//! guest, and the stock QEMU COLO pair driven over `qmp_driver`'s QMP client.
//!
//! Every later colo capability is accepted against this bed, and the stock pair it runs is the
//! baseline our daemons are compared with. Layout, one concern per module:
//!
//! - [`artifacts`]: where the patched QEMU and the guest live (built by `integration/setup.sh`);
//! - [`topology`]: namespaces, bridge, veths and taps;
//! - [`process`]: a QEMU started inside a namespace, owned and killed by PID;
//! - [`stock`]: command lines and QMP sequences of the stock COLO pair, failover both ways;
//! - [`client`]: an HTTP client that runs inside the client namespace;
//! - [`guest`]: the guest's contracts (serial heartbeats, disk records);
//! - [`stats`]: medians and percentiles;
//! - [`scenario`]: the scenarios the tests and the demo run, with their reports.

pub mod artifacts;
pub mod client;
pub mod guest;
pub mod process;
pub mod scenario;
pub mod stats;
pub mod stock;
pub mod topology;
