//! The secondary daemon's checkpoint requests: when the PVM log passes its
//! budget, the primary (a fake QMP server here) gets its own
//! `x-checkpoint-delay` re-set, coalesced, and the relay (an in-process hub)
//! is told why.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use colo_blockd::backend::BlockBackend;
use colo_blockd::daemon::checkpoint::{BLOCK_LOG_FULL, RequestOptions, request_checkpoints};
use colo_blockd::replica::{Replica, ReplicaConfig};
use colo_control::hub::ControlHub;
use colo_testkit::fake_qmp::FakeMonitor;
use colo_types::Address;
use common::fake_qmp::{DELAY_MS, fake_primary, next_request};
use serde_json::{Value, json};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

const BUDGET: u64 = 4096;
const PATIENCE: Duration = Duration::from_secs(20);
/// How long "nothing more arrives" is watched. A wrong extra request would
/// come within milliseconds; a longer quiet time only slows the test.
const QUIET: Duration = Duration::from_millis(500);

struct Bed {
    _dir: tempfile::TempDir,
    replica: Replica,
    hub: ControlHub,
    primary: FakeMonitor,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Bed {
    fn start(min_interval: Duration) -> Bed {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("s.raw");
        std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
        let replica = Replica::open(
            &image,
            ReplicaConfig {
                pvm_memory_budget: BUDGET,
                ..ReplicaConfig::default()
            },
        )
        .unwrap();
        let qmp: PathBuf = dir.path().join("qmp.sock");
        let primary = fake_primary(&qmp);
        let control = dir.path().join("control.sock");
        let hub = ControlHub::new(UnixListener::bind(&control).unwrap());
        let mut opts = RequestOptions::new(Address::Unix(qmp), Some(control.into()));
        opts.min_interval = min_interval;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(request_checkpoints(replica.clone(), opts, shutdown.clone()));
        Bed {
            _dir: dir,
            replica,
            hub,
            primary,
            shutdown,
            task,
        }
    }

    /// Writes past the PVM log's budget.
    async fn fill_log(&self) {
        let data = Bytes::from(vec![0xaa; 2 * BUDGET as usize]);
        self.replica
            .replica_view()
            .write_at(0, data, false)
            .await
            .unwrap();
        assert!(*self.replica.checkpoint_wanted().borrow());
    }

    /// Empties the log, as the relay's `checkpoint-adopted` does.
    async fn checkpoint(&self) {
        self.replica.checkpoint_adopted().await.unwrap();
        assert!(!*self.replica.checkpoint_wanted().borrow());
    }

    async fn next_request(&mut self) -> Value {
        next_request(&mut self.primary, PATIENCE)
            .await
            .expect("no checkpoint request in time")
    }

    async fn no_more_requests(&mut self) {
        if let Some(extra) = next_request(&mut self.primary, QUIET).await {
            panic!("unexpected extra request {extra:?}");
        }
    }

    async fn noted_reasons(&self, n: u64) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let noted = self
                .hub
                .status()
                .requests_by_reason
                .get(BLOCK_LOG_FULL)
                .copied()
                .unwrap_or(0);
            if noted == n {
                return;
            }
            assert!(
                noted < n && Instant::now() < deadline,
                "relay noted {noted}, want {n}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("the requester stops on shutdown")
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_log_re_sets_the_primary_checkpoint_delay_and_tells_the_relay() {
    let mut bed = Bed::start(Duration::from_secs(1));
    bed.fill_log().await;
    assert_eq!(
        bed.next_request().await,
        json!({"x-checkpoint-delay": DELAY_MS})
    );
    bed.noted_reasons(1).await;
    // The log stays full until a checkpoint: one request is enough.
    bed.fill_log().await;
    bed.no_more_requests().await;
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_coalesced_however_often_the_budget_trips() {
    // An interval no test run reaches: every trip after the first falls
    // into it.
    let mut bed = Bed::start(Duration::from_secs(3600));
    bed.fill_log().await;
    assert_eq!(
        bed.next_request().await,
        json!({"x-checkpoint-delay": DELAY_MS})
    );
    for _ in 0..20 {
        bed.checkpoint().await;
        bed.fill_log().await;
    }
    bed.no_more_requests().await;
    bed.noted_reasons(1).await;
    let metrics = bed.replica.metrics();
    assert_eq!(metrics.checkpoints_requested_log_full.get(), 1);
    assert_eq!(metrics.checkpoints_committed.get(), 20);
    assert_eq!(metrics.commit_duration.count(), 20);
    assert_eq!(metrics.committed_bytes.get(), 20 * 2 * BUDGET);
    // The log ends full again, all of it spilled past the 4 KiB budget.
    assert_eq!(metrics.pvm_log_spilled_bytes.get(), 2 * BUDGET);
    assert_eq!(metrics.pvm_log_memory_bytes.get(), 0);
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trip_during_the_interval_is_requested_after_it() {
    let mut bed = Bed::start(Duration::from_millis(200));
    bed.fill_log().await;
    bed.next_request().await;
    bed.checkpoint().await;
    bed.fill_log().await;
    // Not lost: asked for once the interval has passed.
    assert_eq!(
        bed.next_request().await,
        json!({"x-checkpoint-delay": DELAY_MS})
    );
    bed.noted_reasons(2).await;
    assert_eq!(
        bed.replica.metrics().checkpoints_requested_log_full.get(),
        2
    );
    // A log emptied by a checkpoint needs no further request.
    bed.checkpoint().await;
    bed.no_more_requests().await;
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_primary_is_asked_again() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("s.raw");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let config = ReplicaConfig {
        pvm_memory_budget: BUDGET,
        ..ReplicaConfig::default()
    };
    let replica = Replica::open(&image, config).unwrap();
    let qmp = dir.path().join("qmp.sock");
    let mut opts = RequestOptions::new(Address::Unix(qmp.clone()), None);
    opts.min_interval = Duration::from_millis(50);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(request_checkpoints(replica.clone(), opts, shutdown.clone()));
    let data = Bytes::from(vec![0xaa; 2 * BUDGET as usize]);
    replica
        .replica_view()
        .write_at(0, data, false)
        .await
        .unwrap();
    // Nobody listens yet: the first attempts fail (and are counted). Once
    // the primary's monitor is up, the still-full log gets its request.
    let metrics = replica.metrics();
    let deadline = Instant::now() + PATIENCE;
    while metrics.checkpoint_request_failures.get() == 0 {
        assert!(Instant::now() < deadline, "no failed request counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut primary = fake_primary(&qmp);
    let got = next_request(&mut primary, PATIENCE)
        .await
        .expect("no checkpoint request after the primary came up");
    assert_eq!(got, json!({"x-checkpoint-delay": DELAY_MS}));
    let deadline = Instant::now() + PATIENCE;
    while metrics.checkpoints_requested_log_full.get() == 0 {
        assert!(Instant::now() < deadline, "the request was not counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(metrics.checkpoints_requested_log_full.get(), 1);
    shutdown.cancel();
    tokio::time::timeout(PATIENCE, task).await.unwrap().unwrap();
}
