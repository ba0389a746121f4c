//! The secondary daemon's epoch follower against an in-process relay hub
//! (`colo_control::hub::ControlHub`), with real `qemu-io` clients writing
//! the `replica` and `svm` exports over NBD.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use colo_blockd::backend::BlockBackend;
use colo_blockd::daemon::epochs::{DEFAULT_NAME, EpochOptions, follow_epochs};
use colo_blockd::export::{Export, ExportSet};
use colo_blockd::metrics::NbdCommand;
use colo_blockd::replica::{Replica, ReplicaConfig};
use colo_blockd::server::{NbdServer, ServerConfig};
use colo_control::hub::{BarrierError, BarrierReport, ControlHub};
use colo_control::protocol::{EventBody, EventKind};
use colo_types::Role;
use common::{file_bytes, require_tool};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

const SIZE: usize = 1 << 20;
/// The base image's fill: neither VM writes this byte.
const BASE: u8 = 0x11;
/// Bound of every wait, so a bug fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(20);
/// Barrier timeout of the hub: long, so only a missing ack can fail it.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

struct Bed {
    dir: tempfile::TempDir,
    image: PathBuf,
    nbd: PathBuf,
    control: PathBuf,
    replica: Replica,
    hub: ControlHub,
    shutdown: CancellationToken,
    follower: tokio::task::JoinHandle<()>,
}

impl Bed {
    async fn start() -> Bed {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("s.raw");
        std::fs::write(&image, vec![BASE; SIZE]).unwrap();
        let replica = Replica::open(&image, ReplicaConfig::default()).unwrap();
        let exports = ExportSet::new(vec![
            Export::new("replica", replica.replica_view()),
            Export::new("svm", replica.svm_view()),
        ])
        .unwrap();
        let nbd = dir.path().join("nbd.sock");
        let listener = UnixListener::bind(&nbd).unwrap();
        let shutdown = CancellationToken::new();
        let server = NbdServer::new(exports, ServerConfig::default())
            .with_metrics(replica.metrics().clone());
        tokio::spawn({
            let stop = shutdown.clone();
            async move { server.serve_unix(listener, stop).await }
        });
        let control = dir.path().join("control.sock");
        let hub = ControlHub::new(UnixListener::bind(&control).unwrap());
        let follower = tokio::spawn(follow_epochs(
            replica.clone(),
            quick_options(&control),
            shutdown.clone(),
        ));
        wait_subscribed(&hub).await;
        Bed {
            dir,
            image,
            nbd,
            control,
            replica,
            hub,
            shutdown,
            follower,
        }
    }

    /// Runs qemu-io on `export` with `commands`; every one must succeed
    /// (patterns included).
    async fn qemu_io(&self, export: &str, commands: &[&str]) {
        let uri = format!("nbd+unix:///{export}?socket={}", self.nbd.display());
        let mut args = vec!["-f".to_owned(), "raw".to_owned(), uri];
        for c in commands {
            args.extend(["-c".to_owned(), (*c).to_owned()]);
        }
        let out = tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            common::run_ok("qemu-io", &refs)
        })
        .await
        .unwrap();
        assert!(
            !out.contains("failed"),
            "qemu-io {export} {commands:?}: {out}"
        );
    }

    /// Runs qemu-io on `export` with `commands`; returns its output
    /// whatever happened.
    async fn qemu_io_output(&self, export: &str, commands: &[&str]) -> String {
        let uri = format!("nbd+unix:///{export}?socket={}", self.nbd.display());
        let mut args = vec!["-f".to_owned(), "raw".to_owned(), uri];
        for c in commands {
            args.extend(["-c".to_owned(), (*c).to_owned()]);
        }
        let out = tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            common::run("qemu-io", &refs)
        })
        .await
        .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    async fn barrier(&self, event: EventKind, epoch: u64) -> BarrierReport {
        self.hub
            .barrier(EventBody::new(event, epoch), ACK_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("{event} barrier failed: {e}"))
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(PATIENCE, self.follower)
            .await
            .expect("the follower stops on shutdown")
            .unwrap();
    }
}

fn quick_options(control: &Path) -> EpochOptions {
    let mut opts = EpochOptions::new(control, DEFAULT_NAME);
    opts.retry_min = Duration::from_millis(20);
    opts.retry_max = Duration::from_millis(200);
    opts
}

async fn wait_subscribed(hub: &ControlHub) {
    let deadline = Instant::now() + PATIENCE;
    while !hub
        .status()
        .subscribers
        .iter()
        .any(|s| s.name == DEFAULT_NAME && s.sync && s.connected)
    {
        assert!(Instant::now() < deadline, "colo-blockd never subscribed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn acked_by_us(report: &BarrierReport) -> bool {
    report.acks.iter().any(|a| a.name == DEFAULT_NAME)
}

fn all(bytes: &[u8], value: u8) -> bool {
    bytes.iter().all(|&b| b == value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "tier clients: needs qemu-io, qemu-img and nbdinfo (integration/setup.sh); select with --include-ignored (integration/test.sh does)"]
async fn checkpoint_commits_the_replica_writes_and_drops_the_svm_writes() {
    require_tool("qemu-io", "qemu-utils");
    let bed = Bed::start().await;
    bed.qemu_io("replica", &["write -P 0xaa 0 64k"]).await;
    bed.qemu_io("svm", &["write -P 0xbb 64k 64k"]).await;
    // The SVM sees its own writes over S, never the primary's.
    bed.qemu_io("svm", &["read -P 0x11 0 64k", "read -P 0xbb 64k 64k"])
        .await;

    let closed = bed.barrier(EventKind::SvmEpochClosed, 1).await;
    assert!(acked_by_us(&closed), "{closed:?}");
    // Acked only once new SVM requests are held: this read waits for the
    // checkpoint and then sees the adopted state, not S before it.
    let svm = bed.replica.svm_view();
    let held_read = tokio::spawn(async move { svm.read_at(0, 4096).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !held_read.is_finished(),
        "an SVM read ran during the epoch step"
    );
    assert!(file_bytes(&bed.image, 0, 65536).iter().all(|&b| b == BASE));

    let adopted = bed.barrier(EventKind::CheckpointAdopted, 1).await;
    assert!(acked_by_us(&adopted), "{adopted:?}");
    // Acked only after the step: both layers are already empty.
    let stats = bed.replica.stats().unwrap();
    assert_eq!(stats.pvm_log.memory_bytes, 0, "{stats:?}");
    assert_eq!(stats.svm_overlay.memory_bytes, 0, "{stats:?}");
    let read = tokio::time::timeout(PATIENCE, held_read)
        .await
        .expect("the held read goes on after the checkpoint")
        .unwrap()
        .unwrap();
    assert!(
        all(&read, 0xaa),
        "the held SVM read saw S before the commit"
    );

    bed.qemu_io("svm", &["read -P 0xaa 0 64k", "read -P 0x11 64k 64k"])
        .await;
    bed.replica.settle().await.unwrap();
    assert!(all(&file_bytes(&bed.image, 0, 65536), 0xaa));
    assert!(all(&file_bytes(&bed.image, 65536, 65536), BASE));
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "tier clients: needs qemu-io, qemu-img and nbdinfo (integration/setup.sh); select with --include-ignored (integration/test.sh does)"]
async fn svm_never_sees_replica_writes_before_adoption() {
    require_tool("qemu-io", "qemu-utils");
    let bed = Bed::start().await;
    bed.qemu_io("replica", &["write -P 0xaa 0 128k"]).await;
    bed.qemu_io("svm", &["read -P 0x11 0 128k"]).await;
    bed.barrier(EventKind::SvmEpochClosed, 1).await;
    let svm = bed.replica.svm_view();
    let held = tokio::spawn(async move { svm.read_at(0, 131072).await });
    bed.barrier(EventKind::CheckpointAdopted, 1).await;
    let read = tokio::time::timeout(PATIENCE, held)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(all(&read, 0xaa));
    // The next epoch's replica writes are again invisible to the SVM.
    bed.qemu_io("replica", &["write -P 0xcc 0 4k"]).await;
    bed.qemu_io("svm", &["read -P 0xaa 0 128k"]).await;
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "tier clients: needs qemu-io, qemu-img and nbdinfo (integration/setup.sh); select with --include-ignored (integration/test.sh does)"]
async fn failover_to_the_secondary_merges_the_svm_writes() {
    require_tool("qemu-io", "qemu-utils");
    let bed = Bed::start().await;
    bed.qemu_io("replica", &["write -P 0xaa 0 64k"]).await;
    bed.qemu_io("svm", &["write -P 0xbb 64k 64k"]).await;
    bed.hub
        .publish(EventBody::new(EventKind::Failover, 1).with_survivor(Role::Secondary))
        .await;
    let deadline = Instant::now() + PATIENCE;
    while !bed.replica.stats().unwrap().failed_over {
        assert!(Instant::now() < deadline, "no failover");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(all(&file_bytes(&bed.image, 0, 65536), BASE));
    assert!(all(&file_bytes(&bed.image, 65536, 65536), 0xbb));
    // The survivor's disk is S now.
    bed.qemu_io("svm", &["write -P 0xdd 0 4k", "read -P 0xdd 0 4k"])
        .await;
    assert!(all(&file_bytes(&bed.image, 0, 4096), 0xdd));
    // The primary is gone: its writes are refused, and counted as errors.
    let refused = bed.qemu_io_output("replica", &["write -P 0xee 0 4k"]).await;
    assert!(refused.contains("failed"), "{refused}");
    let metrics = bed.replica.metrics();
    assert_eq!(metrics.failovers.get(), 1);
    let replica = metrics.export("replica");
    assert_eq!(replica.requests(NbdCommand::Write), 2);
    assert_eq!(replica.errors(NbdCommand::Write), 1);
    let svm = metrics.export("svm");
    assert_eq!(
        (
            svm.requests(NbdCommand::Write),
            svm.errors(NbdCommand::Write)
        ),
        (2, 0)
    );
    // A second failover event changes nothing and is not counted.
    bed.replica.failover().await.unwrap();
    assert_eq!(metrics.failovers.get(), 1);
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "tier clients: needs qemu-io, qemu-img and nbdinfo (integration/setup.sh); select with --include-ignored (integration/test.sh does)"]
async fn failover_to_the_primary_and_colo_exit_change_nothing() {
    require_tool("qemu-io", "qemu-utils");
    let bed = Bed::start().await;
    bed.qemu_io("svm", &["write -P 0xbb 0 4k"]).await;
    bed.hub
        .publish(EventBody::new(EventKind::ColoExit, 1).with_reason("channel-closed"))
        .await;
    bed.hub
        .publish(EventBody::new(EventKind::Failover, 1).with_survivor(Role::Primary))
        .await;
    // Events are handled in order: once this barrier is acked, both were.
    let closed = bed.barrier(EventKind::SvmEpochClosed, 2).await;
    assert!(acked_by_us(&closed));
    bed.barrier(EventKind::CheckpointAdopted, 2).await;
    assert!(!bed.replica.stats().unwrap().failed_over);
    bed.qemu_io("svm", &["read -P 0x11 0 4k"]).await;
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "tier clients: needs qemu-io, qemu-img and nbdinfo (integration/setup.sh); select with --include-ignored (integration/test.sh does)"]
async fn an_unknown_sync_event_is_acked_and_changes_nothing() {
    require_tool("qemu-io", "qemu-utils");
    let bed = Bed::start().await;
    bed.qemu_io("replica", &["write -P 0xaa 0 4k"]).await;
    // The protocol requires an ack of every sync event, known or not.
    let report = bed.barrier(EventKind::Unknown, 1).await;
    assert!(acked_by_us(&report), "{report:?}");
    bed.qemu_io("svm", &["read -P 0x11 0 4k"]).await;
    assert_eq!(bed.replica.stats().unwrap().pvm_log.memory_bytes, 4096);
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "tier clients: needs qemu-io, qemu-img and nbdinfo (integration/setup.sh); select with --include-ignored (integration/test.sh does)"]
async fn a_failed_commit_fails_the_barrier_at_once() {
    require_tool("qemu-io", "qemu-utils");
    let bed = Bed::start().await;
    bed.qemu_io("replica", &["write -P 0xaa 0 64k"]).await;
    bed.barrier(EventKind::SvmEpochClosed, 1).await;
    bed.replica.inject_crash_after(0).unwrap();
    // Not acknowledged, and the connection closed on purpose: the relay fails the barrier
    // as soon as the step failed, not after its ack timeout (both VMs are stopped meanwhile).
    let err = bed
        .hub
        .barrier(
            EventBody::new(EventKind::CheckpointAdopted, 1),
            Duration::from_secs(60),
        )
        .await
        .expect_err("a failed commit must fail the barrier");
    assert!(
        matches!(&err, BarrierError::Disconnected { disconnected, .. } if disconnected == &[DEFAULT_NAME.to_owned()]),
        "{err:?}"
    );
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "tier clients: needs qemu-io, qemu-img and nbdinfo (integration/setup.sh); select with --include-ignored (integration/test.sh does)"]
async fn the_follower_reconnects_to_a_restarted_relay() {
    require_tool("qemu-io", "qemu-utils");
    let bed = Bed::start().await;
    bed.hub.shutdown().await;
    let _ = std::fs::remove_file(&bed.control);
    let hub = ControlHub::new(UnixListener::bind(&bed.control).unwrap());
    wait_subscribed(&hub).await;
    bed.qemu_io("replica", &["write -P 0xaa 0 4k"]).await;
    let report = hub
        .barrier(EventBody::new(EventKind::SvmEpochClosed, 1), ACK_TIMEOUT)
        .await
        .unwrap();
    assert!(acked_by_us(&report), "{report:?}");
    hub.barrier(EventBody::new(EventKind::CheckpointAdopted, 1), ACK_TIMEOUT)
        .await
        .unwrap();
    bed.qemu_io("svm", &["read -P 0xaa 0 4k"]).await;
    let _keep = &bed.dir;
    bed.stop().await;
}
