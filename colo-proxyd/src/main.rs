//! colo-proxyd: compares the primary's and the secondary's network output on the reassembled
//! TCP stream and releases only what both produced.
//!
//! The pure comparison core (frame codec, packet parsing, stream comparator) is the library
//! of this crate; the daemon around it (sockets, epochs, QMP) is not written yet (issue 4),
//! and the binary says so when run instead of pretending.

use clap::Parser;

/// colo-proxyd is not implemented yet; see issue 4. Today QEMU's colo-compare does this job.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {}

fn main() -> anyhow::Result<()> {
    Args::parse();
    anyhow::bail!(
        "colo-proxyd is not implemented yet (issue 4); the stock pair uses QEMU's colo-compare"
    )
}
