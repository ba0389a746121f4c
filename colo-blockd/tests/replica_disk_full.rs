//! A write of the primary's epoch that the PVM log cannot keep (the disk under its spill file is
//! full) poisons the epoch: the next checkpoint is refused, never adopted without it. Before,
//! the failed writes were skipped, the checkpoint was acknowledged, and S silently lacked them.
//!
//! The full disk is the process's file-size limit (`RLIMIT_FSIZE`): a spill write past it fails
//! with EFBIG as a full file system fails with ENOSPC, without root or a small tmpfs. The limit
//! is process-wide, so this binary holds this one test.

use bytes::Bytes;
use colo_blockd::backend::BlockBackend;
use colo_blockd::replica::{Replica, ReplicaConfig};

const BLOCK: usize = 4096;
const IMAGE_BLOCKS: usize = 16;
/// The largest file this process may write: the image fits, the spill file does not grow past.
const FILE_LIMIT: u64 = (IMAGE_BLOCKS * BLOCK) as u64;

fn limit_file_size(bytes: u64) {
    // SAFETY: plain libc calls with valid arguments; SIGXFSZ ignored makes a write past the limit
    // fail with EFBIG instead of killing the process.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let limit = libc::rlimit {
            rlim_cur: bytes,
            rlim_max: libc::RLIM_INFINITY,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
    }
}

#[tokio::test]
async fn a_pvm_write_the_log_cannot_keep_refuses_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("s.raw");
    std::fs::write(&image, vec![b'.'; IMAGE_BLOCKS * BLOCK]).unwrap();
    let r = Replica::open(
        &image,
        ReplicaConfig {
            pvm_memory_budget: BLOCK as u64,
            svm_memory_budget: BLOCK as u64,
        },
    )
    .unwrap();
    limit_file_size(FILE_LIMIT);

    // The log is append-only: rewriting the image twice over spills past the limit.
    let pvm = r.replica_view();
    let (mut kept, mut failed) = (0, 0);
    for i in 0..3 * IMAGE_BLOCKS {
        let offset = ((i % IMAGE_BLOCKS) * BLOCK) as u64;
        match pvm
            .write_at(offset, Bytes::from(vec![b'p'; BLOCK]), false)
            .await
        {
            Ok(()) => kept += 1,
            Err(_) => failed += 1,
        }
    }
    assert!(kept > 0 && failed > 0, "kept {kept}, failed {failed}");

    r.svm_epoch_closed().await;
    let err = r.checkpoint_adopted().await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("{failed} write(s) of the primary's epoch")),
        "{msg}"
    );
    assert!(msg.contains("refusing to adopt"), "{msg}");
    // Nothing of the epoch reached S.
    r.settle().await.unwrap();
    assert!(std::fs::read(&image).unwrap().iter().all(|&b| b == b'.'));
    // Still refused on a second try: the lost writes are not forgotten.
    r.svm_epoch_closed().await;
    assert!(r.checkpoint_adopted().await.is_err());

    // A failover drops the log (the SVM keeps its own state): nothing is refused any more.
    r.failover().await.unwrap();
    let svm = r.svm_view();
    svm.write_at(0, Bytes::from(vec![b's'; BLOCK]), false)
        .await
        .unwrap();
    assert_eq!(
        &svm.read_at(0, BLOCK as u32).await.unwrap()[..],
        &[b's'; BLOCK][..]
    );
}
