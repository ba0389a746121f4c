//! Property: the replica behaves like a plain in-memory model of three
//! byte arrays (S, S + PVM log, S + SVM overlay) under random interleavings
//! of PVM and SVM writes, zeroing, reads of both views, checkpoints,
//! failover and crash-restarts, including crashes at any file operation of
//! a commit (after which S must be exactly the old or the new checkpoint).
//! Reads after a checkpoint usually run while the committed log is still
//! being written into S in the background.

mod common;

use std::io;
use std::path::Path;

use bytes::Bytes;
use colo_blockd::backend::BlockBackend;
use colo_blockd::proto::ZeroMode;
use colo_blockd::replica::{Recovery, Replica, ReplicaConfig};
use proptest::prelude::*;

const SIZE: u64 = 16 * 1024;
/// Small budgets so that most cases spill.
const CONFIG: ReplicaConfig = ReplicaConfig {
    pvm_memory_budget: 3000,
    svm_memory_budget: 2000,
};
const ZERO: ZeroMode = ZeroMode {
    may_trim: true,
    fast_only: false,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vm {
    Pvm,
    Svm,
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        vm: Vm,
        offset: u64,
        len: u64,
        fill: u8,
    },
    Zero {
        vm: Vm,
        offset: u64,
        len: u64,
        trim: bool,
    },
    Read {
        vm: Vm,
        offset: u64,
        len: u64,
    },
    /// `svm-epoch-closed` then `checkpoint-adopted`, maybe crashing after
    /// that many file operations of the commit.
    Checkpoint {
        crash_after: Option<u64>,
    },
    Failover {
        crash_after: Option<u64>,
    },
    /// A crash between commits.
    Restart,
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..SIZE, 1..3000u64).prop_map(|(offset, len)| (offset, len.min(SIZE - offset)))
}

fn vm() -> impl Strategy<Value = Vm> {
    prop_oneof![Just(Vm::Pvm), Just(Vm::Svm)]
}

fn op() -> impl Strategy<Value = Op> {
    let crash = prop::option::weighted(0.5, 0..16u64);
    prop_oneof![
        6 => (vm(), range(), any::<u8>())
            .prop_map(|(vm, (offset, len), fill)| Op::Write { vm, offset, len, fill }),
        2 => (vm(), range(), any::<bool>())
            .prop_map(|(vm, (offset, len), trim)| Op::Zero { vm, offset, len, trim }),
        4 => (vm(), range()).prop_map(|(vm, (offset, len))| Op::Read { vm, offset, len }),
        3 => crash.clone().prop_map(|crash_after| Op::Checkpoint { crash_after }),
        1 => crash.prop_map(|crash_after| Op::Failover { crash_after }),
        1 => Just(Op::Restart),
    ]
}

/// What each view must read.
#[derive(Debug, Clone)]
struct Model {
    s: Vec<u8>,
    pvm_view: Vec<u8>,
    svm_view: Vec<u8>,
    failed_over: bool,
}

impl Model {
    fn new(s: Vec<u8>) -> Model {
        Model {
            pvm_view: s.clone(),
            svm_view: s.clone(),
            s,
            failed_over: false,
        }
    }

    fn view(&mut self, vm: Vm) -> &mut Vec<u8> {
        match vm {
            Vm::Pvm => &mut self.pvm_view,
            Vm::Svm => &mut self.svm_view,
        }
    }

    /// After failover S is the SVM's disk and both views read it.
    fn write(&mut self, vm: Vm, offset: u64, data: &[u8]) {
        let r = offset as usize..offset as usize + data.len();
        if self.failed_over {
            for v in [&mut self.s, &mut self.pvm_view, &mut self.svm_view] {
                v[r.clone()].copy_from_slice(data);
            }
        } else {
            self.view(vm)[r].copy_from_slice(data);
        }
    }
}

fn pattern(len: u64, fill: u8) -> Vec<u8> {
    (0..len)
        .map(|i| fill.wrapping_add((i % 251) as u8))
        .collect()
}

fn view(r: &Replica, vm: Vm) -> colo_blockd::replica::ReplicaView {
    match vm {
        Vm::Pvm => r.replica_view(),
        Vm::Svm => r.svm_view(),
    }
}

async fn whole_disk(r: &Replica) -> Vec<u8> {
    r.svm_view().read_at(0, SIZE as u32).await.unwrap().to_vec()
}

/// Drops the crashed replica, reopens the image and checks that S is one of
/// the two checkpoints the interrupted commit was between.
async fn crash_restart(
    replica: Replica,
    image: &Path,
    old: &[u8],
    new: &[u8],
) -> Result<(Replica, Model), TestCaseError> {
    drop(replica);
    let r = common::reopen(image, CONFIG).await;
    let s = whole_disk(&r).await;
    prop_assert!(s == old || s == new, "S is a mix of two checkpoints");
    match r.recovery() {
        Recovery::Replayed => prop_assert!(s == new),
        Recovery::Discarded => prop_assert!(s == old),
        Recovery::Clean => {}
    }
    Ok((r, Model::new(s)))
}

async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let initial = pattern(SIZE, 0x40);
    std::fs::write(&image, &initial).unwrap();
    let mut r = Replica::open(&image, CONFIG).unwrap();
    let mut m = Model::new(initial);

    for op in ops {
        match op {
            Op::Write {
                vm,
                offset,
                len,
                fill,
            } => {
                let data = pattern(len, fill);
                let res = view(&r, vm)
                    .write_at(offset, Bytes::from(data.clone()), false)
                    .await;
                if m.failed_over && vm == Vm::Pvm {
                    prop_assert_eq!(res.unwrap_err().kind(), io::ErrorKind::PermissionDenied);
                } else {
                    res.unwrap();
                    m.write(vm, offset, &data);
                }
            }
            Op::Zero {
                vm,
                offset,
                len,
                trim,
            } => {
                let v = view(&r, vm);
                let res = if trim {
                    v.trim(offset, len as u32, false).await
                } else {
                    v.write_zeroes(offset, len as u32, false, ZERO).await
                };
                if m.failed_over && vm == Vm::Pvm {
                    prop_assert!(res.is_err());
                } else {
                    res.unwrap();
                    m.write(vm, offset, &vec![0; len as usize]);
                }
            }
            Op::Read { vm, offset, len } => {
                let got = view(&r, vm).read_at(offset, len as u32).await.unwrap();
                let want = &m.view(vm)[offset as usize..(offset + len) as usize];
                prop_assert_eq!(&got[..], want, "{:?} read at {}", vm, offset);
            }
            Op::Checkpoint { crash_after } => {
                r.svm_epoch_closed().await;
                if let Some(n) = crash_after {
                    // The crash is for this commit, not the previous one
                    // still being written into S.
                    r.settle().await.unwrap();
                    r.inject_crash_after(n).unwrap();
                }
                // Without a crash, S is left being written in the
                // background, and the next ops read through that.
                let mut result = r.checkpoint_adopted().await.map(drop);
                if result.is_ok() && crash_after.is_some() {
                    result = r.settle().await;
                }
                match result {
                    Ok(()) => {
                        prop_assert!(!m.failed_over);
                        m = Model::new(m.pvm_view.clone());
                    }
                    Err(_) if m.failed_over => {}
                    Err(_) => {
                        prop_assert!(crash_after.is_some());
                        (r, m) = crash_restart(r, &image, &m.s, &m.pvm_view).await?;
                    }
                }
            }
            Op::Failover { crash_after } => {
                if let Some(n) = crash_after {
                    r.settle().await.unwrap();
                    r.inject_crash_after(n).unwrap();
                }
                match r.failover().await {
                    Ok(()) => {
                        if !m.failed_over {
                            m = Model::new(m.svm_view.clone());
                            m.failed_over = true;
                        }
                    }
                    Err(_) => {
                        prop_assert!(crash_after.is_some() && !m.failed_over);
                        (r, m) = crash_restart(r, &image, &m.s, &m.svm_view).await?;
                    }
                }
            }
            Op::Restart => {
                // A kill -9 would also stop the background writing of S;
                // the crash cases above cover that.
                r.settle().await.unwrap();
                drop(r);
                r = common::reopen(&image, CONFIG).await;
                prop_assert_eq!(r.recovery(), Recovery::Clean);
                prop_assert!(whole_disk(&r).await == m.s, "restart changed S");
                // A failover is final: the restarted replica still writes S directly.
                let failed_over = m.failed_over;
                m = Model::new(m.s);
                m.failed_over = failed_over;
                prop_assert_eq!(r.stats().unwrap().failed_over, failed_over);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn replica_matches_the_model(ops in prop::collection::vec(op(), 1..60)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run(ops))?;
    }
}
