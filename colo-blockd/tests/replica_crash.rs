//! A crash at every file operation of a commit, one after the other: after
//! reopening, S is exactly the old or the new checkpoint, and which one
//! agrees with what the journal said.

mod common;

use std::path::Path;

use bytes::Bytes;
use colo_blockd::backend::BlockBackend;
use colo_blockd::replica::{Recovery, Replica, ReplicaConfig};

const SIZE: usize = 64 * 1024;
const CONFIG: ReplicaConfig = ReplicaConfig {
    pvm_memory_budget: 8 * 1024,
    svm_memory_budget: 8 * 1024,
};

fn image(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("disk.raw");
    std::fs::write(&path, vec![b'o'; SIZE]).unwrap();
    path
}

/// Writes 20 KiB (past the budget, so part of it spilled) and a zeroed
/// range through `vm`; returns what S holds after committing them.
async fn fill_epoch(r: &Replica, svm: bool) -> Vec<u8> {
    let view = if svm { r.svm_view() } else { r.replica_view() };
    let mut new = vec![b'o'; SIZE];
    for i in 0..5u8 {
        let offset = usize::from(i) * 12 * 1024;
        let data = vec![b'a' + i; 4096];
        view.write_at(offset as u64, Bytes::from(data.clone()), false)
            .await
            .unwrap();
        new[offset..offset + 4096].copy_from_slice(&data);
    }
    let zero = colo_blockd::proto::ZeroMode {
        may_trim: false,
        fast_only: true,
    };
    view.write_zeroes(100, 50, false, zero).await.unwrap();
    new[100..150].fill(0);
    new
}

#[derive(Debug, Default)]
struct Seen {
    old: usize,
    new: usize,
    replayed: usize,
    discarded: usize,
    completed_at: Option<u64>,
}

async fn crash_every_operation(failover: bool) -> Seen {
    let mut seen = Seen::default();
    for n in 0..64 {
        let dir = tempfile::tempdir().unwrap();
        let path = image(dir.path());
        let r = Replica::open(&path, CONFIG).unwrap();
        let new = fill_epoch(&r, failover).await;
        r.inject_crash_after(n).unwrap();
        let result = if failover {
            r.failover().await
        } else {
            r.svm_epoch_closed().await;
            match r.checkpoint_adopted().await {
                // The crash may come while S is written in the background.
                Ok(_) => r.settle().await,
                Err(err) => Err(err),
            }
        };
        if result.is_ok() {
            seen.completed_at = Some(n);
            assert_eq!(std::fs::read(&path).unwrap(), new);
            break;
        }
        // The crashed replica refuses everything, like a dead process.
        assert!(r.svm_view().read_at(0, 1).await.is_err());
        drop(r);
        let r = common::reopen(&path, CONFIG).await;
        let s = std::fs::read(&path).unwrap();
        let old = s == vec![b'o'; SIZE];
        assert!(old || s == new, "crash after {n} operations left a mix");
        match r.recovery() {
            Recovery::Replayed => {
                assert!(!old);
                seen.replayed += 1;
            }
            Recovery::Discarded => {
                assert!(old);
                seen.discarded += 1;
            }
            Recovery::Clean => {}
        }
        if old {
            seen.old += 1;
        } else {
            seen.new += 1;
        }
        // Recovery invalidated the journal: a second restart changes nothing.
        drop(r);
        let r = common::reopen(&path, CONFIG).await;
        assert_eq!(r.recovery(), Recovery::Clean);
        assert_eq!(std::fs::read(&path).unwrap(), s);
    }
    seen
}

#[tokio::test]
async fn crash_at_any_point_of_a_checkpoint_commit_leaves_a_checkpoint() {
    let seen = crash_every_operation(false).await;
    assert!(seen.completed_at.is_some(), "{seen:?}");
    // Both sides of the commit point were hit, torn writes included.
    assert!(seen.old > 0 && seen.new > 0, "{seen:?}");
    assert!(seen.replayed > 0 && seen.discarded > 0, "{seen:?}");
}

#[tokio::test]
async fn crash_at_any_point_of_a_failover_merge_leaves_a_checkpoint() {
    let seen = crash_every_operation(true).await;
    assert!(seen.completed_at.is_some(), "{seen:?}");
    assert!(seen.replayed > 0 && seen.discarded > 0, "{seen:?}");
}

#[tokio::test]
async fn a_committed_journal_of_another_image_size_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path());
    let r = Replica::open(&path, CONFIG).unwrap();
    fill_epoch(&r, false).await;
    // Stop at the first write into S, after the commit point (journal
    // body, sync, trailer, sync).
    r.inject_crash_after(4).unwrap();
    r.svm_epoch_closed().await;
    // The commit point is passed: the checkpoint is adopted, and the crash
    // comes while S is being written.
    r.checkpoint_adopted().await.unwrap();
    assert!(r.settle().await.is_err());
    drop(r);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(SIZE as u64 / 2)
        .unwrap();
    let err = common::try_reopen(&path, CONFIG).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
}
