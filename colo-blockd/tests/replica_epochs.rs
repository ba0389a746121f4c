//! The replica's epoch steps and budgets through its public API: what each
//! view sees, held SVM requests, the checkpoint-wanted signal, spill-over,
//! failover.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use colo_blockd::backend::BlockBackend;
use colo_blockd::export::{Export, ExportSet};
use colo_blockd::proto::ZeroMode;
use colo_blockd::replica::{Replica, ReplicaConfig};

const SIZE: usize = 256 * 1024;

fn image(fill: u8) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    std::fs::write(&path, vec![fill; SIZE]).unwrap();
    (dir, path)
}

fn small_budgets(bytes: u64) -> ReplicaConfig {
    ReplicaConfig {
        pvm_memory_budget: bytes,
        svm_memory_budget: bytes,
    }
}

fn block(fill: u8) -> Bytes {
    Bytes::from(vec![fill; 4096])
}

#[tokio::test]
async fn the_svm_never_sees_the_pvm_log_until_it_is_adopted() {
    let (_dir, path) = image(b'.');
    let r = Replica::open(&path, ReplicaConfig::default()).unwrap();
    let (pvm, svm) = (r.replica_view(), r.svm_view());
    pvm.write_at(0, block(b'p'), false).await.unwrap();
    svm.write_at(4096, block(b's'), false).await.unwrap();
    assert_eq!(&svm.read_at(0, 4096).await.unwrap()[..], &block(b'.')[..]);
    assert_eq!(
        &svm.read_at(4096, 4096).await.unwrap()[..],
        &block(b's')[..]
    );
    assert_eq!(&pvm.read_at(0, 4096).await.unwrap()[..], &block(b'p')[..]);
    assert_eq!(
        &pvm.read_at(4096, 4096).await.unwrap()[..],
        &block(b'.')[..]
    );
    // Nothing reached S before the checkpoint.
    assert!(std::fs::read(&path).unwrap().iter().all(|&b| b == b'.'));

    r.svm_epoch_closed().await;
    r.checkpoint_adopted().await.unwrap();
    // The SVM's own epoch is dropped, the PVM's is in S.
    assert_eq!(&svm.read_at(0, 4096).await.unwrap()[..], &block(b'p')[..]);
    assert_eq!(
        &svm.read_at(4096, 4096).await.unwrap()[..],
        &block(b'.')[..]
    );
    r.settle().await.unwrap();
    let s = std::fs::read(&path).unwrap();
    assert!(s[..4096].iter().all(|&b| b == b'p'));
    assert!(s[4096..].iter().all(|&b| b == b'.'));
}

#[tokio::test]
async fn svm_requests_wait_while_the_epoch_is_closed_and_see_the_new_checkpoint() {
    let (_dir, path) = image(b'.');
    let r = Replica::open(&path, ReplicaConfig::default()).unwrap();
    r.replica_view()
        .write_at(0, block(b'p'), false)
        .await
        .unwrap();
    r.svm_epoch_closed().await;

    let svm = r.svm_view();
    let held_read = tokio::spawn(async move { svm.read_at(0, 4096).await });
    // The PVM still runs the closed epoch: its requests are not held.
    r.replica_view()
        .write_at(8192, block(b'q'), false)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !held_read.is_finished(),
        "an SVM read went through a closed epoch"
    );

    r.checkpoint_adopted().await.unwrap();
    let got = held_read.await.unwrap().unwrap();
    assert_eq!(&got[..], &block(b'p')[..], "the held read saw the old S");
    assert_eq!(
        &r.svm_view().read_at(8192, 4096).await.unwrap()[..],
        &block(b'q')[..]
    );
}

#[tokio::test]
async fn pvm_writes_past_the_budget_spill_and_raise_checkpoint_wanted() {
    let (_dir, path) = image(0);
    let r = Replica::open(&path, small_budgets(3 * 4096)).unwrap();
    let mut wanted = r.checkpoint_wanted();
    let pvm = r.replica_view();
    for i in 0..3u8 {
        pvm.write_at(u64::from(i) * 4096, block(i + 1), false)
            .await
            .unwrap();
    }
    assert!(
        !*wanted.borrow_and_update(),
        "raised before the budget was crossed"
    );
    let stats = r.stats().unwrap();
    assert_eq!(
        (stats.pvm_log.memory_bytes, stats.pvm_log.spilled_bytes),
        (3 * 4096, 0)
    );

    // The budget is full: the write still succeeds, into the spill file.
    pvm.write_at(3 * 4096, block(4), false).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), wanted.changed())
        .await
        .expect("no checkpoint-wanted signal")
        .unwrap();
    assert!(*wanted.borrow_and_update());
    let stats = r.stats().unwrap();
    assert_eq!(
        (stats.pvm_log.memory_bytes, stats.pvm_log.spilled_bytes),
        (3 * 4096, 4096)
    );
    for i in 0..4u8 {
        let got = pvm.read_at(u64::from(i) * 4096, 4096).await.unwrap();
        assert_eq!(&got[..], &block(i + 1)[..]);
    }

    r.svm_epoch_closed().await;
    r.checkpoint_adopted().await.unwrap();
    assert!(
        !*wanted.borrow_and_update(),
        "still wanted after the checkpoint"
    );
    let stats = r.stats().unwrap();
    assert_eq!(stats.pvm_log.memory_bytes + stats.pvm_log.spilled_bytes, 0);
    r.settle().await.unwrap();
    let s = std::fs::read(&path).unwrap();
    for i in 0..4usize {
        assert!(
            s[i * 4096..(i + 1) * 4096]
                .iter()
                .all(|&b| b == i as u8 + 1)
        );
    }
}

#[tokio::test]
async fn svm_writes_past_the_budget_spill_without_asking_for_a_checkpoint() {
    let (_dir, path) = image(0);
    let r = Replica::open(&path, small_budgets(4096)).unwrap();
    let svm = r.svm_view();
    svm.write_at(0, block(1), false).await.unwrap();
    svm.write_at(4096, block(2), false).await.unwrap();
    let stats = r.stats().unwrap();
    assert_eq!(
        (
            stats.svm_overlay.memory_bytes,
            stats.svm_overlay.spilled_bytes
        ),
        (4096, 4096)
    );
    assert!(!*r.checkpoint_wanted().borrow());
    assert_eq!(&svm.read_at(4096, 4096).await.unwrap()[..], &block(2)[..]);
}

#[tokio::test]
async fn failover_keeps_the_svm_epoch_drops_the_pvm_log_and_writes_through() {
    let (_dir, path) = image(b'.');
    let r = Replica::open(&path, ReplicaConfig::default()).unwrap();
    r.replica_view()
        .write_at(0, block(b'p'), false)
        .await
        .unwrap();
    r.svm_view()
        .write_at(4096, block(b's'), false)
        .await
        .unwrap();
    r.svm_epoch_closed().await;
    // The primary died before vmstate-received.
    r.failover().await.unwrap();
    assert!(r.stats().unwrap().failed_over);

    let s = std::fs::read(&path).unwrap();
    assert!(s[..4096].iter().all(|&b| b == b'.'));
    assert!(s[4096..8192].iter().all(|&b| b == b's'));

    let err = r
        .replica_view()
        .write_at(0, block(b'p'), false)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
    // The SVM is the only VM now: its writes go to S, flush makes them
    // durable, and fast zeroing is refused because it would write S.
    let svm = r.svm_view();
    svm.write_at(8192, block(b't'), false).await.unwrap();
    svm.flush().await.unwrap();
    assert!(
        std::fs::read(&path).unwrap()[8192..12288]
            .iter()
            .all(|&b| b == b't')
    );
    let fast = ZeroMode {
        may_trim: true,
        fast_only: true,
    };
    let err = svm.write_zeroes(0, 10, false, fast).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::Unsupported);
}

/// Issue 12: a replica reopened after its failover (the daemon was killed and restarted)
/// stays failed over: the SVM's writes keep going straight into S, where no restart can lose
/// them, and the dead primary's replica view still refuses writes.
#[tokio::test]
async fn a_failover_survives_a_restart() {
    let (_dir, path) = image(b'.');
    let r = Replica::open(&path, ReplicaConfig::default()).unwrap();
    r.svm_view().write_at(0, block(b's'), false).await.unwrap();
    r.failover().await.unwrap();
    r.svm_view()
        .write_at(4096, block(b't'), false)
        .await
        .unwrap();
    drop(r);
    let marker = common::sibling(&path, ".colo-failed-over");
    assert!(
        marker.exists(),
        "{} is written at failover",
        marker.display()
    );

    let r = common::reopen(&path, ReplicaConfig::default()).await;
    assert!(
        r.stats().unwrap().failed_over,
        "the restart forgot the failover"
    );
    let svm = r.svm_view();
    svm.write_at(8192, block(b'u'), false).await.unwrap();
    svm.flush().await.unwrap();
    drop(svm);
    drop(r);
    // Every write the SVM had acknowledged is in S itself, not in an overlay.
    let s = std::fs::read(&path).unwrap();
    for (range, fill) in [(0..4096, b's'), (4096..8192, b't'), (8192..12288, b'u')] {
        assert!(s[range.clone()].iter().all(|&b| b == fill), "{range:?}");
    }
    let r = common::reopen(&path, ReplicaConfig::default()).await;
    let err = r
        .replica_view()
        .write_at(0, block(b'p'), false)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
}

#[tokio::test]
async fn zeroing_and_trimming_a_layer_read_back_as_zeroes() {
    let (_dir, path) = image(b'.');
    let r = Replica::open(&path, ReplicaConfig::default()).unwrap();
    let svm = r.svm_view();
    let fast = ZeroMode {
        may_trim: false,
        fast_only: true,
    };
    // Zeroing a layer only records a range: fast, so FAST_ZERO is honoured.
    svm.write_zeroes(10, 20, false, fast).await.unwrap();
    svm.trim(100, 5, false).await.unwrap();
    let got = svm.read_at(0, 110).await.unwrap();
    let mut want = [b'.'; 110];
    want[10..30].fill(0);
    want[100..105].fill(0);
    assert_eq!(&got[..], &want[..]);
}

#[test]
fn both_views_can_be_served_by_one_server() {
    let (_dir, path) = image(0);
    let r = Replica::open(&path, ReplicaConfig::default()).unwrap();
    let exports = ExportSet::new(vec![
        Export::new("replica", r.replica_view()),
        Export::new("svm", r.svm_view()),
    ])
    .unwrap();
    let names: Vec<_> = exports.iter().map(|e| e.name().to_owned()).collect();
    assert_eq!(names, ["replica", "svm"]);
    assert!(exports.iter().all(|e| e.limits().size == SIZE as u64));
}

#[tokio::test]
async fn a_second_replica_on_the_same_image_is_refused_and_touches_nothing() {
    let (_dir, path) = image(b'.');
    // A PVM log past its budget: the running replica's data lies in its spill file.
    let r = Replica::open(&path, small_budgets(4096)).unwrap();
    let pvm = r.replica_view();
    for i in 0..8u64 {
        pvm.write_at(i * 4096, block(b'0' + i as u8), false)
            .await
            .unwrap();
    }
    let spill = |suffix: &str| {
        let mut p = path.clone().into_os_string();
        p.push(suffix);
        std::fs::read(PathBuf::from(p)).unwrap_or_default()
    };
    let spill_before = spill(".pvm-spill-0");
    assert!(!spill_before.is_empty(), "the log should have spilled");
    let journal_before = spill(".colo-journal");

    // A second daemon started on the same image by mistake.
    let err = Replica::open(&path, small_budgets(4096)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ResourceBusy, "{err}");
    assert!(
        err.to_string().contains("in use by another colo-blockd"),
        "{err}"
    );
    assert_eq!(
        spill(".pvm-spill-0"),
        spill_before,
        "the spill file was touched"
    );
    assert_eq!(
        spill(".colo-journal"),
        journal_before,
        "the journal was touched"
    );

    // The running replica still commits what it acknowledged.
    r.svm_epoch_closed().await;
    r.checkpoint_adopted().await.unwrap();
    r.settle().await.unwrap();
    let s = std::fs::read(&path).unwrap();
    for i in 0..8usize {
        assert!(
            s[i * 4096..(i + 1) * 4096]
                .iter()
                .all(|&b| b == b'0' + i as u8),
            "block {i} lost"
        );
    }

    // Once it is gone, the image is free again.
    drop((pvm, r));
    common::reopen(&path, small_budgets(4096)).await;
}
