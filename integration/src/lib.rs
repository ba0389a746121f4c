//! The colo test bed: a client and two VM hosts as network namespaces on one machine, a tiny
//! guest, and the stock QEMU COLO pair driven over `colo_qmp`'s QMP client.
//!
//! Every later colo capability is accepted against this bed, and the stock pair it runs is the
//! baseline our daemons are compared with. Layout, one concern per module:
//!
//! - [`artifacts`]: where the patched QEMU and the guest live (built by `integration/setup.sh`);
//! - [`topology`]: namespaces, bridge, veths and taps;
//! - [`cluster`]: a corosync cluster (a node per VM host, qdevice, qnetd on a witness);
//! - [`process`]: a QEMU started inside a namespace, owned and killed by PID;
//! - [`stock`]: the COLO pair, described in a `qmp-driver` config file and driven with
//!   `qmp_driver`'s command-line generator and pair sequences (optionally through the relay),
//!   with QEMU's own comparison and replication or colo-proxyd and colo-blockd;
//! - [`relay_watch`]: test subscribers on the relay's control socket;
//! - [`client`]: an HTTP client that runs inside the client namespace;
//! - [`guest`]: the guest's contracts (serial heartbeats, disk records);
//! - [`stats`]: medians and percentiles;
//! - [`scenario`]: the scenarios the tests and the demo run, with their reports;
//! - [`barrier`]: the checkpoint-barrier relay's scenarios (epoch order, slow and stuck subscribers);
//! - [`compare_ab`]: QEMU's colo-compare against colo-proxyd on the identical pair;
//! - [`reprotect`]: online re-protect after a failover;
//! - [`workloads`]: the workload suite against native and stock COLO.

pub mod artifacts;
pub mod barrier;
pub mod client;
pub mod cluster;
pub mod compare_ab;
pub mod guest;
pub mod ha;
pub mod pacemaker;
pub mod process;
pub mod relay_watch;
pub mod reprotect;
pub mod scenario;
pub mod stats;
pub mod stock;
pub mod topology;
pub mod workloads;
