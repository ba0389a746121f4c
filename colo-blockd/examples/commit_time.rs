//! Measures how long `checkpoint_adopted` takes to commit a 10 MB PVM log
//! (the paper's log buffer, the default budget): the acknowledgement
//! latency (what the primary's pause waits for: the journal, up to the
//! commit point) and the steps after it (writing S, in the background),
//! next to one plain overwrite + `fdatasync` of 10 MB on the same file
//! system: the floor any durable commit pays. Prints, asserts nothing.
//!
//! ```text
//! cargo run --release -p colo-blockd --example commit_time [DIR]
//! ```
//!
//! DIR (default: the current directory) must be on the file system to
//! measure; /tmp may be a tmpfs, where fsync costs nothing.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use colo_blockd::backend::BlockBackend;
use colo_blockd::replica::{DEFAULT_MEMORY_BUDGET, Replica, ReplicaConfig};

const IMAGE_SIZE: u64 = 256 << 20;
const ROUNDS: usize = 7;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let dir_arg = std::env::args().nth(1).unwrap_or_else(|| ".".to_owned());
    let dir = tempfile::tempdir_in(&dir_arg)?;
    let image = dir.path().join("disk.raw");
    // A fully allocated image (like `qemu-img create -o preallocation=full`):
    // committing into holes of a sparse one would time block allocation too.
    let f = File::create(&image)?;
    let chunk = vec![0u8; 1 << 20];
    for at in (0..IMAGE_SIZE).step_by(chunk.len()) {
        f.write_all_at(&chunk, at)?;
    }
    f.sync_all()?;
    println!(
        "10 MB log = {DEFAULT_MEMORY_BUDGET} bytes, image {IMAGE_SIZE} bytes in {dir_arg}, {ROUNDS} rounds each (min / median / max):"
    );

    let floor = rounds(|| plain_write_and_sync(dir.path()));
    report("overwrite 10 MB + fdatasync (floor)", &floor);

    let replica = Replica::open(&image, ReplicaConfig::default())?;
    for block in [4096u64, 65536] {
        let (mut ack, mut journal, mut image, mut invalidate) = (vec![], vec![], vec![], vec![]);
        for round in 0..ROUNDS {
            fill_log(&replica, block, round as u64).await?;
            let start = Instant::now();
            replica.svm_epoch_closed().await;
            replica.checkpoint_adopted().await?;
            ack.push(start.elapsed());
            replica.settle().await?;
            let t = replica.stats()?.last_commit.expect("a commit ran");
            journal.push(t.journal);
            image.push(t.image);
            invalidate.push(t.invalidate);
        }
        let kib = block / 1024;
        report(&format!("{kib} KiB writes: checkpoint_adopted"), &ack);
        report("  of which journal + 2 fdatasync", &journal);
        report("  then, in the background: write S + sync", &image);
        report("  then: invalidate journal + fdatasync", &invalidate);
    }
    Ok(())
}

/// Fills the PVM log with exactly the memory budget, in `block`-sized
/// writes at scattered offsets (a multiplicative walk over the image's
/// blocks, so no write overlaps another of the same round).
async fn fill_log(replica: &Replica, block: u64, round: u64) -> std::io::Result<()> {
    let view = replica.replica_view();
    let blocks = IMAGE_SIZE / block;
    let data = Bytes::from(vec![round as u8 + 1; block as usize]);
    for i in 0..DEFAULT_MEMORY_BUDGET / block {
        let at = (i * 2_654_435_761 + round * 7919) % blocks * block;
        view.write_at(at, data.clone(), false).await?;
    }
    Ok(())
}

/// Overwrites 10 MB of an allocated file and syncs it, like the journal
/// does once it has reached its size.
fn plain_write_and_sync(dir: &Path) -> Duration {
    let path = dir.join("floor");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .expect("open");
    let data = vec![7u8; DEFAULT_MEMORY_BUDGET as usize];
    if f.metadata().expect("metadata").len() == 0 {
        f.write_all_at(&data, 0).expect("allocate");
        f.sync_all().expect("sync");
    }
    let start = Instant::now();
    f.write_all_at(&data, 0).expect("write");
    f.sync_data().expect("fdatasync");
    start.elapsed()
}

fn rounds(mut f: impl FnMut() -> Duration) -> Vec<Duration> {
    (0..ROUNDS).map(|_| f()).collect()
}

fn report(what: &str, times: &[Duration]) {
    let mut t = times.to_vec();
    t.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "  {what:<42} {:8.2} / {:8.2} / {:8.2} ms",
        ms(t[0]),
        ms(t[t.len() / 2]),
        ms(t[t.len() - 1])
    );
}
