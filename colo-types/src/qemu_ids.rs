//! Ids of the QEMU objects and chardevs colo's wiring creates and its tools and daemons refer to
//! (`qmp-driver qemu-args` writes them; the failover sequences delete them; colo-proxyd
//! re-creates the redirectors among them). The drive and netdev ids come from the pair's config.

/// Primary: filter-mirror copying client→guest packets to the secondary.
pub const MIRROR_FILTER: &str = "m0";
/// Primary: redirector from colo-compare's output to the guest NIC.
pub const COMPARE_OUT_REDIRECTOR: &str = "redire0";
/// Primary: redirector of the PVM's output into colo-compare.
pub const COMPARE_IN_REDIRECTOR: &str = "redire1";
/// Primary: the iothread colo-compare runs in.
pub const COMPARE_IOTHREAD: &str = "iothread1";
/// Primary: colo-compare.
pub const COMPARE: &str = "comp0";
/// Primary: chardev server the secondary's [`SECONDARY_MIRROR_IN`] connects to.
pub const MIRROR_CHARDEV: &str = "mirror0";
/// Primary: chardev server the secondary's [`SECONDARY_OUT`] connects to.
pub const COMPARE_SECONDARY_IN: &str = "compare1";
/// Primary: loopback server end of redirector → colo-compare.
pub const COMPARE_PRIMARY_IN_SERVER: &str = "compare0";
/// Primary: loopback client end of redirector → colo-compare.
pub const COMPARE_PRIMARY_IN_CLIENT: &str = "compare0-0";
/// Primary: loopback server end of colo-compare → redirector.
pub const COMPARE_OUT_SERVER: &str = "compare_out";
/// Primary: loopback client end of colo-compare → redirector.
pub const COMPARE_OUT_CLIENT: &str = "compare_out0";
/// Secondary: chardev receiving the mirrored packets.
pub const SECONDARY_MIRROR_IN: &str = "red0";
/// Secondary: chardev carrying the SVM's output to colo-compare.
pub const SECONDARY_OUT: &str = "red1";
/// Secondary: redirector feeding mirrored packets to the SVM.
pub const SECONDARY_IN_REDIRECTOR: &str = "f1";
/// Secondary: redirector carrying the SVM's output to the primary.
pub const SECONDARY_OUT_REDIRECTOR: &str = "f2";
/// Secondary, colo-proxyd, added at failover: chardev from colo-proxyd
/// secondary (the SVM's rewritten output, for the network).
pub const SECONDARY_NET_OUT: &str = "red2";
/// Secondary, colo-proxyd, added at failover: chardev to colo-proxyd
/// secondary (the network's packets, to rewrite for the SVM).
pub const SECONDARY_NET_IN: &str = "red3";
/// Secondary, colo-proxyd, added at failover: redirector injecting
/// [`SECONDARY_NET_OUT`] towards the tap (queue=rx, before `f2`).
pub const SECONDARY_NET_OUT_REDIRECTOR: &str = "f3";
/// Secondary, colo-proxyd, added at failover: redirector diverting the
/// tap's packets to [`SECONDARY_NET_IN`] (queue=tx, before `f1`).
pub const SECONDARY_NET_IN_REDIRECTOR: &str = "f4";
/// Secondary: filter-rewriter (TCP sequence numbers).
pub const REWRITER: &str = "rew0";
/// Secondary: the `replication,mode=secondary` drive.
pub const SECONDARY_REPLICATION_DRIVE: &str = "childs0";
/// Secondary, colo-blockd: the NBD client of colo-blockd's `svm` export, the one child of the
/// disk's quorum (so that a survivor can take a replication child, as a primary's disk does).
pub const SECONDARY_BLOCKD_DRIVE: &str = "svm0";

/// The guest NIC's netdev when the config names none.
pub const DEFAULT_NETDEV: &str = "hn0";
